"""
Sample text from a checkpoint written by train.py.

    python sample.py                                       # out-gpt/ckpt.pt
    python sample.py --out_dir=out-bdh --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=200

The model and the tokenizer come from the checkpoint. A model whose file offers its own exact and
faster `generate` (BDH's recurrent form) is sampled with it; any other model re-runs its forward
on the last block_size tokens for every new token, as nanoGPT does. BDH's recurrent state carries
the whole text, also beyond the block_size it was trained on, where a model trained on short
blocks writes worse text; `--crop=True` samples every model the nanoGPT way instead.
"""
import sys

import torch

from prepare_data import UserError, get_tokenizer
from train import load_checkpoint, model_from_checkpoint, parse_value, pick_device

OPTIONS = {
    "out_dir": "out-gpt",
    "start": "\n",           # the prompt, or FILE:path to read it from a file
    "num_samples": 10,
    "max_new_tokens": 500,
    "temperature": 0.8,      # < 1 sharpens the distribution, > 1 flattens it
    "top_k": 200,            # sample among the top_k most likely tokens (1 = greedy; 0 = all)
    "crop": False,           # True: re-run the forward on the last block_size tokens, even for BDH
    "seed": 1337,
    "device": "auto",
    "dtype": "auto",
}


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    """Append max_new_tokens sampled tokens to idx (B, T), re-running the model on the last
    block_size tokens each time (exact for every causal model; a cache would only be faster)."""
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -model.config.block_size:])
        logits = logits[:, -1, :] / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
            logits[logits < kth] = -float("inf")
        next_id = torch.multinomial(torch.softmax(logits.float(), dim=-1), num_samples=1)
        idx = torch.cat((idx, next_id), dim=1)
    return idx


def pick_sampler(model, crop):
    """The model's own generate (BDH's recurrent form) unless crop is asked for or there is none."""
    own = None if crop else getattr(model, "generate", None)
    return own or (lambda *a, **k: generate(model, *a, **k))


def main(argv):
    opts = dict(OPTIONS)
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if arg in ("-h", "--help"):
            print(__doc__ + "\noptions: " + ", ".join(f"--{k}={v!r}" for k, v in OPTIONS.items()))
            return
        if key not in OPTIONS or not eq:
            raise UserError(f"unknown or malformed option {arg!r}; options: {', '.join('--' + k for k in OPTIONS)}")
        opts[key] = parse_value(key, value, OPTIONS[key])
    if not opts["temperature"] > 0:
        raise UserError("--temperature must be positive (for greedy decoding use --top_k=1)")
    for key in ("top_k", "max_new_tokens", "num_samples"):
        if opts[key] < 0:
            raise UserError(f"--{key}={opts[key]}: must be 0 or more")
    start = opts["start"]
    if start.startswith("FILE:"):
        try:
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt file {start[5:]}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"the prompt file {start[5:]} is not UTF-8 text; save it as UTF-8") from None

    device, dtype = pick_device(opts["device"], opts["dtype"])
    path = f"{opts['out_dir']}/ckpt.pt"
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, path)
    model.eval().to(device)
    encode, decode = get_tokenizer(ckpt["tokenizer"])
    idx = torch.tensor([encode(start)], dtype=torch.long, device=device)
    if idx.size(1) == 0:
        raise UserError("the prompt is empty; give at least one character with --start")

    torch.manual_seed(opts["seed"])
    sampler = pick_sampler(model, opts["crop"])
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = torch.autocast(device.type, dtype=ptdtype, enabled=dtype != "float32")
    for _ in range(opts["num_samples"]):
        with autocast:
            out = sampler(idx, opts["max_new_tokens"], temperature=opts["temperature"],
                          top_k=opts["top_k"] or None)
        print(decode(out[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"sample.py: error: {e}")
