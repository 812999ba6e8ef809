"""
train.py's checkpoint, out_dir/ckpt.pt, which sample.py, visualize.py, compare.py and bench.py read,
and the model files it names (model_<name>.py, found by available_models and load_model_module).

ckpt.pt is one dict of plain data (tensors, numbers, strings), so torch.load(weights_only=True)
reads it and a checkpoint can never run code:

    model_name     which model_<name>.py
    model_config   that file's Config, as a dict
    model          the model's state_dict
    optimizer      the optimizer's state_dict (AdamW's moments: a resumed run continues them)
    train_config   train.py's TrainConfig, as a dict
    tokenizer      the dataset's tokenizer descriptor (tokenizer.py): sample.py decodes with it
    iter_num, best_val_loss, train_time, tokens_seen   where the run stands (PROGRESS)
"""
import dataclasses
import glob
import importlib
import os
from contextlib import nullcontext

import torch

from cli import UserError
from tokenizer import upgrade

PROGRESS = ("iter_num", "best_val_loss", "train_time", "tokens_seen")
KEYS = ("model_name", "model_config", "model", "optimizer", "train_config", "tokenizer", *PROGRESS)


def available_models():
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(os.path.basename(p)[6:-3] for p in glob.glob(os.path.join(here, "model_*.py")))


def load_model_module(name):
    if name not in available_models():
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(available_models())}")
    return importlib.import_module(f"model_{name}")


def save_checkpoint(path, cfg, model, optimizer, tokenizer, iter_num, best_val_loss, train_time, tokens_seen,
                    model_state=None, optimizer_state=None):
    """Write the checkpoint (KEYS) through a temporary file and a rename: a crash or a full disk never
    leaves a half-written ckpt.pt, and the previous one stays intact. model_state and optimizer_state,
    when given, are written instead of the model's and optimizer's own state_dict(): train.py's whole
    states gathered from the shards of a model trained with FSDP."""
    ckpt = {"model_name": cfg.model, "model_config": dataclasses.asdict(model.config),
            "model": model.state_dict() if model_state is None else model_state,
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "train_config": dataclasses.asdict(cfg), "tokenizer": tokenizer,
            "iter_num": iter_num, "best_val_loss": best_val_loss, "train_time": train_time, "tokens_seen": tokens_seen}
    tmp = path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch.save reports a write that stopped short (disk full, quota, file-size limit) as a
        # RuntimeError ("unexpected pos ..."), without the errno
        why = e.strerror or e if isinstance(e, OSError) else f"the write stopped short: {str(e).splitlines()[0][:80]}"
        remove_tmp(tmp)
        kept = f"the previous {path} is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"could not write {path}: {why} (disk full, quota or file-size limit? read-only?); "
                        f"{kept}; free some space or choose another --out_dir") from None
    except BaseException:  # Ctrl-C while saving: no half-written file is left to be mistaken for one
        remove_tmp(tmp)
        raise


def remove_tmp(tmp):
    try:
        os.remove(tmp)
    except OSError:  # never written, or the folder refuses even that
        pass


def load_checkpoint(path, device="cpu"):
    """The checkpoint at path, with its tensors on device; a missing, broken or foreign file is a one-line error."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py --model=...) "
                        f"or point --out_dir at the folder holding ckpt.pt")
    try:  # weights_only: a checkpoint is data (tensors, numbers, strings), never code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__}); delete it and "
                        f"train again") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in KEYS):
        other = " (it looks like nanoGPT's)" if isinstance(ckpt, dict) and "model_args" in ckpt else ""
        raise UserError(f"{path} was not written by this repo's train.py{other}; train a model with "
                        f"train.py, or point --out_dir at one of its checkpoints")
    ckpt["tokenizer"] = upgrade(ckpt["tokenizer"])  # as an older train.py may have saved it
    return ckpt


def model_from_checkpoint(ckpt, path, weights=True):
    """The checkpoint's model with its weights loaded (on the checkpoint's device), after checking that
    its config and weights fit the model file and that every weight is finite. weights=False: the
    model's shape only, on the meta device (to count its parameters and FLOPs)."""
    module = load_model_module(ckpt["model_name"])
    hint = f"was {path} written by another version of model_{ckpt['model_name']}.py?"
    try:
        with nullcontext() if weights else torch.device("meta"):
            model = module.Model(module.Config(**ckpt["model_config"]))
    except (TypeError, ValueError) as e:  # TypeError: a config field this file does not know
        raise UserError(f"the checkpoint's model config does not fit ({str(e).splitlines()[0]}); {hint}") from None
    if not weights:
        return model
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"the checkpoint's weights do not fit ({str(e).splitlines()[0][:200]}); {hint}") from None
    if not all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()):
        raise UserError(f"{path} holds NaN or infinite weights; train again from an earlier checkpoint "
                        f"or from scratch with a lower --learning_rate")
    return model
