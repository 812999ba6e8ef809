"""Pretrained Qwen2 weights and tokenizer (pretrained.py) against transformers' own outputs, offline:
tests/fixtures/qwen2_tiny/ was written by tests/make_pretrained_fixtures.py, and a FileServer on
127.0.0.1 stands in for the Hugging Face Hub."""
import json
import os
import unicodedata

import pytest
import torch

import model_dtf
import model_gpt
import model_mod
import pretrained
from cli import UserError
from conftest import FIXTURES, assert_one_line_error, make_text, read, run, safetensors_bytes
from hub import fetch_file, read_safetensors
from tokenizer import bpe_descriptor, get_tokenizer, same_tokenizer, upgrade

FIXTURE = os.path.join(FIXTURES, "qwen2_tiny")
EXPECTED = torch.load(os.path.join(FIXTURE, "expected.pt"), weights_only=True)
MODELS = {"gpt": model_gpt, "mod": model_mod, "dtf": model_dtf}


def load(name, repo="tiny/qwen2", **overrides):
    module = MODELS[name]
    model = module.Model(module.Config(**pretrained.model_fields(repo, overrides, 0)))
    fresh = pretrained.load_weights(model, name, repo)
    return model.eval(), fresh


def test_gpt_logits_equal_transformers_fp32(qwen2_hub):
    model, fresh = load("gpt")
    assert fresh == []  # every parameter of GPT comes from the checkpoint
    assert model.config.rope_theta == 1e4 and model.config.block_size == 128  # capped by max_position_embeddings
    with torch.no_grad():
        logits = model(EXPECTED["idx"])[0]
    torch.testing.assert_close(logits, EXPECTED["logits"], atol=1e-5, rtol=0)


def test_gpt_logits_equal_transformers_bf16_file(qwen2_hub):
    model, _ = load("gpt", "tiny/qwen2-bf16")
    with torch.no_grad():
        logits = model(EXPECTED["idx"])[0]
    # our fp32 model holds the bf16 values exactly, so it matches HF's fp32 run on the same rounded weights
    torch.testing.assert_close(logits, EXPECTED["logits_bf16"], atol=1e-5, rtol=0)
    assert (logits - EXPECTED["logits"]).abs().max() > 1e-4  # and the rounding did happen


@pytest.mark.parametrize("name", ["mod", "dtf"])
def test_mod_dtf_take_every_layer_and_keep_fresh_routers(qwen2_hub, name):
    gpt, _ = load("gpt")
    model, fresh = load(name)
    if name == "mod":
        assert fresh == ["blocks.N.router", "blocks.N.tau", "blocks.N.tau_bias"]
        blocks = [model.blocks[0], model.blocks[1].block]
    else:
        assert {f.split(".")[2] for f in fresh} == {"beta_ce", "beta_cu", "log_o_ce", "m_cu", "tau", "tau_bias",
                                                    "prior"}
        blocks = [model.blocks[0].decision, model.blocks[0].dynamic]
    for ours, theirs in zip(blocks, gpt.blocks):  # layer i of the checkpoint is block i
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), k
    assert torch.equal(model.wte.weight, gpt.wte.weight) and torch.equal(model.norm_f.weight, gpt.norm_f.weight)
    # before training tau = inf routes nothing, so the second layer is skipped: the model is layer 0 alone
    del gpt.blocks[1]
    with torch.no_grad():
        torch.testing.assert_close(model(EXPECTED["idx"])[0], gpt(EXPECTED["idx"])[0], atol=1e-5, rtol=0)


def test_tokenizer_ids_equal_transformers_and_round_trip(qwen2_hub):
    desc = bpe_descriptor("tiny/qwen2")
    tok = get_tokenizer(json.loads(json.dumps(desc)))  # as read back from meta.json
    encode, decode = tok.encode, tok.decode
    for text, ids in EXPECTED["ids"].items():
        assert encode(text) == ids, text
        assert decode(ids) == unicodedata.normalize("NFC", text)
    assert desc["special"]["<|endoftext|>"] == 300


def test_descriptors_written_before_the_bpe_kind_still_load(qwen2_hub):
    """meta.json files and checkpoints from before "bpe" was a kind of its own called it "tiktoken"."""
    desc = bpe_descriptor("tiny/qwen2")
    old = {**desc, "kind": "tiktoken"}
    assert desc["kind"] == "bpe" and upgrade(old) == desc and same_tokenizer(old, desc)
    for text, ids in EXPECTED["ids"].items():
        assert get_tokenizer(old).encode(text) == ids, text


def test_download_is_cached_and_verified(qwen2_hub):
    path = fetch_file("tiny/qwen2", "config.json")
    n = len(qwen2_hub.requests)
    assert fetch_file("tiny/qwen2", "config.json") == path and len(qwen2_hub.requests) == n  # reused
    with open(path, "ab") as f:
        f.write(b" ")  # damaged in the cache: its recorded sha256 no longer matches, so it is fetched again
    assert fetch_file("tiny/qwen2", "config.json") == path and len(qwen2_hub.requests) > n
    assert open(path, "rb").read() == read(FIXTURE, "config.json")


def test_sharded_checkpoint(qwen2_hub):
    # split the fp32 file into two shards with an index, as the hub stores larger checkpoints
    tensors = read_safetensors(os.path.join(FIXTURE, "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    qwen2_hub.serve("tiny/sharded", {**{shard: safetensors_bytes({k: tensors[k] for k in keys})
                                        for shard, keys in shards.items()},
                                     "model.safetensors.index.json": json.dumps(index).encode(),
                                     "config.json": read(FIXTURE, "config.json"), "tokenizer.json": read(FIXTURE, "tokenizer.json")})
    model, _ = load("gpt", "tiny/sharded")
    with torch.no_grad():
        torch.testing.assert_close(model(EXPECTED["idx"])[0], EXPECTED["logits"], atol=1e-5, rtol=0)


def test_bad_checkpoints_give_one_line_errors(qwen2_hub, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="not a readable safetensors file .bad header length"):
        read_safetensors(str(bad))
    good = read(FIXTURE, "model.safetensors")
    n = int.from_bytes(good[:8], "little")
    bad.write_bytes(good[:8 + n] + good[8 + n:-100])  # truncated data
    with pytest.raises(UserError, match="data_offsets do not match"):
        read_safetensors(str(bad))
    config = json.loads(read(FIXTURE, "config.json"))
    qwen2_hub.serve("tiny/wide", {"config.json": json.dumps({**config, "intermediate_size": 96}).encode(),
                                  "model.safetensors": read(FIXTURE, "model.safetensors")})
    with pytest.raises(UserError, match=r"blocks.0.mlp.gate_proj.weight has shape \(64, 32\), model_gpt.py expects \(96, 32\)"):
        load("gpt", "tiny/wide")
    # Qwen2.5's own config.json (older transformers) has rope_theta at the top, not in rope_parameters
    old = {**{k: v for k, v in config.items() if k != "rope_parameters"}, "rope_theta": 1e6}
    qwen2_hub.serve("tiny/old", {"config.json": json.dumps(old).encode()})
    assert pretrained.model_fields("tiny/old", {}, 0)["rope_theta"] == 1e6
    yarn = {**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    qwen2_hub.serve("tiny/yarn", {"config.json": json.dumps(yarn).encode()})
    with pytest.raises(UserError, match="uses yarn; only plain RoPE"):
        pretrained.model_fields("tiny/yarn", {}, 0)
    with pytest.raises(UserError, match="fixed by hf:tiny/qwen2's weights"):
        pretrained.model_fields("tiny/qwen2", {"n_layer": 4}, 0)
    with pytest.raises(UserError, match="not a Hugging Face repo id"):
        fetch_file("Qwen2.5-0.5B", "config.json")


def test_fine_tune_and_sample_end_to_end(qwen2_hub, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(make_text(20000))
    data = str(tmp_path / "data")
    r = run("prepare_data.py", "shakespeare", "--tokenizer=hf:tiny/qwen2", f"--input={text}", "--name=tiny",
            f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "out")
    common = ["--model=mod", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
              "--eval_iters=1", "--batch_size=2", "--block_size=32", "--device=cpu", "--compile=False"]
    r = run("train.py", "--init_from=hf:tiny/qwen2", "--dataset=tiny", *common)
    assert r.returncode == 0, r.stderr
    assert "loaded hf:tiny/qwen2; fresh: blocks.N.router, blocks.N.tau, blocks.N.tau_bias" in r.stdout
    r = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=8", "--start=ROMEO:",
            "--device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO:"), r.stderr
    # a dataset in another tokenizer, and a checkpoint of another architecture: one line each
    r = run("prepare_data.py", "shakespeare_char", f"--input={text}", "--name=chars", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    common.append("--overwrite=True")  # out_dir holds the fine-tuned checkpoint; these runs stop before saving
    r = run("train.py", "--init_from=hf:tiny/qwen2", "--dataset=chars", *common)
    assert_one_line_error(r, "train.py", "dataset chars was not tokenized with hf:tiny/qwen2's tokenizer")
    llama = {**json.loads(read(FIXTURE, "config.json")), "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    qwen2_hub.serve("tiny/llama", {"config.json": json.dumps(llama).encode(), "tokenizer.json": read(FIXTURE, "tokenizer.json")})
    r = run("train.py", "--init_from=hf:tiny/llama", "--dataset=tiny", *common)
    lines = r.stderr.strip().splitlines()  # config.json's download progress, then the error
    assert r.returncode != 0 and len(lines) == 2 and "MiB" in lines[0], r.stderr
    assert lines[1].startswith("train.py: error: hf:tiny/llama is a llama model (LlamaForCausalLM); only Qwen2")
