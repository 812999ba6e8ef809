"""
Train any model_<name>.py of this repo. nanoGPT's training loop, for every architecture.

    python train.py --model=gpt                                   # the laptop recipe, CPU friendly
    python train.py --model=mod --max_iters=500 --learning_rate=2e-3
    python train.py --model=mod --flops_budget=3e12                # the iterations 3e12 FLOPs buy, schedule fitted
    python train.py --model=gpt --preset=gpt2-124m --dataset=shakespeare --batch_size=8
    python train.py --model=gpt --init_from=resume                # continue out-gpt/ckpt.pt
    python train.py --model=mod --init_from=hf:Qwen/Qwen2.5-0.5B --dataset=shakespeare_qwen  # fine-tune (pretrained.py)
    python train.py --model=dawn --init_from=dawn_39m_weights.pt --dataset=shakespeare_bert  # DAWN's published weights
    torchrun --standalone --nproc_per_node=8 train.py --model=dtf --gradient_accumulation_steps=8
    torchrun --standalone --nproc_per_node=8 train.py --model=mod --init_from=hf:Qwen/Qwen2.5-3B --fsdp=True ...

Options are --key=value: the training settings in TrainConfig below, or any field of the model's
Config (python train.py --model=NAME --help lists both). Defaults reproduce nanoGPT's laptop recipe
on tiny Shakespeare (batch 12, block 64, 2000 iterations, lr 1e-3 with warmup and cosine decay).
Writes out_dir/ckpt.pt (everything needed to resume exactly or to sample) and out_dir/log.jsonl
(one JSON object per logged iteration and per evaluation, for plots).
A masked dataset (prepare_data.py mqar) trains on whole sequences with --block_size=its seq_len, its
targets ignored except at the answers, and its evaluations report recall accuracy too (val_acc).
"""
import glob
import hashlib
import json
import math
import os
import resource
import sys
import time
import typing
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import pretrained
import sharding
from checkpoint import PROGRESS, load_checkpoint, load_model_module, model_from_checkpoint, save_checkpoint
from cli import UserError, parse_value
from device import autocast, peak_flops, pick_device
from prepare_data import DATASETS, prepare, read_tokens
from tokenizer import get_tokenizer, upgrade
from train_config import TrainConfig, check_schedule, configure_optimizer, eval_interval, fit_schedule, parse_args

# The file reads top to bottom: the settings (TrainConfig and parse_args, in train_config.py because
# compare.py and bench.py read them too), the setup, the helpers of the loop, the loop, and at the
# end main, which runs them in that order.


# -----------------------------------------------------------------------------
# setup: processes and device, the lock on out_dir, the data, the model and its optimizer

def setup_processes(cfg):
    """(device, dtype name) of this process. Under torchrun (it sets RANK) there is one process per
    GPU or CPU worker, joined in a process group for DDP or FSDP; rank 0 logs and saves."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    device, dtype = pick_device(cfg.device, cfg.dtype, int(os.environ["LOCAL_RANK"]) if ddp else 0)
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device, dtype


def process_alive(pid):
    """Whether process pid still runs. os.kill(pid, 0) also succeeds for a zombie (a process that has
    exited but was not reaped: e.g. a killed child whose parent exited, re-parented to a PID 1 that
    reaps no one), so on Linux its state in /proc decides."""
    os.kill(pid, 0)  # raises ProcessLookupError when there is no such process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # the state follows "(command name)"
    except (OSError, IndexError):  # no /proc (macOS): trust os.kill
        return True


def acquire_lock(out_dir):
    """out_dir/train.lock holding this process's id, created atomically: a second training on the same
    out_dir stops with an error. A lock whose process has died (killed, machine rebooted) is taken over."""
    path = os.path.join(out_dir, "train.lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:  # e.g. inside a read-only folder
        raise UserError(f"cannot create --out_dir={out_dir}: {e.strerror}; choose an --out_dir in a folder you "
                        f"can write to") from None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
                if pid > 0 and process_alive(pid):
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
        except OSError as e:  # a read-only out_dir
            raise UserError(f"cannot write in --out_dir={out_dir}: {e.strerror}; choose an --out_dir you can write "
                            f"to") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    raise UserError(f"could not take the lock {path}; remove it if no training is running")


# the data: the token files and meta.json that prepare_data.py wrote

def prepare_hint(cfg):
    """A command that prepares cfg.dataset: prepare_data.py's own name, or any local text under that name."""
    where = "" if cfg.data_dir == "data" else f" --data_dir={cfg.data_dir}"
    if cfg.dataset in DATASETS:
        return f"python prepare_data.py {cfg.dataset}{where}"
    return (f"python prepare_data.py shakespeare_char --input=YOUR_TEXT.txt --name={cfg.dataset}{where} "
            f"(prepare_data.py knows: {', '.join(DATASETS)})")


def load_split(cfg, split, block_size, meta):
    """All token files of a split: data/<dataset>/<split>.bin, or <split>_000.bin, ... for sharded sets.
    Each must hold a window of block_size + 1 tokens with at least two places to start (get_batch):
    checked here, at start-up, rather than at the first batch after a long evaluation.
    A masked dataset's split is (tokens, answers) instead, its whole sequences for get_sequences."""
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    if meta.get("masked"):
        if block_size != meta["seq_len"]:
            raise UserError(f"block_size={block_size} does not fit {folder}: a training example is one whole sequence "
                            f"of {meta['seq_len']} tokens; give --block_size={meta['seq_len']}")
        tokens = read_tokens(os.path.join(folder, f"{split}.bin"))
        answers = read_tokens(os.path.join(folder, f"{split}.answers.bin"))
        if len(tokens) != len(answers) or not tokens.size or len(tokens) % (block_size + 1):
            raise UserError(f"{folder}/{split}.bin and {split}.answers.bin are not whole sequences of "
                            f"{block_size + 1} tokens each; prepare the dataset again: {prepare_hint(cfg)}")
        return tokens, answers
    paths = sorted(glob.glob(os.path.join(folder, f"{split}_*.bin"))) or \
        glob.glob(os.path.join(folder, f"{split}.bin"))
    if not paths:
        raise UserError(f"no {split} data in {folder}; prepare it with: {prepare_hint(cfg)}")
    shards = [read_tokens(p) for p in paths]
    n, path = min((len(s), p) for s, p in zip(shards, paths))
    if n < block_size + 2:
        fix = f"use --block_size={n - 2} or less, or prepare more text" if n > 2 else "prepare more text"
        raise UserError(f"block_size={block_size} is too long for the {split} split: {path} holds {n:,} tokens, and "
                        f"training needs block_size + 2; {fix}")
    return shards


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
        meta["tokenizer"] = upgrade(meta["tokenizer"])  # as an older prepare_data.py may have written it
        get_tokenizer(meta["tokenizer"])
        if not isinstance(meta["vocab_size"], int) or meta["vocab_size"] <= 0:
            raise ValueError
        if meta.get("masked") and (not isinstance(meta["seq_len"], int) or meta["seq_len"] <= 0):
            raise ValueError
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError, UserError):
        raise UserError(f"{path} is corrupt; prepare the dataset again: {prepare_hint(cfg)}") from None
    return meta


def build_or_resume(cfg, model_overrides, given, init, device, dtype):
    """(cfg, model, optimizer, progress, meta): a new model (init "scratch"), one with pretrained
    weights ("hf", "file": pretrained.py) or the checkpoint's ("resume"), with its optimizer; progress
    holds checkpoint.PROGRESS, where the run starts; meta, the dataset's meta.json. Under torchrun with
    --fsdp=True the model is sharded (shard) before its optimizer is made, so that AdamW's moments are
    sharded too.
    The model config is the file's laptop defaults, then the preset, then the command line; on
    resume everything comes from the checkpoint (training options given on the command line still
    apply, so cfg may change)."""
    module = load_model_module(cfg.model)
    ddp = dist.is_initialized()
    master = not ddp or dist.get_rank() == 0
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if init != "resume" and os.path.exists(ckpt_path) and not cfg.overwrite:
        raise UserError(f"{cfg.out_dir} already holds a checkpoint; continue it with --init_from=resume, "
                        f"train into another --out_dir, or replace it with --overwrite=True")
    if init == "resume":
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["model_name"] != cfg.model:
            raise UserError(f"{ckpt_path} holds a {ckpt['model_name']} model, not {cfg.model}")
        saved = ckpt["train_config"]
        # the saved options are typed as if given again (an older train.py saved --compile as the string "True")
        types = typing.get_type_hints(TrainConfig)
        cfg = TrainConfig(**{**{k: parse_value(k, str(v), types[k]) for k, v in saved.items() if k in types},
                             **{k: getattr(cfg, k) for k in given if hasattr(cfg, k)}})
        check_schedule(cfg)
    # checked once cfg is final: a resumed run's gradient_accumulation_steps is the checkpoint's, unless given
    if ddp and cfg.gradient_accumulation_steps % dist.get_world_size():
        raise UserError(f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a "
                        f"multiple of the {dist.get_world_size()} processes")
    meta = load_meta(cfg)

    if init == "resume":
        if ckpt["tokenizer"] != meta["tokenizer"]:
            raise UserError(f"{ckpt_path} was trained on {saved['dataset']!r} with another tokenizer than "
                            f"{cfg.data_dir}/{cfg.dataset}'s; resume on the checkpoint's dataset "
                            f"(--dataset={saved['dataset']}) or train a new run into another --out_dir")
        model = model_from_checkpoint(ckpt, ckpt_path)
    else:
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        try:
            if init == "scratch":
                fields = {**(module.PRESETS[cfg.preset] if cfg.preset else {}), **model_overrides}
                vocab_size = max(meta["vocab_size"], fields.get("vocab_size", 0))  # larger = padding, allowed
                model = module.Model(module.Config(**{**fields, "vocab_size": vocab_size}))
            else:  # the checkpoint fixes the shapes; the dataset must speak its tokenizer
                if ddp and not master:
                    dist.barrier()  # rank 0 downloads first (one writer per cache file); the others reuse its files
                # DDP copies rank 0's weights to the others; FSDP does not, so there every process loads them
                model = pretrained.from_pretrained(cfg, model_overrides, meta, weights=master or cfg.fsdp)
                if ddp and master:
                    dist.barrier()
        except ValueError as e:
            raise UserError(f"bad {cfg.model} config: {e}") from None
    model = model.to(device)
    fsdp = ddp and cfg.fsdp
    if fsdp:  # every process holds the whole model here (built from the same seed, or loaded): each keeps its shard
        model = sharding.shard(model, device, dtype)
    optimizer = configure_optimizer(model, cfg, device)
    progress = {"iter_num": 0, "best_val_loss": float("inf"), "train_time": 0.0, "tokens_seen": 0}
    if init == "resume":
        if fsdp:
            sharding.load_sharded_optimizer(model, optimizer, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        progress = {k: ckpt[k] for k in PROGRESS}
    return cfg, model, optimizer, progress, meta


# FSDP: the model sharded over the processes, and its checkpoint gathered into today's one file

# -----------------------------------------------------------------------------
# helpers of the loop

def derived_seed(*parts):
    """A seed that is a pure function of `parts` (the run's seed, a purpose, a process, a step).
    torch's CPU generator (mt19937) keeps only the low 32 bits of its seed, so packing the parts into
    higher bits would give every seed and process the same stream: hash them instead. Any integer
    --seed works, a date or a Unix time included."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def get_batch(shards, batch_size, block_size, generator, device):
    """batch_size random windows of block_size + 1 tokens, drawn uniformly over all shards' valid
    start positions: (inputs, targets shifted by one). load_split made sure every shard has some."""
    starts = torch.tensor([len(s) - block_size - 1 for s in shards])  # valid starts per shard
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


def get_sequences(split, batch_size, block_size, generator, device):
    """A masked dataset's batch: batch_size random whole sequences of block_size + 1 tokens (one never
    straddles two), (inputs, targets shifted by one); a target that is no answer is -1, which every
    model's cross-entropy ignores (ignore_index=-1), in training and evaluation alike."""
    tokens, answers = split
    rows = torch.randint(len(tokens) // (block_size + 1), (batch_size,), generator=generator) * (block_size + 1)
    xy = torch.stack([torch.from_numpy(tokens[i:i + block_size + 1].astype(np.int64)) for i in rows.tolist()])
    scored = torch.stack([torch.from_numpy(answers[i + 1:i + block_size + 1].astype(bool)) for i in rows.tolist()])
    x, y = xy[:, :-1], xy[:, 1:].masked_fill(~scored, -1)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.contiguous().to(device), y.contiguous().to(device)


def get_lr(cfg, it):
    """Linear warmup, then cosine decay from learning_rate to min_lr, then min_lr."""
    decay_iters = cfg.max_iters if cfg.lr_decay_iters < 0 else cfg.lr_decay_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def setup_precision(device, dtype):
    """(autocast, GradScaler): autocast to bf16/fp16 on CUDA (fp16 needs loss scaling); TF32 matmuls."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return autocast(device, dtype), torch.amp.GradScaler(device.type, enabled=dtype == "float16")


def compile_or_eager(model, x, y, amp):
    """torch.compile the model and run one training forward/backward on the batch (x, y) to trigger
    compilation; if that fails (no compiler, unsupported op), warn and train the eager model instead."""
    compiled = torch.compile(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # the probe step may move buffers
    try:
        with amp:
            compiled(x, y)[1].backward()
    except Exception as e:
        warnings.warn(f"torch.compile failed ({e.__class__.__name__}: {str(e).splitlines()[0][:200]}); "
                      f"training the eager model")
        compiled = model
    model.zero_grad(set_to_none=True)
    model.load_state_dict(state)
    return compiled


def evaluate(model, splits, batch, eval_iters, amp, token_bytes, accuracy=False):
    """Mean eval-mode loss over eval_iters fixed batches (process -1) of each split (the same for every
    model), in nats per token, and in bits per byte: the summed token losses over ln 2 times the UTF-8
    bytes the target tokens stand for (token_bytes[id]), which compares models across tokenizers. For
    one-byte tokens (ASCII characters) it is loss / ln 2 exactly.
    Targets -1 are ignored (a masked dataset's non-answers): 0 loss, 0 bytes. With accuracy (masked
    datasets), also the fraction of scored targets whose argmax logit is right: MQAR's recall accuracy."""
    model.eval()
    out = {}
    for split, data in splits.items():
        losses, n_targets, n_bytes, n_right = torch.zeros(eval_iters), 0, 0, 0
        for k in range(eval_iters):
            x, y = batch(data, k, process=-1)
            with torch.no_grad(), amp:
                logits, loss = model(x, y)
            losses[k] = loss.item()
            scored = y != -1
            n_targets += scored.sum().item()
            n_bytes += token_bytes[y[scored]].sum().item()
            if accuracy:
                n_right += (logits.argmax(-1) == y)[scored].sum().item()
        out[split] = losses.mean().item()
        # summed nats = mean x targets (every batch scores as many: text all y.numel() of its tokens, MQAR
        # num_queries per sequence), written so the ratio is 1.0 exactly when every token is one byte
        out[f"{split}_bpb"] = out[split] / math.log(2) * (n_targets / n_bytes)
        if accuracy:
            out[f"{split}_acc"] = n_right / n_targets
    model.train()
    return out


def peak_memory_mb(device):
    """Peak memory of this process: the CUDA allocator's high-water mark, else the peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def format_duration(seconds):
    """1h02m, 1m23s or 7s."""
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def log_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(path, iter_num):
    """A resumed run continues its checkpoint's log: the records of iterations after iter_num (which an
    interrupted run logged after its last checkpoint, and the resumed run logs again) are dropped, so
    the log equals the uninterrupted run's. Returns whether the log holds the evaluation at iter_num."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short when the run was killed
            continue
        if isinstance(record, dict) and record.get("iter", 0) <= iter_num:
            kept.append(record)
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(path + ".tmp", path)
    return any("val_loss" in r and r.get("iter") == iter_num for r in kept)


# -----------------------------------------------------------------------------
# the loop

def train_loop(cfg, model, optimizer, progress, meta, device, dtype):
    """Train from progress to cfg.max_iters: every iteration forward, backward, clip and step;
    every log_interval (and at the end) a log line; every eval_interval (and at the end) an evaluation
    and a checkpoint."""
    ddp = dist.is_initialized()
    fsdp = ddp and cfg.fsdp  # build_or_resume sharded the model
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0
    accum_steps = cfg.gradient_accumulation_steps // world_size  # micro-steps of this process
    block_size = model.config.block_size
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * block_size
    train_data, val_data = load_split(cfg, "train", block_size, meta), load_split(cfg, "val", block_size, meta)
    masked, tokenizer = meta.get("masked", False), meta["tokenizer"]
    iter_num, best_val_loss, train_time, tokens_seen = (progress[k] for k in PROGRESS)

    amp, scaler = setup_precision(device, dtype)

    def batch(split_data, step, process=0):
        """Micro-batch `step`. Every random draw is a pure function of (seed, process, step): a resumed
        run sees exactly the batches the uninterrupted run would have seen, and there is no generator
        state to save. Evaluation uses process -1: the same tokens each time."""
        rng = torch.Generator().manual_seed(derived_seed(cfg.seed, "batch", process, step))
        return (get_sequences if masked else get_batch)(split_data, cfg.batch_size, block_size, rng, device)

    raw_model = model
    use_compile = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")
    if use_compile:
        model = compile_or_eager(model, *batch(train_data, 0, process=-2), amp)  # a batch no run trains on
        use_compile = model is not raw_model  # False when compiling failed and the eager model trains
    train_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if ddp and not fsdp else model
    whole = [p for p in raw_model.parameters() if not isinstance(p, DTensor)] if fsdp else []  # shard() left them

    def micro_batch(it, micro_step):
        """This process's micro-batch micro_step (accum_steps of them: past the last, the next
        iteration's first) of iteration it. Iteration it trains on micro-batches it*G ... it*G + G-1
        of one sequence (G = gradient_accumulation_steps), process r on its accum_steps consecutive
        ones from it*G + r*accum_steps: the same global batch for any number of processes, so that
        one process and G processes train alike, and a run resumes with another number of them."""
        it, micro_step = it + micro_step // accum_steps, micro_step % accum_steps
        return batch(train_data, it * cfg.gradient_accumulation_steps + rank * accum_steps + micro_step)

    flops_per_token = raw_model.flops_per_token()  # a function of the config: computed once
    if cfg.flops_budget:  # the nearest whole number of iterations, its schedule ending there
        cfg = fit_schedule(cfg, max(1, round(cfg.flops_budget / (flops_per_token * tokens_per_iter))))
    token_bytes = torch.zeros(raw_model.config.vocab_size, dtype=torch.long)  # rows past the tokenizer's: 0
    lengths = get_tokenizer(tokenizer).token_bytes()
    token_bytes[:len(lengths)] = torch.tensor(lengths)
    token_bytes = token_bytes.to(device)
    if master:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{cfg.model}: {n_params:,} parameters, {flops_per_token / 1e6:.2f} MFLOP/token; "
              f"{tokens_per_iter:,} tokens/iter; {device} {dtype}{', compiled' if use_compile else ''}"
              f"{f', {world_size} processes' if ddp else ''}{' (FSDP)' if fsdp else ''}")
        if cfg.flops_budget:
            print(f"--flops_budget={cfg.flops_budget:g}: {cfg.max_iters:,} iterations, "
                  f"{cfg.max_iters * tokens_per_iter * flops_per_token:.4g} FLOPs; warmup {cfg.warmup_iters}, "
                  f"cosine decay to --min_lr={cfg.min_lr:g} at iteration {cfg.lr_decay_iters}")
    peak = peak_flops(device)
    start_iter, start_time = iter_num, train_time
    x, y = micro_batch(iter_num, 0)
    ckpt_path, log_path = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, "log.jsonl")
    evaluated = False  # whether the log holds the evaluation at start_iter (a resumed run's checkpoint's)
    if master and cfg.init_from == "resume":
        evaluated = trim_log(log_path, start_iter)
    elif master and os.path.exists(log_path):
        os.remove(log_path)  # training really starts: a new run starts a new log
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
    every = eval_interval(cfg)
    while True:
        # evaluate, log and save (every eval_interval iterations and at the end); under FSDP every
        # process evaluates and gathers the checkpoint (each holds a shard of the weights), rank 0 alone
        # prints, logs and writes
        if (master or fsdp) and (iter_num % every == 0 or iter_num == cfg.max_iters):
            train_time += time.time() - t0
            losses = evaluate(model, {"train": train_data, "val": val_data}, batch, cfg.eval_iters, amp, token_bytes,
                              accuracy=masked)
            check_finite(losses.values())
            best_val_loss = min(best_val_loss, losses["val"])
            if master:
                print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                      f"val {losses['val_bpb']:.4f} bits/byte" +
                      (f", train acc {losses['train_acc']:.4f}, val acc {losses['val_acc']:.4f}" if masked else ""))
            if master and not (iter_num == start_iter and evaluated):  # (a finished run resumed: not logged twice)
                accuracies = {k: losses[k] for k in ("train_acc", "val_acc") if k in losses}
                log_jsonl(log_path, {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                                     "train_bpb": losses["train_bpb"], "val_bpb": losses["val_bpb"],
                                     **accuracies, "time": train_time, "tokens": tokens_seen})
            # a resumed run's first evaluation is its checkpoint's; --max_iters=0 saves the model as
            # built or loaded (e.g. pretrained weights converted for sample.py)
            if iter_num > start_iter or (cfg.max_iters == 0 and cfg.init_from != "resume"):
                states = sharding.gathered_states(raw_model, optimizer) if fsdp else {}
                if master:
                    save_checkpoint(ckpt_path, cfg, raw_model, optimizer, tokenizer, iter_num=iter_num,
                                    best_val_loss=best_val_loss, train_time=train_time, tokens_seen=tokens_seen,
                                    **states)
            t0 = time.time()  # evaluation is not training time
        if iter_num >= cfg.max_iters:
            break

        # one optimisation step: accumulate gradients over micro-batches, clip, step
        lr = get_lr(cfg, iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        torch.manual_seed(derived_seed(cfg.seed, "dropout", rank, iter_num))  # dropout: a function of the step too
        for micro_step in range(accum_steps):
            last = micro_step == accum_steps - 1  # reduce the gradients over the processes only after the last
            if fsdp:
                raw_model.set_requires_gradient_sync(last)
            elif ddp:
                train_model.require_backward_grad_sync = last
            with amp:
                _, loss = train_model(x, y)
                loss = loss / accum_steps
            nonfinite |= ~torch.isfinite(loss.detach())
            x, y = micro_batch(iter_num, micro_step + 1)  # prefetch the next one
            scaler.scale(loss).backward()
        if whole:  # the parameters FSDP left whole: their gradients averaged over the processes, in one message
            grads = torch.stack([p.grad for p in whole]) / world_size
            dist.all_reduce(grads)
            for p, g in zip(whole, grads):
                p.grad.copy_(g)
        # clipping under FSDP: clip_grad_norm_ reduces the sharded gradients' norms over the processes
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_seen += tokens_per_iter

        if master and (iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters):
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


# -----------------------------------------------------------------------------

def train(cfg, model_overrides, given, init):
    """The setup, then the loop; returns the trained model (not the DDP wrapper; under FSDP, sharded)."""
    device, dtype = setup_processes(cfg)
    cfg, model, optimizer, progress, meta = build_or_resume(cfg, model_overrides, given, init, device, dtype)
    train_loop(cfg, model, optimizer, progress, meta, device, dtype)
    if dist.is_initialized():
        dist.destroy_process_group()
    return model


def main(argv):
    """The settings, then training, holding the lock on out_dir and saying on Ctrl-C what was kept."""
    cfg, model_overrides, given, init = parse_args(argv, __doc__)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun the first process holds the lock
        return train(cfg, model_overrides, given, init)
    lock = acquire_lock(cfg.out_dir)
    try:
        return train(cfg, model_overrides, given, init)
    except KeyboardInterrupt:
        ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
        if not os.path.exists(ckpt_path):
            sys.exit(f"\ntrain.py: interrupted before the first checkpoint; nothing was saved in {cfg.out_dir}")
        sys.exit(f"\ntrain.py: interrupted; {ckpt_path} is intact, resume with: "
                 f"python train.py --model={cfg.model} --out_dir={cfg.out_dir} --init_from=resume")
    finally:
        os.remove(lock)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:  # during the start, before main's own handler
        sys.exit("\ntrain.py: interrupted")
