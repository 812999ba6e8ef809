"""--flops_budget: the iterations a budget buys for every model, by compare.py's accounting
(flops_per_token() x tokens), and a schedule that ends there; eval points that scale with the run.
compare.py at equal compute: the size ladder, the isoFLOP parabola, the frontier and verdicts
(from synthetic runs), and resuming after Ctrl-C."""
import inspect
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import compare
import train
from checkpoint import available_models
from cli import UserError
from compare import summarise_run
from conftest import ROOT, read_log
from train_config import TrainConfig, fit_schedule

TINY = ["--block_size=16", "--batch_size=2", "--eval_iters=1", "--log_interval=1", "--device=cpu", "--compile=False"]


def lrs(cfg):
    return [train.get_lr(cfg, it) for it in range(cfg.max_iters)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 35, 999, 1000, 2500])
def test_fitted_schedule_ends_at_min_lr(n):
    cfg = fit_schedule(TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100), n)
    lr = lrs(cfg)
    assert cfg.max_iters == n and lr[-1] == 1e-4  # the last iteration taken runs at min_lr
    assert cfg.warmup_iters == min(100, n // 10)  # a short run warms up for a tenth of it
    peak = cfg.warmup_iters
    assert all(a < b for a, b in zip(lr[:peak], lr[1:peak + 1]))  # warmup rises ...
    if n > 1:
        assert lr[peak] == 1e-3  # ... to the peak
    assert all(a > b for a, b in zip(lr[peak:], lr[peak + 1:]))  # then every step decays


def test_default_recipe_keeps_its_schedule_and_evaluations():
    cfg = TrainConfig()
    assert cfg.max_iters == 2000 and train.eval_interval(cfg) == 250
    assert train.get_lr(cfg, 99) < 1e-3 == train.get_lr(cfg, 100) and train.get_lr(cfg, 2000) == 1e-4


@pytest.mark.parametrize("model", available_models())
def test_budget_buys_its_iterations_for_every_model(model, data_dir, tmp_path):
    """12.4 iterations' worth of FLOPs trains 12 iterations: the run's FLOPs, counted as compare.py counts
    them, are within half an iteration of the budget; the schedule ends at min_lr; 9 or 10 evaluations."""
    probe = train.load_model_module(model)
    vocab_size = json.load(open(os.path.join(data_dir, "tiny", "meta.json")))["vocab_size"]
    fpt = probe.Model(probe.Config(block_size=16, vocab_size=vocab_size)).flops_per_token()
    per_iter = fpt * 2 * 16
    out = str(tmp_path / model)
    train.main(["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out}", f"--model={model}", *TINY,
                f"--flops_budget={12.4 * per_iter}", "--min_lr=1e-4"])
    run = summarise_run(out)
    assert run["flops_per_token"] == fpt
    assert abs(run["evals"][-1]["flops"] - 12.4 * per_iter) <= per_iter / 2
    log = read_log(out)
    steps = [r for r in log if "lr" in r]
    assert [r["iter"] for r in steps] == list(range(1, 13)) and steps[-1]["lr"] == 1e-4
    # warmup shortened to 12 // 10 = 1 iteration: the second step is at the peak, then decay follows
    assert steps[0]["lr"] < steps[1]["lr"] == 1e-3 > steps[2]["lr"]
    assert [r["iter"] for r in log if "val_loss" in r] == [0, 2, 4, 6, 8, 10, 12]  # every ceil(12 / 8)


def test_tiny_budget_trains_one_iteration_at_min_lr(data_dir, tmp_path):
    out = str(tmp_path / "run")
    train.main(["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--flops_budget=1",
                "--n_layer=1", "--n_embd=16", "--n_head=2", "--n_kv_head=1"])
    steps = [r for r in read_log(out) if "lr" in r]
    assert [(r["iter"], r["lr"]) for r in steps] == [(1, 1e-4)]
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["train_config"]["max_iters"] == 1 and ckpt["train_config"]["flops_budget"] == 1


def test_resume_keeps_the_budget(data_dir, tmp_path, monkeypatch):
    """A budget run stopped after its first checkpoint and resumed without repeating --flops_budget
    ends where the uninterrupted run does, with the same weights."""
    model = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--n_kv_head=1"]
    args = ["--dataset=tiny", f"--data_dir={data_dir}", *TINY]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    train.main([*args, *model, f"--out_dir={straight}", "--flops_budget=1e8"])

    save = train.save_checkpoint

    def save_then_stop(path, cfg, *rest, iter_num, **kw):
        save(path, cfg, *rest, iter_num=iter_num, **kw)
        if iter_num > 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint", save_then_stop)
    with pytest.raises(SystemExit, match="interrupted"):
        train.main([*args, *model, f"--out_dir={resumed}", "--flops_budget=1e8", "--eval_interval=6"])
    assert torch.load(os.path.join(resumed, "ckpt.pt"), weights_only=True)["iter_num"] == 6
    monkeypatch.setattr(train, "save_checkpoint", save)
    train.main([*(a for a in args if a != "--block_size=16"), f"--out_dir={resumed}", "--init_from=resume"])
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (straight, resumed))
    assert a["iter_num"] == b["iter_num"] > 12
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_flops_budget_refuses_max_iters(data_dir, tmp_path):
    with pytest.raises(UserError, match="--flops_budget sets max_iters and lr_decay_iters; drop those"):
        train.main(["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *TINY,
                    "--flops_budget=1e9", "--max_iters=10"])
    with pytest.raises(UserError, match="--flops_budget=-1.0: must be a finite number >= 0"):
        train.main(["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *TINY, "--flops_budget=-1"])


# -----------------------------------------------------------------------------
# compare.py at equal compute: the size ladder, the isoFLOP parabola, the frontier and its verdicts

def test_ladder_builds_every_model_at_the_listed_sizes():
    """Every model builds at every size, the middle one is its laptop config, the ends span about 10x,
    and the parameter counts compare.py's comment lists are the real ones."""
    listed = {}
    for line in inspect.getsource(compare).splitlines():
        if line.startswith("#   size"):
            names = line.split()[4:]
        elif line.startswith("#   ") and line.split()[1] in compare.SIZES:
            listed[line.split()[1]] = dict(zip(names, (int(n.replace(",", "")) for n in line.split()[4:])))
    assert set(listed) == set(compare.SIZES)
    for model in available_models():
        module = train.load_model_module(model)
        counts = {}
        for size in compare.SIZES:
            net = module.Model(module.Config(**compare.size_options(model, size)))
            counts[size] = sum(p.numel() for p in net.parameters())
            assert listed[size].get(model, counts[size]) == counts[size], (model, size)
        assert counts["m"] == sum(p.numel() for p in module.Model(module.Config()).parameters())
        assert 7 < counts["l"] / counts["s"] < 15, (model, counts)


@pytest.mark.parametrize("shift", [0.0, 0.3, -0.4])
def test_parabola_recovers_a_known_isoflop_curve(shift):
    n_opt = 8e5 * math.exp(shift)
    params = [2e5, 5e5, 8e5, 1.6e6, 2.7e6]
    losses = [1.5 + 0.07 * (math.log(p) - math.log(n_opt)) ** 2 for p in params]
    n, loss, inside = compare.fit_parabola(params, losses)
    assert n == pytest.approx(n_opt, rel=1e-6) and loss == pytest.approx(1.5, abs=1e-9) and inside
    # three points define it exactly; beyond the sizes tried it says so
    n, _, inside = compare.fit_parabola([2e6, 4e6, 8e6], [1.5 + 0.07 * math.log(p / 3e5) ** 2 for p in (2e6, 4e6, 8e6)])
    assert n == pytest.approx(3e5, rel=1e-6) and not inside
    assert compare.fit_parabola([2e5, 8e5, 2.7e6], [2.0, 1.8, 1.3]) is None  # concave: no minimum


def synthetic_run(params, bpb, flops, seconds):
    return {"params": params, "val_bpb": bpb, "flops": flops, "train_time_s": seconds,
            "flops_per_token": flops / 1e5, "iters": 100}


def test_frontier_and_verdicts_from_synthetic_runs():
    """Two models, three sizes, two budgets, two seeds. At 1e12 A's best size is m (its parabola has
    its minimum inside the ladder) and A beats B beyond the spread; at 1e13 B's best is l and the two
    are within the spread. The frontier takes each model's best size; its seconds are that size's."""
    params = {"s": 200_000, "m": 800_000, "l": 2_700_000}
    bpb = {("a", 1e12): {"s": 2.00, "m": 1.90, "l": 1.95}, ("b", 1e12): {"s": 2.10, "m": 2.05, "l": 2.08},
           ("a", 1e13): {"s": 1.80, "m": 1.70, "l": 1.66}, ("b", 1e13): {"s": 1.85, "m": 1.72, "l": 1.661}}
    seconds = {"a": 10.0, "b": 40.0}
    runs = {(m, s, b): [synthetic_run(params[s], v + d, b * (1 + d), seconds[m] * b / 1e12 + d * 100)
                        for d in (-0.01, 0.01)]
            for (m, b), sizes in bpb.items() for s, v in sizes.items()}
    profile = compare.isoflop(runs, ["a", "b"], ["s", "m", "l"], [1e12, 1e13])
    a, b = profile[1e12]["a"], profile[1e12]["b"]
    assert (a["best"], b["best"]) == ("m", "m")
    assert a["val_bpb_mean"] == pytest.approx(1.90) and a["val_bpb_std"] == pytest.approx(0.02 / 2 ** 0.5)
    n, loss, inside = a["parabola"]
    assert inside and 2e5 < n < 2.7e6 and loss < 1.90
    assert [profile[1e13][m]["best"] for m in "ab"] == ["l", "l"]
    assert compare.verdicts(list(profile[1e12].values()), "val_bpb")[0].startswith(
        "a is better than b: 0.1500 lower, more than twice the standard error")
    assert compare.verdicts(list(profile[1e13].values()), "val_bpb")[0].startswith(
        "a vs b: 0.0010 apart, within twice the standard error")
    points = compare.frontier(profile)
    assert points["a"] == [pytest.approx((1e12, 10.0, 1.90, 1.89, 1.91)), pytest.approx((1e13, 100.0, 1.66, 1.65, 1.67))]
    assert [p[1] for p in points["b"]] == pytest.approx([40.0, 400.0])
    text = compare.frontier_table(profile) + compare.budget_tables(profile)
    assert "| a | 1.9000 ± 0.0141 (m, 10.0 s) | 1.6600 ± 0.0141 (l, 100.0 s) |" in text
    assert "| a | **m** | 800,000 |" in text and "| b | l | 2,700,000 |" in text
    assert "| a | l | 1.6600 ± 0.0141 | above 2,700,000 | - |" in text  # still falling at the largest size


def test_budget_comparison_resumes_after_ctrl_c(data_dir, tmp_path):
    """Ctrl-C while the second run of a budget comparison trains: the rerun of the same command keeps
    the finished run, trains the interrupted one from scratch, and writes the tables and frontier."""
    out = tmp_path / "cmp"
    command = [sys.executable, "compare.py", "--models=gpt", "--sizes=s,m", "--flops_budget=1.5e10", f"--out={out}",
               "--dataset=tiny", f"--data_dir={data_dir}", "--eval_iters=1", "--log_interval=1", "--batch_size=2",
               "--block_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = 0
    for line in proc.stdout:
        runs += line.startswith("gpt: ")  # train.py's first line: the model, its parameters
        if runs == 2 and line.startswith("iter 3:"):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().endswith("compare.py: interrupted; rerun the same command to "
                                                         "continue (finished models are not trained again)"), err
    first, interrupted = out / "gpt" / "s-1.5e10-lr0.001-seed1337", out / "gpt" / "m-1.5e10-lr0.001-seed1337"
    assert (first / "compare.json").exists() and not (interrupted / "compare.json").exists()
    mtime = os.path.getmtime(first / "ckpt.pt")
    r = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"gpt/s-1.5e10-lr0.001-seed1337: finished earlier in {first}" in r.stdout
    assert os.path.getmtime(first / "ckpt.pt") == mtime and "iter 1:" in r.stdout  # only the second trained
    log = [json.loads(line) for line in open(interrupted / "log.jsonl")]
    assert [r["iter"] for r in log if "loss" in r][0] == 1  # from scratch, one log
    results = (out / "results.md").read_text()
    assert "| gpt | **" in results and "gpt vs" not in results  # one model: no pairs to judge
    svg = (out / "frontier.svg").read_text()
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 2  # two panels, one budget point each


def test_budget_comparison_rejects_conflicting_options(tmp_path):
    for options, message in [
        (["--sizes=s,m"], "--sizes=s,m: at equal steps one size of the ladder"),
        (["--sizes=s", "--n_embd=96"], "--n_embd is set by the size ladder"),
        (["--flops_budget=1e12", "--learning_rate=1e-3,2e-3"], "--flops_budget takes one --learning_rate"),
        (["--flops_budget=1e12", "--sizes=s,xl"], "--sizes=s,xl: choose from s, m, l"),
        (["--flops_budget=1e12", "--n_embd=96"], "--n_embd is set by the size ladder"),
        (["--flops_budget=1e12", "--max_iters=100"], "--flops_budget sets max_iters"),
        (["--flops_budget=0"], "budgets must be positive"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            compare.main(["--models=gpt", f"--out={tmp_path}", *options])
    assert not os.listdir(tmp_path)
