"""
Compare architectures on equal terms: one command trains each model with the same data, seeds, batch,
block and schedule through train.py itself, then tabulates and plots the runs.

    python compare.py --models=gpt,bdh,dawn,dtf,mod,doge                  # the laptop recipe, 2000 iterations
    python compare.py --models=gpt,mod --seeds=3                          # mean and spread over 3 seeds
    python compare.py --models=gpt,mod --seeds=3 --learning_rate=1e-3,2e-3,4e-3  # each at its best lr
    python compare.py --models=gpt,mod --time_budget=300 --batch_size=16  # ~300 s of training each
    python compare.py --models=gpt,mod --plot_only=True                   # redraw from existing logs

Every other --key=value goes to train.py for every model. --seeds=N trains seeds seed, seed+1, ...
(--seed, default 1337). With several learning rates, the first seed trains each model at every rate,
and the other seeds train it only at the rate that ended lowest there, so each model is reported at
its own best rate (min_lr is lr/10 throughout unless --min_lr is given). A run that fails in a sweep
(a rate at which the loss diverges, say) is recorded as failed and the sweep goes on.

Each run goes to <out>/<model>/lr<lr>-seed<seed>/ (checkpoint and log.jsonl); the table goes to
<out>/results.md and stdout, everything in it to <out>/results.json, and the curves against steps,
wall time and training FLOPs to <out>/loss.svg (a small SVG written here, so no plotting package is
needed): a line per model for its mean over the seeds, and a band from its lowest to highest seed.
The table's verdicts say which differences in mean val loss exceed the seed-to-seed spread.
With --time_budget each model first trains 35 iterations to measure its speed, and then gets the
number of iterations that fits the budget, its warmup and decay fitted to them as with --flops_budget.

Rerunning an interrupted command continues it: a run that finished is not trained again (its folder
holds compare.json with the training options it finished with; other options train it again), and
an unfinished run restarts from scratch, replacing its partial checkpoint and log.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import UserError, parse_options, parse_value
from prepare_data import write_json
from train_config import TrainConfig, fit_schedule, parse_args


@dataclass
class CompareConfig:
    models: str = "gpt,bdh,dawn,dtf,mod,doge"  # comma-separated model names
    out: str = "compare"             # runs go to <out>/<model>/lr<lr>-seed<seed>/, the table and plot to <out>/
    seeds: int = 1                   # seeds seed, seed+1, ...: mean and spread per model
    seed: int = 1337                 # the first seed
    learning_rate: str = ""          # one rate or a comma-separated sweep; empty: train.py's default
    time_budget: float = 0.0         # > 0: seconds of training per run instead of max_iters
    plot_only: bool = False          # True: redraw the table and plot from existing runs

HERE = os.path.dirname(os.path.abspath(__file__))


def run_train(model, out_dir, args):
    """train.py in a subprocess, its output passed through; each model trains in a fresh process, from
    scratch (replacing what an earlier, unfinished run left in out_dir).
    train.py runs in a process group of its own, so a Ctrl-C in the terminal reaches only compare.py,
    which hands it on exactly once and waits: train.py stops as on its own Ctrl-C (no half-written
    checkpoint, train.lock removed) and is reaped. (Killed and left unreaped, it would stay a zombie
    whose process id in train.lock refuses the next run.)"""
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


def loss_at(evals, key, x):
    """Val loss at `x` (training seconds, tokens or FLOPs), linear between eval points; None past the run."""
    points = [(r[key], r["val_loss"]) for r in evals]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return None


def run_name(model, lr, seed):
    return os.path.join(model, f"lr{lr:g}-seed{seed}")


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
    total, non_embedding, net = param_counts(out_dir)
    flops_per_token = net.flops_per_token()  # training FLOPs (forward + backward) per token
    for r in evals:
        r["flops"] = r["tokens"] * flops_per_token
    tok_s = sorted(r["tok_s"] for r in steps[1:] or steps)
    last = steps[-1]
    return {"out_dir": out_dir, "params": total, "non_embedding_params": non_embedding,
            "flops_per_token": flops_per_token, "tokens_per_s": tok_s[len(tok_s) // 2],
            "peak_mem_mb": max(r["peak_mem_mb"] for r in steps), "iters": evals[-1]["iter"],
            "train_time_s": evals[-1]["time"], "val_loss": evals[-1]["val_loss"],
            "best_val_loss": min(r["val_loss"] for r in evals),
            "diagnostics": {k: v for k, v in last.items() if any(d in k for d in DIAGNOSTICS)},
            "stats": {k: v for k, v in last.items() if k not in
                      ("iter", "loss", "lr", "ms", "tok_s", "time", "tokens", "peak_mem_mb")},
            "evals": evals}


def mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


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
        rows.append({"model": model, "learning_rate": lr, "seeds": len(runs), "val_loss_mean": mean,
                     "val_loss_std": std, "sweep": sweep, "runs": runs})
    # each curve read where the cheapest run stopped: the same wall time, the same training FLOPs
    equal = {key: min(r["evals"][-1][key] for row in rows for r in row["runs"]) for key in ("time", "flops")}
    for row in rows:
        for key in ("time", "flops"):
            row[f"val_loss_at_equal_{key}"] = mean_std([loss_at(r["evals"], key, equal[key]) for r in row["runs"]])[0]
    return rows, equal


def verdicts(rows):
    """Which differences in mean final val loss exceed the seed-to-seed spread: a difference counts when it
    is more than twice its standard error, sqrt(s_a^2 / n_a + s_b^2 / n_b) (about a 95% test)."""
    lines = []
    ranked = sorted(rows, key=lambda r: r["val_loss_mean"])
    for i, a in enumerate(ranked):
        for b in ranked[i + 1:]:
            diff = b["val_loss_mean"] - a["val_loss_mean"]
            if min(a["seeds"], b["seeds"]) < 2:
                lines.append(f"{a['model']} vs {b['model']}: {diff:.4f} apart, one seed: no spread to judge by")
                continue
            se = (a["val_loss_std"] ** 2 / a["seeds"] + b["val_loss_std"] ** 2 / b["seeds"]) ** 0.5
            if diff > 2 * se:
                lines.append(f"{a['model']} is better than {b['model']}: {diff:.4f} lower, more than twice the "
                             f"standard error of the difference ({se:.4f})")
            else:
                lines.append(f"{a['model']} vs {b['model']}: {diff:.4f} apart, within twice the standard error "
                             f"({se:.4f}): not distinguishable with these seeds")
    return lines


def table(rows, equal):
    lines = ["| model | params | non-emb. params | MFLOP/token | lr | seeds | tokens/s | peak mem MiB | iters | "
             f"train s | val loss (mean ± sd) | val at {equal['time']:.0f} s | val at {equal['flops'] / 1e12:.2f} "
             "TFLOP | best val | diagnostics (last step, first seed) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        first, runs = row["runs"][0], row["runs"]
        diag = ", ".join(f"{k} {v:.3g}" for k, v in first["diagnostics"].items()) or "-"
        tok_s = sorted(r["tokens_per_s"] for r in runs)[len(runs) // 2]
        spread = f" ± {row['val_loss_std']:.4f}" if row["seeds"] > 1 else ""  # one seed: no spread to show
        lines.append(f"| {row['model']} | {first['params']:,} | {first['non_embedding_params']:,} | "
                     f"{first['flops_per_token'] / 1e6:.2f} | {row['learning_rate']:g} | {row['seeds']} | "
                     f"{tok_s:,.0f} | {max(r['peak_mem_mb'] for r in runs):,.0f} | {first['iters']} | "
                     f"{mean_std([r['train_time_s'] for r in runs])[0]:.0f} | "
                     f"{row['val_loss_mean']:.4f}{spread} | {row['val_loss_at_equal_time']:.4f} | "
                     f"{row['val_loss_at_equal_flops']:.4f} | "
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
# the plot: val loss against steps, training time and training FLOPs, as a self-contained SVG; each
# model's line is the mean over its seeds, and the band around it spans the lowest to highest seed

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def curves(row, key):
    """(x, mean, low, high) per eval point over the runs of a model; x is averaged (wall time varies)."""
    n = min(len(r["evals"]) for r in row["runs"])
    points = []
    for i in range(n):
        evals = [r["evals"][i] for r in row["runs"]]
        losses = [e["val_loss"] for e in evals]
        points.append((mean_std([e[key] for e in evals])[0], mean_std(losses)[0], min(losses), max(losses)))
    return points


def svg_plot(rows, path, width=400, height=330, margin=55):
    ys = [e["val_loss"] for row in rows for r in row["runs"] for e in r["evals"]]
    y_lo, y_hi = min(ys), min(max(ys), min(ys) + 0.6)  # zoomed on the end, where models and seeds differ; higher is drawn at the top
    parts = []
    panels = (("iter", "steps", lambda v: f"{v:,.0f}"), ("time", "training time (s)", lambda v: f"{v:,.0f}"),
              ("flops", "training FLOPs (T = 1e12)", lambda v: f"{v / 1e12:.3g}T"))
    for panel, (key, label, fmt) in enumerate(panels):
        x_hi = max(e[key] for row in rows for r in row["runs"] for e in r["evals"]) or 1
        ox = panel * (width + 20)

        def X(v):
            return ox + margin + (width - margin - 30) * v / x_hi

        def Y(v):
            return height - margin + (margin + 10 - height) * (min(v, y_hi) - y_lo) / (y_hi - y_lo or 1)

        parts.append(f'<rect x="{ox + margin}" y="10" width="{width - margin - 30}" height="{height - margin - 10}" '
                     f'fill="none" stroke="#888"/>')
        for i in range(5):  # tick labels
            xv, yv = x_hi * i / 4, y_lo + (y_hi - y_lo) * i / 4
            parts.append(f'<text x="{X(xv):.1f}" y="{height - margin + 16}" text-anchor="middle">{fmt(xv)}</text>')
            parts.append(f'<text x="{ox + margin - 6}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
        parts.append(f'<text x="{ox + (width + margin) / 2}" y="{height - 12}" text-anchor="middle">{label}</text>')
        parts.append(f'<text x="{ox + 14}" y="{(height - margin) / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 {ox + 14} {(height - margin) / 2})">val loss</text>')
        for i, row in enumerate(rows):
            color, points = COLORS[i % len(COLORS)], curves(row, key)
            if row["seeds"] > 1:
                band = [(x, hi) for x, _, _, hi in points] + [(x, lo) for x, _, lo, _ in reversed(points)]
                parts.append(f'<polygon points="{" ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in band)}" '
                             f'fill="{color}" fill-opacity="0.18" stroke="none"/>')
            line = " ".join(f"{X(x):.1f},{Y(m):.1f}" for x, m, _, _ in points)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{color}" stroke-width="2"/>')
            if panel == 2:
                parts.append(f'<text x="{ox + width - 40}" y="{30 + 16 * i}" text-anchor="end" fill="{color}">'
                             f'{row["model"]}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{3 * width + 40}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
           + "".join(parts) + "</svg>\n")
    with open(path, "w") as f:
        f.write(svg)


def main(argv):
    opts, train_args = parse_options(argv, CompareConfig(), doc=__doc__, titles=("compare.py options",), rest=True)
    for arg in train_args:
        if arg[2:].partition("=")[0] in ("model", "out_dir", "init_from"):
            raise UserError(f"{arg.partition('=')[0]} is set by compare.py for each run")
    if opts.seeds < 1:
        raise UserError(f"--seeds={opts.seeds}: must be at least 1")
    models, out = opts.models.split(","), opts.out
    lrs = [parse_value("learning_rate", v, float) for v in opts.learning_rate.split(",")] if opts.learning_rate \
        else [TrainConfig.learning_rate]
    min_lr_given = any(arg.startswith("--min_lr=") for arg in train_args)
    seeds = [opts.seed + i for i in range(opts.seeds)]

    def args_for(lr, seed):
        """train.py's options for one run; min_lr follows the learning rate (lr/10, the default's ratio)."""
        return [*train_args, f"--learning_rate={lr:g}", *([] if min_lr_given else [f"--min_lr={lr / 10:g}"]),
                f"--seed={seed}"]

    for model in models:
        for lr in lrs:
            parse_args([f"--model={model}", *args_for(lr, opts.seed)])  # a one-line error before any run
    if not opts.plot_only:
        budget_iters = {}
        for seed in seeds:  # seed by seed, so an early stop still leaves whole comparisons
            for model in models:
                # the first seed tries every learning rate; the others train at the best one of those
                for lr in lrs if seed == seeds[0] else [best_lr(out, model, lrs, seeds[0])]:
                    out_dir = os.path.join(out, run_name(model, lr, seed))
                    request = {"train_args": args_for(lr, seed), "time_budget": opts.time_budget}
                    done = read_json(os.path.join(out_dir, "compare.json")) or {}
                    if {k: done.get(k) for k in request} == request:
                        print(f"{run_name(model, lr, seed)}: finished earlier in {out_dir}, not trained again")
                        continue
                    args = request["train_args"]
                    if opts.time_budget:  # as train.py's --flops_budget: the schedule fitted to the run
                        if model not in budget_iters:
                            budget_iters[model] = iterations_for_budget(model, out, args, opts.time_budget)
                        fitted = fit_schedule(parse_args([f"--model={model}", *args])[0], budget_iters[model])
                        args = [*args, f"--max_iters={fitted.max_iters}", f"--warmup_iters={fitted.warmup_iters}",
                                f"--lr_decay_iters={fitted.lr_decay_iters}"]
                    if os.path.exists(os.path.join(out_dir, "compare.json")):
                        os.remove(os.path.join(out_dir, "compare.json"))  # other options: this run is replaced
                    try:
                        run_train(model, out_dir, args)
                    except UserError as e:
                        if len(lrs) == 1:
                            raise
                        print(f"{run_name(model, lr, seed)} failed; the sweep goes on without it")
                        request["failed"] = str(e)  # e.g. a learning rate at which the loss diverged
                    write_json(os.path.join(out_dir, "compare.json"), request)
    rows, equal = summarise(models, out, lrs, seeds)
    text = table(rows, equal) + "\n\n" + "\n".join(f"- {line}" for line in verdicts(rows))
    print(text)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"command": "python compare.py " + " ".join(argv), "models": rows, "equal": equal,
                   "verdicts": verdicts(rows)}, f, indent=1)
    svg_plot(rows, os.path.join(out, "loss.svg"))
    print(f"wrote {out}/results.md, {out}/results.json and {out}/loss.svg")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"compare.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ncompare.py: interrupted; rerun the same command to continue (finished models are "
                 "not trained again)")
