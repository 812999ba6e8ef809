"""
Compare architectures on equal terms: one command trains every model the same way through train.py
itself, then tabulates and plots the runs. Two comparisons:

At equal training compute (the question these architectures exist for: at my budget, which gives the
lowest loss, and what does it cost in wall-clock time?):

    python compare.py --flops_budget=1e11,3e11,1e12 --seeds=2   # every model x size x budget
    python compare.py --quick=True                              # smaller (QUICK), into compare-quick/

Each model trains every size of the ladder (SIZES below, --sizes) at every budget, with train.py's
--flops_budget: as many iterations as the budget buys, warmup and cosine decay fitted to end there,
evaluated at the start and the end only (BUDGET_TRAIN_ARGS).
Per budget, <out>/results.md has a table of every run (val bits per byte, mean ± sd over the seeds),
each model's best size, and with 3 or more sizes a parabola fitted to val bits per byte against
ln(parameters), whose minimum estimates the compute-optimal size: the isoFLOP profile, approach 2
of Hoffmann et al. ("Training Compute-Optimal Large Language Models", arXiv 2203.15556), which the
Mixture-of-Depths paper uses too. Then the 2-standard-error verdict for every pair of models at
their best sizes. <out>/frontier.svg plots each model's best val bits per byte against training
FLOPs and, beside it, against the measured training seconds of the same runs (both log x), a band
from the lowest to the highest seed: a FLOP saving that does not save time shows there.

At equal steps (nanoGPT's laptop recipe, each model at its own laptop config):

    python compare.py --models=gpt,bdh,dawn,dtf,mod,doge                  # 2000 iterations each
    python compare.py --models=gpt,mod --seeds=3 --learning_rate=1e-3,2e-3,4e-3  # each at its best lr
    python compare.py --models=gpt,mod --time_budget=300 --batch_size=16  # ~300 s of training each
    python compare.py --models=gpt,mod --plot_only=True                   # redraw from existing logs
    python compare.py --models=gpt,mod --sizes=s                          # every model at the ladder's small size

With several learning rates, the first seed trains each model at every rate, and the other seeds
train it only at the rate that ended lowest there, so each model is reported at its own best rate. A
run that fails in a sweep (a rate at which the loss diverges, say) is recorded as failed and the
sweep goes on. The table goes to <out>/results.md, the curves of val bits per byte against steps,
wall time and training FLOPs to <out>/loss.svg (a line per model for its mean over the seeds, a band
from its lowest to highest seed). With --time_budget each model first trains 35 iterations to
measure its speed, then the iterations that fit the budget, its schedule fitted as with
--flops_budget. Curves read partway through a run (the table's "val at N s") catch the longer runs
before their learning rate decayed, which flatters the faster models: only --flops_budget and
--time_budget compare runs that each end their schedule at the same budget.

On a masked dataset (prepare_data.py mqar: multi-query associative recall, Arora et al. 2023) the
equal-steps table adds each model's val recall accuracy, with verdicts on it too; the README's
"Recall (MQAR)" section gives the command for all six models at two difficulties.

Both: every other --key=value goes to train.py for every run. --seeds=N trains seeds seed, seed+1,
... (--seed, default 1337); min_lr is lr/10 unless --min_lr is given. Each run goes to its own
folder under <out>/<model>/ (checkpoint and log.jsonl), everything in the table to <out>/results.json.
The verdicts say which differences in mean val bits per byte exceed the seed-to-seed spread.
Rerunning an interrupted command continues it: a run that finished is not trained again (its folder
holds compare.json with the training options it finished with; other options train it again), and
an unfinished run restarts from scratch, replacing its partial checkpoint and log.

Training FLOPs are each model's flops_per_token() x the tokens trained, forward and backward, at the
training context (T = block_size), as the model file counts them. GPT and Doge: nanoGPT's 6 per
parameter a token uses plus attention's 12 * layers * width * T (Doge's attention width includes its
8 bias channels; with its MoE, only the k experts a token reads). MoD and DTF: the same with each
routed block computing its K = capacity_factor * C * T slots of every row (25% at the defaults), not
only the 12.5% of tokens routed into them: the slots are computed either way; DTF adds its prior
network and router on every token. DAWN: what the code multiplies, which is dense over every neuron
of its pools, not only the top-k a token composes. BDH: what the code multiplies, its one shared
layer n_layer times, with the full T x T score square. Bits per byte divide the summed token losses
by ln 2 times the UTF-8 bytes of the target text (train.py's evaluate), so tokenizers compare.
"""
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import UserError, option_pairs, parse_options, parse_value
from prepare_data import write_json
from train_config import TrainConfig, fit_schedule, parse_args


@dataclass
class CompareConfig:
    models: str = "gpt,bdh,dawn,dtf,mod,doge"  # comma-separated model names
    out: str = "compare"             # runs go to <out>/<model>/<run>/, the tables and plots to <out>/
    seeds: int = 1                   # seeds seed, seed+1, ...: mean and spread per model
    seed: int = 1337                 # the first seed
    learning_rate: str = ""          # one rate or (at equal steps) a comma-separated sweep; empty: train.py's default
    flops_budget: str = ""           # comma-separated training FLOPs, e.g. 1e11,3e11,1e12: compare at equal compute
    sizes: str = "s,m,l"             # with --flops_budget: the sizes of the ladder (SIZES) every model trains at; at equal steps one size (default: laptop configs)
    quick: bool = False              # True: the equal-compute comparison in about 4 minutes on 2 cores (QUICK)
    time_budget: float = 0.0         # > 0: seconds of training per run instead of max_iters (equal steps only)
    plot_only: bool = False          # True: redraw the tables and plots from existing runs

HERE = os.path.dirname(os.path.abspath(__file__))

# The size ladder: every model at width d and depth L by one rule, the laptop config (d 128, 4 layers)
# in the middle, about 10x in parameters from end to end. What depends on the width keeps its laptop
# ratio to d: attention heads of 32 channels, half as many KV heads, SwiGLU width 3d (Doge: 2d),
# DAWN's ranks d/4 and router space d/2 (its neuron pools keep their sizes), BDH's 16d neurons in 4
# heads. Parameters with the 65 characters of shakespeare_char (BDH's one layer is shared, so its
# depth adds none; DAWN's pools do not grow):
#
#   size  d    L    gpt        mod        dtf        doge       dawn       bdh
#   s     64   4    201,856    201,984    203,528    153,092    211,392    204,928
#   m     128  4    796,928    797,184    803,336    601,096    816,000    803,072
#   l     192  6    2,671,488  2,672,064  2,692,812  2,010,066  1,889,088  1,794,432
SIZES = {"s": (64, 4), "m": (128, 4), "l": (192, 6)}


def size_options(model, size):
    """train.py's model options for `model` at ladder size `size` (a model file not listed here gets
    n_embd and n_layer only)."""
    d, n_layer = SIZES[size]
    heads = {"n_head": d // 32, "n_kv_head": d // 64}
    width = {"gpt": {**heads, "intermediate_size": 3 * d}, "mod": {**heads, "intermediate_size": 3 * d},
             "dtf": {**heads, "intermediate_size": 3 * d}, "doge": {**heads, "intermediate_size": 2 * d},
             "dawn": {"n_head": d // 32, "rank": d // 4, "knowledge_rank": d // 4, "d_space": d // 2}}
    return {"n_embd": d, "n_layer": n_layer, **width.get(model, {})}


# At equal compute the tables read each run's last evaluation only, so the runs evaluate at their
# start and end alone: the 9 evaluations of a run would cost a small budget's large model several
# times its training (a 2-iteration run still evaluates 20 batches x 2 splits each time).
BUDGET_TRAIN_ARGS = ["--eval_interval=1e9"]

# --quick: the equal-compute comparison in about 4 minutes on 2 cores (222 s on an otherwise idle 2-core CPU,
# 2026-12-05): two budgets, one seed (so no verdicts), the whole ladder, evaluations on 10 batches, not 20
QUICK = {"flops_budget": "1e11,3e11", "seeds": 1, "out": "compare-quick"}
QUICK_TRAIN_ARGS = ["--eval_iters=10"]


def run_train(model, out_dir, args):
    """train.py in a subprocess, its output passed through; each model trains in a fresh process, from
    scratch (replacing what an earlier, unfinished run left in out_dir).
    train.py runs in a process group of its own, so a Ctrl-C in the terminal reaches only compare.py,
    which hands it on exactly once and waits: train.py stops as on its own Ctrl-C (no half-written
    checkpoint, train.lock removed) and is reaped. (Killed and left unreaped, it would stay a zombie
    whose process id in train.lock refuses the next run.)"""
    cfg = parse_args([f"--model={model}", *args])[0]
    if cfg.max_iters < cfg.log_interval:  # the summary needs at least one logged iteration
        args = [*args, f"--log_interval={max(cfg.max_iters, 1)}"]
    cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--model={model}", f"--out_dir={out_dir}",
           "--overwrite=True", *args]
    proc = subprocess.Popen(cmd, process_group=0)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGINT)
        proc.wait()
        raise
    if code:
        raise UserError(f"training {model} failed (see above); command: {' '.join(cmd)}")


def read_json(path):
    """The JSON in path, or None when there is none (or it is unreadable)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]


def iterations_for_budget(model, out, args, budget):
    """Train 35 iterations, take the median ms/iteration of the last 30, and size max_iters to fit."""
    probe = os.path.join(out, f"{model}_speed_probe")
    run_train(model, probe, [*args, "--max_iters=35", "--eval_interval=100000", "--eval_iters=1",
                             "--log_interval=5"])
    steps, _ = read_log(probe)
    shutil.rmtree(probe)
    ms = sorted(r["ms"] for r in steps[1:])[len(steps[1:]) // 2]
    return max(1, int(budget * 1000 / ms))


def param_counts(out_dir):
    """(total, non-embedding) parameters. Non-embedding leaves out matrices with a vocab_size
    dimension (token embedding, LM head) and learned position tables, as scaling-law papers do."""
    path = os.path.join(out_dir, "ckpt.pt")
    model = model_from_checkpoint(load_checkpoint(path), path, weights=False)
    config = model.config
    total = sum(p.numel() for p in model.parameters())
    embedding = {id(p) for p in model.parameters() if config.vocab_size in p.shape}
    embedding |= {id(m.weight) for m in model.modules()
                  if isinstance(m, torch.nn.Embedding) and m.num_embeddings == config.block_size}
    return total, total - sum(p.numel() for p in model.parameters() if id(p) in embedding), model


def loss_at(evals, key, x, metric="val_loss"):
    """`metric` at `x` (training seconds, tokens or FLOPs), linear between eval points; None past the run."""
    points = [(r[key], r[metric]) for r in evals]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return None


def run_name(model, lr, seed, size=None, budget=None):
    """<model>/lr<lr>-seed<seed> at equal steps; <model>/<size>-<budget>-lr<lr>-seed<seed> at equal compute."""
    at = f"{size}-{flops_label(budget)}-" if budget else ""
    return os.path.join(model, f"{at}lr{lr:g}-seed{seed}")


def flops_label(flops):
    """3e11 for 3e+11, 1.5e12 for 1.5e+12."""
    mantissa, _, exponent = f"{flops:.3g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def finished(out_dir):
    """A run compare.py finished (its compare.json exists) and that did not fail."""
    done = read_json(os.path.join(out_dir, "compare.json"))
    return bool(done) and not done.get("failed")


def best_lr(out, model, lrs, seed):
    """The learning rate whose run with `seed` ended at the lowest val loss."""
    losses = {lr: read_log(os.path.join(out, run_name(model, lr, seed)))[1][-1]["val_loss"]
              for lr in lrs if finished(os.path.join(out, run_name(model, lr, seed)))}
    if not losses:
        raise UserError(f"no finished run of {model} with seed {seed} in {out}; run compare.py without "
                        f"--plot_only=True first")
    return min(losses, key=losses.get)


DIAGNOSTICS = ("frac_routed", "density", "dead", "masked_frac", "experts_used")  # stats() keys for the table


def summarise_run(out_dir):
    steps, evals = read_log(out_dir)
    if "val_bpb" not in evals[-1]:
        raise UserError(f"{out_dir}/log.jsonl predates bits per byte; delete {out_dir} and rerun to train it again")
    total, non_embedding, net = param_counts(out_dir)
    flops_per_token = net.flops_per_token()  # training FLOPs (forward + backward) per token
    for r in evals:
        r["flops"] = r["tokens"] * flops_per_token
    tok_s = sorted(r["tok_s"] for r in steps[1:] or steps)
    last = steps[-1]
    return {"out_dir": out_dir, "params": total, "non_embedding_params": non_embedding,
            "flops_per_token": flops_per_token, "tokens_per_s": tok_s[len(tok_s) // 2],
            "peak_mem_mb": max(r["peak_mem_mb"] for r in steps), "iters": evals[-1]["iter"],
            "tokens": evals[-1]["tokens"], "flops": evals[-1]["flops"], "train_time_s": evals[-1]["time"],
            "val_loss": evals[-1]["val_loss"], "val_bpb": evals[-1]["val_bpb"],
            "val_acc": evals[-1].get("val_acc"),  # recall accuracy, on a masked dataset (MQAR) only
            "best_val_loss": min(r["val_loss"] for r in evals),
            "diagnostics": {k: v for k, v in last.items() if any(d in k for d in DIAGNOSTICS)},
            "stats": {k: v for k, v in last.items() if k not in
                      ("iter", "loss", "lr", "ms", "tok_s", "time", "tokens", "peak_mem_mb")},
            "evals": evals}


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def verdicts(rows, metric="val_loss", higher=False):
    """Which differences in mean final `metric` exceed the seed-to-seed spread: a difference counts when it
    is more than twice its standard error, sqrt(s_a^2 / n_a + s_b^2 / n_b) (about a 95% test). Lower is
    better, or higher with higher=True (accuracy)."""
    lines = []
    ranked = sorted(rows, key=lambda r: r[f"{metric}_mean"], reverse=higher)
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            diff = abs(b[f"{metric}_mean"] - a[f"{metric}_mean"])
            if min(a["seeds"], b["seeds"]) < 2:
                lines.append(f"{a['model']} vs {b['model']}: {diff:.4f} apart, one seed: no spread to judge by")
                continue
            se = (a[f"{metric}_std"] ** 2 / a["seeds"] + b[f"{metric}_std"] ** 2 / b["seeds"]) ** 0.5
            if diff > 2 * se:
                lines.append(f"{a['model']} is better than {b['model']}: {diff:.4f} {'higher' if higher else 'lower'}, "
                             f"more than twice the "
                             f"standard error of the difference ({se:.4f})")
            else:
                lines.append(f"{a['model']} vs {b['model']}: {diff:.4f} apart, within twice the standard error "
                             f"of the difference ({se:.4f}): not distinguishable with these seeds")
    return lines


# -----------------------------------------------------------------------------
# at equal compute: per budget, every model's sizes, its best size and its isoFLOP parabola

def fit_parabola(params, losses):
    """The isoFLOP profile (Hoffmann et al. 2022, approach 2): loss = a x^2 + b x + c with x = ln(params),
    least squares. Returns (optimal params exp(-b / 2a), the loss there, whether that lies inside the
    sizes tried), or None when the fit has no minimum (a <= 0: the loss does not turn up across them)."""
    xs = [math.log(p) for p in params]
    a, b, c = map(float, np.polyfit(xs, losses, 2))
    if a <= 0:
        return None
    x = -b / (2 * a)
    return math.exp(x), c - b * b / (4 * a), min(xs) <= x <= max(xs)


def isoflop(runs_by_cell, models, sizes, budgets):
    """{budget: {model: entry}} from {(model, size, budget): [run summaries over seeds]}: per size the
    mean and sd over the seeds of the final val bits per byte; the best size (lowest mean), its
    numbers as the model's at that budget; with 3 or more sizes the parabola's minimum."""
    result = {}
    for budget in budgets:
        result[budget] = {}
        for model in models:
            cells = []
            for size in sizes:
                runs = runs_by_cell.get((model, size, budget), [])
                if not runs:
                    continue
                mean, std = mean_std([r["val_bpb"] for r in runs])
                cells.append({"size": size, "runs": runs, "seeds": len(runs), "val_bpb_mean": mean,
                              "val_bpb_std": std, "params": runs[0]["params"],
                              "flops_per_token": runs[0]["flops_per_token"], "iters": runs[0]["iters"],
                              "flops": mean_std([r["flops"] for r in runs])[0],
                              "train_time_s": mean_std([r["train_time_s"] for r in runs])[0]})
            if not cells:
                continue
            best = min(cells, key=lambda c: c["val_bpb_mean"])
            fit = fit_parabola([c["params"] for c in cells], [c["val_bpb_mean"] for c in cells]) \
                if len(cells) >= 3 else None
            result[budget][model] = {"model": model, "cells": cells, "best": best["size"], "seeds": best["seeds"],
                                     "val_bpb_mean": best["val_bpb_mean"], "val_bpb_std": best["val_bpb_std"],
                                     "parabola": fit, "fitted": len(cells) >= 3}
    return result


def frontier(profile):
    """{model: [(training FLOPs, training seconds, mean, lowest, highest val bits per byte)]}: each
    model's best size at each budget, its FLOPs and seconds the mean over that size's seeds."""
    points = {}
    for budget in sorted(profile):
        for model, entry in profile[budget].items():
            best = next(c for c in entry["cells"] if c["size"] == entry["best"])
            bpbs = [r["val_bpb"] for r in best["runs"]]
            points.setdefault(model, []).append((best["flops"], best["train_time_s"], best["val_bpb_mean"],
                                                 min(bpbs), max(bpbs)))
    return points


def frontier_table(profile):
    """Models x budgets: the best size's val bits per byte, the size and its training seconds."""
    lines = ["Best val bits per byte at each training budget (mean ± sd over the seeds; the best size of the "
             "ladder, training seconds):", "",
             "| model | " + " | ".join(f"{flops_label(b)} FLOPs" for b in profile) + " |",
             "|---|" + "---:|" * len(profile)]
    for model in dict.fromkeys(m for entries in profile.values() for m in entries):
        cells = []
        for entries in profile.values():
            entry = entries.get(model)
            if entry is None:
                cells.append("-")
                continue
            best = next(c for c in entry["cells"] if c["size"] == entry["best"])
            spread = f" ± {entry['val_bpb_std']:.4f}" if entry["seeds"] > 1 else ""
            cells.append(f"{entry['val_bpb_mean']:.4f}{spread} ({entry['best']}, {best['train_time_s']:.1f} s)")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def budget_tables(profile):
    lines = []
    for budget, entries in profile.items():
        lines += [f"## {flops_label(budget)} training FLOPs", "",
                  "| model | size | params | MFLOP/token | iters | train s | val bits/byte (mean ± sd) | seeds |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for model, entry in entries.items():
            for c in entry["cells"]:
                bold = "**" if c["size"] == entry["best"] else ""
                spread = f" ± {c['val_bpb_std']:.4f}" if c["seeds"] > 1 else ""
                lines.append(f"| {model} | {bold}{c['size']}{bold} | {c['params']:,} | "
                             f"{c['flops_per_token'] / 1e6:.2f} | {c['iters']:,} | {c['train_time_s']:.1f} | "
                             f"{bold}{c['val_bpb_mean']:.4f}{spread}{bold} | {c['seeds']} |")
        lines += ["", "| model | best size | val bits/byte | isoFLOP parabola: optimal params | its val bits/byte |",
                  "|---|---|---:|---:|---:|"]
        for model, entry in sorted(entries.items(), key=lambda e: e[1]["val_bpb_mean"]):
            spread = f" ± {entry['val_bpb_std']:.4f}" if entry["seeds"] > 1 else ""
            fit = entry["parabola"]
            params = [c["params"] for c in entry["cells"]]
            if not entry["fitted"]:
                optimum = "-", "-"  # fewer than 3 sizes
            elif fit is None:
                optimum = "no minimum (the fit is not convex)", "-"
            elif not fit[2]:  # a parabola's minimum far outside the sizes tried says only which way it lies
                optimum = f"below {min(params):,}" if fit[0] < min(params) else f"above {max(params):,}", "-"
            else:
                optimum = f"{fit[0]:,.0f}", f"{fit[1]:.4f}"
            lines.append(f"| {model} | {entry['best']} | {entry['val_bpb_mean']:.4f}{spread} | {optimum[0]} | "
                         f"{optimum[1]} |")
        lines += [""] + [f"- {line}" for line in verdicts(list(entries.values()), "val_bpb")] + [""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# at equal steps: every model at its best learning rate, with all its seeds

def summarise(models, out, lrs, seeds):
    """One entry per model, at its best learning rate (chosen on the first seed), with all its seeds'
    runs, and the sweep: every learning rate tried, with the mean and spread of its runs."""
    rows = []
    for model in models:
        lr = best_lr(out, model, lrs, seeds[0])
        sweep = []
        for trial in lrs:
            dirs = [os.path.join(out, run_name(model, trial, s)) for s in seeds]
            losses = [read_log(d)[1][-1]["val_loss"] for d in dirs if finished(d)]
            failed = [d for d in dirs if os.path.exists(os.path.join(d, "compare.json")) and not finished(d)]
            if losses or failed:
                mean, std = mean_std(losses) if losses else (None, None)
                sweep.append({"learning_rate": trial, "seeds": len(losses), "failed": len(failed),
                              "val_loss_mean": mean, "val_loss_std": std})
        runs = [summarise_run(d) for d in (os.path.join(out, run_name(model, lr, s)) for s in seeds) if finished(d)]
        mean, std = mean_std([r["val_loss"] for r in runs])
        bpb_mean, bpb_std = mean_std([r["val_bpb"] for r in runs])
        rows.append({"model": model, "learning_rate": lr, "seeds": len(runs), "val_loss_mean": mean,
                     "val_loss_std": std, "val_bpb_mean": bpb_mean, "val_bpb_std": bpb_std, "sweep": sweep,
                     "runs": runs})
        if all(r["val_acc"] is not None for r in runs):  # a masked dataset: recall accuracy too
            rows[-1]["val_acc_mean"], rows[-1]["val_acc_std"] = mean_std([r["val_acc"] for r in runs])
    # each curve read where the fastest run stopped (rough: see the docstring)
    equal_time = min(r["evals"][-1]["time"] for row in rows for r in row["runs"])
    for row in rows:
        row["val_bpb_at_equal_time"] = mean_std([loss_at(r["evals"], "time", equal_time, "val_bpb")
                                                 for r in row["runs"]])[0]
    return rows, equal_time


def table(rows, equal_time):
    acc = all("val_acc_mean" in row for row in rows)  # recall accuracy beside the loss (MQAR)
    lines = ["| model | params | non-emb. params | MFLOP/token | lr | seeds | tokens/s | peak mem MiB | iters | "
             f"train s | val loss (mean ± sd) | {'val acc (mean ± sd) | ' if acc else ''}val bits/byte (mean ± sd) | "
             f"bits/byte at {equal_time:.0f} s | best val loss | diagnostics (last step, first seed) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * acc + "---:|---:|---:|---|"]
    for row in rows:
        first, runs = row["runs"][0], row["runs"]
        diag = ", ".join(f"{k} {v:.3g}" for k, v in first["diagnostics"].items()) or "-"
        tok_s = sorted(r["tokens_per_s"] for r in runs)[len(runs) // 2]
        loss_sd, bpb_sd = (f" ± {row['val_loss_std']:.4f}", f" ± {row['val_bpb_std']:.4f}") if row["seeds"] > 1 \
            else ("", "")  # one seed: no spread to show
        acc_cell = (f"{row['val_acc_mean']:.4f}" + (f" ± {row['val_acc_std']:.4f}" if row["seeds"] > 1 else "")
                    + " | ") if acc else ""
        lines.append(f"| {row['model']} | {first['params']:,} | {first['non_embedding_params']:,} | "
                     f"{first['flops_per_token'] / 1e6:.2f} | {row['learning_rate']:g} | {row['seeds']} | "
                     f"{tok_s:,.0f} | {max(r['peak_mem_mb'] for r in runs):,.0f} | {first['iters']} | "
                     f"{mean_std([r['train_time_s'] for r in runs])[0]:.0f} | "
                     f"{row['val_loss_mean']:.4f}{loss_sd} | {acc_cell}{row['val_bpb_mean']:.4f}{bpb_sd} | "
                     f"{row['val_bpb_at_equal_time']:.4f} | "
                     f"{mean_std([r['best_val_loss'] for r in runs])[0]:.4f} | {diag} |")
    if any(len(row["sweep"]) > 1 for row in rows):
        lines += ["", "Learning-rate sweep (final val loss, mean ± sd over the seeds run at that rate):", "",
                  "| model | " + " | ".join(f"lr {lr:g}" for lr in sorted({s["learning_rate"] for row in rows
                                                                           for s in row["sweep"]})) + " |"]
        all_lrs = sorted({s["learning_rate"] for row in rows for s in row["sweep"]})
        lines.append("|---|" + "---:|" * len(all_lrs))
        for row in rows:
            cells = []
            for lr in all_lrs:
                s = next((s for s in row["sweep"] if s["learning_rate"] == lr), None)
                if s is None:
                    cells.append("-")
                elif s["seeds"] == 0:
                    cells.append("failed")
                else:
                    cell = f"{s['val_loss_mean']:.4f}" + (f" ± {s['val_loss_std']:.4f}" if s["seeds"] > 1 else "")
                    cells.append(f"**{cell}** ({s['seeds']})" if lr == row["learning_rate"] else f"{cell} ({s['seeds']})")
            lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the plots, self-contained SVG: panels side by side sharing the y axis (val bits per byte), a line per
# model for its mean over the seeds and a band from its lowest to its highest seed

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def curves(row, key):
    """(x, mean, low, high) of val bits per byte per eval point over the runs of a model; x is averaged
    (wall time varies)."""
    n = min(len(r["evals"]) for r in row["runs"])
    points = []
    for i in range(n):
        evals = [r["evals"][i] for r in row["runs"]]
        bpbs = [e["val_bpb"] for e in evals]
        points.append((mean_std([e[key] for e in evals])[0], mean_std(bpbs)[0], min(bpbs), max(bpbs)))
    return points


def log_ticks(lo, hi):
    """1 and 3 times the powers of ten between lo and hi (at least the two ends)."""
    ticks = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
             for m in (1, 3) if lo <= m * 10.0 ** e <= hi]
    return ticks if len(ticks) >= 2 else [lo, hi]


def svg_panels(panels, path, y_span=None, markers=False, width=400, height=330, margin=55):
    """panels: [(x label, log x?, x tick format, {model: [(x, mean, low, high)]})]. y_span: show only
    that much above the lowest value (zoomed on the end of the curves, where models differ)."""
    ys = [v for _, _, _, series in panels for points in series.values() for p in points for v in p[1:]]
    y_lo, y_hi = min(ys), max(ys)
    if y_span:
        y_hi = min(y_hi, y_lo + y_span)
    names = list(dict.fromkeys(name for _, _, _, series in panels for name in series))
    parts = []
    for panel, (label, log_x, fmt, series) in enumerate(panels):
        xs = [p[0] for points in series.values() for p in points]
        ox, plot_w = panel * (width + 20), width - margin - 30
        if log_x:
            x_lo, x_hi = min(xs) / 1.25, max(xs) * 1.25
            ticks = log_ticks(x_lo, x_hi)

            def X(v):
                return ox + margin + plot_w * math.log(v / x_lo) / math.log(x_hi / x_lo)
        else:
            x_hi = max(xs) or 1
            ticks = [x_hi * i / 4 for i in range(5)]

            def X(v):
                return ox + margin + plot_w * v / x_hi

        def Y(v):
            return height - margin + (margin + 10 - height) * (min(v, y_hi) - y_lo) / (y_hi - y_lo or 1)

        parts.append(f'<rect x="{ox + margin}" y="10" width="{plot_w}" height="{height - margin - 10}" '
                     f'fill="none" stroke="#888"/>')
        for xv in ticks:
            parts.append(f'<text x="{X(xv):.1f}" y="{height - margin + 16}" text-anchor="middle">{fmt(xv)}</text>')
        for i in range(5):
            yv = y_lo + (y_hi - y_lo) * i / 4
            parts.append(f'<text x="{ox + margin - 6}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
        parts.append(f'<text x="{ox + (width + margin) / 2}" y="{height - 12}" text-anchor="middle">{label}</text>')
        parts.append(f'<text x="{ox + 14}" y="{(height - margin) / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 {ox + 14} {(height - margin) / 2})">val bits per byte</text>')
        for name, points in series.items():
            color = COLORS[names.index(name) % len(COLORS)]
            if any(hi > lo for _, _, lo, hi in points):  # several seeds: their band
                band = [(x, hi) for x, _, _, hi in points] + [(x, lo) for x, _, lo, _ in reversed(points)]
                parts.append(f'<polygon points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in band)}" '
                             f'fill="{color}" fill-opacity="0.18" stroke="none"/>')
            line = " ".join(f"{X(x):.1f},{Y(m):.1f}" for x, m, _, _ in points)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
            if markers:
                parts += [f'<circle cx="{X(x):.1f}" cy="{Y(m):.1f}" r="3" fill="{color}"/>' for x, m, _, _ in points]
    for i, name in enumerate(names):  # the legend, in the last panel
        parts.append(f'<text x="{(len(panels) - 1) * (width + 20) + width - 40}" y="{30 + 16 * i}" '
                     f'text-anchor="end" fill="{COLORS[i % len(COLORS)]}">{name}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(panels) * (width + 20)}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
           + "".join(parts) + "</svg>\n")
    with open(path + ".tmp", "w") as f:
        f.write(svg)
    os.replace(path + ".tmp", path)


def plot_curves(rows, path):
    """loss.svg: val bits per byte against steps, training time and training FLOPs."""
    panels = [("steps", False, lambda v: f"{v:,.0f}"), ("training time (s)", False, lambda v: f"{v:,.0f}"),
              ("training FLOPs (T = 1e12)", False, lambda v: f"{v / 1e12:.3g}T")]
    keys = ("iter", "time", "flops")
    svg_panels([(*panel, {row["model"]: curves(row, key) for row in rows}) for panel, key in zip(panels, keys)],
               path, y_span=0.9)


def plot_frontier(points, path):
    """frontier.svg: each model's best val bits per byte against training FLOPs and training seconds."""
    svg_panels([("training FLOPs", True, flops_label,
                 {m: [(f, mean, lo, hi) for f, _, mean, lo, hi in p] for m, p in points.items()}),
                ("training time (s), measured", True, lambda v: f"{v:.3g}",
                 {m: sorted((t, mean, lo, hi) for _, t, mean, lo, hi in p) for m, p in points.items()})],
               path, markers=True)


# -----------------------------------------------------------------------------

def train_unless_finished(model, out, name, request, args, may_fail):
    """Train run `name` (into <out>/<name>/) with train.py's options args() unless it finished earlier
    with the same request (its compare.json); record it as failed instead of stopping when may_fail."""
    out_dir = os.path.join(out, name)
    done = read_json(os.path.join(out_dir, "compare.json")) or {}
    if {k: done.get(k) for k in request} == request:
        print(f"{name}: finished earlier in {out_dir}, not trained again")
        return
    if os.path.exists(os.path.join(out_dir, "compare.json")):
        os.remove(os.path.join(out_dir, "compare.json"))  # other options: this run is replaced
    try:
        run_train(model, out_dir, args())
    except UserError as e:
        if not may_fail:
            raise
        print(f"{name} failed; the sweep goes on without it")
        request = {**request, "failed": str(e)}  # e.g. a learning rate at which the loss diverged
    write_json(os.path.join(out_dir, "compare.json"), request)


def at_equal_steps(opts, models, lrs, seeds, args_for, header):
    out = opts.out
    if not opts.plot_only:
        budget_iters = {}
        for seed in seeds:  # seed by seed, so an early stop still leaves whole comparisons
            for model in models:
                # the first seed tries every learning rate; the others train at the best one of those
                for lr in lrs if seed == seeds[0] else [best_lr(out, model, lrs, seeds[0])]:

                    def args():
                        if not opts.time_budget:
                            return args_for(lr, seed, model)
                        if model not in budget_iters:  # as train.py's --flops_budget: the schedule fitted
                            budget_iters[model] = iterations_for_budget(model, out, args_for(lr, seed, model),
                                                                        opts.time_budget)
                        fitted = fit_schedule(parse_args([f"--model={model}", *args_for(lr, seed, model)])[0],
                                              budget_iters[model])
                        return [*args_for(lr, seed, model), f"--max_iters={fitted.max_iters}",
                                f"--warmup_iters={fitted.warmup_iters}", f"--lr_decay_iters={fitted.lr_decay_iters}"]

                    request = {"train_args": args_for(lr, seed, model), "time_budget": opts.time_budget}
                    train_unless_finished(model, out, run_name(model, lr, seed), request, args, len(lrs) > 1)
    rows, equal_time = summarise(models, out, lrs, seeds)
    text = table(rows, equal_time) + "\n\n" + "\n".join(f"- {line}" for line in verdicts(rows, "val_bpb"))
    data = {"models": rows, "equal_time": equal_time, "verdicts": verdicts(rows, "val_bpb")}
    if all("val_acc_mean" in row for row in rows):  # a masked dataset (MQAR): verdicts on recall accuracy too
        data["verdicts_acc"] = verdicts(rows, "val_acc", higher=True)
        text += "\n\nOn val recall accuracy:\n\n" + "\n".join(f"- {line}" for line in data["verdicts_acc"])
    write_results(out, header, text, data)
    plot_curves(rows, os.path.join(out, "loss.svg"))
    print(f"wrote {out}/results.md, {out}/results.json and {out}/loss.svg")


def at_equal_compute(opts, models, sizes, budgets, lr, seeds, args_for, header):
    out = opts.out
    if not opts.plot_only:
        for seed in seeds:  # seed by seed, the small budgets first: an early stop leaves whole comparisons
            for budget in budgets:
                for model in models:
                    for size in sizes:
                        args = args_for(lr, seed, model, size, budget)
                        train_unless_finished(model, out, run_name(model, lr, seed, size, budget),
                                              {"train_args": args}, lambda: args, may_fail=True)
    runs = {(m, s, b): [summarise_run(d) for d in (os.path.join(out, run_name(m, lr, seed, s, b)) for seed in seeds)
                        if finished(d)] for m in models for s in sizes for b in budgets}
    failed = [run_name(m, lr, seed, s, b) for m in models for s in sizes for b in budgets for seed in seeds
              if read_json(os.path.join(out, run_name(m, lr, seed, s, b), "compare.json")) and
              not finished(os.path.join(out, run_name(m, lr, seed, s, b)))]
    profile = isoflop(runs, models, sizes, budgets)
    if not any(profile.values()):
        raise UserError(f"no finished runs in {out}; run compare.py without --plot_only=True first")
    text = frontier_table(profile) + "\n\n" + budget_tables(profile) + "".join(f"\nfailed: {name}" for name in failed)
    points = frontier(profile)
    write_results(out, header, text, {"budgets": budgets, "sizes": {s: SIZES[s] for s in sizes},
                                      "profile": {flops_label(b): v for b, v in profile.items()},
                                      "frontier": points, "failed": failed})
    plot_frontier(points, os.path.join(out, "frontier.svg"))
    print(f"wrote {out}/results.md, {out}/results.json and {out}/frontier.svg")


def write_results(out, header, text, data):
    print(text)
    for name, content in (("results.md", f"{header}\n\n{text}\n"),
                          ("results.json", json.dumps({"header": header, **data}, indent=1))):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(content)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


def main(argv):
    opts, train_args = parse_options(argv, CompareConfig(), doc=__doc__, titles=("compare.py options",), rest=True)
    given = option_pairs(argv)
    if opts.quick:  # QUICK's options, unless given
        for key, value in QUICK.items():
            if key not in given:
                setattr(opts, key, value)
        train_args = [*QUICK_TRAIN_ARGS, *train_args]  # a later option wins in train.py
    for arg in train_args:
        if arg[2:].partition("=")[0] in ("model", "out_dir", "init_from"):
            raise UserError(f"{arg.partition('=')[0]} is set by compare.py for each run")
    if opts.seeds < 1:
        raise UserError(f"--seeds={opts.seeds}: must be at least 1")
    models = opts.models.split(",")
    lrs = [parse_value("learning_rate", v, float) for v in opts.learning_rate.split(",")] if opts.learning_rate \
        else [TrainConfig.learning_rate]
    min_lr_given = any(arg.startswith("--min_lr=") for arg in train_args)
    seeds = [opts.seed + i for i in range(opts.seeds)]
    budgets = [parse_value("flops_budget", v, float) for v in opts.flops_budget.split(",")] if opts.flops_budget \
        else []
    sizes = opts.sizes.split(",")
    header = (f"`python compare.py {' '.join(argv)}`, {time.strftime('%Y-%m-%d')}: torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}")

    def args_for(lr, seed, model=None, size=None, budget=None):
        """train.py's options for one run; min_lr follows the learning rate (lr/10, the default's ratio)."""
        ladder = [f"--{k}={v}" for k, v in size_options(model, size).items()] if size else []
        if not budget:
            return [*train_args, f"--learning_rate={lr:g}", *([] if min_lr_given else [f"--min_lr={lr / 10:g}"]),
                    f"--seed={seed}", *ladder]
        return [*BUDGET_TRAIN_ARGS, *args_for(lr, seed), *ladder, f"--flops_budget={budget:g}"]

    if not set(sizes) <= set(SIZES):
        raise UserError(f"--sizes={opts.sizes}: choose from {', '.join(SIZES)}")
    if "sizes" in given or budgets:  # every model at the sizes of the ladder, not its laptop config
        ladder = {key for model in models for size in sizes for key in size_options(model, size)}
        for arg in train_args:
            if arg[2:].partition("=")[0] in ladder:
                raise UserError(f"{arg.partition('=')[0]} is set by the size ladder (--sizes, SIZES in compare.py)")
    if not budgets:
        if len(sizes) > 1 and "sizes" in given:
            raise UserError(f"--sizes={opts.sizes}: at equal steps one size of the ladder (every model at it); "
                            "several sizes are for --flops_budget")
        size = sizes[0] if "sizes" in given else None  # None: each model at its laptop config
        for model in models:
            for lr in lrs:  # a one-line error before any run
                cfg = parse_args([f"--model={model}", *args_for(lr, opts.seed, model, size)])[0]
                if cfg.max_iters == 0 and not opts.time_budget:
                    raise UserError("--max_iters=0 trains nothing to compare; give --max_iters=1 or more")
        return at_equal_steps(opts, models, lrs, seeds, lambda lr, seed, model: args_for(lr, seed, model, size),
                              header)
    if any(not 0 < b < float("inf") for b in budgets):
        raise UserError(f"--flops_budget={opts.flops_budget}: budgets must be positive numbers, e.g. 1e12,3e12")
    if len(lrs) > 1 or opts.time_budget:
        raise UserError("--flops_budget takes one --learning_rate and no --time_budget; sweep rates at equal steps")
    for model in models:
        for size in sizes:
            parse_args([f"--model={model}", *args_for(lrs[0], opts.seed, model, size, budgets[0])])
    return at_equal_compute(opts, models, sizes, budgets, lrs[0], seeds, args_for, header)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"compare.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ncompare.py: interrupted; rerun the same command to continue (finished models are "
                 "not trained again)")
