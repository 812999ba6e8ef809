"""Bad input from hubs, config files and users: one line each, nothing written outside its folder,
cached models load offline, logs stay clean after a resume. Each case is one line of a table; the
classes are downloaded names and paths, config.json fields, safetensors headers and tensor shapes,
hub JSON files, the cache and the network, and what a user may type."""
import errno
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys

import pytest
import torch

import compare
import hub
import prepare_data
import pretrained
import train
from cli import UserError
from conftest import (FIXTURES, ROOT, SHAKESPEARE, TINY_RUN, assert_one_line_error, fit, make_text, read, read_log,
                      run_args, safetensors_bytes)
from prepare_data import prepare
from tokenizer import bpe_descriptor, describe, wordpiece_descriptor
from train_config import TrainConfig

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def files_under(folder, skip=()):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) if not d.startswith(skip) for f in fs)


def message(text):
    return re.escape(text)


def refuse(monkeypatch, folder, function):
    """os.<function> fails with EACCES for paths under folder, as in a read-only folder (chmod alone does not
    stop root)."""
    real = getattr(os, function)

    def refused(path, *a, **k):
        if str(path).startswith(str(folder)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, function, refused)


# -----------------------------------------------------------------------------
# a hub holding the Qwen2 and Doge fixtures, and changed copies of them

@pytest.fixture
def hub_server(hub):
    """hub with serve(repo, base, config changes, weights, tokenizer, extra files), which publishes a
    changed copy of a fixture repo; tiny/qwen2 and tiny/doge hold the fixtures as they are."""
    publish = hub.serve

    def serve(repo, base="qwen2", change=None, weights=None, tokenizer=None, **files):
        config = json.loads(read(FIXTURES, f"{base}_tiny", "config.json"))
        for key, value in (change or {}).items():
            config.pop(key) if value is None else config.__setitem__(key, value)
        files = {"config.json": json.dumps(config).encode(), "model.safetensors": weights or
                 read(FIXTURES, f"{base}_tiny", "model.safetensors"), "tokenizer.json": tokenizer or
                 read(FIXTURES, f"{base}_tiny", "tokenizer.json"), **files}
        publish(repo, {name: data for name, data in files.items() if data is not None})
    hub.serve = serve
    serve("tiny/qwen2")
    serve("tiny/doge", "doge")
    return hub


def load(repo, model="gpt"):
    """from_pretrained as train.py calls it, for a dataset in the checkpoint's tokenizer."""
    cfg = TrainConfig(model=model, init_from=f"hf:{repo}", dataset="tiny")
    return pretrained.from_pretrained(cfg, {}, {"vocab_size": 0, "tokenizer": describe(f"hf:{repo}")})


def changed_weights(base, changes):
    """The fixture's weights with some tensors replaced: {name: new tensor}."""
    tensors = {k: v.clone() for k, v in hub.read_safetensors(os.path.join(FIXTURES, f"{base}_tiny",
                                                                             "model.safetensors")).items()}
    return safetensors_bytes({**tensors, **changes})


# -----------------------------------------------------------------------------
# downloaded names and paths never leave the cache; --name never leaves data_dir

@pytest.mark.parametrize("shard", ["../../../../x.safetensors", "/tmp/x.safetensors", "a/../../x.safetensors",
                                   "..\\x.safetensors", "./model.safetensors", "model.bin", "", "a//b.safetensors"])
def test_index_shard_names_stay_in_the_cache(hub_server, tmp_path, shard):
    index = {"weight_map": {"model.embed_tokens.weight": shard}}
    hub_server.serve("tiny/evil", **{"model.safetensors": None,
                                     "model.safetensors.index.json": json.dumps(index).encode()})
    hub_server.files["/x.safetensors"] = read(FIXTURES, "qwen2_tiny", "model.safetensors")  # where ../ would lead
    with pytest.raises(UserError, match=message(f"names the shard {shard!r}, which is not a .safetensors file "
                                                f"inside the repo; the index is broken or hostile")):
        load("tiny/evil")
    assert not any("x.safetensors" in path for path, _ in hub_server.requests)
    assert files_under(tmp_path, skip=str(tmp_path / "cache")) == []  # nothing outside the cache


@pytest.mark.parametrize("index", [b"[]", b'{"weight_map": []}', b'{"weight_map": {}}', b'{"weight_map": {"a": 1}}'])
def test_malformed_index_gives_one_line(hub_server, index):
    hub_server.serve("tiny/index", **{"model.safetensors": None, "model.safetensors.index.json": index})
    with pytest.raises(UserError, match="model.safetensors.index.json"):
        load("tiny/index")


@pytest.mark.parametrize("repo", ["../..", "a/..", "../a", ".a/b", "a/b/c", "a", "a/b..c", "a/-"])
def test_repo_ids_never_name_a_folder_outside_the_cache(tmp_path, repo):
    with pytest.raises(UserError, match=message(f"hf:{repo} is not a Hugging Face repo id")):
        train.main([f"--init_from=hf:{repo}", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}"])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["../../x", "../x", "/tmp/x", "a/b", "..", ".", "a\\..\\b"])
def test_prepare_name_stays_in_data_dir(tmp_path, name):
    src = tmp_path / "text.txt"
    src.write_text(make_text(3000))
    with pytest.raises(UserError, match=message(f"--name={name} is not a folder name")):
        prepare("shakespeare_char", data_dir=str(tmp_path / "data"), name=name, input=str(src))
    assert os.listdir(tmp_path) == ["text.txt"]


# -----------------------------------------------------------------------------
# config.json: every field the loader uses is checked (present, type, > 0, consistent, and against
# the safetensors header) before anything is built; absurd sizes never reach the allocator

BAD_CONFIGS = [  # (base, change (None: remove the key), message)
    ("qwen2", {"hidden_size": None}, "hf:tiny/bad's config.json has no hidden_size"),
    ("qwen2", {"num_attention_heads": 0}, "num_attention_heads = 0, expected a whole number > 0"),
    ("qwen2", {"hidden_size": -32}, "hidden_size = -32, expected a whole number > 0"),
    ("qwen2", {"hidden_size": "32"}, "hidden_size = '32', expected a whole number > 0"),
    ("qwen2", {"num_hidden_layers": 2.0}, "num_hidden_layers = 2.0, expected a whole number > 0"),
    ("qwen2", {"vocab_size": True}, "vocab_size = True, expected a whole number > 0"),
    ("qwen2", {"intermediate_size": [64]}, "intermediate_size = [64], expected a whole number > 0"),
    ("qwen2", {"rms_norm_eps": -1}, "rms_norm_eps = -1, expected a number > 0"),
    ("qwen2", {"rope_parameters": {"rope_type": "default", "rope_theta": "big"}}, "rope_theta = 'big'"),
    ("qwen2", {"rope_parameters": [10000]}, "rope_scaling / rope_parameters is [10000], not an object"),
    ("qwen2", {"max_position_embeddings": 0}, "max_position_embeddings = 0, expected a whole number > 0"),
    ("qwen2", {"num_key_value_heads": 3}, "hidden_size 32, num_attention_heads 4 and num_key_value_heads 3 do not fit"),
    ("qwen2", {"hidden_size": 36}, "hidden_size 36, num_attention_heads 4 and num_key_value_heads 2 do not fit"),
    ("qwen2", {"head_dim": 16}, "head_dim 16 is not hidden_size / num_attention_heads = 8"),
    ("qwen2", {"model_type": ["qwen2"]}, "hf:tiny/bad is a ['qwen2'] model"),
    ("qwen2", {"architectures": "Qwen2ForCausalLM"}, "hf:tiny/bad is a qwen2 model ('Qwen2ForCausalLM')"),
    ("qwen2", {"hidden_size": 10**9}, "config.json says vocab_size 320 and hidden_size 1000000000, but its "
                                      "model.embed_tokens.weight has shape (320, 32)"),
    ("qwen2", {"vocab_size": 10**9}, "says vocab_size 1000000000 and hidden_size 32"),
    ("qwen2", {"num_hidden_layers": 10**7}, "says num_hidden_layers 10000000, but its weights hold layers 0..1"),
    ("qwen2", {"num_hidden_layers": 1}, "says num_hidden_layers 1, but its weights hold layers 0..1"),
    ("qwen2", {"intermediate_size": 10**9}, "blocks.0.mlp.gate_proj.weight has shape (64, 32), model_gpt.py "
                                            "expects (1000000000, 32)"),
    ("doge", {"num_attention_heads": None}, "hf:tiny/bad's config.json has no num_attention_heads"),
    ("doge", {"num_attention_heads": 0}, "num_attention_heads = 0, expected a whole number > 0"),
    ("doge", {"hidden_size": 10**9}, "says vocab_size 400 and hidden_size 1000000000"),
    ("doge", {"keep_window_size": -1}, "keep_window_size = -1, expected a whole number > 0"),
    ("doge", {"is_moe": "yes"}, "is_moe = 'yes', expected true or false"),
    ("doge", {"is_moe": True, "num_experts": 0}, "num_experts = 0, expected a whole number > 0"),
    ("doge", {"is_moe": True, "num_experts_per_tok": None}, "config.json has no num_experts_per_tok"),
    ("doge", {"rope_scaling": {"rope_type": "dynamic", "original_max_position_embeddings": "64"}},
     "original_max_position_embeddings = '64'"),
    ("doge", {"intermediate_size": 10**9}, "model_doge.py expects (1000000000, 32)"),
]


@pytest.mark.parametrize("base, change, text", BAD_CONFIGS)
def test_bad_config_fields_give_one_line_before_building(hub_server, base, change, text):
    hub_server.serve("tiny/bad", base, change)
    with pytest.raises(UserError, match=message(text)) as e:
        load("tiny/bad", "doge" if base == "doge" else "gpt")
    assert "\n" not in str(e.value)


def test_dawn_config_fields_are_checked(tmp_path):
    ckpt = torch.load(os.path.join(FIXTURES, "dawn_tiny", "dawn_tiny_weights.pt"), weights_only=True)
    for key, value, text in (("n_heads", 0, "n_heads = 0, expected a whole number > 0"),
                             ("top_k_feature_v", "3", "top_k_feature_v = '3'"),
                             ("dropout", "x", "config dropout = 'x', expected a number in [0, 1)")):
        path = str(tmp_path / f"{key}.pt")
        torch.save({**ckpt, "config": {**ckpt["config"], key: value}}, path)
        config, state = pretrained.read_dawn_checkpoint(path)
        with pytest.raises(UserError, match=message(text)):
            pretrained.dawn_model_fields(path, config, state, {}, 0)


# -----------------------------------------------------------------------------
# safetensors headers and tensor shapes: every malformed file is one line

ENTRY = '{"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
BAD_HEADERS = [  # (header, message)
    (b"[]", "the header is a JSON list, not an object"),
    (b'"w"', "the header is a JSON str, not an object"),
    (b"[" * 100000, "the header is not JSON"),
    (b'{"w": 1}', "malformed entry for w"),
    (b'{"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}', "malformed entry for w"),
    (b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "malformed entry for w"),
    (b'{"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}', "malformed entry for w"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}', "malformed entry for w"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": {"0": 8}}}', "malformed entry for w"),
    (b'{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', "malformed entry for w"),
    (b'{"w": {"shape": [2], "data_offsets": [0, 8]}}', "malformed entry for w"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', "data_offsets do not match"),
    (b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', "data_offsets do not match"),
    (b'{"w": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}', "w has unsupported dtype I64"),
]


@pytest.mark.parametrize("header, text", BAD_HEADERS)
def test_malformed_safetensors_headers(tmp_path, header, text):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(UserError, match=message(text)):
        hub.read_safetensors(str(path))


Q, K, V = (f"model.layers.0.self_attn.{x}_proj" for x in "qkv")
BAD_SHAPES = [  # (base, {tensor: shape}, message): joined q/k/v parts are checked before torch.cat
    ("qwen2", {f"{Q}.weight": (40, 32), f"{K}.weight": (8, 32)},
     f"{Q}.weight has shape (40, 32), its config implies (32, 32)"),  # the right total: hidden in a join
    ("qwen2", {f"{K}.weight": (16, 30)}, f"{K}.weight has shape (16, 30), its config implies (16, 32)"),
    ("qwen2", {f"{V}.bias": (15,)}, f"{V}.bias has shape (15,), its config implies (16,)"),
    ("qwen2", {f"{Q}.weight": (32,)}, f"{Q}.weight has shape (32,), its config implies (32, 32)"),
    ("qwen2", {"model.layers.1.self_attn.o_proj.weight": (32, 30)},
     "blocks.1.attn.o_proj.weight has shape (32, 30), model_gpt.py expects (32, 32)"),
    ("qwen2", {"model.embed_tokens.weight": (320, 30)}, "model.embed_tokens.weight has shape (320, 30)"),
    ("doge", {f"{Q}.weight": (40, 32)}, "blocks.0.attn.q_proj.weight has shape (40, 32), model_doge.py expects (32, "),
]


@pytest.mark.parametrize("base, shapes, text", BAD_SHAPES)
def test_wrong_tensor_shapes_give_one_line(hub_server, base, shapes, text):
    hub_server.serve("tiny/shapes", base, weights=changed_weights(base, {k: torch.zeros(s) for k, s in shapes.items()}))
    with pytest.raises(UserError, match=message(text)):
        load("tiny/shapes", "doge" if base == "doge" else "gpt")


def test_dawn_router_parts_are_checked_before_they_are_joined(tmp_path):
    import model_dawn
    ckpt = torch.load(os.path.join(FIXTURES, "dawn_tiny", "dawn_tiny_weights.pt"), weights_only=True)
    config, state = ckpt["config"], dict(ckpt["model_state_dict"])
    fields = pretrained.dawn_model_fields("f.pt", config, state, {}, 0)
    state["router.neuron_router.proj_feature_know.weight"] = torch.zeros(16, 30)
    model = model_dawn.DAWN(model_dawn.Config(**fields))
    with pytest.raises(UserError, match=message("know.weight has shape (16, 30), its config implies (16, 32)")):
        pretrained.load_dawn_weights(model, "f.pt", state)


# -----------------------------------------------------------------------------
# JSON files from the hub: not JSON, or JSON of the wrong kind, is one line; a corrupt cached file
# is deleted so that the next run downloads it again

def tokenizer_with(change):
    tok = json.loads(read(FIXTURES, "qwen2_tiny", "tokenizer.json"))
    change(tok)
    return json.dumps(tok).encode()


BAD_TOKENIZERS = [  # (tokenizer.json, message)
    (b'{"model": {"type": "BPE", "vo', "hf:tiny/tok's tokenizer.json is not JSON (JSONDecodeError); it was deleted"),
    (b"\xff\xfe{}", "tokenizer.json is not JSON (UnicodeDecodeError); it was deleted"),
    (b"[]", "tokenizer.json is a JSON list, not an object; it was deleted"),
    (b'{"model": [1]}', "tokenizer.json is malformed (AttributeError"),
    (tokenizer_with(lambda t: t["model"].__setitem__("vocab", [1, 2])), "tokenizer.json is malformed"),
    (tokenizer_with(lambda t: t.__setitem__("pre_tokenizer", "Split")), "tokenizer.json is malformed"),
    (tokenizer_with(lambda t: t["added_tokens"][0].__setitem__("id", "x")), "tokenizer.json is malformed"),
    (tokenizer_with(lambda t: t["model"].__setitem__("merges", [["a", "b", "c"]])), "tokenizer.json is malformed"),
    (tokenizer_with(lambda t: t["pre_tokenizer"]["pretokenizers"][0]["pattern"].__setitem__("Regex", "(")),
     "tokenizer.json is malformed (ValueError"),
]


@pytest.mark.parametrize("data, text", BAD_TOKENIZERS)
def test_bad_tokenizer_json_gives_one_line(hub_server, data, text):
    hub_server.serve("tiny/tok", tokenizer=data)
    with pytest.raises(UserError, match=message(text)) as e:
        bpe_descriptor("tiny/tok")
    assert "\n" not in str(e.value)


def test_truncated_json_downloads_are_fetched_again(hub_server, tmp_path):
    """A tokenizer.json or config.json cut short is deleted from the cache, so that the next run gets a whole one."""
    whole = read(FIXTURES, "qwen2_tiny", "tokenizer.json")
    hub_server.serve("tiny/cut", tokenizer=whole[:100])
    r = subprocess.run([sys.executable, "prepare_data.py", "shakespeare", "--tokenizer=hf:tiny/cut",
                        f"--input={os.path.join(FIXTURES, 'dawn_tiny', 'vocab.txt')}", f"--data_dir={tmp_path / 'd'}"],
                       cwd=ROOT, env={**ENV, **{k: os.environ[k] for k in ("DYNLM_HF_URL", "DYNLM_CACHE")}},
                       capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()  # the download's progress line, then the error
    assert r.returncode == 1 and len(lines) == 2 and "MiB" in lines[0], r.stderr
    assert lines[1].startswith("prepare_data.py: error: hf:tiny/cut's tokenizer.json is not JSON (JSONDecodeError); "
                               "it was deleted from the cache")
    hub_server.serve("tiny/cut", tokenizer=whole)  # the hub (or the network) is fine again
    assert bpe_descriptor("tiny/cut") == {**bpe_descriptor("tiny/qwen2"), "name": "hf:tiny/cut"}
    hub_server.files["/tiny/cut/resolve/main/config.json"] = b'{"model_type": "qw'
    with pytest.raises(UserError, match="config.json is not JSON .* deleted from the cache"):
        load("tiny/cut")
    hub_server.serve("tiny/cut", tokenizer=whole)
    load("tiny/cut")


def test_damaged_vocab_txt_from_the_hub_is_fetched_again(file_server, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNLM_HF_URL", file_server.url)
    monkeypatch.setenv("DYNLM_CACHE", str(tmp_path / "cache"))
    file_server.files["/bert/base/resolve/main/vocab.txt"] = b"[UNK]\n\xff\xfe\n"
    with pytest.raises(UserError, match="is not UTF-8 text.*deleted from the cache: rerun to download it again"):
        wordpiece_descriptor("hf:bert/base")
    file_server.files["/bert/base/resolve/main/vocab.txt"] = read(FIXTURES, "dawn_tiny", "vocab.txt")
    assert wordpiece_descriptor("hf:bert/base")["vocab"].startswith("[PAD]")


# -----------------------------------------------------------------------------
# the cache and the network

@pytest.mark.parametrize("sharded", [False, True])
def test_a_cached_model_loads_offline(hub_server, monkeypatch, sharded):
    if sharded:
        tensors = hub.read_safetensors(os.path.join(FIXTURES, "qwen2_tiny", "model.safetensors"))
        names = sorted(tensors)
        halves = {"a.safetensors": names[:5], "b.safetensors": names[5:]}
        index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
        shards = {s: safetensors_bytes({k: tensors[k] for k in ks}) for s, ks in halves.items()}
        hub_server.serve("tiny/q", **{"model.safetensors": None, **shards,
                                      "model.safetensors.index.json": json.dumps(index).encode()})
    else:
        hub_server.serve("tiny/q")
    first = load("tiny/q")
    index = os.path.join(os.environ["DYNLM_CACHE"], "hf", "tiny", "q", "model.safetensors.index.json")
    assert os.path.exists(index if sharded else index + ".absent")  # the hub's 404 is remembered too
    monkeypatch.setenv("DYNLM_HF_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(hub.requests, "get", lambda *a, **k: pytest.fail(f"network access: {a}"))
    second = load("tiny/q")  # config.json, tokenizer.json, the weights and the index's absence: all cached
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_read_only_cache_gives_one_line(hub_server, tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir(mode=0o555)  # empty and read-only
    refuse(monkeypatch, tmp_path / "cache", "makedirs")
    folder = tmp_path / "cache" / "hf" / "tiny" / "qwen2"
    with pytest.raises(UserError, match=message(f"cannot write to the cache folder {folder}: Permission denied; "
                                                f"set DYNLM_CACHE to a writable folder")):
        load("tiny/qwen2")
    assert os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost", "ftp://host/x", "huggingface.co", "http:/host"])
def test_hub_url_without_a_scheme(hub_server, monkeypatch, url):
    monkeypatch.setenv("DYNLM_HF_URL", url)
    with pytest.raises(UserError, match=message(f"DYNLM_HF_URL={url} is not an http:// or https:// address")):
        load("tiny/qwen2")


@pytest.mark.parametrize("option", ["--url=example.com/input.txt", "--url=file:///etc/passwd", "--url="])
def test_prepare_url_without_a_scheme(tmp_path, option):
    r = subprocess.run([sys.executable, "prepare_data.py", "shakespeare_char", option, f"--data_dir={tmp_path / 'd'}"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert_one_line_error(r, "prepare_data.py", f"{option} is not an http:// or https:// address")
    assert os.listdir(tmp_path) == []


def test_download_of_an_unparsable_address(tmp_path):
    with pytest.raises(UserError, match=message("http://127.0.0.1:port/x is not a valid address")):
        hub.download("http://127.0.0.1:port/x", str(tmp_path / "x"))


# -----------------------------------------------------------------------------
# users: what a training run is asked to do (on conftest's data_dir)

@pytest.mark.parametrize("seed", [20241205, 1733400000, 2**63 - 1, 2**64 - 1, -1])
def test_any_64_bit_seed_trains(data_dir, tmp_path, seed):
    fit(data_dir, str(tmp_path), f"--seed={seed}")


@pytest.mark.parametrize("options, text", [
    (["--learning_rate=5e-5"], "--learning_rate=5e-05 is below --min_lr=0.0001, where the cosine decay ends; give "
                               "--min_lr=5e-06"),
    (["--learning_rate=1e-3", "--min_lr=2e-3"], "--learning_rate=0.001 is below --min_lr=0.002"),
    (["--learning_rate=0"], "--learning_rate=0 is below --min_lr=0.0001"),
])
def test_learning_rate_below_min_lr(data_dir, tmp_path, options, text):
    with pytest.raises(UserError, match=message(text)):
        fit(data_dir, str(tmp_path), *options)
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_learning_rate_below_min_lr_on_resume(data_dir, tmp_path):
    fit(data_dir, str(tmp_path), "--learning_rate=5e-5", "--min_lr=5e-6")
    train.main(run_args(data_dir, str(tmp_path), "--init_from=resume", "--max_iters=4", "--learning_rate=5e-5"))
    with pytest.raises(UserError, match=message("--learning_rate=5e-05 is below --min_lr=0.001")):
        train.main(run_args(data_dir, str(tmp_path), "--init_from=resume", "--max_iters=6", "--min_lr=1e-3"))


@pytest.mark.parametrize("block_size, text", [
    (4000, "block_size=4000 is too long for the val split: {data}/tiny/val.bin holds 3,000 tokens, and training needs "
           "block_size + 2; use --block_size=2998 or less, or prepare more text"),
    (2999, "val.bin holds 3,000 tokens, and training needs block_size + 2; use --block_size=2998 or less"),
    (200000, "block_size=200000 is too long for the train split: {data}/tiny/train.bin holds 27,000 tokens"),
])
def test_block_size_is_checked_against_the_data_at_start(data_dir, tmp_path, monkeypatch, block_size, text):
    monkeypatch.setattr(train, "evaluate", lambda *a: pytest.fail("evaluates before the check"))
    with pytest.raises(UserError, match=message(text.format(data=data_dir))):
        fit(data_dir, str(tmp_path), f"--block_size={block_size}", "--n_embd=8", "--n_head=2")
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_block_size_that_just_fits(data_dir, tmp_path):
    fit(data_dir, str(tmp_path), "--block_size=798", "--n_embd=8", "--n_head=2", "--batch_size=1")


def test_sample_ctrl_c_prints_one_line(tmp_path):
    fifo = tmp_path / "prompt"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "sample.py", f"--start=FILE:{fifo}", f"--out_dir={tmp_path}"], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with open(fifo, "w"):  # returns once sample.py has opened the prompt: it is in main, reading
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and err.strip().splitlines() == ["sample.py: interrupted"], err


def test_compare_with_fewer_iterations_than_the_log_interval(data_dir, tmp_path):
    out = tmp_path / "cmp"
    compare.main(["--models=gpt", f"--out={out}", "--max_iters=4", *run_args(data_dir, "unused")[:2],
                  *[a for a in TINY_RUN if a != "--log_interval=1"]])
    results = json.loads((out / "results.json").read_text())
    assert results["models"][0]["runs"][0]["iters"] == 4 and (out / "loss.svg").exists()
    with pytest.raises(UserError, match=message("--max_iters=0 trains nothing to compare")):
        compare.main(["--models=gpt", f"--out={out}", "--max_iters=0", *run_args(data_dir, "unused")[:2], *TINY_RUN])


# -----------------------------------------------------------------------------
# log.jsonl after a resume equals the uninterrupted run's log

TIMING = ("ms", "tok_s", "time", "peak_mem_mb", "mfu")


def log_of(out):
    return [{k: v for k, v in record.items() if k not in TIMING} for record in read_log(out)]


def interrupted_after(monkeypatch, iteration):
    """Ctrl-C right after the log record of `iteration` is written (a step between two evaluations)."""
    real = train.log_jsonl

    def log_then_stop(path, record):
        real(path, record)
        if record["iter"] == iteration and "loss" in record:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, "log_jsonl", log_then_stop)


@pytest.mark.parametrize("stop", [3, 5, 4])  # between evaluations, and at one (its step logged, not its evaluation)
def test_log_after_resume_equals_the_uninterrupted_log(data_dir, tmp_path, monkeypatch, stop):
    run = ["--max_iters=6", "--eval_interval=2"]
    train.main(run_args(data_dir, tmp_path / "straight", *run, "--dropout=0.1"))
    interrupted_after(monkeypatch, stop)
    with pytest.raises(SystemExit, match="interrupted; .* is intact, resume with"):
        train.main(run_args(data_dir, tmp_path / "resumed", *run, "--dropout=0.1"))
    monkeypatch.undo()
    train.main(run_args(data_dir, tmp_path / "resumed", "--init_from=resume", *run))
    straight = log_of(tmp_path / "straight")
    assert log_of(tmp_path / "resumed") == straight
    assert [r["iter"] for r in straight] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]  # each step, each evaluation once
    train.main(run_args(data_dir, tmp_path / "resumed", "--init_from=resume", *run))  # a finished run resumed
    assert log_of(tmp_path / "resumed") == straight  # its final evaluation is not written twice


# -----------------------------------------------------------------------------
# prepare_data.py reuses a known download only if its sha256 is the download's

def test_prepare_reuses_only_the_real_download(tmp_path, monkeypatch):
    """The committed excerpt stands in for the download: its sha256 is made the known one."""
    monkeypatch.setattr(prepare_data, "SHAKESPEARE_SHA256", hashlib.sha256(read(SHAKESPEARE)).hexdigest())
    data = tmp_path / "data"
    mine = tmp_path / "mine.txt"
    mine.write_text(make_text(5000))
    prepare("shakespeare_char", data_dir=str(data), name="shakespeare", input=str(mine))
    before = {p: open(p, "rb").read() for p in files_under(data)}
    copy = data / "shakespeare" / "input.txt"
    with pytest.raises(UserError, match=message(f"{copy} is not tiny Shakespeare (its sha256 is not the download's)")):
        prepare("shakespeare_char", data_dir=str(data), name="shakespeare")
    assert {p: open(p, "rb").read() for p in files_under(data)} == before  # nothing changed
    copy.write_bytes(read(SHAKESPEARE))  # the real text: reused, no download
    monkeypatch.setattr(prepare_data, "download", lambda *a, **k: pytest.fail("downloads"))
    prepare("shakespeare_char", data_dir=str(data), name="shakespeare")


# -----------------------------------------------------------------------------
# out_dir: a read-only folder, and a save that hits a file-size limit

@pytest.mark.parametrize("function, text", [
    ("makedirs", "cannot create --out_dir={out}: Permission denied; choose an --out_dir in a folder you can write to"),
    ("open", "cannot write in --out_dir={out}: Permission denied; choose an --out_dir you can write to"),
])
def test_out_dir_in_a_read_only_folder(data_dir, tmp_path, monkeypatch, function, text):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    out = folder / ("run" if function == "makedirs" else "")
    refuse(monkeypatch, folder, function)
    with pytest.raises(UserError, match=message(text.format(out=out))):
        fit(data_dir, str(out))
    assert os.listdir(folder) == []


def test_save_hitting_a_file_size_limit(data_dir, tmp_path):
    out = tmp_path / "run"

    def limit():  # log.jsonl fits, the checkpoint does not; SIGXFSZ is ignored by Python, so writes fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))
    r = subprocess.run([sys.executable, "train.py", *run_args(data_dir, out, "--max_iters=2", "--eval_interval=2")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, preexec_fn=limit)
    assert_one_line_error(r, "train.py", f"could not write {out / 'ckpt.pt'}: the write stopped short")
    assert "no checkpoint was written" in r.stderr
    assert sorted(os.listdir(out)) == ["log.jsonl"]  # no ckpt.pt.tmp, no lock


def test_save_raising_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    fit(data_dir, str(tmp_path))
    before = open(tmp_path / "ckpt.pt", "rb").read()

    def quota(obj, path):
        open(path, "wb").write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", quota)
    with pytest.raises(UserError, match="the write stopped short: .* the previous .*ckpt.pt is intact"):
        train.main(run_args(data_dir, str(tmp_path), "--init_from=resume", "--max_iters=4"))
    assert open(tmp_path / "ckpt.pt", "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "log.jsonl"]
