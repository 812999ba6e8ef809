"""
Sample text from a checkpoint written by train.py.

    python sample.py                                       # out-gpt/ckpt.pt
    python sample.py --out_dir=out-bdh --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=200

The model and the tokenizer come from the checkpoint. Every model decodes incrementally through
its cache (a KV cache; BDH's recurrent state), all num_samples in one batch; past block_size the
cache is refilled from the last block_size/2 tokens. `--crop=True` re-runs the whole forward on
the last block_size tokens for every token instead, as nanoGPT does.
"""
import sys
from dataclasses import dataclass
from typing import Literal

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import UserError, parse_options
from device import autocast, pick_device
from tokenizer import get_tokenizer


@dataclass
class SampleConfig:
    out_dir: str = "out-gpt"     # the folder holding train.py's ckpt.pt
    start: str = "\n"            # the prompt, or FILE:path to read it from a file
    num_samples: int = 10
    max_new_tokens: int = 500
    temperature: float = 0.8     # < 1 sharpens the distribution, > 1 flattens it
    top_k: int = 200             # sample among the top_k most likely tokens (1 = greedy; 0 = all)
    crop: bool = False           # True: re-run the whole forward on the last block_size tokens per token
    seed: int = 1337
    device: str = "auto"         # auto: cuda, then mps, then cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: as train.py


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, crop=False):
    """Append max_new_tokens sampled tokens to every row of idx (B, T).

    Incremental decoding: the prompt fills the model's cache once (forward_cached), then each new
    token costs one cached step, with logits equal to a full forward over the same tokens. A cache
    holds at most block_size tokens; when it is full it is refilled from the last block_size/2
    tokens, so every token is predicted from between block_size/2 and block_size tokens of context
    and no position goes past what the model was trained on. crop=True instead re-runs the whole
    forward on the last block_size tokens for every token, as nanoGPT does (always block_size of
    context once the text is that long, and far slower)."""
    block_size = model.config.block_size
    cache, held = None, 0  # held: tokens in the cache
    for _ in range(max_new_tokens):
        if crop:
            logits = model(idx[:, -block_size:])[0][:, -1]
        elif cache is None or held == block_size:
            context = idx[:, -(block_size if cache is None else max(1, block_size // 2)):]
            cache = model.init_cache(idx.size(0))
            logits = model.forward_cached(context, cache)[:, -1]
            held = context.size(1)
        else:
            logits = model.forward_cached(idx[:, -1:], cache)[:, -1]
            held += 1
        if top_k == 1:  # greedy: the most likely token, without a softmax and a draw over the vocabulary
            next_id = logits.max(dim=-1, keepdim=True).indices  # = argmax (first of ties), 3x faster on CPU
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, -float("inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


def read_text_option(text, what):
    """The option's text itself, or the contents of the UTF-8 file named by FILE:path."""
    if not text.startswith("FILE:"):
        return text
    try:
        with open(text[5:], encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read the {what} file {text[5:]}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"the {what} file {text[5:]} is not UTF-8 text; save it as UTF-8") from None


def main(argv):
    [opts] = parse_options(argv, SampleConfig(), doc=__doc__)
    if not opts.temperature > 0:
        raise UserError("--temperature must be positive (for greedy decoding use --top_k=1)")
    for key in ("top_k", "max_new_tokens", "num_samples"):
        if getattr(opts, key) < 0:
            raise UserError(f"--{key}={getattr(opts, key)}: must be 0 or more")
    start = read_text_option(opts.start, "prompt")

    device, dtype = pick_device(opts.device, opts.dtype)
    path = f"{opts.out_dir}/ckpt.pt"
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, path)
    model.eval().to(device)
    tokenizer = get_tokenizer(ckpt["tokenizer"])
    idx = torch.tensor([tokenizer.encode(start)], dtype=torch.long, device=device)
    if idx.size(1) == 0:
        raise UserError("the prompt is empty; give at least one character with --start")

    torch.manual_seed(opts.seed)
    with autocast(device, dtype):  # all samples at once: one batch of num_samples rows
        out = generate(model, idx.expand(opts.num_samples, -1), opts.max_new_tokens,
                       temperature=opts.temperature, top_k=opts.top_k or None, crop=opts.crop)
    for row in out.tolist():
        print(tokenizer.decode(row))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"sample.py: error: {e}")
    except KeyboardInterrupt:  # nothing is written, so nothing is lost: one line, not a traceback
        sys.exit("\nsample.py: interrupted")
