"""
Build tests/fixtures/dawn_tiny/: a tiny random DAWN v17.1 made and run by the DAWN authors' own code
(madst0614/DAWN, models/model_v17_1.py, unchanged from ff1036c to 84389f7), saved in the layout of
their published dawn_39m_weights.pt, and a tiny WordPiece vocab.txt with the token ids Hugging
Face's BertTokenizer gives for a few strings, so that tests/test_pretrained_dawn.py can check our
loader, model_dawn.py and tokenizer against the originals without importing them.

    pip install transformers && python tests/make_dawn_fixtures.py /path/to/DAWN   # a checkout of madst0614/DAWN
    python tests/make_dawn_fixtures.py /path/to/DAWN --check-39m   # no fixture: the 39M shape, compared

Writes vocab.txt, dawn_tiny_weights.pt ({"model_state_dict", "config", "epoch", "global_step"},
as their scripts/extract_weights.py writes it, config = the DAWN(**config) arguments their
scripts/train.py saves) and expected.pt: fixed inputs, the reference's eval-mode logits for them,
its auxiliary losses in training mode with dropout off, and BertTokenizer's ids and decodes.
"""
import os
import sys

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "dawn_tiny")

# a vocabulary in bert-base-uncased's layout: [PAD], unused slots, the special tokens, single
# characters, "##" continuations, then whole words; no "x" at all and only two CJK ideographs
WORDS = ("the king and queen of france shall speak to thee my lord what is this night a fair day for "
         "love war we will go now hello world run jump cafe naive un over there here don can won").split()
PIECES = ["##aff", "##able", "##ning", "##ed", "##ing", "##s", "##lo", "##sume", "##14", "14", "20", "##24", "'"]
LETTERS = [c for c in "abcdefghijklmnopqrstuvwyz"]
VOCAB = (["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
         + list("!\"#$%&()*+,-./:;<=>?@[\\]^_`{|}~") + ["—", "東", "京"] + list("0123456789") + LETTERS
         + ["##" + c for c in LETTERS] + ["##" + d for d in "0123456789"] + WORDS + PIECES)
VOCAB = list(dict.fromkeys(VOCAB))  # once each ("a" is a letter and a word)
STRINGS = ["Hello, World! This is the king's night.", "Café, naïve résumé — ÉCOLE", "東京 and 日本語",
           "unaffable running jumped xylophone", "a" * 100, "a" * 101, "tabs\tand\nnewlines   and\u00a0nbsp\u200bzero",
           "[SEP] special [CLS]tokens[MASK] and [unused0] [sep]", "3.14 and 2024", "don't can't won't",
           "control\x00chars\ufffd and \x07bell", "ΟΔΟΣ Straße ﬁne", "emoji 🙂 here", "",
           "the king and queen of france shall speak to thee, my lord."]
CONFIG = dict(vocab_size=len(VOCAB), d_model=32, n_layers=2, n_heads=4, rank=8, knowledge_rank=6, max_seq_len=64,
              state_dim=4, d_space=16, n_feature_qk=6, n_restore_qk=6, n_feature_v=10, n_restore_v=10,
              n_feature_know=8, n_restore_know=8, top_k_feature_qk=2, top_k_restore_qk=2, top_k_feature_v=3,
              top_k_restore_v=3, top_k_feature_know=2, top_k_restore_know=2, dropout=0.1, router_dropout=0.1,
              gradient_checkpointing=True, attention_token_routing=True, knowledge_token_routing=True,
              use_ssm_context=False)  # the flags of the 39M config (token routing, no SSM)


def tokenizer_ids(vocab_path):
    """{string: (ids, decoded)} from transformers' BertTokenizer; the Python implementation (what
    transformers 4 called BertTokenizer) and the tokenizers-backed one must agree."""
    from transformers import BertTokenizer
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as PythonBertTokenizer
    python, rust = PythonBertTokenizer(vocab_path), BertTokenizer(vocab_path)
    out = {}
    for s in STRINGS:
        ids = python.encode(s, add_special_tokens=False)
        assert rust.encode(s, add_special_tokens=False) == ids, (s, ids, rust.encode(s, add_special_tokens=False))
        out[s] = (ids, python.decode(ids, clean_up_tokenization_spaces=True))
    return out


def run_with_margin(model, idx):
    """The reference's eval logits for idx, and how far its closest selection was from a tie: the
    gap between the k-th and (k+1)-th largest routing logits, over every token, routing and layer."""
    normed = []  # each layer's LN2 output: the knowledge routings read it
    hooks = [layer.norm2.register_forward_hook(lambda m, i, o: normed.append(o)) for layer in model.layers]
    with torch.no_grad():
        logits, infos = model(idx, return_routing_info=True)
        for h in hooks:
            h.remove()
        prefs = [(info["attention"][key], k) for info in infos for key, k in
                 (("fqk_q_pref", 2), ("fqk_k_pref", 2), ("fv_pref", 3), ("rqk_q_pref", 2), ("rqk_k_pref", 2), ("rv_pref", 3))]
        for u in normed:
            prefs += [(torch.softmax(logits_, dim=-1), 2) for logits_ in model.router.neuron_router.get_knowledge_logits(u)]
    gaps = [p.log().topk(k + 1, dim=-1).values.diff(dim=-1)[..., k - 1].abs().min() for p, k in prefs]
    return logits, min(gaps).item()


def main(reference):
    sys.path.insert(0, os.path.join(reference, "models"))
    from model_v17_1 import DAWN
    os.makedirs(OUT, exist_ok=True)
    vocab_path = os.path.join(OUT, "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in VOCAB))
    torch.manual_seed(0)
    model = DAWN(**CONFIG)
    with torch.no_grad():  # the reference zero-inits biases and sets norms to 1, and its router starts
        for name, p in model.named_parameters():  # near uniform: randomise them so the test sees them
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if "proj_" in name and name.endswith("weight"):
                p.normal_(0.0, 0.3)  # routing far from uniform
            if name.startswith("shared_neurons."):
                p.add_(0.05 * torch.randn_like(p))  # no longer exactly orthogonal: a non-zero orthogonality loss
    model.eval()
    for seed in range(1, 100):  # inputs whose every top-k selection is far from a tie, so that any
        idx = torch.randint(0, CONFIG["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(seed))
        logits, margin = run_with_margin(model, idx)  # summation order selects the same neurons
        if margin > 1e-4:
            break
    print(f"inputs of seed {seed}: smallest top-k margin {margin:.2e}")
    # training mode with every dropout off: the balance loss of this batch, and the weight losses
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    with torch.no_grad():
        train_logits = model(idx)
        aux = {"lb": float(model.aux_loss), "orth": float(model.orthogonality_loss()),
               "div": float(model.knowledge_diversity_loss())}
    assert torch.allclose(train_logits, logits, atol=1e-6)  # per-token routing: no batch statistics
    state = model.state_dict()  # the reference's own state_dict: shared pools listed by every layer
    torch.save({"model_state_dict": state, "config": CONFIG, "epoch": 1, "global_step": 100},
               os.path.join(OUT, "dawn_tiny_weights.pt"))
    torch.save({"idx": idx, "logits": logits, "aux": aux, "ids": tokenizer_ids(vocab_path)},
               os.path.join(OUT, "expected.pt"))
    print(f"wrote {OUT}: {sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT)):,} bytes, aux {aux}")


def check_39m(reference):
    """No fixture: the published 39M shape with random weights, through pretrained.py into our
    model_dawn.py, against the reference in fp64 (equal up to rounding: the same computation) and in
    fp32 (where rounding flips near-tied top-k selections, differently in each implementation)."""
    sys.path.insert(0, os.path.join(reference, "models"))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch.nn.functional as F
    import model_dawn
    import pretrained
    from model_v17_1 import DAWN
    sizes = {"qk": 64, "v": 264, "know": 160}
    config = {**CONFIG, "vocab_size": 30522, "d_model": 384, "n_layers": 12, "n_heads": 6, "rank": 64,
              "knowledge_rank": 64, "max_seq_len": 512, "state_dim": 64, "d_space": 256,
              **{f"n_{step}_{pool}": n for step in ("feature", "restore") for pool, n in sizes.items()},
              **{f"top_k_{step}_{pool}": 12 for step in ("feature", "restore") for pool in sizes}}
    torch.manual_seed(0)
    ref = DAWN(**config).eval()
    path = os.path.join(OUT, "..", "dawn_39m_random.pt")
    torch.save({"model_state_dict": ref.state_dict(), "config": config}, path)
    try:
        cfg, state = pretrained.read_dawn_checkpoint(path)
        ours = model_dawn.DAWN(model_dawn.Config(**pretrained.dawn_model_fields(path, cfg, state, {}, 0)))
        pretrained.load_dawn_weights(ours, path, state)
    finally:
        os.remove(path)
    ours.eval()
    print(f"parameters: reference {sum(p.numel() for p in ref.parameters()):,} (with its unused SSM), "
          f"ours {sum(p.numel() for p in ours.parameters()):,}")
    idx = torch.randint(0, 30522, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fp32 = (ours(idx)[0] - ref(idx)).abs().max().item()
        ref.double()
        ours.double()

        def route_fp64(z, keys, k):  # model_dawn.route without its cast to fp32
            p = torch.softmax(z @ keys.T, dim=-1)
            top = p.topk(k, dim=-1)
            w = torch.zeros_like(p).scatter(-1, top.indices, top.values / (top.values.sum(-1, keepdim=True) + 1e-8))
            return w, p, top.indices

        model_dawn.route = route_fp64
        unit = F.normalize(ours.neuron_emb, dim=-1).split([ours.pool_sizes[pool] for pool in model_dawn.POOLS])
        ours.keys = lambda: dict(zip(model_dawn.POOLS, unit))
        fp64 = (ours(idx)[0] - ref(idx)).abs().max().item()
    print(f"max |logit difference| on 2 x 128 tokens: fp64 {fp64:.1e}, fp32 {fp32:.1e}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[2:] not in ([], ["--check-39m"]):
        sys.exit("usage: python tests/make_dawn_fixtures.py /path/to/a/checkout/of/madst0614/DAWN [--check-39m]")
    check_39m(sys.argv[1]) if sys.argv[2:] else main(sys.argv[1])
