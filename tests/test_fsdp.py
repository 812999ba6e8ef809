"""train.py --fsdp=True: FSDP2 (torch.distributed.fsdp.fully_shard) under torchrun with 2 CPU processes
(gloo). It trains as one process does on the same global batch, MoD's routing thresholds stay equal
on every process, and its checkpoint is the one-file format: it resumes exactly, with 2 processes or
with 1, and sample.py reads it; pretrained weights reach every shard."""
import os
import shutil

import pytest
import torch

import sample
import sharding
import train
from cli import UserError
from conftest import build, make_text, read_log, run, saved_checkpoint
from prepare_data import prepare

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
# 2 layers (MoD's second is routed, DTF's are one pair), 4 micro-batches an iteration (2 a process under
# torchrun: the gradients are reduced after the second only), a clip that bites every step (the tiny
# models' gradient norms are ~1): 4 iterations, evaluated at 0, 2, 4
SMALL = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--block_size=32"]
RUN = ["--dataset=tiny", "--device=cpu", "--compile=False", "--eval_interval=2", "--eval_iters=1",
       "--log_interval=1", "--batch_size=4", "--gradient_accumulation_steps=4", "--lr_decay_iters=4",
       "--grad_clip=0.05"]
TIMING = ("time", "ms", "tok_s", "peak_mem_mb")  # what a rerun may not repeat


def torchrun(script, data_dir, out, *args):
    r = run(script, f"--data_dir={data_dir}", f"--out_dir={out}", *args, launcher=TORCHRUN)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def evals(out):
    return [(r["iter"], r["train_loss"], r["val_loss"]) for r in read_log(out) if "val_loss" in r]


def assert_close_runs(a, b, atol=1e-6):
    """Two runs' evaluations and checkpoints (weights, buffers, AdamW's moments) agree to float
    tolerance, and the checkpoints have the same format: keys, optimizer numbering and groups."""
    for (i, *losses), (j, *others) in zip(evals(a), evals(b), strict=True):
        assert i == j and losses == pytest.approx(others, rel=1e-6), (i, losses, others)
    ca, cb = saved_checkpoint(a), saved_checkpoint(b)
    assert ca.keys() == cb.keys() and ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        torch.testing.assert_close(ca["model"][key], cb["model"][key], rtol=0, atol=atol, msg=key)
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert ca["optimizer"]["param_groups"] == cb["optimizer"]["param_groups"] and sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            torch.testing.assert_close(sa[i][key], sb[i][key], rtol=0, atol=atol, msg=f"{i} {key}")


@pytest.fixture(scope="module")
def fsdp_gpt(data_dir, tmp_path_factory):
    """GPT trained 4 iterations by 2 processes under FSDP."""
    out = str(tmp_path_factory.mktemp("fsdp"))
    r = torchrun("train.py", data_dir, out, "--model=gpt", *SMALL, *RUN, "--max_iters=4", "--fsdp=True")
    assert "2 processes (FSDP)" in r.stdout
    return out


@pytest.fixture(scope="module")
def one_gpt(data_dir, tmp_path_factory):
    """The same run in one process, which takes both micro-batches of each iteration (--fsdp=True is
    ignored: one process has nothing to shard)."""
    out = str(tmp_path_factory.mktemp("one"))
    train.main(["--model=gpt", f"--data_dir={data_dir}", f"--out_dir={out}", *SMALL, *RUN, "--max_iters=4",
                "--fsdp=True"])
    return out


def test_fsdp_trains_as_one_process(fsdp_gpt, one_gpt):
    """Same global batch, same run: the sharded gradients' reduction, the accumulation and the
    clipping (whose norm is reduced over the shards) agree with one process to float tolerance."""
    assert evals(fsdp_gpt)[-1][2] < evals(fsdp_gpt)[0][2]  # it trains
    assert_close_runs(fsdp_gpt, one_gpt)


@pytest.mark.parametrize("model", ["mod", "dtf"])
def test_routing_thresholds_stay_equal_on_every_process(data_dir, tmp_path, model):
    """MoD and DTF under FSDP: each process holds a shard of every weight but its whole routing
    thresholds (buffers), equal on both processes after 4 steps, as are DTF's router scalars (0-D,
    left whole, their gradients averaged by train.py); and the whole run equals DDP's. (Not compared
    with one process: the threshold moves after every forward, 4 times an iteration in one process,
    twice from the two processes' averaged statistics under torchrun.)"""
    fsdp, ddp = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    torchrun("tests/ddp_worker.py", data_dir, fsdp, f"--model={model}", *SMALL, *RUN, "--max_iters=4", "--fsdp=True")
    torchrun("tests/ddp_worker.py", data_dir, ddp, f"--model={model}", *SMALL, *RUN, "--max_iters=4")
    rank0, rank1 = (torch.load(os.path.join(fsdp, f"rank{i}.pt"), weights_only=True) for i in (0, 1))
    thresholds = [key for key in rank0 if key.endswith(("tau", "tau_bias"))]
    assert thresholds and all(torch.isfinite(rank0[key]) for key in thresholds)  # trained: no longer inf
    whole = [key for key in rank0 if rank0[key].dim() == 0]  # the thresholds, and DTF's router scalars
    assert len(whole) == len(thresholds) + (4 if model == "dtf" else 0)
    for key in whole:
        assert torch.equal(rank0[key], rank1[key]), key
    embedding = rank0["wte.weight"].shape[0] + rank1["wte.weight"].shape[0]
    assert rank0["wte.weight"].shape[0] < embedding == saved_checkpoint(fsdp)["model"]["wte.weight"].shape[0]
    assert_close_runs(fsdp, ddp)
    ckpt = saved_checkpoint(fsdp)["model"]
    for key in thresholds:
        assert torch.equal(ckpt[key], rank0[key]), key


def test_resume_is_exact_with_two_processes_or_one(data_dir, fsdp_gpt, one_gpt, tmp_path):
    """Stopped at iteration 2 and resumed: under FSDP the run equals the uninterrupted one exactly
    (log and weights); the same checkpoint resumed in one process equals the one-process run."""
    out, alone = str(tmp_path / "two"), str(tmp_path / "one")
    torchrun("train.py", data_dir, out, "--model=gpt", *SMALL, *RUN, "--max_iters=2", "--fsdp=True")
    shutil.copytree(out, alone)
    r = torchrun("train.py", data_dir, out, "--init_from=resume", "--max_iters=4")  # --fsdp from the checkpoint
    assert "(FSDP)" in r.stdout and "iter 3:" in r.stdout and "iter 1:" not in r.stdout

    def without_timing(log):
        return [{k: v for k, v in record.items() if k not in TIMING} for record in log]

    assert without_timing(read_log(out)) == without_timing(read_log(fsdp_gpt))
    a, b = saved_checkpoint(fsdp_gpt), saved_checkpoint(out)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    train.main(["--init_from=resume", f"--data_dir={data_dir}", f"--out_dir={alone}", "--max_iters=4"])
    assert_close_runs(alone, one_gpt)


def test_checkpoint_samples(fsdp_gpt, one_gpt, capsys):
    """sample.py reads the FSDP checkpoint as it is, and greedy decoding writes what it writes from
    the one-process checkpoint."""
    texts = []
    for out in (fsdp_gpt, one_gpt):
        sample.main([f"--out_dir={out}", "--start=The king", "--num_samples=1", "--max_new_tokens=30", "--top_k=1",
                     "--device=cpu"])
        texts.append(capsys.readouterr().out)
    assert texts[0].startswith("The king") and len(texts[0]) > 38 and texts[0] == texts[1]


def test_float16_is_refused():
    with pytest.raises(UserError, match="bfloat16"):
        sharding.shard(build("gpt", n_layer=1, n_embd=16, n_head=2, n_kv_head=1), torch.device("cpu"), "float16")


def test_pretrained_weights_reach_every_shard(qwen2_hub, tmp_path):
    """Fine-tuning from hub weights: under DDP only rank 0 loads them (DDP copies them to the others),
    but FSDP copies nothing, so every process loads them. The checkpoint of the model as loaded
    (--max_iters=0), gathered from both shards, equals the one process's."""
    text = tmp_path / "text.txt"
    text.write_text(make_text(20000))
    data = str(tmp_path / "data")
    prepare("shakespeare", data_dir=data, tokenizer="hf:tiny/qwen2", input=str(text), name="tiny")
    args = ["--model=mod", "--init_from=hf:tiny/qwen2", "--dataset=tiny", "--max_iters=0", "--eval_iters=1",
            "--batch_size=2", "--block_size=32", "--device=cpu", "--compile=False"]
    sharded, alone = str(tmp_path / "fsdp"), str(tmp_path / "one")
    torchrun("train.py", data, sharded, *args, "--gradient_accumulation_steps=2", "--fsdp=True")
    train.main([*args, f"--data_dir={data}", f"--out_dir={alone}"])
    a, b = saved_checkpoint(sharded)["model"], saved_checkpoint(alone)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
