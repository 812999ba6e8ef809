"""
Compare architectures on equal terms: one command trains each model with the same data, seed, batch,
block and schedule through train.py itself, then tabulates and plots the runs.

    python compare.py --models=gpt,bdh,dawn,dtf,mod,doge                 # the laptop recipe, 2000 iterations
    python compare.py --models=gpt,mod --time_budget=300 --batch_size=16  # ~300 s of training each
    python compare.py --models=gpt,mod --plot_only                        # redraw from existing logs

Every other --key=value goes to train.py for every model. Runs go to <out>/<model>/ (checkpoint and
log.jsonl); the table goes to <out>/results.md and stdout, everything in it to <out>/results.json,
and the curves to <out>/loss.svg (a small SVG written here, so no plotting package is needed).
With --time_budget each model first trains 30 iterations to measure its speed, and then gets the
number of iterations that fits the budget, with its full warmup and decay schedule.

Rerunning an interrupted command continues it: a model whose run finished is not trained again (its
folder holds compare.json with the training options it finished with; other options train it
again), and an unfinished run restarts from scratch, replacing its partial checkpoint and log.
"""
import json
import os
import shutil
import subprocess
import sys

import torch

from prepare_data import UserError, write_json
from train import TrainConfig, load_model_module, parse_args, parse_value

HERE = os.path.dirname(os.path.abspath(__file__))


def run_train(model, out_dir, args):
    """train.py in a subprocess, its output passed through; each model trains in a fresh process, from
    scratch (replacing what an earlier, unfinished run left in out_dir)."""
    cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--model={model}", f"--out_dir={out_dir}",
           "--overwrite=True", *args]
    if subprocess.run(cmd).returncode:
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
    ckpt = torch.load(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    module = load_model_module(ckpt["model_name"])
    config = module.Config(**ckpt["model_config"])
    with torch.device("meta"):
        model = module.Model(config)
    total = sum(p.numel() for p in model.parameters())
    embedding = {id(p) for p in model.parameters() if config.vocab_size in p.shape}
    embedding |= {id(m.weight) for m in model.modules()
                  if isinstance(m, torch.nn.Embedding) and m.num_embeddings == config.block_size}
    return total, total - sum(p.numel() for p in model.parameters() if id(p) in embedding), model


def loss_at(evals, key, x):
    """Val loss at `x` (training seconds or tokens), linear between eval points; None past the run."""
    points = [(r[key], r["val_loss"]) for r in evals]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1e-12)
    return None


DIAGNOSTICS = ("frac_routed", "density", "dead", "used_frac", "masked_frac", "experts_used")  # stats() keys for the table


def summarise(models, out):
    rows = []
    for model in models:
        steps, evals = read_log(os.path.join(out, model))
        total, non_embedding, net = param_counts(os.path.join(out, model))
        tok_s = sorted(r["tok_s"] for r in steps[1:] or steps)
        last = steps[-1]
        diagnostics = {k: v for k, v in last.items() if any(d in k for d in DIAGNOSTICS)}
        rows.append({"model": model, "params": total, "non_embedding_params": non_embedding,
                     "flops_per_token": net.flops_per_token(), "tokens_per_s": tok_s[len(tok_s) // 2],
                     "peak_mem_mb": max(r["peak_mem_mb"] for r in steps), "iters": evals[-1]["iter"],
                     "train_time_s": evals[-1]["time"], "val_loss": evals[-1]["val_loss"],
                     "best_val_loss": min(r["val_loss"] for r in evals), "diagnostics": diagnostics,
                     "stats": {k: v for k, v in last.items() if k not in
                               ("iter", "loss", "lr", "ms", "tok_s", "time", "tokens", "peak_mem_mb")},
                     "evals": evals})
    equal_time = min(r["train_time_s"] for r in rows)
    for r in rows:
        r["val_loss_at_equal_time"] = loss_at(r["evals"], "time", equal_time)
    return rows, equal_time


def table(rows, equal_time):
    lines = ["| model | params | non-emb. params | MFLOP/token | tokens/s | peak mem MiB | iters | train s | "
             f"val loss | val loss at {equal_time:.0f} s | best val | diagnostics (last step) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        diag = ", ".join(f"{k} {v:.3g}" for k, v in r["diagnostics"].items()) or "-"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['non_embedding_params']:,} | "
                     f"{r['flops_per_token'] / 1e6:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_mem_mb']:,.0f} | "
                     f"{r['iters']} | {r['train_time_s']:.0f} | {r['val_loss']:.4f} | "
                     f"{r['val_loss_at_equal_time']:.4f} | {r['best_val_loss']:.4f} | {diag} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the plot: val loss against training time and against tokens, as a self-contained SVG

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def svg_plot(rows, path, width=460, height=330, margin=55):
    ys = [r["val_loss"] for row in rows for r in row["evals"]]
    y_lo, y_hi = min(ys), min(max(ys), min(ys) + 1.5)  # the init loss would flatten the interesting part
    parts = []
    for panel, (key, label) in enumerate((("time", "training time (s)"), ("tokens", "tokens seen"))):
        x_hi = max(r[key] for row in rows for r in row["evals"]) or 1
        ox = panel * (width + 20)

        def X(v):
            return ox + margin + (width - margin - 30) * v / x_hi

        def Y(v):
            return height - margin + (margin + 10 - height) * (min(v, y_hi) - y_lo) / (y_hi - y_lo or 1)

        parts.append(f'<rect x="{ox + margin}" y="10" width="{width - margin - 30}" height="{height - margin - 10}" '
                     f'fill="none" stroke="#888"/>')
        for i in range(5):  # tick labels
            xv, yv = x_hi * i / 4, y_lo + (y_hi - y_lo) * i / 4
            xtext = f"{xv:,.0f}" if key == "time" else f"{xv / 1e6:.3g}M"
            parts.append(f'<text x="{X(xv):.1f}" y="{height - margin + 16}" text-anchor="middle">{xtext}</text>')
            parts.append(f'<text x="{ox + margin - 6}" y="{Y(yv) + 4:.1f}" text-anchor="end">{yv:.2f}</text>')
        parts.append(f'<text x="{ox + (width + margin) / 2}" y="{height - 12}" text-anchor="middle">{label}</text>')
        parts.append(f'<text x="{ox + 14}" y="{(height - margin) / 2}" text-anchor="middle" '
                     f'transform="rotate(-90 {ox + 14} {(height - margin) / 2})">val loss</text>')
        for i, row in enumerate(rows):
            color = COLORS[i % len(COLORS)]
            points = " ".join(f"{X(r[key]):.1f},{Y(r['val_loss']):.1f}" for r in row["evals"])
            parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
            if panel == 1:
                parts.append(f'<text x="{ox + width - 40}" y="{30 + 16 * i}" text-anchor="end" fill="{color}">'
                             f'{row["model"]}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width + 20}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
           + "".join(parts) + "</svg>\n")
    with open(path, "w") as f:
        f.write(svg)


def run_name(model, lr, seed):
    return os.path.join(model, f"lr{lr:g}-seed{seed}")


def final_val_loss(out_dir):
    """The last eval's val loss of a finished run; None for a run that is missing or failed."""
    done = read_json(os.path.join(out_dir, "compare.json"))
    if not done or done.get("failed"):
        return None
    return read_log(out_dir)[1][-1]["val_loss"]


def best_lr(out, model, lrs, seed):
    """The learning rate whose run with `seed` ended at the lowest val loss."""
    losses = {lr: final_val_loss(os.path.join(out, run_name(model, lr, seed))) for lr in lrs}
    losses = {lr: loss for lr, loss in losses.items() if loss is not None}
    if not losses:
        raise UserError(f"every learning rate failed for {model} with seed {seed}")
    return min(losses, key=losses.get)


def main(argv):
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    models, out, time_budget, plot_only = "gpt,bdh,dawn,dtf,mod,doge".split(","), "compare", 0.0, False
    n_seeds, lrs, train_args = 1, [TrainConfig.learning_rate], []
    base_seed, min_lr_given = TrainConfig.seed, False
    for arg in argv:
        key, _, value = arg[2:].partition("=")
        if key == "models":
            models = value.split(",")
        elif key == "out":
            out = value
        elif key == "time_budget":
            time_budget = parse_value(key, value, 0.0)
        elif key == "seeds":
            n_seeds = parse_value(key, value, 1)
            if n_seeds < 1:
                raise UserError("--seeds must be at least 1")
        elif key == "seed":
            base_seed = parse_value(key, value, 1)
        elif key == "learning_rate":
            lrs = [parse_value(key, v, 1.0) for v in value.split(",")]
        elif arg == "--plot_only":
            plot_only = True
        elif key in ("model", "out_dir", "init_from"):
            raise UserError(f"--{key} is set by compare.py for each model")
        else:
            min_lr_given |= key == "min_lr"
            train_args.append(arg)
    seeds = [base_seed + i for i in range(n_seeds)]

    def args_for(lr, seed):
        """train.py's options for one run; min_lr follows the learning rate (lr/10, the default's ratio)."""
        return [*train_args, f"--learning_rate={lr:g}", *([] if min_lr_given else [f"--min_lr={lr / 10:g}"]),
                f"--seed={seed}"]

    for model in models:
        for lr in lrs:
            parse_args([f"--model={model}", *args_for(lr, base_seed)])  # a one-line error before any run
    if not plot_only:
        budget_iters = {}
        for seed in seeds:  # seed by seed, so an early stop still leaves whole comparisons
            for model in models:
                # the first seed tries every learning rate; the others train at the best one of those
                for lr in lrs if seed == seeds[0] else [best_lr(out, model, lrs, seeds[0])]:
                    out_dir = os.path.join(out, run_name(model, lr, seed))
                    request = {"train_args": args_for(lr, seed), "time_budget": time_budget}
                    done = read_json(os.path.join(out_dir, "compare.json")) or {}
                    if {k: done.get(k) for k in request} == request:
                        print(f"{run_name(model, lr, seed)}: finished earlier in {out_dir}, not trained again")
                        continue
                    args = request["train_args"]
                    if time_budget:
                        if model not in budget_iters:
                            budget_iters[model] = iterations_for_budget(model, out, args, time_budget)
                        args = [*args, f"--max_iters={budget_iters[model]}"]
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
    raise SystemExit("summary not written yet")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"compare.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("\ncompare.py: interrupted; rerun the same command to continue (finished models are "
                 "not trained again)")
