"""bench.py and bench_originals.py: what they time is what sample.py and prepare_data.py compute, their
options give one-line errors, and a missing original repository is reported, not fatal."""
import gzip
import json
import os
import shutil

import pytest
import torch

import bench
from cli import UserError
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


def test_gpu_mode_dry_run_times_a_listed_model_at_a_tiny_shape():
    """bench.py --mode=gpu --dry_run=True: the GPU mode's steps, evaluations and table on CPU; without
    --dry_run a machine with no CUDA GPU gets one line saying how to dry-run it."""
    r = run("bench.py", "--mode=gpu", "--dry_run=True", "--compile=False", "--model=gpt")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| gpt ")]
    assert [(row[2].strip(), row[3].strip(), row[6].strip(), row[8].strip()) for row in rows] == \
        [("2x32", "1,628,448", "-", "0")]  # shape, params, no MFU on CPU, not compiled: no recompile
    assert float(rows[0][5].replace(",", "")) > 0  # tokens/s
    assert "FSDP vs DDP: not measured" in r.stdout
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="--mode=gpu needs a CUDA GPU; --mode=gpu --dry_run=True"):
            bench.main(["--mode=gpu"])
    with pytest.raises(UserError, match="--n_layer=3: --mode=gpu fixes every model's shape"):
        bench.main(["--mode=gpu", "--dry_run=True", "--n_layer=3"])


@pytest.mark.parametrize("name", ["gpt", "bdh", "doge", "mod"])
def test_gpu_mode_builds_gpt2_small_shape(name):
    """One rule for every model: its own gpt2-124m preset, else model_gpt's values of the fields its
    Config has; GPT-2's BPE padded to 50304; no dropout."""
    opts = bench.BenchConfig(mode="gpu")
    with torch.device("meta"):
        model = bench.build_gpu(opts, __import__(f"model_{name}"))
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.block_size, c.vocab_size) == (12, 768, 12, 1024, 50304)
    assert all(getattr(c, f) == 0 for f in vars(c) if "dropout" in f)
    if name != "bdh":  # (BDH has neither field)
        assert (c.n_kv_head, c.intermediate_size) == (12, 2048)


def test_gpu_mode_counts_the_evaluation_graph_as_the_one_recompile(monkeypatch):
    """A compiled training run with evaluations in between compiles the eval graph once, at the first
    evaluation (grad mode and training flag differ), and nothing after: the count measure_gpu reports.
    (torch.compile's eager backend: dynamo's guards and recompiles without inductor's minutes on CPU.)"""
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))
    torch._dynamo.reset()
    opts = bench.BenchConfig(mode="gpu", dry_run=True, compile=True, batch_size=2)
    result = bench.measure_gpu(opts, [], "gpt", torch.device("cpu"), "float32")
    assert result["recompiles"] == 1 and result["steps"] == 4 and result["eval_every"] == 2


def test_decode_benchmark_loads_a_saved_checkpoint_as_pretrained_py_does(tmp_path, monkeypatch):
    """bench_originals.py --decode=True gives our model transformers' weights the way users load a
    checkpoint (pretrained.py from the hub cache); here the saved checkpoint is tests/fixtures/qwen2_tiny,
    written by transformers, and ours must reproduce transformers' logits for it."""
    import bench_originals
    from conftest import FIXTURES
    from test_pretrained import EXPECTED

    class Saved:  # stands in for a transformers model: save_pretrained writes the fixture's files
        def save_pretrained(self, folder):
            os.makedirs(folder)
            for name in ("config.json", "model.safetensors"):
                shutil.copy(os.path.join(FIXTURES, "qwen2_tiny", name), folder)

    monkeypatch.setenv("DYNLM_CACHE", str(tmp_path))
    monkeypatch.setenv("DYNLM_HF_URL", "http://127.0.0.1:9")  # nothing may be downloaded
    ours = bench_originals.load_as_users_do(Saved(), "gpt", "bench/tiny", 32)
    assert ours.config.block_size == 32 and not ours.training
    with torch.no_grad():
        logits = ours(EXPECTED["idx"])[0]
    torch.testing.assert_close(logits, EXPECTED["logits"], atol=1e-5, rtol=0)


def test_decode_benchmark_says_what_to_install():
    """transformers is optional: without it --decode=True is one line naming the install, and the
    tokens check reports the first differing generated position."""
    import importlib.util

    import bench_originals
    a = torch.zeros(2, 20, dtype=torch.long)
    b = a.clone()
    assert bench_originals.first_difference(a, b) == "identical"
    b[1, 19] = 1
    b[0, 18] = 1
    assert bench_originals.first_difference(a, b) == "differ from token 2"  # prompt of 16, then 0-based
    if importlib.util.find_spec("transformers") is None:
        assert_one_line_error(run("bench_originals.py", "--decode=True"), "bench_originals.py",
                              "pip install transformers")
