"""
Zero-shot downstream evaluation of a checkpoint written by train.py (trained here, converted from
Qwen2.5 or SmallDoge, or loaded with --max_iters=0), with the model's own forward and the
checkpoint's own tokenizer.

    python eval.py --out_dir=out-mod-qwen                                   # all four tasks
    python eval.py --out_dir=out-gpt --tasks=hellaswag,lambada --max_per_task=200   # a quick CPU run

Every score is a log-likelihood, log p(continuation | context) = the sum of the continuation's token
log-probabilities, each token predicted from the tokens before it only (every model is causal):
- hellaswag (validation, 10,042 examples) and arc_easy (test, 2,376): multiple choice, completion
  style: each choice is scored as a continuation of the context; acc picks the largest
  log-likelihood, acc_norm the largest log-likelihood per UTF-8 byte of the choice (so a
  character-level and a BPE model are normalised alike). HellaSwag's context is its "ctx" and a
  choice " " + ending (as karpathy's hellaswag.py, build-nanogpt); ARC's context is
  "Question: <question>\\nAnswer:" and a choice " " + its text (as lm-evaluation-harness's arc_easy).
- lambada (OpenAI's test set, 5,153 passages): the context is the passage up to its last space, the
  target " " + its last word. acc: the greedy continuation is the word (every one of its tokens is
  the most likely one); ppl: exp of the mean over passages of -log p(word | context).
- wikitext2 (raw test text): bits per byte of the whole text, -sum log2 p / the UTF-8 bytes of the
  scored tokens. A window of block_size tokens slides by block_size/2, so every token (all but the
  first, which has nothing to be predicted from) is scored exactly once, from at least block_size/2
  tokens of context.
A context too long for block_size keeps its last tokens; a continuation too long is scored in
windows as WikiText is. Examples a character-level vocabulary cannot encode are skipped and counted.

Each task's file is downloaded once from its original public source into $DYNLM_CACHE/eval/
(default ~/.cache/dynamic-lm/eval/), resumed after an interruption, with its sha256 recorded next to
it and checked on every reuse. None of the sources publishes a checksum, so the first download is
trusted and its format is checked: a malformed file is one line, and is deleted so that a rerun
downloads it again. $DYNLM_EVAL_URL=URL reads every file from a mirror instead, as URL/<file name>.
Prints a table and writes out_dir/eval.json.
"""
import json
import math
import os
import sys
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import Literal

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import UserError, parse_options
from device import autocast, pick_device
from hub import cache_root, cached, check_url, download, forget, make_cache_folder, record_sha256
from tokenizer import get_tokenizer


@dataclass
class EvalConfig:
    out_dir: str = "out-gpt"     # the folder holding train.py's ckpt.pt; eval.json is written there
    tasks: str = "hellaswag,lambada,arc_easy,wikitext2"  # comma-separated
    max_per_task: int = 0        # the first N examples of each task (wikitext2: its first N lines); 0 = all
    batch_size: int = 16         # rows of at most block_size tokens per forward; lower it if memory runs out
    device: str = "auto"         # auto: cuda, then mps, then cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: as train.py


# -----------------------------------------------------------------------------
# the tasks' files: original public sources, in formats the standard library reads

@dataclass
class Source:
    url: str
    member: str = ""             # the file inside a zip archive, if the download is one
    sha256: str = None           # none is published for these files: the first download is trusted


SOURCES = {
    # Zellers et al. 2019, the authors' repository
    "hellaswag": Source("https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"),
    # OpenAI's LAMBADA test set, as GPT-2 was evaluated on (Radford et al. 2019)
    "lambada": Source("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"),
    # AI2's ARC release (Clark et al. 2018); the zip also holds the ARC Corpus, hence its size
    "arc_easy": Source("https://s3-us-west-2.amazonaws.com/ai2-website/data/ARC-V1-Feb2018.zip",
                       "ARC-V1-Feb2018-2/ARC-Easy/ARC-Easy-Test.jsonl"),
    # WikiText-2 raw (Merity et al. 2016), from its author's site since the original S3 bucket closed
    "wikitext2": Source("https://wikitext.smerity.com/wikitext-2-raw-v1.zip", "wikitext-2-raw/wiki.test.raw"),
}


def eval_cache():
    return os.path.join(cache_root(), "eval")


def fetch(task):
    """Local path of the task's download: cached (its recorded sha256 still matching), or downloaded."""
    source = SOURCES[task]
    name = source.url.rsplit("/", 1)[1]
    mirror = os.environ.get("DYNLM_EVAL_URL")
    if mirror:
        check_url(mirror, "DYNLM_EVAL_URL")
    url = f"{mirror.rstrip('/')}/{name}" if mirror else source.url
    path = os.path.join(eval_cache(), name)
    if cached(path):
        return path
    make_cache_folder(eval_cache())
    print(f"{task}: downloading {url}", file=sys.stderr)
    download(url, path, sha256=source.sha256, local_hint=f"download it yourself and put it at {path} with its "
             f"sha256 in {path}.sha256, or set DYNLM_EVAL_URL to a mirror holding {name}")
    record_sha256(path)
    return path


def read_text(task, path):
    """The task's text: the downloaded file, or its member inside the downloaded zip."""
    member = SOURCES[task].member
    if not member:
        with open(path, "rb") as f:
            data = f.read()
    else:
        with zipfile.ZipFile(path) as z:
            data = z.read(member)
    return data.decode("utf-8")


def need(condition, why):
    if not condition:
        raise ValueError(why)


def text_field(obj, key):
    need(isinstance(obj, dict) and isinstance(obj.get(key), str) and obj[key].strip(), f"no text {key!r}")
    return obj[key]


def hellaswag_example(obj):
    """(context, choices, index of the right one): "ctx", " " + each of "endings", "label"."""
    ctx, endings, label = text_field(obj, "ctx"), obj.get("endings"), obj.get("label")
    need(isinstance(endings, list) and len(endings) >= 2 and all(isinstance(e, str) for e in endings),
         "no list of 'endings'")
    need(type(label) is int and 0 <= label < len(endings), "no 'label' indexing the endings")
    return ctx, [" " + e for e in endings], label


def arc_example(obj):
    """(context, choices, index of the right one) of an ARC question, as lm-evaluation-harness words it."""
    question = obj.get("question") if isinstance(obj, dict) else None
    stem, choices = text_field(question, "stem"), question.get("choices")
    need(isinstance(choices, list) and len(choices) >= 2, "no list of 'choices'")
    texts, labels = [text_field(c, "text") for c in choices], [text_field(c, "label") for c in choices]
    need(obj.get("answerKey") in labels, "no 'answerKey' among the choices' labels")
    return f"Question: {stem}\nAnswer:", [" " + t for t in texts], labels.index(obj["answerKey"])


def lambada_example(obj):
    """(context, [" " + last word], 0): a passage's last word is its target."""
    context, _, word = text_field(obj, "text").strip().rpartition(" ")
    need(context and word, "a passage of one word")
    return context, [" " + word], 0


def jsonl_examples(text, example):
    out = []
    for i, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                out.append(example(json.loads(line)))
            except (ValueError, TypeError, AttributeError, RecursionError) as e:  # JSONDecodeError is a ValueError
                raise ValueError(f"line {i + 1} is not an example ({str(e)[:60]})") from None
    need(out, "no examples")
    return out


def load_examples(task, max_per_task):
    """The task's examples (wikitext2: its text), the file downloaded first if need be. A file that is
    not what the task expects is deleted from the cache, so that a rerun downloads it again."""
    path = fetch(task)
    try:
        text = read_text(task, path)
        if task == "wikitext2":
            lines = text.splitlines(keepends=True)
            need(sum(len(line.strip()) for line in lines) > 0, "no text")
            return lines[:max_per_task or None]
        example = {"hellaswag": hellaswag_example, "arc_easy": arc_example, "lambada": lambada_example}[task]
        return jsonl_examples(text, example)[:max_per_task or None]
    except (ValueError, KeyError, zipfile.BadZipFile, zlib.error, EOFError) as e:  # UnicodeDecodeError: ValueError
        forget(path)
        raise UserError(f"{task}: {path} (from {SOURCES[task].url}) is malformed: {str(e).strip()[:100]}; it "
                        f"was deleted from the cache: rerun to download it again") from None


# -----------------------------------------------------------------------------
# scoring: log-probabilities of tokens, many sequences a forward

def windows(n, first, block_size):
    """How forwards of at most block_size tokens score tokens first..n-1 of an n-token sequence, each
    exactly once: (start, lo, hi) is a forward over tokens start..hi-2 scoring tokens lo..hi-1. The
    first window reaches back a whole block; each later one moves on by stride = block_size/2 tokens,
    so every token is predicted from all tokens before it or from at least block_size/2 of them."""
    stride = max(1, block_size // 2)
    spans, lo = [], first
    while lo < n:
        hi = min(n, lo + stride if spans else max(lo + stride, block_size + 1))
        spans.append((max(0, hi - 1 - block_size), lo, hi))
        lo = hi
    return spans


def progress_printer(label, total):
    """A function of the windows done so far that redraws one line on stderr: count, time, ETA."""
    start = last = time.time()

    def show(done):
        nonlocal last
        now = time.time()
        if now - last > 0.5 or done == total:
            last = now
            eta = (now - start) / max(done, 1) * (total - done)
            print(f"\r{label}: {done:,}/{total:,} windows, {now - start:.0f}s, ETA {eta:.0f}s",
                  end="\n" if done == total else "", file=sys.stderr, flush=True)
    return show


@torch.inference_mode()
def score(model, seqs, firsts, device, dtype, batch_size, label):
    """For every token list seqs[i]: (the sum of log p(token | the tokens before it) over its tokens
    firsts[i] on, whether each of them was the most likely token). Windows of all sequences go
    through the model batch_size at a time, longest first, right-padded: a causal model's logits at a
    position never see the padding after it."""
    spans = [(i, *span) for i, seq in enumerate(seqs) for span in windows(len(seq), firsts[i], model.config.block_size)]
    spans.sort(key=lambda s: s[3] - s[1], reverse=True)
    logp, greedy = [0.0] * len(seqs), [True] * len(seqs)
    show = progress_printer(label, len(spans))
    for b in range(0, len(spans), batch_size):
        batch = spans[b:b + batch_size]
        x = torch.zeros(len(batch), max(hi - 1 - start for _, start, _, hi in batch), dtype=torch.long)
        for row, (i, start, _, hi) in enumerate(batch):
            x[row, :hi - 1 - start] = torch.tensor(seqs[i][start:hi - 1])
        with autocast(device, dtype):
            logits = model(x.to(device))[0]
        for row, (i, start, lo, hi) in enumerate(batch):
            scores = logits[row, lo - 1 - start:hi - 1 - start].float()  # position p predicts token p+1
            targets = torch.tensor(seqs[i][lo:hi], device=device)
            logp[i] += torch.log_softmax(scores, dim=-1).gather(1, targets[:, None]).sum().item()
            greedy[i] = greedy[i] and bool((scores.argmax(dim=-1) == targets).all())
        show(b + len(batch))
    return logp, greedy


def encode(tokenizer, text):
    """text's tokens, or None if a character-level vocabulary lacks one of its characters."""
    try:
        return tokenizer.encode(text)
    except UserError:
        return None


def evaluate_choices(task, examples, model, tokenizer, opts, device, dtype):
    """Multiple choice (and LAMBADA, one choice): every choice scored as a continuation of the context."""
    seqs, firsts, kept = [], [], []
    for context, choices, label in examples:
        ctx = encode(tokenizer, context)
        conts = [encode(tokenizer, c) for c in choices]
        if not ctx or any(not c for c in conts):  # (the context needs a token to predict from)
            continue
        kept.append((choices, label, len(seqs)))
        seqs += [ctx + c for c in conts]
        firsts += [len(ctx)] * len(conts)
    logp, greedy = score(model, seqs, firsts, device, dtype, opts.batch_size, task)
    result = {"examples": len(kept), "skipped": len(examples) - len(kept)}
    if not kept:
        return result
    if task == "lambada":
        result["acc"] = sum(greedy[at] for _, _, at in kept) / len(kept)
        result["ppl"] = math.exp(-sum(logp[at] for _, _, at in kept) / len(kept))
        return result
    right = right_norm = 0
    for choices, label, at in kept:
        ll = logp[at:at + len(choices)]
        per_byte = [v / max(1, len(c.encode())) for v, c in zip(ll, choices)]
        right += max(range(len(ll)), key=ll.__getitem__) == label
        right_norm += max(range(len(ll)), key=per_byte.__getitem__) == label
    result.update(acc=right / len(kept), acc_norm=right_norm / len(kept))
    return result


def evaluate_text(lines, model, tokenizer, opts, device, dtype):
    """WikiText-2's bits per byte over its whole text (lines a character-level vocabulary cannot
    encode are left out and counted)."""
    ids = encode(tokenizer, "".join(lines))
    kept = lines if ids is not None else [line for line in lines if encode(tokenizer, line) is not None]
    if ids is None:
        ids = tokenizer.encode("".join(kept))
    result = {"lines": len(kept), "skipped": len(lines) - len(kept), "tokens": max(0, len(ids) - 1)}
    if len(ids) < 2:
        return result
    [logp], _ = score(model, [ids], [1], device, dtype, opts.batch_size, "wikitext2")
    token_bytes = tokenizer.token_bytes()
    n_bytes = sum(token_bytes[t] for t in ids[1:])
    result.update(bytes=n_bytes, bpb=-logp / math.log(2) / max(1, n_bytes))
    return result


# -----------------------------------------------------------------------------

def table(results):
    lines = [f"{'task':<10} {'metric':<9} {'value':>10} {'examples':>9} {'skipped':>8}"]
    for task, r in results.items():
        metrics = [(k, r[k]) for k in ("acc", "acc_norm", "ppl", "bpb") if k in r] or [("-", float("nan"))]
        count = r.get("examples", r.get("lines"))
        for j, (metric, value) in enumerate(metrics):
            lines.append(f"{task if j == 0 else '':<10} {metric:<9} {value:>10.{'4f' if value < 1e5 else '4g'}} "
                         + (f"{count:>9,} {r['skipped']:>8,}" if j == 0 else ""))
    return "\n".join(line.rstrip() for line in lines)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def main(argv):
    [opts] = parse_options(argv, EvalConfig(), doc=__doc__)
    tasks = [t.strip() for t in opts.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in SOURCES]
    if unknown or not tasks:
        raise UserError(f"unknown task {unknown[0] if unknown else repr(opts.tasks)}; --tasks takes a comma-separated "
                        f"list of {', '.join(SOURCES)}")
    if opts.max_per_task < 0 or opts.batch_size < 1:
        raise UserError("--max_per_task must be 0 (all) or more, and --batch_size 1 or more")

    device, dtype = pick_device(opts.device, opts.dtype)
    path = os.path.join(opts.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, path)
    model.eval().to(device)
    tokenizer = get_tokenizer(ckpt["tokenizer"])

    results = {}
    for task in dict.fromkeys(tasks):  # in the order given, each once
        examples = load_examples(task, opts.max_per_task)
        if task == "wikitext2":
            results[task] = evaluate_text(examples, model, tokenizer, opts, device, dtype)
        else:
            results[task] = evaluate_choices(task, examples, model, tokenizer, opts, device, dtype)
    print(f"{path}: {ckpt['model_name']}, iteration {ckpt['iter_num']:,}, zero-shot"
          + (f", the first {opts.max_per_task:,} examples of each task" if opts.max_per_task else ""))
    print(table(results))
    out = os.path.join(opts.out_dir, "eval.json")
    write_json(out, {"checkpoint": path, "model": ckpt["model_name"], "iter_num": ckpt["iter_num"],
                     "max_per_task": opts.max_per_task, "tasks": results})
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"eval.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("\neval.py: interrupted; rerun the same command (downloads resume)")
