"""train.py and sample.py end to end on a small local text: training, exact resume, sampling,
one-line errors for bad input, and a 2-process DDP run through torchrun (gloo, CPU)."""
import json
import os

import pytest
import torch

import train
from checkpoint import load_model_module
from cli import UserError
from conftest import SHAKESPEARE, assert_one_line_error, run, saved_checkpoint
from prepare_data import prepare
from train_config import TrainConfig, configure_optimizer


def run_train(data_dir, out_dir, *args):
    r = run("train.py", "--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--eval_iters=2",
            "--log_interval=1", "--batch_size=4", "--warmup_iters=2", *args)
    assert r.returncode == 0, r.stderr
    return r


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """An uninterrupted 8-iteration run (with dropout, so that resuming must restore randomness too)."""
    out = str(tmp_path_factory.mktemp("straight"))
    run_train(data_dir, out, "--max_iters=8", "--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1")
    return out


def test_training_writes_checkpoint_and_log(trained):
    ckpt = saved_checkpoint(trained)
    assert ckpt["model_name"] == "gpt" and ckpt["iter_num"] == 8
    assert ckpt["model_config"]["vocab_size"] == len(ckpt["tokenizer"]["chars"])
    assert ckpt["train_config"]["dataset"] == "tiny"
    assert set(ckpt["optimizer"]["state"])  # AdamW moments are saved, so a resume continues them
    log = read_log(trained)
    evals = [r for r in log if "val_loss" in r]
    steps = [r for r in log if "loss" in r]
    assert [r["iter"] for r in evals] == [0, 4, 8]
    assert [r["iter"] for r in steps] == list(range(1, 9))
    assert evals[-1]["train_loss"] < evals[0]["train_loss"]  # it learns
    assert all(r["tok_s"] > 0 and r["tokens"] == 4 * 64 * r["iter"] for r in steps)


def test_resume_continues_exactly(data_dir, trained, tmp_path):
    out = str(tmp_path)
    run_train(data_dir, out, "--max_iters=4", "--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1")
    assert saved_checkpoint(out)["iter_num"] == 4
    r = run("train.py", "--init_from=resume", f"--out_dir={out}", "--max_iters=8")  # the rest: from ckpt.pt
    assert r.returncode == 0, r.stderr
    assert "iter 5:" in r.stdout and "iter 1:" not in r.stdout  # the iteration count continues
    a, b = saved_checkpoint(trained), saved_checkpoint(out)
    assert b["iter_num"] == 8
    for key in a["model"]:  # same weights as the uninterrupted run: same batches, dropout, moments
        assert torch.equal(a["model"][key], b["model"][key]), key
    straight, resumed = read_log(trained), read_log(out)
    assert [r["loss"] for r in straight if "loss" in r] == [r["loss"] for r in resumed if "loss" in r]


def test_sample_from_checkpoint(trained, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The king")
    args = [f"--out_dir={trained}", "--num_samples=2", "--max_new_tokens=30", "--seed=7"]
    a = run("sample.py", *args, "--start=FILE:" + str(prompt))
    b = run("sample.py", *args, "--start=The king")
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # the same seed gives the same text
    samples = a.stdout.split("---------------\n")[:-1]
    assert len(samples) == 2 and all(s.startswith("The king") and len(s) >= 38 for s in samples)


def test_sampler_is_exact_with_top_k_1(trained):
    """The nanoGPT way (crop=True): greedy tokens are the argmax of the eval forward on the last
    block_size tokens at every position."""
    from sample import generate
    ckpt = saved_checkpoint(trained)
    module = load_model_module("gpt")
    model = module.Model(module.Config(**ckpt["model_config"])).eval()
    model.load_state_dict(ckpt["model"])
    out = generate(model, torch.tensor([[1, 2, 3]]), 80, top_k=1, crop=True)  # past block_size: crops
    assert out.shape == (1, 83)
    for t in range(3, 83):
        window = out[:, max(0, t - 64):t]
        assert model(window)[0][0, -1].argmax().item() == out[0, t].item()


def test_bad_input_gives_one_line_errors(data_dir, trained, tmp_path):
    base = ["--dataset=tiny", f"--data_dir={data_dir}", "--max_iters=1"]
    assert_one_line_error(run("train.py", "--model=nope"), "train.py", "unknown model 'nope'; choose one of")
    assert_one_line_error(run("train.py", "--colour=red"), "train.py", "unknown option --colour")
    assert_one_line_error(run("train.py", "--max_iters=many"), "train.py", "--max_iters=many: expected int")
    assert_one_line_error(run("train.py", "--dataset=nope", f"--data_dir={data_dir}"), "train.py",
                          "--name=nope")
    assert_one_line_error(run("train.py", *base, "--preset=huge"), "train.py", "unknown preset 'huge'")
    assert_one_line_error(run("train.py", *base, "--n_head=3"), "train.py", "bad gpt config")
    if not torch.cuda.is_available():
        assert_one_line_error(run("train.py", *base, "--device=cuda"), "train.py", "has no cuda device")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt.pt").write_bytes(b"this is not a checkpoint")
    assert_one_line_error(run("train.py", *base, "--init_from=resume", f"--out_dir={corrupt}"), "train.py",
                          "is not a readable checkpoint")
    assert_one_line_error(run("sample.py", f"--out_dir={corrupt}"), "sample.py", "is not a readable checkpoint")
    assert_one_line_error(run("sample.py", f"--out_dir={tmp_path / 'none'}"), "sample.py", "no checkpoint at")
    assert_one_line_error(run("train.py", *base, "--init_from=resume", f"--out_dir={trained}", "--n_layer=2"),
                          "train.py", "keeps the checkpoint's model config")
    assert_one_line_error(run("sample.py", f"--out_dir={trained}", "--start=Zürich"), "sample.py",
                          "not in this model's vocabulary")


def test_help_lists_options():
    r = run("train.py", "--model=gpt", "--help")
    assert r.returncode == 0 and "--learning_rate=0.001" in r.stdout and "--n_kv_head=2" in r.stdout


def test_default_dataset_prepares_itself(tmp_path, file_server, monkeypatch):
    """A missing shakespeare_char is downloaded on first use (here from a local server); another
    missing dataset is a hint to prepare it."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = f.read()
    file_server.files["/input.txt"] = text.encode()
    monkeypatch.setattr(train, "prepare", lambda name, data_dir: prepare(name, data_dir,
                                                                          url=file_server.url + "/input.txt"))
    meta = train.load_meta(TrainConfig(data_dir=str(tmp_path)))
    assert meta["tokenizer"] == {"kind": "char", "chars": "".join(sorted(set(text)))}
    assert [path for path, _ in file_server.requests] == ["/input.txt"]
    with pytest.raises(UserError, match="python prepare_data.py shakespeare"):
        train.load_meta(TrainConfig(data_dir=str(tmp_path), dataset="shakespeare"))


def test_lr_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    lrs = [train.get_lr(cfg, it) for it in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1e-3                       # linear warmup
    assert abs(lrs[10] - 1e-3) < 1e-12 and abs(lrs[60] - 5.5e-4) < 1e-12  # cosine: halfway at the middle
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[115] == 1e-4


def test_optimizer_groups_follow_ndim_and_lr_mult():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model[1].weight.lr_mult = 10.0
    opt = configure_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    groups = {(g["weight_decay"], g["lr_mult"]): {id(p) for p in g["params"]} for g in opt.param_groups}
    assert groups == {(0.1, 1.0): {id(model[0].weight)}, (0.0, 1.0): {id(model[0].bias), id(model[1].bias)},
                      (0.0, 10.0): {id(model[1].weight)}}


@pytest.mark.parametrize("model", ["gpt", "mod"])
def test_ddp_two_processes_agree(data_dir, tmp_path, model):
    """torchrun with 2 CPU processes (gloo): training runs, and both processes end with identical
    weights and buffers (for a routed model: its routing thresholds)."""
    out = str(tmp_path)
    r = run("tests/ddp_worker.py", f"--model={model}", "--dataset=tiny", f"--data_dir={data_dir}",
            f"--out_dir={out}", "--device=cpu", "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
            "--log_interval=1", "--batch_size=4", "--gradient_accumulation_steps=2",
            launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 processes" in r.stdout and "iter 4:" in r.stdout
    rank0, rank1 = (torch.load(os.path.join(out, f"rank{i}.pt"), weights_only=True) for i in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert saved_checkpoint(out)["iter_num"] == 4


def test_batches_differ_by_seed_and_process_and_any_seed_works():
    """torch's CPU generator keeps only its seed's low 32 bits: seeds, processes and steps must still
    draw different batches (they once all drew the same ones), and a date or 64-bit seed must work."""
    tokens = [torch.arange(10000, dtype=torch.int32).numpy()]

    def offsets(*parts):
        rng = torch.Generator().manual_seed(train.derived_seed(*parts))
        x, _ = train.get_batch(tokens, 8, 16, rng, torch.device("cpu"))
        return x[:, 0].tolist()

    base = offsets(1337, "batch", 0, 5)
    assert base == offsets(1337, "batch", 0, 5)  # a pure function of its parts: exact resume
    for other in [(1338, "batch", 0, 5), (1337, "batch", 1, 5), (1337, "batch", 0, 6), (1337, "dropout", 0, 5)]:
        assert offsets(*other) != base, other
    for seed in (20241205, 1764633600, 2**64 - 1, -1):
        assert 0 <= train.derived_seed(seed, "batch", 0, 10**9) < 2**63
