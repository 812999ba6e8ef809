"""MoD's and DTF's routing threshold: one rule (a running threshold that holds the capacity, updated
from batch statistics, averaged over processes), so one set of checks, run on both models."""
import importlib

import pytest

from conftest import build, tokens
from routing import (check_capacity_from_iteration_50, check_processes_agree_on_tau, check_threshold_lifecycle,
                     check_threshold_rule_tracks_drifting_scores, routed_fractions_of_run)

ROUTED = ["mod", "dtf"]


@pytest.mark.parametrize("name", ROUTED)
def test_threshold_lifecycle(name):
    check_threshold_lifecycle(build(name), tokens(), tokens(seed=7))


@pytest.mark.parametrize("name", ROUTED)
def test_processes_agree_on_tau(name):
    check_processes_agree_on_tau(name)


@pytest.mark.parametrize("kind", ["gate", "router"])
@pytest.mark.parametrize("name", ROUTED)
def test_threshold_rule_keeps_the_capacity_on_drifting_scores(name, kind):
    check_threshold_rule_tracks_drifting_scores(importlib.import_module(f"model_{name}"), kind)


@pytest.mark.parametrize("name", ROUTED)
def test_routed_fraction_holds_the_capacity_in_a_short_run(name, tmp_path):
    """Every 20-iteration mean of the routed fraction from iteration 50 to 100 of a train.py run
    (a 0.2M-parameter model, the default schedule's warmup) is within 25% of the capacity."""
    check_capacity_from_iteration_50(routed_fractions_of_run(
        tmp_path, f"--model={name}", "--max_iters=100", "--eval_interval=100", "--batch_size=8", "--n_embd=64",
        "--n_layer=2", "--intermediate_size=192"))


@pytest.mark.parametrize("name", ROUTED)
def test_routed_fraction_holds_the_capacity_after_loading_pretrained_weights(name, tmp_path, qwen2_hub):
    """The same from Qwen2 weights (tests/fixtures/qwen2_tiny), whose hidden states, and so the
    fresh router's or gate's scores, are not those of a model trained from scratch."""
    check_capacity_from_iteration_50(routed_fractions_of_run(
        tmp_path, f"--model={name}", "--init_from=hf:tiny/qwen2", "--max_iters=100", "--eval_interval=100",
        "--block_size=64", tokenizer=("--tokenizer=hf:tiny/qwen2",)))
