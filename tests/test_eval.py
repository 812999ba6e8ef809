"""eval.py: each task's file in its real format, served from 127.0.0.1; every score against an
independent computation with the model's full forward; a model rigged to prefer the answers scores
100%; random weights score near chance; WikiText's windows score every token once; bad input is one line."""
import io
import json
import math
import os
import random
import zipfile

import pytest
import torch

import eval as eval_py
from checkpoint import load_checkpoint, model_from_checkpoint
from cli import UserError
from conftest import assert_one_line_error, fit, make_text, run
from hub import file_sha256
from prepare_data import prepare
from tokenizer import get_tokenizer

WORDS = ("the king and queen of france shall speak to thee my lord what is this night a fair day for "
         "love and war we will go now").split()
RIGGED = "xjxjx"  # the right answers of the rigged files: the rigged model prefers x after a space, j after x, ...
BLOCK = 64


def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def hellaswag(rng, n, rigged=False):
    """n examples as hellaswag_val.jsonl has them; some contexts longer than a block."""
    out = []
    for i in range(n):
        ctx = words(rng, 20, 24) if i % 5 == 0 else words(rng, 3, 6).capitalize() + ". " + words(rng, 1, 2)
        endings, label = [words(rng, 1, 3) + "." for _ in range(4)], rng.randrange(4)
        if rigged:
            endings[label] = RIGGED[:rng.randint(2, 5)]
        out.append({"ind": i, "activity_label": "Talking", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "split": "val",
                    "split_type": "indomain", "label": label, "endings": endings, "source_id": f"test~{i}"})
    return out


def arc(rng, n, rigged=False):
    """n questions as ARC-Easy-Test.jsonl has them (labels A-D, or 1-4 as some questions have)."""
    out = []
    for i in range(n):
        labels = "1234" if i % 4 == 3 else "ABCD"
        texts, answer = [words(rng, 1, 2) for _ in labels], rng.randrange(4)
        if rigged:
            texts[answer] = RIGGED[:rng.randint(2, 5)]
        out.append({"id": f"Test_{i}", "question": {"stem": words(rng, 3, 5).capitalize() + "?", "choices": [
            {"text": t, "label": label} for t, label in zip(texts, labels)]}, "answerKey": labels[answer]})
    return out


def lambada(rng, n, rigged=False):
    """n passages as lambada_test.jsonl has them; a rigged one ends " and xjx...": and, then the word."""
    return [{"text": words(rng, 6, 10) + (" and " + RIGGED[:rng.randint(2, 5)] if rigged else " " + rng.choice(WORDS))}
            for _ in range(n)]


def wikitext(rng, n_lines):
    lines = [" ", " = Valkyria Chronicles = ", " "]
    lines += [" " + words(rng, 8, 16) + " . " for _ in range(n_lines)]
    return "\n".join(lines) + "\n"


def jsonl(objs):
    return "".join(json.dumps(o) + "\n" for o in objs).encode()


def zipped(member, data):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, data)
    return buf.getvalue()


def serve(server, hs, arc_qs, lam, text):
    """The four downloads, each under its original file name (DYNLM_EVAL_URL's layout)."""
    server.files.update({
        "/hellaswag_val.jsonl": jsonl(hs),
        "/ARC-V1-Feb2018.zip": zipped("ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl", jsonl(arc_qs)),
        "/lambada_test.jsonl": jsonl(lam),
        "/wikitext-2-raw-v1.zip": zipped("wikitext-2-raw/wiki.test.raw", text.encode())})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards: one thread is many times faster than two on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt_dir(data_dir, tmp_path_factory):
    """A checkpoint of random weights (--max_iters=0), character-level, every letter, digit and the
    fixtures' punctuation in its vocabulary, é (2 bytes) but not ß, block 64."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?!'=é\n"
    path = os.path.join(data_dir, "evaltext.txt")
    with open(path, "w") as f:
        f.write(make_text(6000) + chars * 10)
    prepare("shakespeare_char", data_dir=data_dir, name="evaltext", input=path)
    out = str(tmp_path_factory.mktemp("eval") / "out")
    fit(data_dir, out, "--dataset=evaltext", "--max_iters=0", f"--block_size={BLOCK}")
    return out


@pytest.fixture
def mirror(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNLM_EVAL_URL", file_server.url)
    monkeypatch.setenv("DYNLM_CACHE", str(tmp_path / "cache"))
    return file_server


def load(ckpt_dir):
    ckpt = load_checkpoint(os.path.join(ckpt_dir, "ckpt.pt"))
    return model_from_checkpoint(ckpt, "ckpt.pt").eval(), get_tokenizer(ckpt["tokenizer"])


@torch.no_grad()
def reference(model, ids, first):
    """(log p of ids[first:] given what precedes them, greedy?) from one full forward over the last
    block_size + 1 tokens (the continuation fits in a block)."""
    keep = ids[-(model.config.block_size + 1):]
    first -= len(ids) - len(keep)
    assert first >= 1
    logits = model(torch.tensor([keep[:-1]]))[0][0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return (sum(logp[j - 1, keep[j]].item() for j in range(first, len(keep))),
            all(logits[j - 1].argmax().item() == keep[j] for j in range(first, len(keep))))


def reference_choices(model, tok, examples):
    """acc and acc_norm of (context, choices, label) examples, one forward per choice."""
    right = right_norm = 0
    for ctx, choices, label in examples:
        ll = [reference(model, tok.encode(ctx) + tok.encode(c), len(tok.encode(ctx)))[0] for c in choices]
        right += max(range(len(ll)), key=lambda i: ll[i]) == label
        right_norm += max(range(len(ll)), key=lambda i: ll[i] / len(choices[i].encode())) == label
    return right / len(examples), right_norm / len(examples)


def test_scores_equal_full_forward(ckpt_dir, mirror):
    rng = random.Random(0)
    hs, arc_qs, lam = hellaswag(rng, 20), arc(rng, 12), lambada(rng, 12)
    hs[3]["endings"][1] = "straße."  # ß is not in the vocabulary: skipped, and counted
    for e in hs[5:12]:
        e["endings"][e["label"]] = "é"  # one token, two bytes: acc_norm divides by bytes, not tokens
    text = " \n = Valkyria Chronicles = \n the king and queen . \n"  # fits in one window
    serve(mirror, hs, arc_qs, lam, text)
    results = eval_py.main([f"--out_dir={ckpt_dir}", "--device=cpu", "--batch_size=5"])
    assert json.load(open(os.path.join(ckpt_dir, "eval.json")))["tasks"] == results
    model, tok = load(ckpt_dir)

    expected = reference_choices(model, tok, [(e["ctx"], [" " + x for x in e["endings"]], e["label"])
                                              for i, e in enumerate(hs) if i != 3])
    assert (results["hellaswag"]["examples"], results["hellaswag"]["skipped"]) == (19, 1)
    assert (results["hellaswag"]["acc"], results["hellaswag"]["acc_norm"]) == pytest.approx(expected, abs=1e-12)

    expected = reference_choices(model, tok, [
        (f"Question: {q['question']['stem']}\nAnswer:", [" " + c["text"] for c in q["question"]["choices"]],
         [c["label"] for c in q["question"]["choices"]].index(q["answerKey"])) for q in arc_qs])
    assert (results["arc_easy"]["acc"], results["arc_easy"]["acc_norm"]) == pytest.approx(expected, abs=1e-12)
    assert results["arc_easy"]["examples"] == 12

    scored = [reference(model, tok.encode(ctx) + tok.encode(" " + word), len(tok.encode(ctx)))
              for ctx, _, word in (p["text"].rpartition(" ") for p in lam)]
    assert results["lambada"]["acc"] == sum(g for _, g in scored) / len(scored)
    assert results["lambada"]["ppl"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / len(scored)), rel=1e-5)

    ids = tok.encode(text)  # short enough for one window: one full forward is the whole computation
    assert len(ids) <= BLOCK + 1
    ll, _ = reference(model, ids, 1)
    assert results["wikitext2"]["tokens"] == len(ids) - 1
    assert results["wikitext2"]["bpb"] == pytest.approx(-ll / math.log(2) / len(text[1:].encode()), rel=1e-5)

    # downloaded once: a second run reads the cache
    requests = len(mirror.requests)
    eval_py.main([f"--out_dir={ckpt_dir}", "--device=cpu", "--tasks=hellaswag,arc_easy"])
    assert len(mirror.requests) == requests


def test_rigged_model_scores_100_percent(ckpt_dir, mirror, monkeypatch):
    """A model whose logits favour x after a space, j after x, x after j and a space after d by 50
    prefers every rigged answer: acc and acc_norm 1, LAMBADA's greedy word right every time."""
    rng = random.Random(1)
    serve(mirror, hellaswag(rng, 20, rigged=True), arc(rng, 12, rigged=True), lambada(rng, 12, rigged=True),
          wikitext(rng, 2))
    ckpt = load_checkpoint(os.path.join(ckpt_dir, "ckpt.pt"))
    stoi = {c: i for i, c in enumerate(ckpt["tokenizer"]["chars"])}
    V = ckpt["model_config"]["vocab_size"]
    boost = torch.zeros(V, V)
    for a, b in ((" ", "x"), ("x", "j"), ("j", "x"), ("d", " ")):
        boost[stoi[a], stoi[b]] = 50.0

    class Rigged(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, idx, targets=None):
            return self.inner(idx)[0] + boost.to(idx.device)[idx], None

    real = eval_py.model_from_checkpoint
    monkeypatch.setattr(eval_py, "model_from_checkpoint", lambda c, p: Rigged(real(c, p)))
    results = eval_py.main([f"--out_dir={ckpt_dir}", "--device=cpu", "--tasks=hellaswag,arc_easy,lambada"])
    for task in ("hellaswag", "arc_easy"):
        assert results[task]["acc"] == results[task]["acc_norm"] == 1.0
    assert results["lambada"]["acc"] == 1.0 and results["lambada"]["ppl"] < 1.01


def test_random_weights_near_chance(ckpt_dir, mirror):
    """Random weights: 4-way choices at 25% (within 3.5 standard errors over 160 questions), LAMBADA's
    words hardly ever greedy, and about ln V nats per character (V the vocabulary) for LAMBADA's
    words and WikiText's text."""
    rng = random.Random(2)
    lam = lambada(rng, 40)
    serve(mirror, hellaswag(rng, 160), arc(rng, 160), lam, wikitext(rng, 12))
    results = eval_py.main([f"--out_dir={ckpt_dir}", "--device=cpu", "--batch_size=64"])
    model, tok = load(ckpt_dir)
    for task in ("hellaswag", "arc_easy"):
        for metric in ("acc", "acc_norm"):
            assert abs(results[task][metric] - 0.25) < 3.5 * math.sqrt(0.25 * 0.75 / 160), (task, metric, results[task])
    assert results["lambada"]["acc"] < 0.1
    chars = sum(len(p["text"].rpartition(" ")[2]) + 1 for p in lam) / len(lam)
    assert math.log(results["lambada"]["ppl"]) / chars == pytest.approx(math.log(tok.vocab_size), rel=0.1)
    assert results["wikitext2"]["bpb"] == pytest.approx(math.log2(tok.vocab_size), rel=0.05)
    assert results["wikitext2"]["tokens"] > 2 * BLOCK  # several windows


def test_windows_score_every_token_once():
    for block in (1, 2, 5, 16, 64):
        for n in range(2, 3 * block + 5):
            for first in range(1, n):
                spans, scored = eval_py.windows(n, first, block), []
                for start, lo, hi in spans:
                    assert 0 <= start < lo and hi - 1 - start <= block  # a forward of at most block tokens
                    assert lo - start >= min(lo, max(1, block // 2))  # from all or at least block/2 tokens
                    scored += range(lo, hi)
                assert scored == list(range(first, n))


def test_errors_are_one_line(ckpt_dir, mirror, tmp_path):
    result = run("eval.py", f"--out_dir={ckpt_dir}", "--tasks=hellaswag,mmlu")
    assert_one_line_error(result, "eval.py", "unknown task mmlu")
    result = run("eval.py", f"--out_dir={tmp_path / 'nothing'}")
    assert_one_line_error(result, "eval.py", "no checkpoint at")
    cache = tmp_path / "cache" / "eval"  # a local copy where the download would go, as the error hint says
    cache.mkdir(parents=True)
    (cache / "lambada_test.jsonl").write_bytes(b'{"text": "a fine passage"}\n{"text": 3}\n')
    (cache / "lambada_test.jsonl.sha256").write_text(file_sha256(cache / "lambada_test.jsonl"))
    result = run("eval.py", f"--out_dir={ckpt_dir}", "--tasks=lambada", "--device=cpu")
    assert_one_line_error(result, "eval.py", "line 2 is not an example")
    assert "deleted from the cache" in result.stderr
    assert not os.listdir(cache) and not mirror.requests  # read from the cache, deleted from it


@pytest.mark.parametrize("task, path, data, message", [
    ("hellaswag", "/hellaswag_val.jsonl", b'{"ctx": "the king", "endings": ["a", "b"], "label": 2}\n', "label"),
    ("hellaswag", "/hellaswag_val.jsonl", b'{"ctx": "the king", "endings": ["a", "b"], "label": 0}\n<html>\n', "line 2"),
    ("hellaswag", "/hellaswag_val.jsonl", b"\n", "no examples"),
    ("arc_easy", "/ARC-V1-Feb2018.zip", b"not a zip", "zip file"),
    ("arc_easy", "/ARC-V1-Feb2018.zip", zipped("other.jsonl", b"{}"), "ARC-Easy-Test.jsonl"),
    ("arc_easy", "/ARC-V1-Feb2018.zip", zipped("ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl",
        b'{"question": {"stem": "why?", "choices": [{"text": "a", "label": "A"}, {"text": "b", "label": "B"}]}, '
        b'"answerKey": "C"}\n'), "answerKey"),
    ("wikitext2", "/wikitext-2-raw-v1.zip", zipped("wikitext-2-raw/wiki.test.raw", b"\xff\xfe text"), "utf-8"),
], ids=["label", "not-json", "empty", "not-zip", "no-member", "answer-key", "not-utf8"])
def test_malformed_files(ckpt_dir, mirror, tmp_path, task, path, data, message):
    mirror.files[path] = data
    with pytest.raises(UserError, match=message) as e:
        eval_py.main([f"--out_dir={ckpt_dir}", f"--tasks={task}", "--device=cpu"])
    assert "rerun to download it again" in str(e.value)
    assert not os.listdir(tmp_path / "cache" / "eval")  # deleted, with its sha256 record
