"""
train.py's settings: TrainConfig (every training option with its default), parse_args (the command
line, checked before any data is touched), fit_schedule (a run's schedule fitted to its length, for
--flops_budget and compare.py's --time_budget) and configure_optimizer (the AdamW those settings
describe).
They live here, not in train.py, because compare.py checks every run's options before training any,
and bench.py times the optimizer train.py steps: both read them without importing the script.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

import pretrained
from checkpoint import load_model_module
from cli import UserError, option_pairs, parse_options
from hub import check_repo


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
    flops_budget: float = 0.0        # > 0: train this many FLOPs (the model's flops_per_token() x tokens) instead
                                     # of max_iters, with warmup and decay fitted to end there (fit_schedule)
    eval_interval: int = 0           # evaluate and save a checkpoint every this many iterations; 0: max_iters / 8
                                     # (rounded up), so every run has the same 9 or 10 evaluation points
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
    fsdp: bool = False               # under torchrun: shard weights, gradients and AdamW's moments over the
                                     # processes (FSDP2) instead of a full copy on each (DDP); one process ignores it


def parse_args(argv, doc=""):
    """--key=value arguments -> (TrainConfig, {model field: value}, keys given on the command line, init).
    The options are TrainConfig's fields and those of the chosen model's Config; --help prints doc
    and both. init is what --init_from names: "scratch", "resume", "hf" (hf:OWNER/NAME) or "file" (a
    DAWN checkpoint), known to exist or to be well formed before any data work."""
    given = option_pairs(argv)
    module = load_model_module(given.get("model", TrainConfig.model))
    name = module.__name__[len("model_"):]
    doc = f"{doc.strip()}\n\npresets ({name}): {', '.join(module.PRESETS)}"
    cfg, model_cfg = parse_options(argv, TrainConfig(), module.Config(), doc=doc,
                                   titles=("training options", f"model options (model_{name}.py Config)"))
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    model_overrides = {k: getattr(model_cfg, k) for k in given if hasattr(model_cfg, k) and k not in train_keys}
    if cfg.preset and cfg.preset not in module.PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r} for {cfg.model}; choose one of {', '.join(module.PRESETS)}")
    if model_overrides.get("block_size", 1) <= 0:
        raise UserError(f"--block_size={model_overrides['block_size']}: must be positive")
    for key in ("max_iters", "eval_interval", "eval_iters", "log_interval", "batch_size",
                "gradient_accumulation_steps"):
        if getattr(cfg, key) <= 0 and not (key in ("max_iters", "eval_interval") and getattr(cfg, key) == 0):
            raise UserError(f"--{key} must be positive")
    if cfg.flops_budget and {"max_iters", "lr_decay_iters"} & set(given):
        raise UserError("--flops_budget sets max_iters and lr_decay_iters; drop those")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "flops_budget"):
        if not 0 <= getattr(cfg, key) < float("inf"):  # also catches nan
            raise UserError(f"--{key}={getattr(cfg, key)}: must be a finite number >= 0")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"--{key}={getattr(cfg, key)}: must be in [0, 1), e.g. 0.9 or 0.99")

    # --init_from, classified once
    if cfg.init_from in ("scratch", "resume"):
        init = cfg.init_from
    elif cfg.init_from.startswith("hf:"):
        check_repo(cfg.init_from[3:])
        init = "hf"
    elif cfg.model == "dawn":  # DAWN's reference weights (pretrained.py)
        pretrained.check_dawn_file(cfg.init_from)
        init = "file"
    else:
        raise UserError(f"--init_from={cfg.init_from}: choose scratch, resume or hf:OWNER/NAME "
                        f"(a checkpoint file loads only with --model=dawn: DAWN's reference weights)")
    if init == "resume" and (model_overrides or "preset" in given):
        raise UserError("a resumed run keeps the checkpoint's model config; drop the model options")
    if init in ("hf", "file") and "preset" in given:
        raise UserError(f"--init_from={'hf:...' if init == 'hf' else 'FILE'} takes the model's shape from the "
                        f"checkpoint; drop --preset")
    if init != "resume":  # a resumed run's rates are the checkpoint's, merged in train.py
        check_schedule(cfg)
    cfg.out_dir = cfg.out_dir or f"out-{cfg.model}"
    return cfg, model_overrides, set(given), init


def check_schedule(cfg):
    """The cosine decays from learning_rate down to min_lr: a min_lr above learning_rate would instead
    raise the rate while "decaying" (to twice the rate asked for, with the default min_lr and 5e-5).
    An error rather than clamping min_lr with a warning: a clamp trains a schedule nobody asked for
    (and a warning scrolls away in a long run), while the fix is one option on the same line."""
    if cfg.min_lr > cfg.learning_rate:
        raise UserError(f"--learning_rate={cfg.learning_rate:g} is below --min_lr={cfg.min_lr:g}, where the cosine "
                        f"decay ends; give --min_lr={cfg.learning_rate / 10:g} (a tenth of it, the defaults' ratio) or less")


EVALS_PER_RUN = 8  # eval_interval 0: an evaluation every ceil(max_iters / 8) iterations, plus the last


def eval_interval(cfg):
    return cfg.eval_interval or max(1, math.ceil(cfg.max_iters / EVALS_PER_RUN))


def fit_schedule(cfg, max_iters):
    """cfg for a run of max_iters iterations whose schedule ends with it: warmup shortened to at most
    a tenth of the run (a 20-iteration run gets 2, not 100), and the cosine decay reaching min_lr at
    the last iteration taken (max_iters - 1), so that runs of any length end their schedule alike."""
    return dataclasses.replace(cfg, max_iters=max_iters, warmup_iters=min(cfg.warmup_iters, max_iters // 10),
                               lr_decay_iters=max(max_iters - 1, 0))


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
