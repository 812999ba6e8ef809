"""Nothing a user trained is lost, and bad input gets one line: NaN losses, refused out_dirs, the lock,
a full disk, foreign or broken checkpoints, mismatched data, bad sample/prepare options, Ctrl-C."""
import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

import sample
import train
from checkpoint import load_model_module
from cli import UserError
from conftest import ROOT, SHAKESPEARE, TINY_RUN, assert_one_line_error, fit, make_text, run, run_args, saved_checkpoint

@pytest.fixture
def fitted(data_dir, tmp_path):
    """An out_dir holding the checkpoint of a 2-iteration run."""
    out = str(tmp_path / "run")
    fit(data_dir, out)
    return out


def test_nan_loss_stops_before_a_checkpoint(data_dir, fitted):
    before = saved_checkpoint(fitted)
    with pytest.raises(UserError, match="nan or inf by iteration .* is intact; lower --learning_rate"):
        train.main(run_args(data_dir, fitted, "--init_from=resume", "--max_iters=30", "--eval_interval=4",
                        "--learning_rate=1e6", "--grad_clip=0"))
    after = saved_checkpoint(fitted)
    assert after["iter_num"] == 2 and all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert not os.path.exists(os.path.join(fitted, "train.lock"))


def test_nan_eval_loss_is_never_saved(data_dir, tmp_path, monkeypatch):
    """A non-finite evaluation stops the run too (here: the model's loss is made nan in eval mode)."""
    module = load_model_module("gpt")
    forward = module.Model.forward

    def nan_when_evaluating(self, idx, targets=None):
        logits, loss = forward(self, idx, targets)
        return logits, (loss * float("nan") if not self.training and loss is not None else loss)

    monkeypatch.setattr(module.Model, "forward", nan_when_evaluating)
    with pytest.raises(UserError, match="no checkpoint was written"):
        fit(data_dir, str(tmp_path))
    assert not os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.parametrize("option, message", [
    ("--block_size=0", "--block_size=0: must be positive"),
    ("--learning_rate=-1e-3", "--learning_rate=-0.001: must be a finite number >= 0"),
    ("--learning_rate=nan", "--learning_rate=nan: must be a finite number >= 0"),
    ("--min_lr=-1", "--min_lr=-1.0: must be a finite number >= 0"),
    ("--beta1=1", "--beta1=1.0: must be in [0, 1)"),
    ("--beta2=-0.1", "--beta2=-0.1: must be in [0, 1)"),
])
def test_bad_hyperparameters_fail_at_start(data_dir, tmp_path, option, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fit(data_dir, str(tmp_path), option)
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_scratch_run_refuses_an_out_dir_with_a_checkpoint(data_dir, fitted):
    log = open(os.path.join(fitted, "log.jsonl")).read()
    with pytest.raises(UserError, match="already holds a checkpoint; continue it with --init_from=resume, "
                                        "train into another --out_dir, or replace it with --overwrite=True"):
        fit(data_dir, fitted)
    with pytest.raises(UserError, match="bad gpt config"):  # fails at start even with --overwrite
        fit(data_dir, fitted, "--overwrite=True", "--n_head=3")
    assert open(os.path.join(fitted, "log.jsonl")).read() == log  # the old log survives a failed start
    fit(data_dir, fitted, "--overwrite=True", "--max_iters=4", "--eval_interval=4")
    assert saved_checkpoint(fitted)["iter_num"] == 4


def test_lock_refuses_a_second_training_and_takes_over_a_stale_one(data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "train.lock").write_text(str(other.pid))
        with pytest.raises(UserError, match=f"another training \\(process {other.pid}\\) is using"):
            fit(data_dir, str(out))
        assert (out / "train.lock").read_text() == str(other.pid)  # not removed: it is not ours
    finally:
        other.kill()
        other.wait()
    fit(data_dir, str(out))  # the dead process's lock is taken over
    assert saved_checkpoint(str(out))["iter_num"] == 2 and not (out / "train.lock").exists()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, and stays a zombie until reaped
    try:
        while open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
            pass
        (out / "train.lock").write_text(str(zombie.pid))
        fit(data_dir, str(out), "--overwrite=True")  # os.kill(pid, 0) succeeds, yet the process is dead
    finally:
        zombie.wait()
    assert not (out / "train.lock").exists()


def test_init_from_is_checked_before_any_data_work(tmp_path, monkeypatch):
    """A mistyped --init_from is one line at once, not after preparing (downloading) the default dataset."""
    monkeypatch.setattr(train, "prepare", lambda *a, **k: pytest.fail("prepares data"))
    with pytest.raises(UserError, match="--init_from=scrach: no such file; download dawn_39m_weights.pt"):
        train.main(["--model=dawn", "--init_from=scrach", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="--init_from=scrach: choose scratch, resume or hf:OWNER/NAME"):
        train.main(["--model=gpt", "--init_from=scrach", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"])
    with pytest.raises(UserError, match="hf:Qwen2.5-0.5B is not a Hugging Face repo id"):
        train.main(["--init_from=hf:Qwen2.5-0.5B", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"])
    assert os.listdir(tmp_path) == []  # no data, no out_dir


def test_full_disk_keeps_the_previous_checkpoint(data_dir, fitted, monkeypatch):
    before = saved_checkpoint(fitted)

    def full(obj, path):
        open(path, "wb").write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError, match="No space left on device .* the previous .*ckpt.pt is intact"):
        train.main(run_args(data_dir, fitted, "--init_from=resume", "--max_iters=4", "--eval_interval=2"))
    monkeypatch.undo()
    assert saved_checkpoint(fitted)["iter_num"] == before["iter_num"]
    assert sorted(os.listdir(fitted)) == ["ckpt.pt", "log.jsonl"]  # no .tmp, no lock left


def test_read_only_out_dir(data_dir, fitted, monkeypatch):
    real_replace = os.replace

    def read_only(src, dst):
        if dst.endswith("ckpt.pt"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(UserError, match="Read-only file system"):
        train.main(run_args(data_dir, fitted, "--init_from=resume", "--max_iters=4", "--eval_interval=2"))
    assert not os.path.exists(os.path.join(fitted, "ckpt.pt.tmp"))


def broken_checkpoints():
    """(name, how to break a good checkpoint, the expected message)."""
    def unknown_field(c):
        c["model_config"]["n_wings"] = 2

    def wrong_weights(c):
        c["model"] = {k: v[..., :1] if v.dim() else v for k, v in c["model"].items()}

    def nanogpt(c):
        return {"model": c["model"], "model_args": {"n_layer": 1}, "iter_num": 2, "config": {}}

    def nan_weights(c):
        next(iter(c["model"].values())).fill_(float("nan"))

    return [("unknown_field", unknown_field, "model config does not fit"),
            ("wrong_weights", wrong_weights, "weights do not fit"),
            ("nanogpt", nanogpt, "not written by this repo's train.py (it looks like nanoGPT's)"),
            ("nan", nan_weights, "holds NaN or infinite weights")]


def test_broken_checkpoints_give_one_line(data_dir, fitted, tmp_path):
    for name, breaks, message in broken_checkpoints():
        c = saved_checkpoint(fitted)
        c = breaks(c) or c
        out = tmp_path / name
        out.mkdir()
        torch.save(c, out / "ckpt.pt")
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train.main(run_args(data_dir, str(out), "--init_from=resume", "--max_iters=4"))
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            sample.main([f"--out_dir={out}", "--max_new_tokens=2", "--num_samples=1", "--device=cpu"])
    r = run("sample.py", f"--out_dir={tmp_path / 'nanogpt'}")
    assert_one_line_error(r, "sample.py", "not written by this repo's train.py")


def test_resume_on_another_dataset_is_refused(data_dir, fitted):
    with pytest.raises(UserError, match=r"was trained on .tiny. with another tokenizer .* \(--dataset=tiny\)"):
        train.main(run_args(data_dir, fitted, "--init_from=resume", "--max_iters=4", "--dataset=other"))


def test_bad_data_and_sample_options(data_dir, fitted, tmp_path):
    bad = tmp_path / "data" / "bad"
    bad.mkdir(parents=True)
    (bad / "meta.json").write_text('{"vocab_size": 65, "tokeni')
    with pytest.raises(UserError, match="meta.json is corrupt; prepare the dataset again"):
        fit(str(tmp_path / "data"), str(tmp_path / "out"), "--dataset=bad")
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(b"\xff\xfe caf\xe9")
    base = [f"--out_dir={fitted}", "--device=cpu", "--num_samples=1"]
    for option, message in ((f"--start=FILE:{prompt}", "is not UTF-8 text"), ("--top_k=-1", "--top_k=-1: must be 0"),
                            ("--max_new_tokens=-5", "--max_new_tokens=-5: must be 0")):
        with pytest.raises(UserError, match=message):
            sample.main([*base, option])
    r = run("prepare_data.py", "shakespeare_char", f"--input={tmp_path}", f"--data_dir={tmp_path / 'd'}")
    assert_one_line_error(r, "prepare_data.py", "is a directory; give a UTF-8 text file")


def test_unknown_dataset_suggests_a_working_command(data_dir, tmp_path):
    with pytest.raises(UserError) as e:
        fit(data_dir, str(tmp_path), "--dataset=foo")
    hint = str(e.value).split("run: ")[1]
    assert "--name=foo" in hint and "shakespeare_char, shakespeare, c4" in hint
    src = tmp_path / "text.txt"
    src.write_text(make_text(5000))
    command = hint.split(" (")[0].replace("YOUR_TEXT.txt", str(src)).split()[1:]
    assert run(*command).returncode == 0  # the suggested command works as printed
    fit(data_dir, str(tmp_path / "foo_run"), "--dataset=foo")


def test_log_lines_show_progress_and_eta(data_dir, tmp_path, capsys):
    fit(data_dir, str(tmp_path))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iter ")]
    assert lines[0].startswith("iter 1: 1/2, loss ") and "eta " in lines[0]
    assert train.format_duration(83) == "1m23s" and train.format_duration(7.9) == "7s" and \
        train.format_duration(3720) == "1h02m"


def interrupt(cmd, when):
    """Start cmd, send SIGINT once a stdout line satisfies when(line), return (process, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if when(line):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    proc.stderr_text = err
    return proc


def test_ctrl_c_says_whether_a_checkpoint_exists(data_dir, tmp_path):
    base = [sys.executable, "train.py", *run_args(data_dir, tmp_path / "a", "--max_iters=100000")]
    p = interrupt([*base, "--eval_interval=100000"], lambda line: line.startswith("iter 2:"))
    lines = p.stderr_text.strip().splitlines()
    assert p.returncode == 1 and lines == [f"train.py: interrupted before the first checkpoint; nothing was "
                                           f"saved in {tmp_path / 'a'}"], p.stderr_text
    assert not (tmp_path / "a" / "train.lock").exists()
    p = interrupt([*base, "--eval_interval=2", "--overwrite=True"], lambda line: line.startswith("iter 3:"))
    assert p.stderr_text.strip().splitlines() == [
        f"train.py: interrupted; {tmp_path / 'a' / 'ckpt.pt'} is intact, resume with: python train.py "
        f"--model=gpt --out_dir={tmp_path / 'a'} --init_from=resume"], p.stderr_text


def test_offline_quick_start(tmp_path, monkeypatch):
    """prepare_data.py shakespeare_char --input=FILE keeps the text where the download would be, and
    then train.py's default dataset finds it (no download)."""
    r = run("prepare_data.py", "shakespeare_char", f"--input={SHAKESPEARE}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with open(SHAKESPEARE, "rb") as f:
        assert (tmp_path / "data" / "shakespeare_char" / "input.txt").read_bytes() == f.read()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(train, "prepare", lambda *a, **k: pytest.fail("downloads"))
    train.main(["--out_dir=out", *TINY_RUN, "--max_iters=1", "--eval_interval=1"])
    assert (tmp_path / "out" / "ckpt.pt").exists()
