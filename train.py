"""
Train any model_<name>.py of this repo. nanoGPT's training loop, for every architecture.

    python train.py --model=gpt                                   # the laptop recipe, CPU friendly
    python train.py --model=mod --max_iters=500 --learning_rate=2e-3
    python train.py --model=gpt --preset=gpt2-124m --dataset=shakespeare --batch_size=8
    python train.py --model=gpt --init_from=resume                # continue out-gpt/ckpt.pt
    python train.py --model=mod --init_from=hf:Qwen/Qwen2.5-0.5B --dataset=shakespeare_qwen  # fine-tune (pretrained.py)
    python train.py --model=dawn --init_from=dawn_39m_weights.pt --dataset=shakespeare_bert  # DAWN's published weights
    torchrun --standalone --nproc_per_node=8 train.py --model=dtf --gradient_accumulation_steps=8

Options are --key=value: the training settings in TrainConfig below, or any field of the model's
Config (python train.py --model=NAME --help lists both). Defaults reproduce nanoGPT's laptop recipe
on tiny Shakespeare (batch 12, block 64, 2000 iterations, lr 1e-3 with warmup and cosine decay).
Writes out_dir/ckpt.pt (everything needed to resume exactly or to sample) and out_dir/log.jsonl
(one JSON object per logged iteration and per evaluation, for plots).
"""
import dataclasses
import glob
import importlib
import json
import math
import os
import resource
import sys
import time
import typing
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import pretrained
from cli import UserError, option_pairs, parse_options, parse_value
from prepare_data import get_tokenizer, prepare, read_tokens


@dataclass
class TrainConfig:
    model: str = "gpt"               # trains model_<model>.py
    preset: str = ""                 # a name from that file's PRESETS (paper-size shapes)
    dataset: str = "shakespeare_char"  # a folder of data_dir written by prepare_data.py
    data_dir: str = "data"
    out_dir: str = ""                # default: out-<model>
    init_from: str = "scratch"       # "scratch", "resume" (from out_dir/ckpt.pt) or "hf:OWNER/NAME" (Qwen2 or Doge weights)
                                     # or, with --model=dawn, a DAWN reference checkpoint file (dawn_39m_weights.pt)
    overwrite: bool = False          # True: a new run may replace the ckpt.pt already in out_dir
    # iterations, evaluation, logging
    max_iters: int = 2000
    eval_interval: int = 250         # evaluate and save a checkpoint every this many iterations
    eval_iters: int = 20             # batches per split in each evaluation
    log_interval: int = 10
    # batch: tokens per iteration = gradient_accumulation_steps * batch_size * block_size
    batch_size: int = 12
    gradient_accumulation_steps: int = 1  # summed over all processes under torchrun
    # AdamW and the learning-rate schedule: linear warmup, cosine decay to min_lr
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = -1         # -1: decay over max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0           # 0 disables clipping
    # system
    device: str = "auto"             # auto: cuda, then mps, then cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bfloat16 on CUDA when supported, else float16 on CUDA, float32 elsewhere
    compile: Literal["auto", True, False] = "auto"  # auto: True on CUDA, False on CPU (the first compile costs about what a 2000-iteration run saves) and MPS; a failed compile trains the eager model
    seed: int = 1337


# -----------------------------------------------------------------------------
# options

def available_models():
    here = os.path.dirname(os.path.abspath(__file__))
    return sorted(os.path.basename(p)[6:-3] for p in glob.glob(os.path.join(here, "model_*.py")))


def load_model_module(name):
    if name not in available_models():
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(available_models())}")
    return importlib.import_module(f"model_{name}")


def parse_args(argv):
    """--key=value arguments -> (TrainConfig, {model field: value}, keys given on the command line).
    The options are TrainConfig's fields and those of the chosen model's Config."""
    given = option_pairs(argv)
    module = load_model_module(given.get("model", TrainConfig.model))
    name = module.__name__[len("model_"):]
    doc = f"{__doc__.strip()}\n\npresets ({name}): {', '.join(module.PRESETS)}"
    cfg, model_cfg = parse_options(argv, TrainConfig(), module.Config(), doc=doc,
                                   titles=("training options", f"model options (model_{name}.py Config)"))
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_overrides = {k: getattr(model_cfg, k) for k in given if hasattr(model_cfg, k) and k not in train_keys}
    if cfg.preset and cfg.preset not in module.PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r} for {cfg.model}; choose one of {', '.join(module.PRESETS)}")
    if pretrained.is_dawn_checkpoint(cfg.init_from) and cfg.model != "dawn":
        raise UserError(f"--init_from={cfg.init_from}: choose scratch, resume or hf:OWNER/NAME "
                        f"(a checkpoint file loads only with --model=dawn: DAWN's reference weights)")
    for key in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                "gradient_accumulation_steps"):
        if getattr(cfg, key) <= 0 and not (key == "max_iters" and cfg.max_iters == 0):
            raise UserError(f"--{key} must be positive")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if not 0 <= getattr(cfg, key) < float("inf"):  # also catches nan
            raise UserError(f"--{key}={getattr(cfg, key)}: must be a finite number >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be in [0, 1), e.g. 0.9 or 0.99")
    cfg.out_dir = cfg.out_dir or f"out-{cfg.model}"
    return cfg, model_overrides, set(given)


# -----------------------------------------------------------------------------
# data: random windows of block_size + 1 tokens from the memory-mapped token files

def prepare_hint(cfg):
    """A command that prepares cfg.dataset: prepare_data.py's own name, or any local text under that name."""
    from prepare_data import DATASETS
    where = "" if cfg.data_dir == "data" else f" --data_dir={cfg.data_dir}"
    if cfg.dataset in DATASETS:
        return f"python prepare_data.py {cfg.dataset}{where}"
    return (f"python prepare_data.py shakespeare_char --input=YOUR_TEXT.txt --name={cfg.dataset}{where} "
            f"(prepare_data.py knows: {', '.join(DATASETS)})")


def load_split(cfg, split):
    """All token files of a split: data/<dataset>/<split>.bin, or <split>_000.bin, ... for sharded sets."""
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    paths = sorted(glob.glob(os.path.join(folder, f"{split}_*.bin"))) or \
        glob.glob(os.path.join(folder, f"{split}.bin"))
    if not paths:
        raise UserError(f"no {split} data in {folder}; prepare it with: {prepare_hint(cfg)}")
    return [read_tokens(p) for p in paths]


def load_meta(cfg):
    path = os.path.join(cfg.data_dir, cfg.dataset, "meta.json")
    if not os.path.exists(path):
        if cfg.dataset == "shakespeare_char":  # the default dataset prepares itself on first use
            prepare("shakespeare_char", cfg.data_dir)
        else:
            raise UserError(f"dataset {cfg.dataset!r} is not prepared ({path} is missing); run: "
                            f"{prepare_hint(cfg)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        get_tokenizer(meta["tokenizer"])
        if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] <= 0:
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, UserError):
        raise UserError(f"{path} is corrupt; prepare the dataset again: {prepare_hint(cfg)}") from None
    return meta


def get_batch(shards, batch_size, block_size, generator, device):
    """batch_size windows drawn uniformly over all shards' valid start positions."""
    starts = torch.tensor([len(s) - block_size - 1 for s in shards])  # valid starts per shard
    if (starts <= 0).any():
        raise UserError(f"a token file holds fewer than block_size + 2 = {block_size + 2} tokens")
    offsets = torch.randint(int(starts.sum()), (batch_size,), generator=generator)
    ends = starts.cumsum(0)
    which = torch.searchsorted(ends, offsets, right=True)
    rows = []
    for shard, offset in zip(which.tolist(), offsets.tolist()):
        i = offset - (int(ends[shard]) - int(starts[shard]))
        rows.append(torch.from_numpy(shards[shard][i:i + block_size + 1].astype(np.int64)))
    xy = torch.stack(rows)
    x, y = xy[:, :-1], xy[:, 1:]
    if device.type == "cuda":  # pinned memory lets the copy overlap with compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


# -----------------------------------------------------------------------------
# helpers for the loop

def get_lr(cfg, it):
    """Linear warmup, then cosine decay from learning_rate to min_lr, then min_lr."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters < 0 else cfg.lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def configure_optimizer(model, cfg, device):
    """AdamW with nanoGPT's rule: weight decay on tensors of 2 or more dimensions (matmul weights and
    embeddings), none on gains, biases and scalars. A parameter with an `lr_mult` attribute gets its
    own group whose learning rate is scaled by it, through warmup and decay alike."""
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (p.dim() >= 2, getattr(p, "lr_mult", 1.0))
            groups.setdefault(key, []).append(p)
    param_groups = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_mult": mult}
                    for (decay, mult), ps in sorted(groups.items())]
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type in ("cuda", "cpu"))  # one kernel for all parameters


# bf16 dense peak FLOP/s of common GPUs, for MFU (the first name that appears in the device name wins)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
              "4090": 165e12, "A10G": 70e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def peak_memory_mb(device):
    """Peak memory of this process: the CUDA allocator's high-water mark, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def pick_device(name="auto", dtype="auto", local_rank=0):
    """(device, dtype name) for the options --device and --dtype."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device={name}: use auto, cpu, mps, cuda or cuda:N") from None
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if (device.type == "cuda" and not torch.cuda.is_available()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        raise UserError(f"--device={name}, but this machine has no {device.type} device; use --device=cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if dtype == "auto":
        dtype = "float32" if device.type != "cuda" else \
            "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return device, dtype


def save_checkpoint(path, ckpt):
    """Write through a temporary file and a rename: a crash or a full disk never leaves a half-written
    ckpt.pt, and the previous one stays intact."""
    tmp = path + ".tmp"
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = f"the previous {path} is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"could not write {path}: {e.strerror or e} (disk full? read-only?); {kept}; "
                        f"free some space or choose another --out_dir") from None


CHECKPOINT_KEYS = ("model_name", "model_config", "model", "optimizer", "iter_num", "best_val_loss",
                   "train_config", "train_time", "tokens_seen", "tokenizer")


def load_checkpoint(path, device="cpu"):
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train one first (python train.py --model=...) "
                        f"or point --out_dir at the folder holding ckpt.pt")
    try:  # weights_only: a checkpoint is data (tensors, numbers, strings), never code
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__}); delete it and "
                        f"train again") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in CHECKPOINT_KEYS):
        other = " (it looks like nanoGPT's)" if isinstance(ckpt, dict) and "model_args" in ckpt else ""
        raise UserError(f"{path} was not written by this repo's train.py{other}; train a model with "
                        f"train.py, or point --out_dir at one of its checkpoints")
    return ckpt


def model_from_checkpoint(ckpt, path):
    """The checkpoint's model with its weights loaded (on the checkpoint's device), after checking that
    its config and weights fit the model file and that every weight is finite."""
    module = load_model_module(ckpt["model_name"])
    hint = f"was {path} written by another version of model_{ckpt['model_name']}.py?"
    try:
        model = module.Model(module.Config(**ckpt["model_config"]))
    except (TypeError, ValueError) as e:  # TypeError: a config field this file does not know
        raise UserError(f"the checkpoint's model config does not fit ({str(e).splitlines()[0]}); {hint}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"the checkpoint's weights do not fit ({str(e).splitlines()[0][:200]}); {hint}") from None
    if not all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()):
        raise UserError(f"{path} holds NaN or infinite weights; train again from an earlier checkpoint "
                        f"or from scratch with a lower --learning_rate")
    return model


def format_duration(seconds):
    """1h02m, 1m23s or 7s."""
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# -----------------------------------------------------------------------------

def acquire_lock(out_dir):
    """out_dir/train.lock holding this process's id, created atomically: a second training on the same
    out_dir stops with an error. A lock whose process has died (killed, machine rebooted) is taken over."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "train.lock")
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
                if pid > 0:
                    os.kill(pid, 0)  # raises if no such process
                    raise UserError(f"another training (process {pid}) is using {out_dir}; wait for it, "
                                    f"stop it, or choose another --out_dir")
            except (ProcessLookupError, ValueError, FileNotFoundError):
                pass  # stale: its process is gone (or it was just removed)
            except PermissionError:  # the process exists but belongs to another user
                raise UserError(f"another training (process {pid}) is using {out_dir}; "
                                f"choose another --out_dir") from None
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    raise UserError(f"could not take the lock {path}; remove it if no training is running")


def main(argv):
    cfg, model_overrides, given = parse_args(argv)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun the first process holds the lock
        return train(cfg, model_overrides, given)
    lock = acquire_lock(cfg.out_dir)
    try:
        return train(cfg, model_overrides, given)
    except KeyboardInterrupt:
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.exists(ckpt_path):
            sys.exit(f"\ntrain.py: interrupted before the first checkpoint; nothing was saved in {cfg.out_dir}")
        sys.exit(f"\ntrain.py: interrupted; {ckpt_path} is intact, resume with: "
                 f"python train.py --model={cfg.model} --out_dir={cfg.out_dir} --init_from=resume")
    finally:
        os.remove(lock)


def train(cfg, model_overrides, given):
    """Train with the options parse_args returned; returns the trained model (not the DDP wrapper).
    The steps are the functions below, in the order they run."""
    device, dtype = setup_processes(cfg)
    cfg, model, optimizer, progress, tokenizer = build_or_resume(cfg, model_overrides, given, device)
    train_loop(cfg, model, optimizer, progress, tokenizer, device, dtype)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


def setup_processes(cfg):
    """(device, dtype name) of this process. Under torchrun (it sets RANK) there is one process per
    GPU or CPU worker, joined in a process group for DDP; rank 0 evaluates, logs and saves."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device, dtype = pick_device(cfg.device, cfg.dtype, int(os.environ["LOCAL_RANK"]) if ddp else 0)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if cfg.gradient_accumulation_steps % dist.get_world_size():
            raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a "
                            f"multiple of the {dist.get_world_size()} processes")
    return device, dtype


PROGRESS_KEYS = ("iter_num", "best_val_loss", "train_time", "tokens_seen")  # where a run stands


def build_or_resume(cfg, model_overrides, given, device):
    """(cfg, model, optimizer, progress, tokenizer): a new model, one with pretrained weights
    (--init_from=hf:...) or the checkpoint's (--init_from=resume), with its optimizer; progress
    holds PROGRESS_KEYS, where the run starts.
    The model config is the file's laptop defaults, then the preset, then the command line; on
    resume everything comes from the checkpoint (training options given on the command line still
    apply, so cfg may change)."""
    module = load_model_module(cfg.model)
    ddp = dist.is_initialized()
    master = not ddp or dist.get_rank() == 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.init_from != "resume" and os.path.exists(ckpt_path) and not cfg.overwrite:  # scratch or hf:
        raise UserError(f"{cfg.out_dir} already holds a checkpoint; continue it with --init_from=resume, "
                        f"train into another --out_dir, or replace it with --overwrite=True")
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["model_name"] != cfg.model:
            raise UserError(f"{ckpt_path} holds a {ckpt['model_name']} model, not {cfg.model}")
        if model_overrides or "preset" in given:
            raise UserError("a resumed run keeps the checkpoint's model config; drop the model options")
        saved = ckpt["train_config"]
        # the saved options are typed as if given again (an older train.py saved --compile as the string "True")
        types = typing.get_type_hints(TrainConfig)
        cfg = TrainConfig(**{**{k: parse_value(k, str(v), types[k]) for k, v in saved.items() if k in types},
                             **{k: getattr(cfg, k) for k in given if hasattr(cfg, k)}})
    meta = load_meta(cfg)
    hf_repo = cfg.init_from[3:] if cfg.init_from.startswith("hf:") else None
    dawn_file = cfg.init_from if ckpt is None and pretrained.is_dawn_checkpoint(cfg.init_from) else None
    if ckpt is not None:
        if ckpt["tokenizer"] != meta["tokenizer"]:
            raise UserError(f"{ckpt_path} was trained on {saved['dataset']!r} with another tokenizer than "
                            f"{cfg.data_dir}/{cfg.dataset}'s; resume on the checkpoint's dataset "
                            f"(--dataset={saved['dataset']}) or train a new run into another --out_dir")
        model = model_from_checkpoint(ckpt, ckpt_path).to(device)
        model_config = model.config
    elif hf_repo:  # the checkpoint fixes the shapes; the dataset must speak its tokenizer
        if "preset" in given:
            raise UserError("--init_from=hf:... takes the model's shape from the checkpoint; drop --preset")
        if ddp and not master:
            dist.barrier()  # rank 0 downloads first (one writer per cache file); the others then reuse its files
        model_config = module.Config(**pretrained.model_fields(hf_repo, model_overrides, meta["vocab_size"], cfg.model))
        if not pretrained.same_tokenizer(meta["tokenizer"], pretrained.tokenizer_descriptor(hf_repo)):
            raise UserError(f"dataset {cfg.dataset} was not tokenized with hf:{hf_repo}'s tokenizer; prepare it "
                            f"with: python prepare_data.py shakespeare --tokenizer=hf:{hf_repo} --name=NAME")
        if ddp and master:
            dist.barrier()
    elif dawn_file:  # DAWN's reference weights (pretrained.py): they fix the shapes and the tokenizer
        if "preset" in given:
            raise UserError("--init_from=FILE takes the model's shape from the checkpoint; drop --preset")
        dawn_config, dawn_state = pretrained.read_dawn_checkpoint(dawn_file)
        model_config = module.Config(**pretrained.dawn_model_fields(dawn_file, dawn_config, dawn_state,
                                                                    model_overrides, meta["vocab_size"]))
        pretrained.check_dawn_tokenizer(meta["tokenizer"], model_config.vocab_size, cfg.dataset)
    else:
        fields = {**(module.PRESETS[cfg.preset] if cfg.preset else {}), **model_overrides}
        vocab_size = max(meta["vocab_size"], fields.get("vocab_size", 0))  # larger = padding, allowed
        model_config = module.Config(**{**fields, "vocab_size": vocab_size})
    if model_config.block_size <= 0:
        raise UserError(f"--block_size={model_config.block_size}: must be positive")

    if ckpt is None:
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        try:
            model = module.Model(model_config).to(device)
        except ValueError as e:
            raise UserError(f"bad {cfg.model} config: {e}") from None
        if hf_repo and master:  # one download; DDP copies rank 0's weights to the other processes
            fresh = pretrained.load_weights(model, cfg.model, hf_repo)
            print(f"loaded hf:{hf_repo}" + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
        if dawn_file and master:
            pretrained.load_dawn_weights(model, dawn_file, dawn_state)
            print(f"loaded {dawn_file}")
    optimizer = configure_optimizer(model, cfg, device)
    progress = {"iter_num": 0, "best_val_loss": float("inf"), "train_time": 0.0, "tokens_seen": 0}
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        progress = {k: ckpt[k] for k in PROGRESS_KEYS}
    return cfg, model, optimizer, progress, meta["tokenizer"]


def train_loop(cfg, model, optimizer, progress, tokenizer, device, dtype):
    """Train from progress to cfg.max_iters: every iteration forward, backward, clip and step;
    every log_interval a log line; every eval_interval (and at the end) an evaluation and a checkpoint."""
    ddp = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    accum_steps = cfg.gradient_accumulation_steps // world_size  # micro-steps of this process
    block_size = model.config.block_size
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * block_size
    train_data, val_data = load_split(cfg, "train"), load_split(cfg, "val")
    iter_num, best_val_loss, train_time, tokens_seen = (progress[k] for k in PROGRESS_KEYS)

    autocast, scaler = setup_precision(device, dtype)
    raw_model = model
    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    if use_compile:
        model = compile_or_eager(model, train_data, cfg.batch_size, block_size, device, autocast)
        use_compile = model is not raw_model  # False when compiling failed and the eager model trains
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model

    def batch(split_data, step, process=rank):
        """Micro-batch `step` of a process. Every random draw is a pure function of (seed, process,
        step): a resumed run sees exactly the batches the uninterrupted run would have seen, and
        there is no generator state to save. Evaluation uses process -1: the same tokens each time."""
        rng = torch.Generator().manual_seed((cfg.seed * 1000 + process + 1) * 2**32 + step)
        return get_batch(split_data, cfg.batch_size, block_size, rng, device)

    flops_per_token = raw_model.flops_per_token()  # a function of the config: computed once
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{cfg.model}: {n_params:,} parameters, {flops_per_token / 1e6:.2f} MFLOP/token; "
              f"{tokens_per_iter:,} tokens/iter; {device} {dtype}{', compiled' if use_compile else ''}"
              f"{f', {world_size} processes' if ddp else ''}")
    peak = peak_flops(device)
    start_iter, start_time = iter_num, train_time
    x, y = batch(train_data, iter_num * accum_steps)
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    if master and cfg.init_from != "resume" and os.path.exists(log_path):
        os.remove(log_path)  # training really starts: a new run starts a new log; a resumed run appends
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # any non-finite loss since the last check

    def check_finite(losses=()):
        """Stop before anything is saved when a loss was nan or inf (read on log and eval steps only:
        .item() waits for the GPU)."""
        if nonfinite.item() or not all(math.isfinite(v) for v in losses):
            kept = f"the last checkpoint {ckpt_path} is intact" if os.path.exists(ckpt_path) else \
                "no checkpoint was written"
            raise UserError(f"the loss became nan or inf by iteration {iter_num}; {kept}; lower "
                            f"--learning_rate (now {cfg.learning_rate:g}) or set --grad_clip")

    t0, logged_time, logged_iter = time.time(), train_time, iter_num
    while True:
        # evaluate, log and save (every eval_interval iterations and at the end)
        if master and (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters):
            train_time += time.time() - t0
            losses = evaluate(model, {"train": train_data, "val": val_data}, batch, cfg.eval_iters, autocast)
            check_finite(losses.values())
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            best_val_loss = min(best_val_loss, losses["val"])
            log_jsonl(log_path, {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                 "time": train_time, "tokens": tokens_seen})
            # a resumed run's first evaluation is its checkpoint's; --max_iters=0 saves the model as
            # built or loaded (e.g. pretrained weights converted for sample.py)
            if iter_num > start_iter or (cfg.max_iters == 0 and cfg.init_from != "resume"):
                save_checkpoint(ckpt_path, {
                    "model_name": cfg.model, "model_config": dataclasses.asdict(raw_model.config),
                    "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                    "iter_num": iter_num, "best_val_loss": best_val_loss, "train_config": dataclasses.asdict(cfg),
                    "train_time": train_time, "tokens_seen": tokens_seen, "tokenizer": tokenizer})
            t0 = time.time()  # evaluation is not training time
        if iter_num >= cfg.max_iters:
            break

        # one optimisation step: accumulate gradients over micro-batches, clip, step
        lr = get_lr(cfg, iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        torch.manual_seed((cfg.seed * 1000 + 500 + rank) * 2**32 + iter_num)  # dropout: a function of the step too
        for micro_step in range(accum_steps):
            if ddp:  # all-reduce the gradients only after the last micro-batch
                train_model.require_backward_grad_sync = micro_step == accum_steps - 1
            with autocast:
                _, loss = train_model(x, y)
                loss = loss / accum_steps
            nonfinite |= ~torch.isfinite(loss.detach())
            x, y = batch(train_data, iter_num * accum_steps + micro_step + 1)  # prefetch the next one
            scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter

        if master and iter_num % cfg.log_interval == 0:
            check_finite()
            loss_value = loss.item() * accum_steps  # .item() waits for the GPU: only on log steps
            train_time += time.time() - t0
            t0 = time.time()
            dt = (train_time - logged_time) / (iter_num - logged_iter)
            logged_time, logged_iter = train_time, iter_num
            record = {"iter": iter_num, "loss": loss_value, "lr": lr, "ms": dt * 1000,
                      "tok_s": tokens_per_iter / dt, "time": train_time, "tokens": tokens_seen,
                      "peak_mem_mb": peak_memory_mb(device)}
            eta = (train_time - start_time) / (iter_num - start_iter) * (cfg.max_iters - iter_num)
            line = (f"iter {iter_num}: {iter_num}/{cfg.max_iters}, loss {loss_value:.4f}, {dt * 1000:.1f}ms, "
                    f"{tokens_per_iter / dt:,.0f} tok/s, eta {format_duration(eta)}")
            if peak:
                record["mfu"] = flops_per_token * tokens_per_iter / dt / (peak * world_size)
                line += f", mfu {record['mfu']:.1%}"
            stats = raw_model.stats()
            print(line + "".join(f", {k} {v:.3g}" for k, v in stats.items()))
            log_jsonl(log_path, {**stats, **record})

    if master:
        print(f"done: best val loss {best_val_loss:.4f}; peak memory {peak_memory_mb(device):,.0f} MiB. "
              f"Sample with: python sample.py --out_dir={cfg.out_dir}")


def setup_precision(device, dtype):
    """(autocast, GradScaler): autocast to bf16/fp16 on CUDA (fp16 needs loss scaling); TF32 matmuls."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=ptdtype)
    return autocast, torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def evaluate(model, splits, batch, eval_iters, autocast):
    """Mean eval-mode loss over eval_iters fixed batches (process -1) of each split (the same for every model)."""
    model.eval()
    out = {}
    for split, data in splits.items():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = batch(data, k, process=-1)
            with torch.no_grad(), autocast:
                losses[k] = model(x, y)[1].item()
        out[split] = losses.mean().item()
    model.train()
    return out


def compile_or_eager(model, train_data, batch_size, block_size, device, autocast):
    """torch.compile the model and run one training forward/backward to trigger compilation; if
    that fails (no compiler, unsupported op), warn and train the eager model instead."""
    compiled = torch.compile(model)
    x, y = get_batch(train_data, batch_size, block_size, torch.Generator().manual_seed(0), device)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the probe step may move buffers
    try:
        with autocast:
            compiled(x, y)[1].backward()
    except Exception as e:
        warnings.warn(f"torch.compile failed ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                      f"training the eager model")
        compiled = model
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return compiled


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:  # during the start, before main's own handler
        sys.exit("\ntrain.py: interrupted")
