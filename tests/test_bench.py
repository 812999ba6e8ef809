"""bench.py and bench_originals.py: what they time is what sample.py and prepare_data.py compute, their
options give one-line errors, and a missing original repository is reported, not fatal."""
import gzip
import json
import os

import pytest
import torch

import bench
from conftest import SHAKESPEARE, assert_one_line_error, build, run, tokens
from prepare_data import prepare
from sample import generate


def test_generate_times_trained_checkpoints(data_dir, tmp_path):
    """bench.py --mode=generate --checkpoints: a trained run is timed with its own config and weights,
    the cached and re-run samplers agree within block_size, and a routed model reports its routing."""
    for model in ("gpt", "mod"):
        r = run("train.py", f"--model={model}", f"--out_dir={tmp_path / model}", "--dataset=tiny",
                f"--data_dir={data_dir}", "--max_iters=4", "--eval_interval=4", "--eval_iters=1", "--batch_size=2",
                "--block_size=32", "--n_layer=2", "--n_embd=32")
        assert r.returncode == 0, r.stderr[-2000:]
    dirs = f"{tmp_path / 'gpt'},{tmp_path / 'mod'}"
    r = run("bench.py", "--mode=generate", f"--checkpoints={dirs}", "--new_tokens=16", "--repeats=1")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith(f"| {tmp_path}")]
    assert [row[1].strip() for row in rows] == [str(tmp_path / "gpt"), str(tmp_path / "mod")]
    assert [row[7].strip() for row in rows] == ["True", "True"]  # 16 + 16 tokens fit block_size 32
    assert rows[0][8].strip() == "-" and rows[1][8].strip().startswith("l1 ")
    assert_one_line_error(run("bench.py", f"--checkpoints={dirs}"), "bench.py",
                          "--checkpoints times generation only; add --mode=generate")
    assert_one_line_error(run("bench.py", "--mode=generate", f"--checkpoints={tmp_path}"), "bench.py",
                          f"no checkpoint at {tmp_path}/ckpt.pt")


@pytest.mark.parametrize("name", ["gpt", "mod"])
def test_lockstep_decodes_what_sample_py_decodes(name):
    """bench.py --mode=generate times the two ways alternating in chunks; both must produce
    sample.py's greedy tokens (cached and re-run), and each way's time is its own."""
    model = build(name, block_size=16).eval()
    x = tokens(2, 4, seed=7)
    text, seconds = bench.greedy_lockstep(model, x, 12, chunk=5)  # chunks that end mid-way too
    expected = generate(model, x, 12, top_k=1)
    assert torch.equal(text["cached"], expected) and torch.equal(text["forward"], expected)
    assert set(seconds) == {"cached", "forward"} and all(s > 0 for s in seconds.values())


def test_tokenize_times_the_c4_path_on_the_prepared_text(tmp_path, monkeypatch, capsys):
    """bench.py --mode=tokenize finds the text prepare_data.py shakespeare_char left in data/ (its
    default --text) and hands prepare_data's C4 tokenizer a gzip of ~2 KB documents cut from it, with
    1 process and with all cores (the tokenizer itself is stubbed: 20 MB of BPE takes minutes here)."""
    prepare("shakespeare_char", data_dir=str(tmp_path / "data"), input=SHAKESPEARE)
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    calls = []

    def tokenize_c4_file(gz, out, procs):
        with gzip.open(gz, "rt", encoding="utf-8") as f:
            calls.append(([json.loads(next(f))["text"] for _ in range(5)], procs))
        return 123

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("prepare_data.tokenize_c4_file", tokenize_c4_file)
    bench.bench_tokenize(bench.BenchConfig())
    docs = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    assert [c[0] for c in calls] == [(docs * 2)[:5]] * len(calls)  # the text, document by document, repeated
    assert [c[1] for c in calls] == sorted({1, os.cpu_count()})
    assert "| 1 | 123 |" in capsys.readouterr().out


def test_originals_reports_what_is_not_there(tmp_path):
    """bench_originals.py without the original repositories says, per model, what to clone; an
    unknown model name is a one-line error."""
    r = run("bench_originals.py", f"--originals={tmp_path}", "--models=gpt,bdh,dawn,mod")
    assert r.returncode == 0, r.stderr
    assert ("skipped: " + str(tmp_path / "nanoGPT" / "model.py") +
            " not found (git clone https://github.com/karpathy/nanoGPT)") in r.stdout
    assert "bdh.py not found (git clone https://github.com/pathwaycom/bdh)" in r.stdout
    assert "model_v17_1.py not found (git clone https://github.com/madst0614/DAWN)" in r.stdout
    assert "dtf/model.py not found (git clone https://github.com/fredericowieser/Dynamic-Transformers" in r.stdout
    assert_one_line_error(run("bench_originals.py", f"--originals={tmp_path}", "--models=gpt,xl"),
                          "bench_originals.py", "--models: no original is known for 'xl'")
