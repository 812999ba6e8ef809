"""--flops_budget: the iterations a budget buys for every model, by compare.py's accounting
(flops_per_token() x tokens), and a schedule that ends there; eval points that scale with the run."""
import json
import math
import os

import pytest
import torch

import train
from checkpoint import available_models
from compare import summarise_run
from conftest import make_text
from prepare_data import prepare
from train_config import TrainConfig, fit_schedule

TINY = ["--block_size=16", "--batch_size=2", "--eval_iters=1", "--log_interval=1", "--device=cpu", "--compile=False"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = root / "tiny.txt"
    src.write_text(make_text(8000))
    prepare("shakespeare_char", data_dir=str(root), name="tiny", input=str(src))
    return str(root)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


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
    with pytest.raises(train.UserError, match="--flops_budget sets max_iters and lr_decay_iters; drop those"):
        train.main(["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *TINY,
                    "--flops_budget=1e9", "--max_iters=10"])
    with pytest.raises(train.UserError, match="--flops_budget=-1.0: must be a finite number >= 0"):
        train.main(["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={tmp_path}", *TINY, "--flops_budget=-1"])
