"""Bits per byte: train.py's evaluation divides the summed token losses by ln 2 times the UTF-8 bytes of
the target tokens. Checked against counts made without the tokenizer's byte table: the text's own
UTF-8 length, for characters, GPT-2's BPE and a checkpoint's byte-level BPE (whose tokens may be
parts of a character); WordPiece against its stated convention; loss / ln 2 for ASCII characters."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import hub
import tokenizer
import train
from checkpoint import available_models, load_model_module
from conftest import ROOT, make_text
from prepare_data import prepare
from tokenizer import describe, get_tokenizer

# a text of 1, 2, 3 and 4-byte characters (BPE splits the longer ones into partial tokens)
TEXT = "Zürich, naïve café — 日本語 and 🙂 emoji.\nThe king and queen of France.\n"
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


@pytest.fixture
def qwen2_tiny_bpe(monkeypatch):
    """The committed tiny Qwen2 tokenizer as a "bpe" descriptor, read from tests/fixtures (no hub)."""
    def fetch_file(repo, name, required=True):
        return os.path.join(FIXTURES, "qwen2_tiny", name)
    monkeypatch.setattr(hub, "fetch_file", fetch_file)  # (fetch_json reads through it)
    monkeypatch.setattr(tokenizer, "fetch_file", fetch_file)
    return tokenizer.bpe_descriptor("tiny/qwen2")


def total_bytes(tok, ids):
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    return sum(table[i] for i in ids)


def test_char_bytes_are_the_texts():
    tok = get_tokenizer(describe("char", TEXT))
    assert total_bytes(tok, tok.encode(TEXT)) == len(TEXT.encode("utf-8"))


def test_gpt2_bpe_bytes_are_the_texts(gpt2_bpe):
    tok = get_tokenizer(describe("gpt2"))
    ids = tok.encode(TEXT)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # some tokens are parts of a character
    assert total_bytes(tok, ids) == len(TEXT.encode("utf-8"))
    table = tok.token_bytes()
    assert table[50256] == 0 and table[50257:] == [0] * (tok.vocab_size - 50257)  # <|endoftext|>, padding


def test_checkpoint_bpe_bytes_are_the_texts(qwen2_tiny_bpe):
    tok = get_tokenizer(qwen2_tiny_bpe)
    ids = tok.encode(TEXT)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)
    assert total_bytes(tok, ids) == len(TEXT.encode("utf-8"))
    eot = tok.encode("<|endoftext|>")  # an added token: a document boundary, no text
    assert len(eot) == 1 and total_bytes(tok, eot) == 0


def test_wordpiece_convention():
    """WordPiece loses whitespace and case: a word-initial piece counts the space before it, a "##"
    piece its letters, punctuation no space. For a lowercase text of known words that is the text's
    length plus one (the first word has no space before it)."""
    tok = get_tokenizer(describe(f"wordpiece:{FIXTURES}/dawn_tiny/vocab.txt"))
    vocab = tok.decode(list(range(tok.vocab_size))).split(" ")
    words = [w for w in vocab if w.isalpha() and w.islower() and len(w) > 1][:6]
    assert len(words) >= 3, "the fixture vocabulary should hold whole words"
    text = " ".join(words[:3]) + ", " + " ".join(words[3:]) + "."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert total_bytes(tok, ids) == len(text.encode()) + 1


class ConstantLoss(torch.nn.Module):
    """Returns the k-th loss of `losses` on the k-th call; what evaluate needs of a model."""

    def __init__(self, losses):
        super().__init__()
        self.losses = iter(losses)

    def forward(self, x, y):
        return None, torch.tensor(next(self.losses))


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_evaluate_divides_summed_nats_by_the_bytes(kind, request):
    """Two batches of 2 rows that together are the whole text: bits per byte = (sum over batches of
    loss x tokens) / (ln 2 x the text's UTF-8 bytes)."""
    if kind == "gpt2":
        request.getfixturevalue("gpt2_bpe")
    desc = request.getfixturevalue("qwen2_tiny_bpe") if kind == "bpe" else describe(kind, TEXT + "!")
    tok = get_tokenizer(desc)
    text = TEXT
    while len(tok.encode(text)) % 4:
        text += "!"
    ids = torch.tensor(tok.encode(text)).view(2, 2, -1)  # (batch k, row, position)
    table = torch.tensor(tok.token_bytes())
    losses = [1.25, 2.5]
    out = train.evaluate(ConstantLoss(losses), {"val": None}, lambda data, k, process: (ids[k], ids[k]),
                         eval_iters=2, amp=torch.autocast("cpu", enabled=False), token_bytes=table)
    expected = sum(loss * ids[k].numel() for k, loss in enumerate(losses)) / (math.log(2) * len(text.encode()))
    assert out["val"] == pytest.approx(1.875) and out["val_bpb"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", available_models())
def test_eval_loss_is_the_mean_cross_entropy(name):
    """Bits per byte takes the eval loss times the tokens as the summed token losses: no model may add
    an auxiliary term to its eval-mode loss."""
    module = load_model_module(name)
    torch.manual_seed(0)
    model = module.Model(module.Config()).eval()
    x = torch.randint(0, module.Config.vocab_size, (2, 16))
    y = torch.randint(0, module.Config.vocab_size, (2, 16))
    with torch.no_grad():
        logits, loss = model(x, y)
    assert torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), y.flatten()), rtol=1e-6, atol=0)


def test_ascii_characters_give_loss_over_ln2_exactly(tmp_path):
    """A character-level ASCII dataset: every token is one byte, so the logged bits per byte are the
    logged loss / ln 2, to the last bit."""
    src = tmp_path / "tiny.txt"
    src.write_text(make_text(8000))
    prepare("shakespeare_char", data_dir=str(tmp_path), name="tiny", input=str(src))
    out = tmp_path / "run"
    train.main(["--dataset=tiny", f"--data_dir={tmp_path}", f"--out_dir={out}", "--n_layer=1", "--n_embd=16",
                "--n_head=2", "--n_kv_head=1", "--block_size=16", "--batch_size=2", "--eval_iters=3",
                "--max_iters=2", "--eval_interval=1", "--device=cpu", "--compile=False"])
    evals = [r for r in map(json.loads, open(out / "log.jsonl")) if "val_loss" in r]
    assert len(evals) == 3
    for r in evals:
        assert r["val_bpb"] == r["val_loss"] / math.log(2) and r["train_bpb"] == r["train_loss"] / math.log(2)
