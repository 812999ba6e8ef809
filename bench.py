"""
Benchmark training or generation speed of model files on the current device (a benchmark, not a test).

    python bench.py --model=gpt,mod,dtf                      # laptop configs, batch 12 x block 64
    python bench.py --model=gpt --preset=gpt2-124m --block_size=1024 --batch_size=16 --compile=True
    python bench.py --model=gpt,mod --compile=both             # each eager and torch.compile'd, in the same rounds
    python bench.py --model=gpt,mod,dtf --mode=generate --new_tokens=512   # block_size 16 + 512
    python bench.py --model=gpt,mod --mode=generate --new_tokens=1008       # block_size 1024
    python bench.py --mode=generate --checkpoints=compare/gpt/lr0.001-seed1337,compare/mod/lr0.001-seed1337
    python bench.py --model=doge --is_moe=True                 # any other --key=value sets a Config field
    python bench.py --mode=tokenize --text=data/shakespeare_char/input.txt   # prepare_data.py c4's tokenizer
    python bench.py --mode=gpu                                 # a CUDA GPU: every model at GPT-2 small's shape
    python bench.py --mode=gpu --dry_run=True --compile=False  # the same on CPU at a tiny shape (a test runs it)

mode=train times fwd+bwd+AdamW steps after warm-up and prints ms/step, tokens/s, peak memory (CUDA:
the allocator's high-water mark; CPU: peak RSS growth over the process before the model was built)
and, on a GPU, MFU from the model's flops_per_token(). mode=generate times greedy generation of
new_tokens tokens after a 16-token prompt at block_size 16 + new_tokens (nothing is cropped): with
the cache (sample.py's decoding) and by re-running the full forward for every token (--crop=True),
the two ways alternating every 32 tokens so that both meet the same machine, and checks both produce
the same tokens. With --checkpoints, sample.py's generate() runs each way in full, one after the other.
mode=gpu times every model (or --model) at GPT-2 small's shape (the model's PRESETS["gpt2-124m"], else
model_gpt's gpt2-124m values of the fields its Config has) on random tokens of GPT-2's BPE vocabulary
(50257 ids, the embedding padded to 50304, as C4 is prepared), compiled (--compile, default True
here) in bf16: GPU_STEPS training steps with an evaluation every GPU_EVAL_EVERY, and prints the median
ms/step, tokens/s, MFU, peak memory and the recompilations over those steps (torch._dynamo's
compilation metrics: a compile with a recompile reason). FSDP against DDP is not measured: with one
process neither has anything to shard or reduce. --dry_run=True runs it on CPU at a tiny shape.
mode=tokenize times prepare_data.py's C4 path (gzip JSON lines -> GPT-2 BPE token shard) on a
20 MB file of ~2 KB documents cut from --text, with 1 process and with all cores.
Every measurement runs in a fresh process, models are interleaved over `repeats` rounds and the
median is kept; speeds are also given relative to the first model. Compare models within one run
only, on an otherwise idle machine.
"""
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from checkpoint import load_checkpoint, load_model_module, model_from_checkpoint
from cli import UserError, option_pairs, parse_options
from device import autocast, peak_flops, pick_device
from train_config import TrainConfig, configure_optimizer

@dataclass
class BenchConfig:
    model: str = "gpt"           # one name or a comma-separated list; the first is the reference
    preset: str = ""             # a PRESETS entry of every listed model
    mode: Literal["train", "generate", "tokenize", "gpu"] = "train"
    batch_size: int = 12
    block_size: int = 0          # 0: the config's own (64 at the laptop configs)
    vocab_size: int = 65
    warmup: int = 3              # steps before the timed ones
    steps: int = 20              # timed steps
    repeats: int = 3             # rounds over all models; the median is kept
    new_tokens: int = 512        # generate mode: tokens generated after a 16-token prompt
    checkpoints: str = ""        # generate mode: comma-separated out_dirs of trained runs, timed instead of --model
    device: str = "auto"         # auto: cuda, then mps, then cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # as train.py: bf16 on CUDA when supported, float32 on CPU/MPS
    compile: Literal[False, True, "both"] = False  # time the torch.compile'd model; both: each model eager and compiled
                                                    # (mode=gpu: True unless given)
    dry_run: bool = False        # mode=gpu: on CPU at a tiny shape, a few steps (checks the mode runs)
    peak_flops: float = 0.0      # 0: look the GPU up in device.PEAK_FLOPS
    profile: bool = False        # write a torch.profiler trace bench_trace_<model>.json (train mode)
    text: str = "data/shakespeare_char/input.txt"  # tokenize mode: any UTF-8 text
    worker: bool = False         # (used by bench.py itself) one measurement in this process, as a JSON line


def build(opts, model_args, name, device):
    """The model `name` as benchmarked: preset, then model_args (--key=value fields of its Config)."""
    module = load_model_module(name)
    config, unknown = parse_options(model_args, module.Config(), rest=True)
    if unknown:
        raise UserError(f"{unknown[0]} is neither a bench.py option nor a field of model_{name}.Config")
    overrides = {key: getattr(config, key) for key in option_pairs(model_args)}
    if opts.mode == "gpu":
        return build_gpu(opts, module).to(device)
    if opts.preset and opts.preset not in module.PRESETS:
        raise UserError(f"{name} has no preset {opts.preset!r}; it has {', '.join(module.PRESETS)}")
    fields = dict(module.PRESETS[opts.preset]) if opts.preset else {}
    fields.update(overrides)
    fields["vocab_size"] = opts.vocab_size
    if opts.block_size:
        fields["block_size"] = opts.block_size
    if opts.mode == "generate":  # no cropping: the whole text fits in one block
        fields["block_size"] = 16 + opts.new_tokens
    for f in dataclasses.fields(module.Config):
        if "dropout" in f.name:
            fields[f.name] = 0.0  # benchmarks measure the deterministic computation
    torch.manual_seed(0)
    return module.Model(module.Config(**fields)).to(device)


# mode=gpu: GPT-2 small's shape for every model, GPT-2's BPE vocabulary (50257) padded to 50304;
# (training steps, an evaluation every so many)
GPU_STEPS, GPU_VOCAB = (50, 10), (50257, 50304)
DRY_RUN = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, intermediate_size=64, block_size=32)  # --dry_run=True
DRY_RUN_STEPS = (4, 2)


def build_gpu(opts, module):
    """module's model at GPT-2 small's shape: its PRESETS["gpt2-124m"], else model_gpt's gpt2-124m values
    of the fields its Config has (one rule for every model); --dry_run: DRY_RUN's values instead."""
    from model_gpt import PRESETS as GPT_PRESETS
    shape = DRY_RUN if opts.dry_run else module.PRESETS.get("gpt2-124m", GPT_PRESETS["gpt2-124m"])
    names = {f.name for f in dataclasses.fields(module.Config)}
    fields = {k: v for k, v in shape.items() if k in names}
    fields.update(vocab_size=GPU_VOCAB[1], **{k: 0.0 for k in names if "dropout" in k})
    torch.manual_seed(0)
    return module.Model(module.Config(**fields))


def recompiles():
    """How many compilations torch._dynamo made for a frame it had compiled before (a guard failed)."""
    from torch._dynamo.utils import get_compilation_metrics
    return sum(1 for m in get_compilation_metrics() if m.recompile_reason)


def rss_mb(field):
    """VmRSS (current) or VmHWM (peak) of this process in MiB, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure_train(opts, model_args, name, device, dtype):
    base_rss = rss_mb("VmRSS") if device.type == "cpu" and os.path.exists("/proc/self/status") else None
    model = build(opts, model_args, name, device).train()
    optimizer = configure_optimizer(model, TrainConfig(), device)
    step_model = torch.compile(model) if opts.compile is True else model
    B, T, V = opts.batch_size, model.config.block_size, model.config.vocab_size
    x, y = torch.randint(0, V, (B, T), device=device), torch.randint(0, V, (B, T), device=device)
    amp = autocast(device, dtype)

    def step():
        with amp:
            loss = step_model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    t0 = time.perf_counter()
    for _ in range(opts.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(opts.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / opts.steps
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mem = rss_mb("VmHWM") - base_rss if base_rss is not None else float("nan")
    if opts.profile:
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(5):
                step()
            sync()
        prof.export_chrome_trace(f"bench_trace_{name}.json")
    return {"ms": dt * 1000, "tok_s": B * T / dt, "peak_mem_mb": peak_mem, "warmup_s": warmup_s,
            "params": sum(p.numel() for p in model.parameters()), "flops_per_token": model.flops_per_token()}


def measure_gpu(opts, model_args, name, device, dtype):
    """mode=gpu: training steps of the (compiled) model with an evaluation every GPU_EVAL_EVERY, as
    train.py runs them; the median step, peak memory and the recompilations over all of them."""
    base_rss = rss_mb("VmRSS") if device.type == "cpu" and os.path.exists("/proc/self/status") else None
    model = build(opts, model_args, name, device).train()
    optimizer = configure_optimizer(model, TrainConfig(), device)
    step_model = torch.compile(model) if opts.compile is True else model
    B, T = opts.batch_size, model.config.block_size
    g = torch.Generator().manual_seed(0)
    x, y, x_val, y_val = (torch.randint(0, GPU_VOCAB[0], (B, T), generator=g).to(device) for _ in range(4))
    amp = autocast(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before, times = recompiles(), []
    steps, eval_every = DRY_RUN_STEPS if opts.dry_run else GPU_STEPS
    for step in range(steps):
        if step % eval_every == eval_every - 1:
            model.eval()  # as train.py's evaluate(): the eval graph is compiled once, at the first
            with torch.no_grad(), amp:
                step_model(x_val, y_val)
            model.train()
        sync()
        t0 = time.perf_counter()
        with amp:
            loss = step_model(x, y)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times[1:])  # the first step compiles
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mem = rss_mb("VmHWM") - base_rss if base_rss is not None else float("nan")
    return {"ms": dt * 1000, "tok_s": B * T / dt, "peak_mem_mb": peak_mem, "recompiles": recompiles() - before,
            "steps": steps, "eval_every": eval_every, "params": sum(p.numel() for p in model.parameters()),
            "flops_per_token": model.flops_per_token(), "shape": f"{model.config.n_layer}x{model.config.n_embd}"}


@torch.no_grad()
def greedy_lockstep(model, prompt, n, chunk=32):
    """Greedy decoding of n tokens after prompt both ways, alternating every `chunk` tokens: the
    next chunk by cached steps (forward_cached, as sample.py decodes while the text fits in
    block_size), then the same positions by a full forward over the whole text per token (as
    sample.py's --crop=True). Each way's seconds are summed separately, so a slow moment of the
    machine (they come and go over seconds on a shared CPU) hits both ways alike, while each way
    still runs many steps in a row, as it would alone (alternating every token slows the cached
    steps, whose small operations then start from caches the full forward has flushed).
    Returns ({way: tokens}, {way: seconds})."""
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    cache = model.init_cache(prompt.size(0))
    text = {"cached": prompt, "forward": prompt}
    seconds = {"cached": 0.0, "forward": 0.0}
    for first in range(0, n, chunk):
        for way in ("cached", "forward"):
            sync()
            t0 = time.perf_counter()
            for i in range(first, min(n, first + chunk)):
                if way == "cached":
                    logits = model.forward_cached(text[way] if i == 0 else text[way][:, -1:], cache)[:, -1]
                else:
                    logits = model(text[way])[0][:, -1]
                text[way] = torch.cat((text[way], logits.argmax(dim=-1, keepdim=True)), dim=1)
            sync()
            seconds[way] += time.perf_counter() - t0
    return text, seconds


def measure_generate(opts, model_args, name, device, dtype):
    """Greedy generation after a 16-token prompt, cached and by re-running the forward. With
    --checkpoints, `name` is a trained run's out_dir: its model, at its block_size, with a prompt from
    its validation text; past block_size the two samplers condition differently (the cache refills from
    the last block_size/2 tokens, the re-run slides its window), so their tokens are not compared."""
    from sample import generate
    if opts.checkpoints:
        from prepare_data import read_tokens
        path = os.path.join(name, "ckpt.pt")
        ckpt = load_checkpoint(path, device)
        model = model_from_checkpoint(ckpt, path).eval()
        cfg = ckpt["train_config"]
        val_path = os.path.join(cfg["data_dir"], cfg["dataset"], "val.bin")
        if not os.path.exists(val_path):  # data_dir is as train.py was given it, maybe relative
            raise UserError(f"{val_path} (the prompt source of {name}) is missing; run bench.py where "
                            f"train.py ran, or prepare {cfg['dataset']} again")
        val = read_tokens(val_path)
        prompt = torch.from_numpy(val[:16].astype(np.int64))[None].to(device)
    else:
        model = build(opts, model_args, name, device).eval()
        prompt = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
        prompt = prompt.to(device)
    result = {"params": sum(p.numel() for p in model.parameters())}
    outputs = {}
    if 16 + opts.new_tokens <= model.config.block_size:
        outputs, seconds = greedy_lockstep(model, prompt, opts.new_tokens)
        result["same_tokens"] = bool(torch.equal(outputs["cached"], outputs["forward"]))
        result.update({f"{way}_tok_s": opts.new_tokens / s for way, s in seconds.items()})
    else:
        for way, crop in (("cached", False), ("forward", True)):  # crop=True: the whole forward per token
            t0 = time.perf_counter()
            outputs[way] = generate(model, prompt, opts.new_tokens, top_k=1, crop=crop)
            result[f"{way}_tok_s"] = opts.new_tokens / (time.perf_counter() - t0)
    if hasattr(model, "stats"):
        model(outputs["cached"][:, -model.config.block_size:])  # the routing of the generated text
        result["stats"] = {k: v for k, v in model.stats().items() if "frac_routed" in k}
    return result


def bench_tokenize(opts):
    import gzip
    import tempfile
    from prepare_data import tokenize_c4_file
    try:
        with open(opts.text, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read --text={opts.text}: {e.strerror}; prepare tiny Shakespeare first "
                        f"(python prepare_data.py shakespeare_char, offline: --input=FILE) or give "
                        f"--text=ANY_UTF8_FILE") from None
    docs = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    with tempfile.TemporaryDirectory() as tmp:
        gz = os.path.join(tmp, "docs.json.gz")
        procs, copies = sorted({1, os.cpu_count()}), 20_000_000 // len(text) + 1
        print(f"{len(docs) * copies:,} documents, {copies * len(text) / 1e6:.0f} MB of text")
        print("| processes | tokens | seconds | tokens/s |\n|---:|---:|---:|---:|")
        with gzip.open(gz, "wt", encoding="utf-8") as f:
            for _ in range(copies):
                for doc in docs:
                    f.write(json.dumps({"text": doc}) + "\n")
        for n in procs:
            t0 = time.perf_counter()
            n_tokens = tokenize_c4_file(gz, os.path.join(tmp, "out.bin"), n)
            dt = time.perf_counter() - t0
            print(f"| {n} | {n_tokens:,} | {dt:.1f} | {n_tokens / dt:,.0f} |")


def worker(opts, model_args):
    """One measurement of one model, printed as a JSON line for the parent process."""
    device, dtype = pick_device(opts.device, opts.dtype)
    measure = {"train": measure_train, "generate": measure_generate, "gpu": measure_gpu}[opts.mode]
    print("RESULT " + json.dumps(measure(opts, model_args, opts.model, device, dtype)))


def run_worker(opts, model_args, name):
    options = dataclasses.asdict(dataclasses.replace(opts, model=name, worker=True))
    args = [f"--{k}={v}" for k, v in options.items()] + model_args
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise UserError(f"{name} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(lines[-1][len("RESULT "):])


def gpu_options(opts, given, model_args):
    """mode=gpu's options: every model unless --model, compiled and one round unless given (each
    measurement already takes the median of its steps); --dry_run: on CPU in float32, batch 2."""
    if model_args:
        raise UserError(f"{model_args[0]}: --mode=gpu fixes every model's shape (GPT-2 small's); drop it")
    if opts.preset or opts.block_size:
        raise UserError("--mode=gpu fixes every model's shape (GPT-2 small's); drop --preset and --block_size")
    if not opts.dry_run and not torch.cuda.is_available():
        raise UserError("--mode=gpu needs a CUDA GPU; --mode=gpu --dry_run=True --compile=False runs it on CPU "
                        "at a tiny shape")
    from checkpoint import available_models
    return dataclasses.replace(
        opts, model=opts.model if "model" in given else ",".join(available_models()),
        compile=opts.compile if "compile" in given else True, repeats=opts.repeats if "repeats" in given else 1,
        **(dict(device="cpu", dtype="float32", batch_size=2) if opts.dry_run else {}))


def main(argv):
    # any option that is not BenchConfig's is a model Config field, checked when each model is built
    opts, model_args = parse_options(argv, BenchConfig(), doc=__doc__, rest=True)
    if opts.worker:
        return worker(opts, model_args)
    if opts.mode == "tokenize":
        return bench_tokenize(opts)

    if opts.mode == "gpu":  # a preset of options: every model, compiled, one round, unless given
        opts = gpu_options(opts, option_pairs(argv), model_args)
    if opts.compile is not False and opts.mode not in ("train", "gpu"):
        raise UserError("--compile times training steps only; drop it or use --mode=train")
    if opts.checkpoints and opts.mode != "generate":
        raise UserError("--checkpoints times generation only; add --mode=generate")
    names = opts.checkpoints.split(",") if opts.checkpoints else opts.model.split(",")
    for name in names:  # one-line errors for an unknown model, field or checkpoint before any work
        if opts.checkpoints:
            if not os.path.exists(os.path.join(name, "ckpt.pt")):
                raise UserError(f"no checkpoint at {name}/ckpt.pt; --checkpoints takes train.py out_dirs")
            continue
        with torch.device("meta"):
            build(opts, model_args, name, "meta")
    device, dtype = pick_device(opts.device, opts.dtype)
    peak = opts.peak_flops or peak_flops(device)
    batch = "batch 1, 16-token prompt" if opts.mode == "generate" else f"batch {opts.batch_size}"
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, {dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; mode {opts.mode}, "
          f"{batch}, {opts.repeats} rounds, median")
    # (row label, model, compile) per measurement; --compile=both times each model eager and compiled
    jobs = [(name + (" compiled" if c else ""), name, c) for name in names
            for c in ((False, True) if opts.compile == "both" else (opts.compile,))]
    runs = {label: [] for label, _, _ in jobs}
    for _ in range(opts.repeats):  # interleaved, so that a slow moment of the machine hits every model
        for label, name, c in jobs:
            runs[label].append(run_worker(dataclasses.replace(opts, compile=c), model_args, name))
    names = list(runs)

    def median(name, key):
        return statistics.median(r[key] for r in runs[name])

    if opts.mode == "gpu":
        steps = runs[names[0]][0]["steps"]
        print(f"| model | shape | params | ms/step | tokens/s | MFU | peak mem MiB | recompiles in {steps} steps |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for name in names:
            tok_s, r0 = median(name, "tok_s"), runs[name][0]
            mfu = f"{r0['flops_per_token'] * tok_s / peak:.1%}" if peak else "-"
            print(f"| {name} | {r0['shape']} | {r0['params']:,} | {median(name, 'ms'):.1f} | {tok_s:,.0f} | {mfu} | "
                  f"{median(name, 'peak_mem_mb'):,.0f} | {max(r['recompiles'] for r in runs[name])} |")
        print(f"recompiles: compilations with a recompile reason while {steps} training steps ran with an evaluation "
              f"every {runs[names[0]][0]['eval_every']} (1 expected: the first evaluation's graph; "
              f"0 when not compiled). FSDP vs DDP: not measured, with one process neither shards nor reduces anything.")
    elif opts.mode == "train":
        # warm-up: the first round's warm-up steps, which include compiling (from an empty
        # TORCHINDUCTOR_CACHE_DIR: a first compile; later rounds hit that cache)
        print("| model | params | MFLOP/token | ms/step | tokens/s | vs first | peak mem MiB | warm-up s |"
              + (" MFU |" if peak else ""))
        print("|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if peak else ""))
        ref = median(names[0], "tok_s")
        for name in names:
            tok_s, r0 = median(name, "tok_s"), runs[name][0]
            row = (f"| {name} | {r0['params']:,} | {r0['flops_per_token'] / 1e6:.2f} | {median(name, 'ms'):.1f} | "
                   f"{tok_s:,.0f} | {tok_s / ref:.2f}x | {median(name, 'peak_mem_mb'):,.0f} | {r0['warmup_s']:.1f} |")
            print(row + (f" {r0['flops_per_token'] * tok_s / peak:.1%} |" if peak else ""))
    else:
        print("| model | params | cached tok/s | vs first | full forward tok/s | speed-up | same tokens | routed |")
        print("|---|---:|---:|---:|---:|---:|---|---|")
        ref = median(names[0], "cached_tok_s")
        for name in names:
            cached, fwd, r0 = median(name, "cached_tok_s"), median(name, "forward_tok_s"), runs[name][0]
            same = all(r["same_tokens"] for r in runs[name]) if "same_tokens" in r0 else "not compared"
            routed = ", ".join(f"{k[len('frac_routed_'):]} {v:.2f}" for k, v in r0.get("stats", {}).items()) or "-"
            print(f"| {name} | {r0['params']:,} | {cached:,.0f} | {cached / ref:.2f}x | {fwd:,.0f} | "
                  f"{cached / fwd:.1f}x | {same} | {routed} |")

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"bench.py: error: {e}")
