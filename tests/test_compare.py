"""compare.py end to end on tiny runs: the table has their rows, the JSON and the plot exist, seeds and
learning-rate sweeps follow the documented protocol, and the verdicts follow the spread."""
import json
import os
import signal
import subprocess
import sys

from checkpoint import load_checkpoint
from compare import loss_at, mean_std, read_log, size_options, verdicts
from conftest import ROOT, assert_one_line_error, build, run


def test_compare_two_models(data_dir, tmp_path):
    models = ["gpt", "bdh"]
    out = tmp_path / "cmp"
    command = [f"--models={','.join(models)}", f"--out={out}", "--dataset=tiny", f"--data_dir={data_dir}",
               "--max_iters=6", "--eval_interval=3", "--eval_iters=1", "--log_interval=2", "--batch_size=2"]
    r = run("compare.py", *command)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == models
    results = json.load(open(out / "results.json"))
    assert [row["model"] for row in results["models"]] == models
    runs = [run for row in results["models"] for run in row["runs"]]
    assert all(run["iters"] == 6 and run["params"] > 0 and run["tokens_per_s"] > 0 for run in runs)
    svg = (out / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 6  # three panels x two models
    assert "<polygon" not in svg  # one seed: no band
    # a rerun of the same command does not train the finished models again
    mtimes = [os.path.getmtime(out / m / "lr0.001-seed1337" / "ckpt.pt") for m in models]
    r = run("compare.py", *command)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"{m}/lr0.001-seed1337: finished earlier" in r.stdout for m in models)
    assert [os.path.getmtime(out / m / "lr0.001-seed1337" / "ckpt.pt") for m in models] == mtimes
    # --plot_only redraws from the logs without training again
    os.remove(out / "loss.svg")
    r = run("compare.py", f"--models={','.join(models)}", f"--out={out}", "--plot_only=True")
    assert r.returncode == 0 and (out / "loss.svg").exists(), r.stderr


def test_equal_steps_at_one_size_of_the_ladder(data_dir, tmp_path):
    """--sizes=s at equal steps: every model at the ladder's small size instead of its laptop config."""
    out = tmp_path / "cmp"
    r = run("compare.py", "--models=gpt,dawn", "--sizes=s", f"--out={out}", "--dataset=tiny", f"--data_dir={data_dir}",
            "--max_iters=1", "--eval_iters=1", "--batch_size=2", "--block_size=16")
    assert r.returncode == 0, r.stderr[-2000:]
    params = {row["model"]: row["runs"][0]["params"] for row in json.load(open(out / "results.json"))["models"]}
    for model in ("gpt", "dawn"):
        config = load_checkpoint(out / model / "lr0.001-seed1337" / "ckpt.pt")["model_config"]
        assert {k: config[k] for k in size_options(model, "s")} == size_options(model, "s")
        assert params[model] == sum(p.numel() for p in build(model, **config).parameters())


def test_ctrl_c_stops_the_run_cleanly_and_a_rerun_continues(data_dir, tmp_path):
    """Ctrl-C during a run (here sent to compare.py alone): compare.py hands it to train.py and waits, so
    train.py says what it kept and removes its lock; the rerun trains the interrupted model again."""
    out = tmp_path / "cmp"
    command = [sys.executable, "compare.py", "--models=gpt", f"--out={out}", "--dataset=tiny",
               f"--data_dir={data_dir}", "--eval_iters=1", "--log_interval=1", "--batch_size=2", "--n_layer=1",
               "--n_embd=16", "--block_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*command, "--max_iters=100000", "--eval_interval=2"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 3:"):  # a checkpoint exists (iteration 2)
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    run_dir = out / "gpt" / "lr0.001-seed1337"
    assert [line for line in err.strip().splitlines() if line] == [
        f"train.py: interrupted; {run_dir / 'ckpt.pt'} is intact, resume with: python train.py --model=gpt "
        f"--out_dir={run_dir} --init_from=resume",
        "compare.py: interrupted; rerun the same command to continue (finished models are not trained again)"], err
    assert not (run_dir / "train.lock").exists()  # train.py ended itself; no killed process holds the lock
    assert not (run_dir / "compare.json").exists()  # unfinished
    r = subprocess.run([*command, "--max_iters=4", "--eval_interval=2"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iter 1:" in r.stdout and json.load(open(out / "results.json"))["models"][0]["runs"][0]["iters"] == 4


def test_compare_rejects_bad_options_before_training(tmp_path):
    r = run("compare.py", "--models=gpt", "--colour=red", f"--out={tmp_path}")
    assert_one_line_error(r, "compare.py", "unknown option --colour")
    assert not os.listdir(tmp_path)


def test_loss_interpolation():
    evals = [{"time": 0.0, "val_loss": 4.0}, {"time": 10.0, "val_loss": 2.0}, {"time": 20.0, "val_loss": 1.0}]
    assert loss_at(evals, "time", 5.0) == 3.0 and loss_at(evals, "time", 15.0) == 1.5
    assert loss_at(evals, "time", 25.0) is None


def test_seeds_and_learning_rate_sweep(data_dir, tmp_path):
    """The first seed tries every learning rate, the others train at the one that ended lowest there; a
    diverging rate is recorded as failed without stopping the sweep; mean and sd come from the runs' logs."""
    out = tmp_path / "cmp"
    r = run("compare.py", "--models=gpt", f"--out={out}", "--dataset=tiny", f"--data_dir={data_dir}", "--max_iters=6",
            "--eval_interval=3", "--eval_iters=1", "--log_interval=3", "--batch_size=2", "--n_layer=1", "--n_embd=16",
            "--block_size=16", "--seeds=3", "--learning_rate=3e-3,1e-2,1e6")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gpt/lr1e+06-seed1337 failed; the sweep goes on without it" in r.stdout
    first = {lr: read_log(out / "gpt" / f"lr{lr}-seed1337")[1][-1]["val_loss"] for lr in ("0.003", "0.01")}
    best = min(first, key=first.get)
    assert sorted(os.listdir(out / "gpt")) == sorted(["lr0.003-seed1337", "lr0.01-seed1337", "lr1e+06-seed1337",
                                                      f"lr{best}-seed1338", f"lr{best}-seed1339"])
    args = json.load(open(out / "gpt" / f"lr{best}-seed1339" / "compare.json"))["train_args"]
    assert f"--learning_rate={best}" in args and f"--min_lr={float(best) / 10:g}" in args and "--seed=1339" in args
    losses = [read_log(out / "gpt" / f"lr{best}-seed{s}")[1][-1]["val_loss"] for s in (1337, 1338, 1339)]
    assert len(set(losses)) == 3  # the seeds really differ
    row = json.load(open(out / "results.json"))["models"][0]
    mean = sum(losses) / 3
    assert row["learning_rate"] == float(best) and row["seeds"] == 3
    assert abs(row["val_loss_mean"] - mean) < 1e-12
    assert abs(row["val_loss_std"] - (sum((x - mean) ** 2 for x in losses) / 2) ** 0.5) < 1e-12
    assert [(s["learning_rate"], s["seeds"], s["failed"]) for s in row["sweep"]] == \
        [(3e-3, 3 if best == "0.003" else 1, 0), (1e-2, 3 if best == "0.01" else 1, 0), (1e6, 0, 1)]
    table = (out / "results.md").read_text()
    assert "| gpt |" in table and "failed" in table and f"**{mean:.4f} ± " in table
    assert (out / "loss.svg").read_text().count("<polygon") == 3  # a band per panel


def row(model, mean, std, seeds=3):
    return {"model": model, "val_loss_mean": mean, "val_loss_std": std, "seeds": seeds}


def test_verdicts_follow_the_standard_error():
    # a vs b: standard error of the difference sqrt(0.03^2 / 3 + 0.06^2 / 3) = 0.0387, and 0.1 > 2 x 0.0387
    lines = verdicts([row("b", 1.70, 0.06), row("a", 1.60, 0.03), row("c", 1.64, 0.03)])
    assert lines[0].startswith("a vs c: 0.0400 apart, within twice the standard error of the difference (0.0245)")
    assert lines[1].startswith("a is better than b: 0.1000 lower, more than twice the standard error "
                               "of the difference (0.0387)")
    assert lines[2].startswith("c vs b: 0.0600 apart, within twice the standard error of the difference (0.0387)")
    assert verdicts([row("a", 1.6, 0.0, seeds=1), row("b", 1.9, 0.0, seeds=1)]) == \
        ["a vs b: 0.3000 apart, one seed: no spread to judge by"]


def test_mean_std():
    assert mean_std([2.0]) == (2.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert abs(mean - 7 / 3) < 1e-12 and abs(std - ((16 + 1 + 25) / 9 / 2) ** 0.5) < 1e-12
