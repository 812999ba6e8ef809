"""visualize.py: a page for every model_*.py, whose numbers are the model's own.

Each model is built tiny, saved in train.py's checkpoint format, rendered with visualize.main, and
the HTML is parsed: every token is there, escaped; nothing is loaded from outside; the tags nest;
the routed / skipped cells are the decisions a plain forward of the model makes, token by token;
the attention weights shown, applied to the model's own values, give what its attention returned;
and the masked cells agree with keep_window_size arithmetic.
"""
import dataclasses
import importlib
import os
from html.parser import HTMLParser

import pytest
import torch

import visualize
from checkpoint import save_checkpoint
from cli import UserError
from conftest import MODEL_NAMES
from routing import routed_layers
from train_config import TrainConfig

CHARS = "\n !&',-.:;<>?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TEXT = "ROMEO:\nBut soft, what light <b>&amp; yonder window?"  # HTML-looking on purpose
TINY = dict(vocab_size=len(CHARS), block_size=64, n_layer=2, n_embd=32, n_head=2, n_kv_head=1,
            intermediate_size=64, mlp_internal_dim_multiplier=4, rank=8, knowledge_rank=8, d_space=16,
            keep_window_size=8)


def tiny_model(name):
    module = importlib.import_module(f"model_{name}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    cfg = {k: v for k, v in TINY.items() if k in fields}
    cfg.update({f: 0.0 for f in fields if "dropout" in f})
    torch.manual_seed(0)
    model = module.Model(module.Config(**cfg))
    # routing thresholds as training would leave them, so that some tokens are routed, some not
    for layer in routed_layers(model):
        layer.tau.fill_(0.0 if name == "mod" else 0.5)
        if name == "dtf":  # make the gates vary around tau
            layer.log_o_ce.data.fill_(0.0)
    return model.eval()


def save(model, name, out_dir):
    """The model as train.py would checkpoint it before its first step, in a char dataset of CHARS."""
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), TrainConfig(model=name), model,
                    torch.optim.AdamW(model.parameters()), {"kind": "char", "chars": CHARS}, iter_num=0,
                    best_val_loss=float("inf"), train_time=0.0, tokens_seen=0)


def tokens_of(text):
    return torch.tensor([[CHARS.index(c) for c in text]])


class Page(HTMLParser):
    """Collects token spans (class, text, title), external references and tag-nesting errors."""
    VOID = {"meta", "br", "img", "link", "input", "hr"}

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.urls, self.spans, self.cur = [], [], [], [], None
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed {self.stack}")

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for key in ("src", "href"):
            if key in attrs:
                self.urls.append(attrs[key])
        if tag == "script" and "src" in attrs:
            self.errors.append("external script")
        if tag not in self.VOID:
            self.stack.append(tag)
        if tag == "span" and "tok" in attrs.get("class", "").split():
            self.cur = [attrs["class"].split()[1], "", attrs.get("title", "")]

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()
        if tag == "span" and self.cur is not None:
            self.spans.append(tuple(self.cur))
            self.cur = None

    def handle_data(self, data):
        if self.cur is not None:
            self.cur[1] += data


def render(name, tmp_path, *extra):
    model = tiny_model(name)
    out_dir = str(tmp_path / name)
    save(model, name, out_dir)
    path = visualize.main([f"--out_dir={out_dir}", f"--text={TEXT}", *extra])
    with open(path, encoding="utf-8") as f:
        return model, f.read()


def strips(page, cls):
    return [s for s in page.spans if s[0] == cls]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_page_is_complete_self_contained_and_escaped(name, tmp_path):
    _, text = render(name, tmp_path)
    page = Page(text)
    assert page.errors == []
    assert not any(u.startswith(("http", "//")) or "://" in u for u in page.urls)
    assert "http" not in text.split("<body>")[0].lower()  # no external stylesheet or font
    # every token, whitespace made visible, in order in the next-token strip
    shown = [s[1] for s in page.spans[:len(TEXT)]]
    assert shown == [c.replace(" ", "\u2423").replace("\n", "\u21b5") for c in TEXT]
    assert "<b>" not in text and "&lt;b&gt;&amp;amp;" not in text  # escaped once per character
    assert "&lt;" in text and "&amp;" in text
    title = {"gpt": "GPT: attention", "mod": "MoD: which tokens", "dtf": "DTF: which tokens",
             "dawn": "DAWN: the most frequently picked", "bdh": "BDH: firing density",
             "doge": "Doge: keys kept and masked"}.get(name, "stats()")
    assert title in text


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_visualize_does_not_change_the_logits(name):
    model = tiny_model(name)
    idx = tokens_of(TEXT)
    with torch.no_grad():
        plain = model(idx)[0]
    opts = visualize.VisualizeConfig()
    data = visualize.EXTRACTORS.get(name, visualize.extract_other)(model, idx, opts)
    assert torch.equal(data["logits"], plain)
    for m in model.modules():  # and no hook is left behind
        assert not m._forward_hooks and not m._forward_pre_hooks


def shown_number(title, name):
    """The number after 'name ' or 'name = ' in a cell's hover title."""
    return float(title.split(f"{name} ")[1].lstrip("= ").split(",")[0])


@pytest.mark.parametrize("name,score", [("mod", "router score r"), ("dtf", "surprise gate G")])
def test_routed_cells_are_the_models_own_decisions(name, score, tmp_path):
    """Token by token, layer by layer: routed where a plain forward of the model routed (its last["sel"],
    which stats() counts), and a routed token's score shown at or above the tau shown."""
    model, text = render(name, tmp_path)
    with torch.no_grad():
        model(tokens_of(TEXT))
    expected = [("routed" if s else "skipped") for layer in routed_layers(model) for s in layer.last["sel"][0].tolist()]
    page = Page(text)
    cells = [s for s in page.spans if s[0] in ("routed", "skipped")]
    assert [c[0] for c in cells] == expected
    assert 0 < expected.count("routed") < len(expected)  # the test means something: some routed, some not
    for cls, _, title in cells:  # a skipped token may clear tau too: its row had reached the cap K
        if cls == "routed":
            assert shown_number(title, score) >= shown_number(title, "tau")


@pytest.mark.parametrize("name", ["gpt", "doge"])
def test_attention_weights_shown_are_the_models_own(name, tmp_path):
    """The weights visualize computes from each attention call the model made, applied to that
    call's values, give the call's output, the attention the model used; and the page shows their
    mean over each KV group's query heads for the query."""
    model, text = render(name, tmp_path, "--query=30")
    with torch.no_grad(), visualize.AttentionCalls() as calls:
        model(tokens_of(TEXT))
    assert len(calls.made) == TINY["n_layer"]
    shown = [c[2] for c in Page(text).spans if "attention weight" in c[2]]  # per layer and group, keys 0..30
    G = TINY["n_kv_head"] if name == "doge" else 1
    for l, (args, kwargs, out) in enumerate(calls.made):
        weights = visualize.sdpa_weights(*args, **kwargs)  # (1, H, T, T)
        v = args[2].repeat_interleave(weights.size(1) // args[2].size(1), dim=1)
        torch.testing.assert_close(weights @ v.float(), out.float(), atol=1e-6, rtol=1e-5)
        H = weights.size(1)
        for g in range(G):
            row = weights[0, g * H // G:(g + 1) * H // G, 30, :31].mean(0)  # query 30, keys 0..30
            cells = shown[(l * G + g) * 31:(l * G + g + 1) * 31]
            assert [shown_number(c, "attention weight") for c in cells] == [float(f"{w:.4f}") for w in row.tolist()]


def test_doge_masks_all_but_keep_window_size_keys(tmp_path):
    _, text = render("doge", tmp_path, "--query=30")
    page = Page(text)
    kws, rows = TINY["keep_window_size"], TINY["n_layer"] * TINY["n_kv_head"]
    assert len(strips(page, "masked")) == rows * (31 - kws)
    assert len(strips(page, "kept")) - len(TEXT) == rows * kws  # minus the next-token strip's cells
    assert len(strips(page, "future")) == rows * (len(TEXT) - 31)


def test_doge_query_before_keep_window_size_says_nothing_is_masked(tmp_path, capsys):
    _, text = render("doge", tmp_path, "--query=5")  # sees 6 keys, keep_window_size 8
    assert len(strips(Page(text), "masked")) == 0
    assert "so none is masked; a query at position 8 or later (--query=8..50) shows the mask" in text
    assert "nothing is masked" in capsys.readouterr().err


def test_dawn_lists_the_neurons_of_its_routing_path(tmp_path):
    model, text = render("dawn", tmp_path, "--layer=1")
    path = model.routing_path(tokens_of(TEXT))[1]
    last = " ".join(str(n) for n in sorted(path["fKn"][-1].tolist()))
    row = text.split(f"<tr><td>{len(TEXT) - 1}</td>")[1].split("</tr>")[0]
    assert row.split("</td>")[1 + 6] == f"<td>{last}"  # after t and the token: fQ fK fV rQ rK rV fKn
    assert "DAWN layer 0" not in text and "DAWN layer 1" in text


def test_bad_input_is_one_line_error(tmp_path):
    save(tiny_model("gpt"), "gpt", str(tmp_path))
    for argv, message in [(["--nope=1"], "unknown option --nope=1; the options are --out_dir"),
                          (["--query=99"], "outside the text"),
                          (["--layer=5"], "not a layer"), (["--text="], "empty"),
                          (["--text=FILE:/nonexistent"], "cannot read"), (["--text=~"], "not in this model")]:
        with pytest.raises(UserError, match=message):
            visualize.main([f"--out_dir={tmp_path}", *argv])
    with pytest.raises(UserError, match="no checkpoint"):
        visualize.main([f"--out_dir={tmp_path / 'missing'}"])


def test_long_text_is_cropped_with_a_note(tmp_path, capsys):
    save(tiny_model("gpt"), "gpt", str(tmp_path))
    html_path = str(tmp_path / "page.html")
    visualize.main([f"--out_dir={tmp_path}", "--text=" + "ab" * 40, f"--html={html_path}"])
    with open(html_path, encoding="utf-8") as f:
        text = f.read()
    assert "only its first block_size = 64 are shown" in text
    assert "cropped" in capsys.readouterr().err
