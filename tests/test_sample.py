"""sample.py's generate for every model: cached decoding samples what the full forward would, and
past block_size it follows its documented window rule (refill from the last block_size/2 tokens)."""
import pytest
import torch

from sample import generate
from test_models import MODEL_NAMES, build


def small(name):
    """A model with a short block, so that a short generation crosses block_size twice."""
    return build(name, block_size=16).eval()


def prompt(model, B, T, seed=7):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_cached_sampling_draws_what_the_full_forward_draws(name):
    """Within block_size: temperature and top-k through the cache give, draw for draw, the tokens of
    re-running the whole forward (crop=True), for a batch of different prompts."""
    model = small(name)
    x = prompt(model, 3, 4)
    torch.manual_seed(5)
    cached = generate(model, x, 12, temperature=0.8, top_k=10)
    torch.manual_seed(5)
    rerun = generate(model, x, 12, temperature=0.8, top_k=10, crop=True)
    assert cached.shape == (3, 16)
    assert torch.equal(cached, rerun)
    assert not torch.equal(cached[0, 4:], cached[1, 4:])  # different prompts, different texts


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_past_block_size_the_cache_is_refilled_from_the_last_half_block(name):
    """Greedy tokens past block_size equal the argmax of a full forward over the window the rule
    names: the cache fills up to block_size tokens, then restarts from the last block_size/2."""
    model = small(name)
    T = model.config.block_size
    x = prompt(model, 2, 5)
    out = generate(model, x, 3 * T, top_k=1)
    assert out.shape == (2, 5 + 3 * T)
    start, refills = 0, 0
    for n in range(5, out.size(1)):  # token n is predicted from out[:, start:n]
        if n - start > T:  # the cache would need block_size + 1 tokens
            start, refills = n - T // 2, refills + 1
        with torch.no_grad():
            expected = model(out[:, start:n])[0][:, -1].argmax(-1)
        assert torch.equal(expected, out[:, n]), f"{name}: token {n} (window from {start})"
    assert refills >= 4  # the test crossed block_size several times


def test_crop_past_block_size_differs_from_the_refill_rule():
    """The two samplers are different rules past block_size (otherwise the tests above prove less)."""
    model = small("gpt")
    x = prompt(model, 1, 5)
    assert not torch.equal(generate(model, x, 40, top_k=1), generate(model, x, 40, top_k=1, crop=True))


def test_bench_generate_times_trained_checkpoints(tmp_path):
    """bench.py --mode=generate --checkpoints: a trained run is timed with its own config and weights,
    the cached and re-run samplers agree within block_size, and a routed model reports its routing."""
    import os
    import subprocess
    import sys
    from conftest import ROOT, assert_one_line_error, make_text
    from prepare_data import prepare
    src = tmp_path / "tiny.txt"
    src.write_text(make_text(20000))
    prepare("shakespeare_char", data_dir=str(tmp_path), name="tiny", input=str(src))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for model in ("gpt", "mod"):
        r = subprocess.run([sys.executable, "train.py", f"--model={model}", f"--out_dir={tmp_path / model}",
                            "--dataset=tiny", f"--data_dir={tmp_path}", "--max_iters=4", "--eval_interval=4",
                            "--eval_iters=1", "--batch_size=2", "--block_size=32", "--n_layer=2", "--n_embd=32"],
                           cwd=ROOT, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
    dirs = f"{tmp_path / 'gpt'},{tmp_path / 'mod'}"
    r = subprocess.run([sys.executable, "bench.py", "--mode=generate", f"--checkpoints={dirs}", "--new_tokens=16",
                        "--repeats=1"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith(f"| {tmp_path}")]
    assert [row[1].strip() for row in rows] == [str(tmp_path / "gpt"), str(tmp_path / "mod")]
    assert [row[7].strip() for row in rows] == ["True", "True"]  # 16 + 16 tokens fit block_size 32
    assert rows[0][8].strip() == "-" and rows[1][8].strip().startswith("l1 ")
    r = subprocess.run([sys.executable, "bench.py", f"--checkpoints={dirs}"], cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(r, "bench.py", "--checkpoints times generation only; add --mode=generate")
    r = subprocess.run([sys.executable, "bench.py", "--mode=generate", f"--checkpoints={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert_one_line_error(r, "bench.py", f"no checkpoint at {tmp_path}/ckpt.pt")


@pytest.mark.parametrize("name", ["gpt", "mod"])
def test_bench_lockstep_decodes_what_sample_py_decodes(name):
    """bench.py --mode=generate times the two ways alternating in chunks; both must produce
    sample.py's greedy tokens (cached and re-run), and each way's time is its own."""
    import bench
    model = small(name)
    x = prompt(model, 2, 4)
    text, seconds = bench.greedy_lockstep(model, x, 12, chunk=5)  # chunks that end mid-way too
    expected = generate(model, x, 12, top_k=1)
    assert torch.equal(text["cached"], expected) and torch.equal(text["forward"], expected)
    assert set(seconds) == {"cached", "forward"} and all(s > 0 for s in seconds.values())
