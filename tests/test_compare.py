"""compare.py end to end on two tiny runs: the table has their rows, and the JSON and the plot exist."""
import json
import os
import signal
import subprocess
import sys

import pytest

from compare import loss_at
from conftest import ROOT, assert_one_line_error, make_text
from prepare_data import prepare
from train import available_models


def test_compare_two_models(tmp_path):
    others = [m for m in available_models() if m != "gpt"]
    if not others:
        pytest.skip("needs a second model file")
    models = ["gpt", others[0]]
    src = tmp_path / "tiny.txt"
    src.write_text(make_text(20000))
    prepare("shakespeare_char", data_dir=str(tmp_path), name="tiny", input=str(src))
    out = tmp_path / "cmp"
    command = [sys.executable, "compare.py", f"--models={','.join(models)}", f"--out={out}", "--dataset=tiny",
               f"--data_dir={tmp_path}", "--max_iters=6", "--eval_interval=3", "--eval_iters=1",
               "--log_interval=2", "--batch_size=2"]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == models
    results = json.load(open(out / "results.json"))
    assert [run["model"] for run in results["runs"]] == models
    assert all(run["iters"] == 6 and run["params"] > 0 and run["tokens_per_s"] > 0 for run in results["runs"])
    svg = (out / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4  # two panels x two runs
    # a rerun of the same command does not train the finished models again
    mtimes = [os.path.getmtime(out / m / "ckpt.pt") for m in models]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(f"{m}: finished earlier" in r.stdout for m in models)
    assert [os.path.getmtime(out / m / "ckpt.pt") for m in models] == mtimes
    # --plot_only redraws from the logs without training again
    os.remove(out / "loss.svg")
    r = subprocess.run([sys.executable, "compare.py", f"--models={','.join(models)}", f"--out={out}", "--plot_only"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and (out / "loss.svg").exists(), r.stderr


def test_ctrl_c_gives_one_line_and_a_rerun_continues(tmp_path):
    """Ctrl-C during a run: one line; the rerun trains the interrupted model again from scratch."""
    src = tmp_path / "tiny.txt"
    src.write_text(make_text(20000))
    prepare("shakespeare_char", data_dir=str(tmp_path), name="tiny", input=str(src))
    out = tmp_path / "cmp"
    command = [sys.executable, "compare.py", "--models=gpt", f"--out={out}", "--dataset=tiny",
               f"--data_dir={tmp_path}", "--eval_iters=1", "--log_interval=1", "--batch_size=2", "--n_layer=1",
               "--n_embd=16", "--block_size=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([*command, "--max_iters=100000", "--eval_interval=2"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("iter 3:"):  # a checkpoint exists (iteration 2)
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert err.strip().splitlines() == ["compare.py: interrupted; rerun the same command to continue "
                                        "(finished models are not trained again)"], err
    assert not (out / "gpt" / "compare.json").exists()  # unfinished
    r = subprocess.run([*command, "--max_iters=4", "--eval_interval=2"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iter 1:" in r.stdout and json.load(open(out / "results.json"))["runs"][0]["iters"] == 4


def test_compare_rejects_bad_options_before_training(tmp_path):
    r = subprocess.run([sys.executable, "compare.py", "--models=gpt", "--colour=red", f"--out={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(r, "compare.py", "unknown option --colour")
    assert not os.listdir(tmp_path)


def test_loss_interpolation():
    evals = [{"time": 0.0, "val_loss": 4.0}, {"time": 10.0, "val_loss": 2.0}, {"time": 20.0, "val_loss": 1.0}]
    assert loss_at(evals, "time", 5.0) == 3.0 and loss_at(evals, "time", 15.0) == 1.5
    assert loss_at(evals, "time", 25.0) is None
