"""compare.py end to end on two tiny runs: the table has their rows, and the JSON and the plot exist."""
import json
import os
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
    r = subprocess.run([sys.executable, "compare.py", f"--models={','.join(models)}", f"--out={out}",
                        "--dataset=tiny", f"--data_dir={tmp_path}", "--max_iters=6", "--eval_interval=3",
                        "--eval_iters=1", "--log_interval=2", "--batch_size=2"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == models
    results = json.load(open(out / "results.json"))
    assert [run["model"] for run in results["runs"]] == models
    assert all(run["iters"] == 6 and run["params"] > 0 and run["tokens_per_s"] > 0 for run in results["runs"])
    svg = (out / "loss.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 4  # two panels x two runs
    # --plot_only redraws from the logs without training again
    os.remove(out / "loss.svg")
    r = subprocess.run([sys.executable, "compare.py", f"--models={','.join(models)}", f"--out={out}", "--plot_only"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and (out / "loss.svg").exists(), r.stderr


def test_compare_rejects_bad_options_before_training(tmp_path):
    r = subprocess.run([sys.executable, "compare.py", "--models=gpt", "--colour=red", f"--out={tmp_path}"],
                       cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(r, "compare.py", "unknown option --colour")
    assert not os.listdir(tmp_path)


def test_loss_interpolation():
    evals = [{"time": 0.0, "val_loss": 4.0}, {"time": 10.0, "val_loss": 2.0}, {"time": 20.0, "val_loss": 1.0}]
    assert loss_at(evals, "time", 5.0) == 3.0 and loss_at(evals, "time", 15.0) == 1.5
    assert loss_at(evals, "time", 25.0) is None
