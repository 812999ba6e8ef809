"""Pretrained Doge weights and tokenizer (pretrained.py, model_doge.py) against transformers' own
DogeForCausalLM, offline: tests/fixtures/doge_tiny/ was written by tests/make_doge_fixtures.py, and a
FileServer on 127.0.0.1 stands in for the Hugging Face Hub."""
import json
import os

import pytest
import torch

import model_doge
import pretrained
from cli import UserError
from conftest import (FIXTURES, assert_one_line_error, decode, make_text, read, run, safetensors_bytes,
                      saved_checkpoint)
from hub import read_safetensors
from tokenizer import bpe_descriptor, get_tokenizer

FIXTURE = os.path.join(FIXTURES, "doge_tiny")
EXPECTED = torch.load(os.path.join(FIXTURE, "expected.pt"), weights_only=True)
CONFIG = json.loads(open(os.path.join(FIXTURE, "config.json")).read())
MOE_FRESH = ["blocks.N.mlp.down_embed.weight", "blocks.N.mlp.router_gate.weight", "blocks.N.mlp.up_embed.weight"]


def serve(hub, repo, config=None, weights=None, tokenizer=None):
    """The fixture as the hub repo `repo`, with another config.json, weights or tokenizer if given."""
    hub.serve(repo, {"config.json": json.dumps(config or CONFIG).encode(),
                     "tokenizer.json": tokenizer or read(FIXTURE, "tokenizer.json"),
                     "model.safetensors": weights or read(FIXTURE, "model.safetensors")})


@pytest.fixture
def doge_hub(hub):
    """hub with tests/fixtures/doge_tiny (written by transformers, see make_doge_fixtures.py) as tiny/doge."""
    serve(hub, "tiny/doge")
    return hub


def load(repo="tiny/doge", **overrides):
    model = model_doge.Model(model_doge.Config(**pretrained.model_fields(repo, overrides, 0, "doge")))
    fresh = pretrained.load_weights(model, "doge", repo)
    return model.eval(), fresh


def test_logits_equal_transformers_fp32(doge_hub):
    model, fresh = load()
    assert fresh == []  # every parameter comes from the checkpoint
    c = model.config
    assert (c.n_head, c.n_kv_head, c.keep_window_size, c.block_size, c.rope_theta) == (2, 1, 16, 64, 1e4)
    idx = EXPECTED["idx"]
    assert idx.size(1) > c.keep_window_size  # the dynamic mask's top-k runs
    with torch.no_grad():
        logits = model(idx)[0]
    torch.testing.assert_close(logits, EXPECTED["logits"], atol=1e-5, rtol=0)
    cached, _ = decode(model, idx, [5] + [1] * (idx.size(1) - 5))  # incremental decoding: the same
    torch.testing.assert_close(cached, EXPECTED["logits"], atol=1e-5, rtol=0)


def test_tokenizer_ids_equal_transformers_and_round_trip(doge_hub):
    desc = bpe_descriptor("tiny/doge")
    tok = get_tokenizer(json.loads(json.dumps(desc)))  # as read back from meta.json
    encode, dec = tok.encode, tok.decode
    for text, ids in EXPECTED["ids"].items():
        assert encode(text) == ids, text
        assert dec(ids) == text
    # SmallDoge's layout: the added tokens come first, inside the vocabulary
    assert desc["special"]["<|begin_of_text|>"] == 0 and desc["special"]["<|end_of_text|>"] == 1
    assert EXPECTED["with_bos"] == [0] + EXPECTED["ids"]["Hello world"]  # HF's BOS, which we do not add


def test_upcycle_dense_into_cdmoe(doge_hub):
    dense, _ = load()
    moe, fresh = load(is_moe=True, n_experts=16, n_experts_per_head=2)
    assert fresh == MOE_FRESH  # router and private experts fresh; all else from the checkpoint
    for d, m in zip(dense.blocks, moe.blocks):  # the dense MLP is the CDMoE's shared part
        for x in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(d.mlp, x).weight, getattr(m.mlp, x).weight)
    with torch.no_grad():
        for block in moe.blocks:
            block.mlp.up_embed.weight.zero_()  # no private experts' output: the dense model exactly
        logits = moe(EXPECTED["idx"])[0]
    torch.testing.assert_close(logits, EXPECTED["logits"], atol=1e-5, rtol=0)


def test_moe_checkpoint_uses_every_tensor(doge_hub):
    tensors = {k: v.clone() for k, v in read_safetensors(os.path.join(FIXTURE, "model.safetensors")).items()}
    g = torch.Generator().manual_seed(0)
    for i in range(CONFIG["num_hidden_layers"]):
        tensors[f"model.layers.{i}.mlp.router_gate.weight"] = torch.randn(8, 32, generator=g)
        tensors[f"model.layers.{i}.mlp.down_embed.weight"] = torch.randn(16, 32, generator=g)
        tensors[f"model.layers.{i}.mlp.up_embed.weight"] = torch.zeros(16, 32)
    config = {**CONFIG, "is_moe": True, "num_experts": 16, "num_experts_per_tok": 2}
    serve(doge_hub, "tiny/doge-moe", config=config, weights=safetensors_bytes(tensors))
    model, fresh = load("tiny/doge-moe")
    assert fresh == [] and model.config.is_moe and model.config.n_experts == 16
    assert torch.equal(model.blocks[1].mlp.router_gate.weight, tensors["model.layers.1.mlp.router_gate.weight"])
    with torch.no_grad():  # zero up vectors: the dense part alone, which is the fixture's MLP
        torch.testing.assert_close(model(EXPECTED["idx"])[0], EXPECTED["logits"], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="CDMoE checkpoint; its experts need is_moe"):
        pretrained.model_fields("tiny/doge-moe", {"is_moe": False}, 0, "doge")
    with pytest.raises(UserError, match="--n_experts is fixed by"):
        pretrained.model_fields("tiny/doge-moe", {"n_experts": 64}, 0, "doge")
    with pytest.raises(UserError, match="tensors no DogeForCausalLM with this config.json has"):
        pretrained.map_doge_tensors(dict(tensors), 2, is_moe=False)  # experts a dense config has no place for


def test_bad_configs_give_one_line_errors(doge_hub):
    bad = {"gelu": {"hidden_act": "gelu"}, "untied": {"tie_word_embeddings": False},
           "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "bias": {"attention_bias": True},
           "old": {"dynamic_mask_ratio": 0.1}, "window": {"sliding_window": 8}}
    for repo, change in bad.items():
        serve(doge_hub, f"tiny/{repo}", config={**CONFIG, **change})
        with pytest.raises(UserError, match="which model_doge.py does not implement") as e:
            pretrained.model_fields(f"tiny/{repo}", {}, 0, "doge")
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"--block_size=128 is longer than hf:tiny/doge's 64 positions"):
        pretrained.model_fields("tiny/doge", {"block_size": 128}, 0, "doge")
    with pytest.raises(UserError, match="--n_layer is fixed by hf:tiny/doge's weights"):
        pretrained.model_fields("tiny/doge", {"n_layer": 4}, 0, "doge")
    with pytest.raises(UserError, match="is a Doge checkpoint; load it with --model=doge, not --model=gpt"):
        pretrained.model_fields("tiny/doge", {}, 0, "gpt")
    # transformers 5 writes rope_theta inside rope_parameters
    v5 = {k: v for k, v in CONFIG.items() if k not in ("rope_theta", "rope_scaling")}
    serve(doge_hub, "tiny/v5", config={**v5, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 5e5}})
    assert pretrained.model_fields("tiny/v5", {}, 0, "doge")["rope_theta"] == 5e5
    wide = {**CONFIG, "intermediate_size": 96}
    serve(doge_hub, "tiny/wide", config=wide)
    with pytest.raises(UserError, match=r"blocks.0.mlp.gate_proj.weight has shape \(64, 32\), model_doge.py expects \(96, 32\)"):
        load("tiny/wide")
    spm = json.loads(read(FIXTURE, "tokenizer.json"))
    spm["model"]["byte_fallback"] = True
    serve(doge_hub, "tiny/spm", tokenizer=json.dumps(spm).encode())
    with pytest.raises(UserError, match="sentencepiece-style BPE"):
        bpe_descriptor("tiny/spm")


def test_fine_tune_and_sample_end_to_end(doge_hub, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(make_text(20000))
    data = str(tmp_path / "data")
    r = run("prepare_data.py", "shakespeare", "--tokenizer=hf:tiny/doge", f"--input={text}", "--name=tiny",
            f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    common = ["--model=doge", "--init_from=hf:tiny/doge", "--dataset=tiny", f"--data_dir={data}", "--max_iters=2",
              "--eval_interval=2", "--eval_iters=1", "--batch_size=2", "--block_size=32", "--device=cpu",
              "--compile=False"]
    out = str(tmp_path / "out")
    r = run("train.py", *common, f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    assert "loaded hf:tiny/doge\n" in r.stdout
    r = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=8", "--start=ROMEO:",
            "--device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    # --max_iters=0 converts without training: the saved weights are the checkpoint's
    converted = str(tmp_path / "converted")
    r = run("train.py", *[a for a in common if not a.startswith("--max_iters")], "--max_iters=0",
            f"--out_dir={converted}")
    assert r.returncode == 0, r.stderr
    saved = saved_checkpoint(converted)["model"]
    original = read_safetensors(os.path.join(FIXTURE, "model.safetensors"))
    assert torch.equal(saved["wte.weight"], original["model.embed_tokens.weight"])
    assert torch.equal(saved["blocks.1.mlp.down_proj.weight"], original["model.layers.1.mlp.down_proj.weight"])
    moe = str(tmp_path / "moe")
    r = run("train.py", *common, f"--out_dir={moe}", "--is_moe=True", "--n_experts=16", "--n_experts_per_head=2")
    assert r.returncode == 0, r.stderr
    assert f"loaded hf:tiny/doge; fresh: {', '.join(MOE_FRESH)}" in r.stdout
    r = run("sample.py", f"--out_dir={moe}", "--num_samples=1", "--max_new_tokens=8", "--start=ROMEO:",
            "--device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    r = run("train.py", *common[1:], "--model=gpt", f"--out_dir={tmp_path / 'gpt'}")
    assert_one_line_error(r, "train.py", "hf:tiny/doge is a Doge checkpoint; load it with --model=doge")
