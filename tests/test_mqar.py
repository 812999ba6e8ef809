"""Multi-query associative recall (prepare_data.py mqar): the generator's properties, whole-sequence
batches whose non-answer targets every model's loss ignores, recall accuracy in train.py's evaluation,
and a small GPT that learns to recall."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import train
from checkpoint import available_models, load_model_module
from cli import UserError
from conftest import ROOT, assert_one_line_error
from prepare_data import prepare, read_tokens
from tokenizer import get_tokenizer

SMALL = dict(vocab_size=32, num_kv_pairs=4, num_queries=3, seq_len=24, train_seqs=300, val_seqs=100)


def load(folder, split, seq_len):
    """(tokens, answers) of a split as (sequences, seq_len + 1) arrays."""
    tokens = np.asarray(read_tokens(os.path.join(folder, f"{split}.bin"))).reshape(-1, seq_len + 1)
    answers = np.asarray(read_tokens(os.path.join(folder, f"{split}.answers.bin"))).reshape(-1, seq_len + 1)
    return tokens.astype(np.int64), answers.astype(bool)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqar")
    return prepare("mqar", data_dir=str(root), name="small", seed=1, **SMALL)


def test_every_answer_is_the_value_paired_with_its_key_earlier(small):
    meta = json.load(open(os.path.join(small, "meta.json")))
    assert meta["masked"] is True and meta["seq_len"] == 24 and meta["vocab_size"] == 32
    assert meta["tokenizer"] == {"kind": "ids", "vocab_size": 32}
    K, Q, V = 4, 3, 32
    for split, n in (("train", 300), ("val", 100)):
        tokens, answers = load(small, split, 24)
        assert tokens.shape == (n, 25) and tokens.max() < V
        for seq, ans in zip(tokens.tolist(), answers.tolist()):
            keys, values = seq[0:2 * K:2], seq[1:2 * K:2]
            assert len(set(keys)) == K and all(k < V // 2 for k in keys)  # distinct, from the first half
            assert all(v >= V // 2 for v in values)  # values from the other half
            where = [t for t, a in enumerate(ans) if a]
            assert len(where) == Q and min(where) > 2 * K  # the queries follow all the pairs
            asked = [seq[t - 1] for t in where]
            assert len(set(asked)) == Q  # each key asked at most once
            for t in where:  # the token before an answer is a key; the answer is the value after it in the pairs
                i = keys.index(seq[t - 1])
                assert seq[t] == values[i] and 2 * i + 1 < t


def test_train_and_val_are_disjoint_and_seeded(small, tmp_path):
    train_tokens, _ = load(small, "train", 24)
    val_tokens, _ = load(small, "val", 24)
    train_pairs = {row[:8].tobytes() for row in train_tokens}
    assert not any(row[:8].tobytes() in train_pairs for row in val_tokens)  # no val sequence's pairs seen in training
    again = prepare("mqar", data_dir=str(tmp_path), name="again", seed=1, **SMALL)
    other = prepare("mqar", data_dir=str(tmp_path), name="other", seed=2, **SMALL)
    for name in ("train.bin", "train.answers.bin", "val.bin", "val.answers.bin", "meta.json"):
        assert open(os.path.join(small, name), "rb").read() == open(os.path.join(again, name), "rb").read(), name
    assert open(os.path.join(small, "train.bin"), "rb").read() != open(os.path.join(other, "train.bin"), "rb").read()


def test_tiny_vocabulary_cannot_fill_val_with_unseen_pairs(tmp_path):
    """vocabulary 4: one key-value pair has 2 x 2 forms, all of them in train; val must say so, not loop."""
    with pytest.raises(UserError, match="too few distinct sets"):
        prepare("mqar", data_dir=str(tmp_path), vocab_size=4, num_kv_pairs=1, seq_len=8, train_seqs=200, val_seqs=5)


def test_prepare_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "prepare_data.py", "mqar", *args, f"--data_dir={tmp_path}"],
                              cwd=ROOT, capture_output=True, text=True)
    assert_one_line_error(run("--num_kv_pairs=200"), "prepare_data.py", "--num_kv_pairs=200: K distinct keys need")
    assert_one_line_error(run("--num_queries=9"), "prepare_data.py", "--num_queries=9: at most the 8 keys")
    assert_one_line_error(run("--num_kv_pairs=16", "--seq_len=40"), "prepare_data.py",
                          "--seq_len=40 leaves no room for 16 queries")


def test_batches_are_whole_sequences_with_targets_only_at_answers(small):
    split = train.load_split(train.TrainConfig(dataset="small", data_dir=os.path.dirname(small)), "train", 24,
                             {"masked": True, "seq_len": 24})
    x, y = train.get_sequences(split, 16, 24, torch.Generator().manual_seed(0), torch.device("cpu"))
    tokens, answers = load(small, "train", 24)
    assert x.shape == y.shape == (16, 24)
    for xr, yr in zip(x.tolist(), y.tolist()):
        i = next(i for i, row in enumerate(tokens.tolist()) if row[:24] == xr)  # a whole sequence, from its start
        assert yr == [tok if a else -1 for tok, a in zip(tokens[i, 1:].tolist(), answers[i, 1:].tolist())]


def test_block_size_must_be_the_sequence_length(small):
    r = subprocess.run([sys.executable, "train.py", "--dataset=small", f"--data_dir={os.path.dirname(small)}",
                        "--max_iters=1", f"--out_dir={small}/out", "--device=cpu"], cwd=ROOT, capture_output=True,
                       text=True)
    assert_one_line_error(r, "train.py", "block_size=64 does not fit")
    assert "give --block_size=24" in r.stderr


@pytest.mark.parametrize("name", available_models())
def test_masked_loss_is_the_cross_entropy_of_the_answers_alone(name):
    """Every model, in eval mode: the loss over targets with -1 at ignored positions equals the mean of
    -log softmax(logits)[target] over the other positions, computed by hand."""
    module = load_model_module(name)
    torch.manual_seed(0)
    model = module.Model(module.Config()).eval()
    x = torch.randint(0, module.Config.vocab_size, (2, 16))
    y = torch.randint(0, module.Config.vocab_size, (2, 16))
    y[torch.rand(2, 16) < 0.7] = -1
    y[0, 3] = 5  # at least one scored target
    with torch.no_grad():
        logits, loss = model(x, y)
    total, count = 0.0, 0
    for b in range(2):
        for t in range(16):
            if y[b, t] != -1:
                row = logits[b, t].double()
                total += (math.log(row.exp().sum()) - row[y[b, t]]).item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


class FixedLogits(torch.nn.Module):
    """A model whose logits are given; evaluate reads only (logits, loss)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, y):
        return self.logits, torch.nn.functional.cross_entropy(self.logits.flatten(0, 1), y.flatten(), ignore_index=-1)


def test_accuracy_is_the_fraction_of_answers_whose_argmax_is_right():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 8)
    y = torch.randint(0, 8, (3, 10))
    y[torch.rand(3, 10) < 0.6] = -1
    y[0, 0], y[1, 1] = logits[0, 0].argmax(), logits[1, 1].argmax()  # some right answers for sure
    right = answers = 0
    for b in range(3):
        for t in range(10):
            if y[b, t] != -1:
                answers += 1
                scores = logits[b, t].tolist()
                right += scores.index(max(scores)) == y[b, t].item()
    out = train.evaluate(FixedLogits(logits), {"val": None}, lambda data, k, process: (None, y), eval_iters=2,
                         amp=torch.autocast("cpu", enabled=False), token_bytes=torch.ones(8, dtype=torch.long),
                         accuracy=True)
    assert 0 < right < answers and out["val_acc"] == right / answers
    # ignored targets count 0 bytes: with one byte per id, bits per byte are the loss over ln 2
    assert out["val_bpb"] == pytest.approx(out["val"] / math.log(2), rel=1e-12)


def test_ids_tokenizer_round_trip():
    tok = get_tokenizer({"kind": "ids", "vocab_size": 32})
    assert tok.encode("3 17  31\n") == [3, 17, 31] and tok.decode([3, 17, 31]) == "3 17 31"
    assert tok.token_bytes() == [1] * 32
    with pytest.raises(UserError, match="0..31"):
        tok.encode("3 32")


def test_a_small_gpt_learns_the_task_within_200_steps(tmp_path):
    """Vocabulary 16, 3 pairs per sequence, each key asked once. Guessing any of the 8 values scores 1/8,
    one of the sequence's 3 values 1/3, and one not yet answered in this sequence 0.61 (1/3, 1/2, 1 for
    the three queries: elimination, no recall). Within 200 steps a 2-layer GPT must beat 0.4: the masked
    loss trains the answers, and the model has learnt which tokens can answer. That is not recall yet: on
    a 2-core CPU (2026-12-05), 0.2M-parameter models with 4 pairs stayed at that level for 3000 steps."""
    dataset = prepare("mqar", data_dir=str(tmp_path), name="tiny", vocab_size=16, num_kv_pairs=3, seq_len=12,
                      train_seqs=5000, val_seqs=200)
    assert json.load(open(os.path.join(dataset, "meta.json")))["mqar"]["chance"] == pytest.approx(
        {"any_value": 1 / 8, "sequence_value": 1 / 3, "elimination": (1 / 3 + 1 / 2 + 1) / 3})
    out = tmp_path / "run"
    train.main(["--dataset=tiny", f"--data_dir={tmp_path}", f"--out_dir={out}", "--block_size=12", "--n_layer=2",
                "--n_embd=64", "--n_head=2", "--n_kv_head=1", "--learning_rate=3e-3", "--min_lr=3e-4",
                "--warmup_iters=20", "--max_iters=200", "--eval_iters=4", "--batch_size=32", "--log_interval=200",
                "--device=cpu", "--compile=False"])
    evals = [r for r in map(json.loads, open(out / "log.jsonl")) if "val_loss" in r]
    assert evals[0]["val_acc"] < 0.2  # untrained: about chance
    assert evals[-1]["val_acc"] > 0.4 and evals[-1]["train_acc"] > 0.4
