"""
See where the computation goes: render a model's routing and sparsity over a text as one HTML page.

    python visualize.py --out_dir=out-mod --text=$'ROMEO:\\nBut soft, what light'   # bash's $'...' turns \\n into a newline
    python visualize.py --out_dir=out-doge --text=FILE:prompt.txt --layer=1
    python visualize.py --out_dir=out-dawn --text="To be" --html=/tmp/dawn.html

Per token of the text, from one eval forward (no_grad) of the checkpoint's model:
  mod, dtf   routed or skipped in each routed layer, and the router score (MoD r, DTF gate G) vs tau
  dawn       the neurons each of the eight routings picked, and the most used neurons of each pool
  bdh        the fraction of the H*N neurons that fire (g = xs*ys > 0) per layer, and the most active
  doge       for one query (--query, default the last token), which keys the dynamic mask kept, the
             per-key bias delta and the attention weights; with CDMoE also the experts each token picked
  gpt        the attention weights of one query, for comparison
Every model also gets its next-token guess per token. Every number is the model's own: what its
forward keeps for stats() (routing decisions and gates, DAWN's selected neurons, BDH's activations,
Doge's delta and keep mask, the CDMoE's experts), MoD's score() of its routed blocks' inputs, and the
attention weights of the forward's own calls of F.scaled_dot_product_attention, recorded as they
happen (AttentionCalls). Nothing is recomputed with a copy of a model's maths, and the logits are the
plain forward's. The page is self-contained: inline CSS, no scripts, no external assets.
"""
import html
import os
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import UserError, parse_options
from device import pick_device
from sample import read_text_option
from tokenizer import get_tokenizer


@dataclass
class VisualizeConfig:
    out_dir: str = "out-gpt"     # the folder holding train.py's ckpt.pt
    text: str = "ROMEO:\nBut soft, what light through yonder window breaks?"  # or FILE:path
    html: str = ""               # output file; default out_dir/visualize.html
    query: int = -1              # doge/gpt: the query position whose attention is shown (negative: from the end)
    layer: int = -1              # show only this layer in the per-layer tables (-1: every layer)
    top: int = 8                 # how many neurons / experts to list per token or pool
    device: str = "cpu"          # cpu, cuda, mps, or auto: the first of cuda, mps, cpu there is


# --- what the forward computed -------------------------------------------------------------------

def forward(model, idx):
    """One eval forward; returns the logits (1, T, V). The model keeps what its stats() reads."""
    with torch.no_grad():
        return model(idx)[0]


class AttentionCalls(TorchFunctionMode):
    """Inside `with AttentionCalls() as calls:`, every call of F.scaled_dot_product_attention is
    recorded as made, in calls.made = [(args, kwargs, output)]: one per attention layer, in forward
    order, with the model's own q, k, v and mask (Doge's bias rides in q and k, DMAttn.project).
    Nothing is changed: each call runs as it would without the recording."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.scaled_dot_product_attention:
            self.made.append((args, kwargs or {}, out))
        return out


def sdpa_weights(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """The weights (B, H, T, S) that F.scaled_dot_product_attention(same arguments) applies to the
    values, as PyTorch documents the function: softmax(q k^T * scale + mask), where a boolean mask
    keeps True, is_causal keeps the lower triangle and enable_gqa lets key head g serve query heads
    g*H/G .. (g+1)*H/G - 1. Without dropout: visualize runs the model in eval mode."""
    T, S = query.size(-2), key.size(-2)
    if enable_gqa:
        key = key.repeat_interleave(query.size(-3) // key.size(-3), dim=-3)
    scores = (query.float() @ key.float().mT) * (query.size(-1) ** -0.5 if scale is None else scale)
    if is_causal:
        attn_mask = torch.ones(T, S, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    return torch.softmax(scores, dim=-1)


def forward_with_attention(model, idx):
    """The eval forward's logits and the weights of each of its attention calls, [(1, H, T, T)]."""
    with AttentionCalls() as calls:
        logits = forward(model, idx)
    return logits, [sdpa_weights(*args, **kwargs) for args, kwargs, _ in calls.made]


# --- one extractor per model family: plain dicts of per-token data --------------------------------
# Each returns {"logits": ..., "sections": [...]}. A section is one of
#   {"kind": "strips", "title", "note", "rows": [{"label", "cells": [{"cls", "alpha", "title"}]}]}
#       one line of the text per row, every token a coloured cell (cls: routed/skipped/kept/...)
#   {"kind": "table", "title", "note", "header": [...], "rows": [[...]]}   plain text cells

def scaled(values):
    """Values mapped to 0.15..1 for a background alpha (constant rows map to 0.6)."""
    lo, hi = min(values), max(values)
    return [0.6 if hi - lo < 1e-12 else 0.15 + 0.85 * (v - lo) / (hi - lo) for v in values]


def routing_sections(name, layers, score_name):
    """Shared by MoD and DTF: layers = [(label, scores, routed, tau)]."""
    rows, table = [], []
    for label, scores, routed, tau in layers:
        alpha = scaled(scores)
        rows.append({"label": f"{label} ({sum(routed)}/{len(routed)})", "cells": [
            {"cls": "routed" if r else "skipped", "alpha": a,
             "title": f"{'routed' if r else 'skipped'}: {score_name} = {s:.4f}, tau = {tau:.4f}"}
            for s, r, a in zip(scores, routed, alpha)]})
    for t in range(len(layers[0][1]) if layers else 0):
        table.append([f"{l[1][t]:.4f} {'routed' if l[2][t] else 'skip'}" for l in layers])
    note = (f"A token goes through a routed block when its {score_name} >= tau (the routing threshold) "
            f"and fewer than K earlier tokens were routed (the per-row cap). Shade: {score_name}.")
    return [{"kind": "strips", "title": f"{name}: which tokens get the routed block", "note": note, "rows": rows},
            {"kind": "table", "title": f"{score_name} per token and routed layer",
             "header": [l[0] for l in layers], "rows": table, "note": "", "per_token": True}]


def extract_mod(model, idx, opts):
    # the routed blocks' own decisions (last["sel"]) and their router scores, score() of the input
    # each received (a pre-hook only stores it)
    routed = [(l, block) for l, block in enumerate(model.blocks) if hasattr(block, "score")]
    inputs = {}

    def store_input(module, args):  # returns None: the block runs on its arguments unchanged
        inputs[module] = args[0]

    hooks = [block.register_forward_pre_hook(store_input) for _, block in routed]
    try:
        logits = forward(model, idx)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        layers = [(f"layer {l}", block.score(inputs[block])[0].tolist(), block.last["sel"][0].tolist(), float(block.tau))
                  for l, block in routed]
    return {"logits": logits, "sections": routing_sections("MoD", layers, "router score r")}


def extract_dtf(model, idx, opts):
    logits = forward(model, idx)  # each pair keeps its gate G and its decisions
    layers = [(f"pair {p} (dynamic block {2 * p + 1})", pair.last["G"][0].tolist(), pair.last["sel"][0].tolist(),
               float(pair.tau)) for p, pair in enumerate(model.blocks)]
    return {"logits": logits, "sections": routing_sections("DTF", layers, "surprise gate G")}


def extract_dawn(model, idx, opts):
    import model_dawn
    logits = forward(model, idx)
    selected = model.last["selected"]     # per layer {pool: (1, T, m, k)}, kept by the forward
    names = [(pool, i, n) for pool, ns in model_dawn.ROUTINGS.items() for i, n in enumerate(ns)]
    sections = []
    counts = {pool: Counter() for pool in model_dawn.ROUTINGS}
    for l, layer in enumerate(selected):
        for pool in model_dawn.ROUTINGS:
            counts[pool].update(layer[pool].flatten().tolist())
        if opts.layer not in (-1, l):
            continue
        rows = [[" ".join(str(n) for n in sorted(layer[pool][0, t, i].tolist())) for pool, i, _ in names]
                for t in range(idx.size(1))]
        sections.append({"kind": "table", "title": f"DAWN layer {l}: the neurons each routing picked",
                         "header": [f"{n} ({pool})" for pool, _, n in names], "rows": rows, "per_token": True,
                         "note": "Neuron ids within their pool; every layer composes from the same shared pools."})
    top = [[pool, model.pool_sizes[pool], ", ".join(f"{n} ({c}x)" for n, c in counts[pool].most_common(opts.top))]
           for pool in model_dawn.ROUTINGS]
    sections.insert(0, {"kind": "table", "title": "DAWN: the most frequently picked neurons per pool",
                        "header": ["pool", "neurons", "most picked over all tokens, layers and routings"],
                        "rows": top, "note": ""})
    return {"logits": logits, "sections": sections}


def extract_bdh(model, idx, opts):
    logits = forward(model, idx)
    H, _, N = model.encoder.shape
    T = idx.size(1)
    rows, table = [], [[] for _ in range(T)]
    for l, (_, _, g) in enumerate(model.last["activations"]):  # per layer xs, ys, g = xs * ys: (H, B*T, N)
        g = g.view(H, T, N).transpose(0, 1).reshape(T, H * N)  # neuron h*N + i, as the decoder's rows
        density = (g > 0).float().mean(-1).tolist()
        alpha = scaled(density)
        rows.append({"label": f"layer {l}", "cells": [
            {"cls": "fire", "alpha": a, "title": f"{d:.2%} of {H * N} neurons fire"} for d, a in zip(density, alpha)]})
        if opts.layer in (-1, l):
            top = g.topk(min(opts.top, H * N), dim=-1)
            for t in range(T):
                table[t].append(f"{density[t]:.1%}: " + " ".join(
                    f"{i}" for v, i in zip(top.values[t].tolist(), top.indices[t].tolist()) if v > 0))
    shown = [l for l in range(len(rows)) if opts.layer in (-1, l)]
    return {"logits": logits, "sections": [
        {"kind": "strips", "title": "BDH: firing density per token", "rows": rows,
         "note": "Fraction of the n = H*N neurons with g = relu(x D_x) * relu(a D_y) > 0. Shade: density."},
        {"kind": "table", "title": "BDH: density and the most active neurons (largest g) per token",
         "header": [f"layer {l}" for l in shown], "rows": table, "per_token": True,
         "note": "Neuron id h*N + i: neuron i of head h (row of the decoder)."}]}


def query_position(opts, T):
    q = opts.query + T if opts.query < 0 else opts.query
    if not 0 <= q < T:
        raise UserError(f"--query={opts.query} is outside the text's {T} tokens")
    return q


def attention_strip(label, probs, keep, bias, q, T):
    """One strip row for query q: keys after q are 'future', masked keys 'masked', kept 'kept'."""
    cells = []
    top = max(probs[: q + 1]) or 1.0
    for j in range(T):
        if j > q:
            cells.append({"cls": "future", "alpha": 0.0, "title": "after the query: not visible"})
            continue
        kind = "kept" if keep[j] else "masked"
        b = "" if bias is None else f", bias delta = {bias[j]:.4f}"
        cells.append({"cls": kind + (" query" if j == q else ""), "alpha": 0.15 + 0.85 * probs[j] / top if keep[j] else 0.0,
                      "title": f"{kind}: attention weight {probs[j]:.4f}{b}"})
    return {"label": label, "cells": cells}


def extract_doge(model, idx, opts):
    T = idx.size(1)
    q_pos = query_position(opts, T)
    logits, weights = forward_with_attention(model, idx)  # one call per layer, the bias delta inside
    kws = model.config.keep_window_size
    rows, table, sections = [], [[] for _ in range(T)], []
    header = []
    for l, (block, probs) in enumerate(zip(model.blocks, weights)):
        a = block.attn
        delta, keep = a.last["delta"], a.last["keep"]  # the forward's own: (1, G, T), (1, G, T, T) or None
        H, G = a.n_head, a.n_kv_head
        keep_rows = torch.ones(G, T, T, dtype=torch.bool).tril() if keep is None else keep[0].cpu()
        for g in range(G):
            p = probs[0, g * H // G:(g + 1) * H // G, q_pos].mean(0).tolist()
            kept = keep_rows[g, q_pos].tolist()
            n_kept = sum(kept[: q_pos + 1])
            rows.append(attention_strip(f"layer {l} kv head {g} ({n_kept}/{q_pos + 1} kept)",
                                        p, kept, delta[0, g].tolist(), q_pos, T))
        if opts.layer in (-1, l):
            header += [f"l{l} delta h{g}" for g in range(G)]
            for t in range(T):
                table[t] += [f"{delta[0, g, t].item():.4f}" for g in range(G)]
        if model.config.is_moe and opts.layer in (-1, l):
            experts = block.mlp.last["experts"][0]  # the CDMoE keeps its last routing itself
            sections.append({"kind": "table", "title": f"Doge CDMoE layer {l}: experts each token picked",
                             "header": ["experts (id = a*K + b)"], "note": "", "per_token": True,
                             "rows": [[" ".join(str(e) for e in experts[t].tolist())] for t in range(T)]})
    note = (f"Query: token {q_pos}. Each query keeps the keep_window_size = {kws} keys with the largest "
            "per-key bias delta among keys 0..query (all of them while there are fewer); masked keys get "
            "no attention. Shade: attention weight (mean over the group's query heads).")
    if q_pos < kws:  # nothing to mask yet: say so, and where masking starts
        note += (f" This query sees {q_pos + 1} keys, not more than {kws}, so none is masked; "
                 + (f"a query at position {kws} or later (--query={kws}..{T - 1}) shows the mask." if T > kws
                    else f"the mask acts from position {kws} on: give a text of more than {kws} tokens."))
        print(f"visualize.py: note: query {q_pos} sees {q_pos + 1} <= keep_window_size = {kws} keys: "
              "nothing is masked", file=sys.stderr)
    return {"logits": logits, "sections": [
        {"kind": "strips", "title": f"Doge: keys kept and masked for query {q_pos}", "note": note, "rows": rows},
        {"kind": "table", "title": "Doge: per-key bias delta = exp(A * softplus(dt(v)))", "header": header,
         "rows": table, "note": "", "per_token": True}] + sections}


def extract_gpt(model, idx, opts):
    T = idx.size(1)
    q_pos = query_position(opts, T)
    logits, weights = forward_with_attention(model, idx)  # one call per layer
    rows = [attention_strip(f"layer {l}", probs[0, :, q_pos].mean(0).tolist(), [True] * T, None, q_pos, T)
            for l, probs in enumerate(weights)]
    return {"logits": logits, "sections": [
        {"kind": "strips", "title": f"GPT: attention of query {q_pos} (dense, every earlier key)", "rows": rows,
         "note": "Shade: attention weight, mean over heads. Every key up to the query is used."}]}


def extract_other(model, idx, opts):
    """A model file this script does not know: its stats() after the forward, nothing per layer."""
    logits = forward(model, idx)
    stats = model.stats() if hasattr(model, "stats") else {}
    return {"logits": logits, "sections": [{"kind": "table", "title": "stats() of this forward",
                                            "header": ["key", "value"], "note": "",
                                            "rows": [[k, f"{v:.4g}"] for k, v in stats.items()]}]}


EXTRACTORS = {"mod": extract_mod, "dtf": extract_dtf, "dawn": extract_dawn, "bdh": extract_bdh,
              "doge": extract_doge, "gpt": extract_gpt}


# --- the one renderer -----------------------------------------------------------------------------

CSS = """
body { font: 14px/1.4 sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; } .note { color: #666; }
.strip { margin: .3em 0; } .label { display: block; color: #555; font-size: .85em; }
.tok, .lg { font-family: monospace; white-space: pre; display: inline-block; padding: 1px 1px; margin: 1px 0;
       border-bottom: 3px solid transparent; }
.routed { background: rgba(230, 110, 0, var(--a)); border-bottom-color: #b34700; }
.skipped { background: rgba(120, 120, 120, calc(var(--a) * .25)); color: #999; }
.kept { background: rgba(0, 110, 230, var(--a)); border-bottom-color: #0050a8; }
.masked { background: #eee; color: #bbb; text-decoration: line-through; }
.future { color: #ddd; }
.fire { background: rgba(0, 150, 70, var(--a)); }
.query { outline: 2px solid #c00; }
table { border-collapse: collapse; font-size: .85em; margin-top: .4em; }
td, th { border: 1px solid #ddd; padding: 1px 6px; text-align: left; font-family: monospace; white-space: pre; }
th { background: #f4f4f4; }
.legend span { margin-right: 1em; }
"""


def visible(token):
    """The decoded token with its whitespace visible, escaped for HTML."""
    return html.escape(token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5"))


def render(title, tokens, data, notes):
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    out += [f'<p class="note">{e(n)}</p>' for n in notes]
    out.append('<p class="legend"><span class="lg routed" style="--a:.8">routed</span>'
               '<span class="lg skipped" style="--a:.8">skipped</span><span class="lg kept" style="--a:.8">'
               'kept key</span><span class="lg masked">masked key</span><span class="lg fire" style="--a:.8">'
               'firing</span> (hover a token for its numbers)</p>')
    for s in data["sections"]:
        out.append(f"<h2>{e(s['title'])}</h2>")
        if s.get("note"):
            out.append(f'<p class="note">{e(s["note"])}</p>')
        if s["kind"] == "strips":
            for row in s["rows"]:
                cells = "".join(
                    f'<span class="tok {c["cls"]}" style="--a:{c["alpha"]:.3f}" title="{e(f"{t}: {tokens[t]!r} - " + c["title"])}">'
                    f"{visible(tokens[t])}</span>" for t, c in enumerate(row["cells"]))
                out.append(f'<div class="strip"><span class="label">{e(row["label"])}</span>{cells}</div>')
        else:
            head = "".join(f"<th>{e(h)}</th>" for h in s["header"])
            tok_col = s.get("per_token", False)  # one row per token: lead with its position and text
            rows = []
            for t, r in enumerate(s["rows"]):
                lead = f"<td>{t}</td><td>{visible(tokens[t])}</td>" if tok_col else ""
                rows.append("<tr>" + lead + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
            lead_head = "<th>t</th><th>token</th>" if tok_col else ""
            out.append(f"<table><tr>{lead_head}{head}</tr>{''.join(rows)}</table>")
    return "\n".join(out) + "\n</body></html>\n"


def prediction_section(logits, decode, tokens):
    """Every model: the next token it guesses after each position, shaded by its probability."""
    p = torch.softmax(logits[0].float(), dim=-1)
    best = p.max(dim=-1)
    cells = []
    for t in range(len(tokens)):
        guess = decode([best.indices[t].item()])
        cells.append({"cls": "kept", "alpha": 0.1 + 0.9 * best.values[t].item(),
                      "title": f"guesses {guess!r} next, p = {best.values[t].item():.3f}"})
    return {"kind": "strips", "title": "Next-token guess (shade: the model's confidence)", "note": "",
            "rows": [{"label": "all models", "cells": cells}]}


def main(argv):
    [opts] = parse_options(argv, VisualizeConfig(), doc=__doc__)
    text = read_text_option(opts.text, "text")
    if opts.top < 1:
        raise UserError("--top must be at least 1")

    device, _ = pick_device(opts.device, "float32")
    path = f"{opts.out_dir}/ckpt.pt"
    ckpt = load_checkpoint(path, device)
    model = model_from_checkpoint(ckpt, path).eval().to(device)
    tokenizer = get_tokenizer(ckpt["tokenizer"])
    encode, decode = tokenizer.encode, tokenizer.decode
    ids = encode(text)
    if not ids:
        raise UserError("the text is empty; give at least one token with --text")
    notes = [f"{ckpt['model_name']} checkpoint from {opts.out_dir} (iteration {ckpt.get('iter_num', '?')}, "
             f"eval mode, one forward)."]
    block_size = model.config.block_size
    if len(ids) > block_size:
        notes.append(f"The text has {len(ids)} tokens; only its first block_size = {block_size} are shown.")
        print(f"visualize.py: note: text cropped to its first {block_size} of {len(ids)} tokens", file=sys.stderr)
        ids = ids[:block_size]
    n_layer = getattr(model.config, "n_layer", 0)
    if opts.layer != -1 and not 0 <= opts.layer < n_layer:
        raise UserError(f"--layer={opts.layer} is not a layer of this {n_layer}-layer model (or -1 for all)")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    tokens = [decode([i]) for i in ids]

    extract = EXTRACTORS.get(ckpt["model_name"], extract_other)
    data = extract(model, idx, opts)
    data["sections"].insert(0, prediction_section(data["logits"], decode, tokens))
    page = render(f"visualize.py: {ckpt['model_name']} on {len(ids)} tokens", tokens, data, notes)
    path = opts.html or os.path.join(opts.out_dir, "visualize.html")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror}") from None
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"visualize.py: error: {e}")
