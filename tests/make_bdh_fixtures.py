"""
Build tests/fixtures/bdh_tiny/expected.pt: a tiny BDH-GPU made, trained a few steps and run by the
authors' own code (pathwaycom/bdh, bdh.py), so that tests/test_bdh.py can check model_bdh.py
against the original without importing it.

    python tests/make_bdh_fixtures.py /path/to/bdh   # a checkout of pathwaycom/bdh

The config has the laptop config's N = 512 neurons per head (one head, D = 16), where forming the
RoPE frequencies as theta^(-2k/N) instead of the reference's 1 / theta^(2k/N) rounds some of them
differently. Writes {"config", "state_dict" (the reference's names), "idx", "logits" (eval mode),
"freqs" (the reference's fp32 frequency buffer, turns per position of each neuron)}.
"""
import os
import sys

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "bdh_tiny")
CONFIG = dict(n_layer=2, n_embd=16, n_head=1, mlp_internal_dim_multiplier=32, vocab_size=65, dropout=0.0)
T = 64


def main(reference):
    sys.path.insert(0, reference)
    from bdh import BDH, BDHConfig
    torch.manual_seed(0)
    model = BDH(BDHConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(1)
    for _ in range(30):  # large steps at repeating the previous token: logits of a few units
        x = torch.randint(0, CONFIG["vocab_size"], (4, T), generator=g)
        model(x, torch.roll(x, 1, dims=1))[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    idx = torch.randint(0, CONFIG["vocab_size"], (2, T), generator=g)
    with torch.no_grad():
        logits = model(idx)[0]
    state = {k: v for k, v in model.state_dict().items() if k != "attn.freqs"}
    os.makedirs(OUT, exist_ok=True)
    torch.save({"config": CONFIG, "state_dict": state, "idx": idx, "logits": logits,
                "freqs": model.attn.freqs.flatten()}, os.path.join(OUT, "expected.pt"))
    print(f"wrote {OUT}/expected.pt: max |logit| {logits.abs().max().item():.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/make_bdh_fixtures.py /path/to/a/checkout/of/pathwaycom/bdh")
    main(sys.argv[1])
