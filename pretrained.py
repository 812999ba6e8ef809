"""
Pretrained checkpoints from the Hugging Face Hub: Qwen2 / Qwen2.5 as our GPT, MoD or DTF, and
SmallDoge's Doge (transformers' DogeForCausalLM, model_type doge) as our Doge.

    python prepare_data.py shakespeare --tokenizer=hf:Qwen/Qwen2.5-0.5B --name=shakespeare_qwen
    python train.py --model=mod --init_from=hf:Qwen/Qwen2.5-0.5B --dataset=shakespeare_qwen
    python prepare_data.py shakespeare --tokenizer=hf:SmallDoge/Doge-20M --name=shakespeare_doge
    python train.py --model=doge --init_from=hf:SmallDoge/Doge-20M --dataset=shakespeare_doge [--is_moe=True]

Transfer learning as in the Dynamic-Transformers reference: layer i of the checkpoint becomes our
block i (MoD: routed layers wrap a Block; DTF: pair p holds layers 2p and 2p+1 as its decision and
dynamic blocks), every pretrained tensor is used, and what the checkpoint does not have (routers,
thresholds, DTF's priors and gate scalars) keeps its fresh init. Doge's layer i is our block i
under the same leaf names; with --is_moe=True a dense Doge is upcycled as the Doge authors continue
their MoE models from dense ones: each dense MLP becomes the shared (dense) part of a CDMoE, whose
router and private experts start fresh.

Files come from $DYNLM_HF_URL (default https://huggingface.co)/<repo>/resolve/main/<file> into
$DYNLM_CACHE (default ~/.cache/dynamic-lm)/hf/<repo>/, through prepare_data.download (resume,
progress, rename into place). Each file's sha256 is checked against the hub's X-Linked-Etag when
it sends one (its LFS files), and is recorded next to the file so that a reused file is checked too.
No transformers and no safetensors package: the format is simple enough to read here (read_safetensors),
and the tokenizer is tiktoken with the checkpoint's own byte-level BPE (tokenizer_descriptor).
"""
import base64
import json
import math
import os
import re
import unicodedata

import numpy as np
import requests
import torch

from cli import UserError
from prepare_data import download, file_sha256

HF_URL = "https://huggingface.co"


def cache_dir(repo):
    root = os.environ.get("DYNLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dynamic-lm")
    return os.path.join(root, "hf", *repo.split("/"))


# -----------------------------------------------------------------------------
# download

def check_repo(repo):
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
        raise UserError(f"hf:{repo} is not a Hugging Face repo id; write it as hf:OWNER/NAME, e.g. hf:Qwen/Qwen2.5-0.5B")


def fetch_file(repo, name, required=True):
    """Local path of <repo>/<name>, downloaded on first use; None if the hub has no such file and
    required is False."""
    check_repo(repo)
    path = os.path.join(cache_dir(repo), name)
    record = path + ".sha256"
    if os.path.exists(path) and os.path.exists(record):
        with open(record) as f:
            expected = f.read().strip()
        if file_sha256(path) == expected:
            return path
        os.remove(path)  # damaged since it was downloaded: fetch it again
    url = f"{os.environ.get('DYNLM_HF_URL', HF_URL).rstrip('/')}/{repo}/resolve/main/{name}"
    status, sha256 = probe(url)
    if status == 404 and not required:
        return None
    if status in (401, 403, 404):
        raise UserError(f"{url}: HTTP {status}; check the repo id (only public repos can be downloaded)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    download(url, path, sha256=sha256, local_hint=f"put the file at {path} and its sha256 in {record}")
    with open(record + ".tmp", "w") as f:
        f.write(file_sha256(path) + "\n")
    os.replace(record + ".tmp", record)
    return path


def probe(url):
    """(HTTP status, sha256 or None) of url without following the hub's redirect to its CDN: for an
    LFS file the hub answers 302 with the file's sha256 as X-Linked-Etag (ETag on the CDN is not it)."""
    try:
        with requests.get(url, stream=True, allow_redirects=False, timeout=30) as r:
            etag = (r.headers.get("X-Linked-Etag") or r.headers.get("ETag") or "").strip('W/"')
            return r.status_code, etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None
    except requests.RequestException:
        return None, None  # download() retries and reports the network problem


def fetch_weights(repo):
    """Paths of the checkpoint's safetensors files: model.safetensors, or the shards its index names."""
    index = fetch_file(repo, "model.safetensors.index.json", required=False)
    if index is None:
        return [fetch_file(repo, "model.safetensors")]
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return [fetch_file(repo, shard) for shard in shards]


# -----------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
# data_offsets: [begin, end]}} (offsets relative to the end of the header), then the raw data

# BF16 has no numpy type: its 16 bits are read as int16 and viewed as torch.bfloat16
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16, "F64": np.float64}


def read_safetensors(path):
    """{name: tensor} viewing a copy-on-write memory map of the file: nothing is read until a tensor
    is used, so a 1 GB checkpoint costs no memory beyond the model it is copied into."""
    def bad(why):
        return UserError(f"{path} is not a readable safetensors file ({why}); delete it and rerun to download it again")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(size - 8, 100 << 20):
            raise bad("bad header length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("the header is not JSON") from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise bad(f"malformed entry for {name}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise bad(f"{name} has unsupported dtype {dtype}")
        np_dtype = SAFETENSORS_DTYPES[dtype]
        if not 0 <= begin <= end <= data.size or end - begin != math.prod(shape) * np.dtype(np_dtype).itemsize:
            raise bad(f"{name}'s data_offsets do not match its shape or the file size")
        array = data[begin:end].view(np_dtype).reshape(shape)
        t = torch.from_numpy(array)
        tensors[name] = t.view(torch.bfloat16) if dtype == "BF16" else t  # same 16 bits, read as bf16
    return tensors


# -----------------------------------------------------------------------------
# config.json -> our Config, and Qwen2's tensor names -> our state_dict

def read_config(repo):
    path = fetch_file(repo, "config.json")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is not JSON; delete it and rerun to download it again") from None
    architectures = hf.get("architectures") or []
    known = {"qwen2": "Qwen2ForCausalLM", "doge": "DogeForCausalLM"}
    if hf.get("model_type") not in known or architectures not in ([], [known[hf.get("model_type")]]):
        raise UserError(f"hf:{repo} is a {hf.get('model_type')} model ({', '.join(architectures) or 'no architecture'}); "
                        f"only Qwen2/Qwen2.5 checkpoints (model_type qwen2, Qwen2ForCausalLM: --model=gpt, mod or dtf) "
                        f"and Doge ones (model_type doge, DogeForCausalLM: --model=doge) can be loaded")
    if hf["model_type"] == "doge":
        return hf
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default" or hf.get("use_sliding_window"):
        raise UserError(f"hf:{repo} uses {rope.get('rope_type') or 'sliding-window attention'}; only plain RoPE "
                        f"with full attention (as Qwen2.5's base models) is supported")
    if not hf.get("tie_word_embeddings", False):
        raise UserError(f"hf:{repo} has a separate lm_head; our models tie it to the embedding, so only tied "
                        f"checkpoints load (Qwen2.5-0.5B, 1.5B and 3B are tied)")
    return hf


def check_model(repo, hf, model_name):
    """The checkpoint's architecture goes into these of our models."""
    if model_name is None:
        return
    if hf["model_type"] == "doge" and model_name != "doge":
        raise UserError(f"hf:{repo} is a Doge checkpoint; load it with --model=doge, not --model={model_name}")
    if hf["model_type"] == "qwen2" and model_name not in ("gpt", "mod", "dtf"):
        raise UserError(f"hf:{repo} is a Qwen2 checkpoint; load it with --model=gpt, mod or dtf, not --model={model_name}")


def model_fields(repo, overrides, dataset_vocab_size, model_name=None):
    """Fields of our Config from the checkpoint's config.json. Command-line options may set the rest
    (block_size, dropout, routing knobs) but not the shapes the weights fix. model_name, when given,
    must be a model the checkpoint loads into."""
    hf = read_config(repo)
    check_model(repo, hf, model_name)
    if hf["model_type"] == "doge":
        return doge_fields(repo, hf, overrides, dataset_vocab_size)
    rope = hf.get("rope_parameters") or {}  # where transformers 5 writes rope_theta
    fields = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                  n_kv_head=hf.get("num_key_value_heads", hf["num_attention_heads"]), n_embd=hf["hidden_size"],
                  intermediate_size=hf["intermediate_size"], rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 1e4)),
                  norm_eps=float(hf["rms_norm_eps"]), qkv_bias=True)
    fixed = sorted(set(overrides) & set(fields))
    if fixed:
        raise UserError(f"--{fixed[0]} is fixed by hf:{repo}'s weights; drop it")
    if dataset_vocab_size > hf["vocab_size"]:
        raise UserError(f"the dataset's vocabulary ({dataset_vocab_size:,}) is larger than hf:{repo}'s embedding ({hf['vocab_size']:,})")
    block_size = overrides.get("block_size", min(1024, hf.get("max_position_embeddings", 1024)))
    if block_size > hf.get("max_position_embeddings", block_size):
        raise UserError(f"--block_size={block_size} is longer than hf:{repo} was trained for "
                        f"({hf['max_position_embeddings']} positions)")
    return {**overrides, **fields, "block_size": block_size}


def layer_prefixes(model_name, n_layer):
    """Where Qwen layer i lives in our model's state_dict."""
    if model_name == "gpt":
        return [f"blocks.{i}." for i in range(n_layer)]
    if model_name == "mod":  # odd layers are MoDBlocks wrapping a Block (model_mod.MoD)
        return [f"blocks.{i}." if i % 2 == 0 else f"blocks.{i}.block." for i in range(n_layer)]
    if model_name == "dtf":  # pair p: decision block = layer 2p, dynamic block = layer 2p+1
        return [f"blocks.{i // 2}.{'decision' if i % 2 == 0 else 'dynamic'}." for i in range(n_layer)]
    raise UserError(f"pretrained Qwen2 weights load into gpt, mod or dtf, not {model_name}")


def map_tensors(tensors, prefixes):
    """{our name: tensor} from Qwen2's names. q, k, v are stacked in that order, as
    model_gpt.Attention splits qkv_proj's output."""
    out = {"wte.weight": tensors.pop("model.embed_tokens.weight"), "norm_f.weight": tensors.pop("model.norm.weight")}
    tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head too; it is wte
    for i, p in enumerate(prefixes):
        hf = f"model.layers.{i}."
        for part in ("weight", "bias"):
            out[f"{p}attn.qkv_proj.{part}"] = torch.cat([tensors.pop(f"{hf}self_attn.{x}_proj.{part}") for x in "qkv"])
        out[f"{p}attn.o_proj.weight"] = tensors.pop(f"{hf}self_attn.o_proj.weight")
        out[f"{p}attn_norm.weight"] = tensors.pop(f"{hf}input_layernorm.weight")
        out[f"{p}mlp_norm.weight"] = tensors.pop(f"{hf}post_attention_layernorm.weight")
        for x in ("gate", "up", "down"):
            out[f"{p}mlp.{x}_proj.weight"] = tensors.pop(f"{hf}mlp.{x}_proj.weight")
    if tensors:
        raise UserError(f"the checkpoint has tensors no Qwen2 model has (e.g. {next(iter(tensors))}); "
                        f"is it really Qwen2ForCausalLM?")
    return out


def load_weights(model, model_name, repo):
    """Copy every tensor of hf:<repo> into model (fp32 or whatever its parameters are); returns the
    names of our parameters and buffers the checkpoint does not provide (they keep their init)."""
    hf = read_config(repo)
    check_model(repo, hf, model_name)
    tensors = {}
    for path in fetch_weights(repo):
        tensors.update(read_safetensors(path))
    try:
        if hf["model_type"] == "doge":
            mapped = map_doge_tensors(tensors, model.config.n_layer, bool(hf.get("is_moe")))
        else:
            mapped = map_tensors(tensors, layer_prefixes(model_name, model.config.n_layer))
    except KeyError as e:
        kind = "Doge" if hf["model_type"] == "doge" else "Qwen2"
        raise UserError(f"hf:{repo} lacks the tensor {e.args[0]}; the checkpoint is incomplete or not {kind}") from None
    state = model.state_dict()
    with torch.no_grad():
        for name, t in mapped.items():
            if name not in state:
                raise UserError(f"model_{model_name}.py has no {name} for the checkpoint's weights")
            if tuple(t.shape) != tuple(state[name].shape):
                raise UserError(f"hf:{repo}: {name} has shape {tuple(t.shape)}, model_{model_name}.py "
                                f"expects {tuple(state[name].shape)}")
            state[name].copy_(t)  # state_dict tensors share storage with the parameters
    fresh = set(state) - set(mapped) - {"lm_head.weight"}
    return sorted({re.sub(r"\.\d+\.", ".N.", name) for name in fresh})  # one entry per kind, not per layer


# -----------------------------------------------------------------------------
# Doge: transformers' DogeForCausalLM config.json and tensor names -> model_doge

def doge_fields(repo, hf, overrides, dataset_vocab_size):
    """model_doge.Config fields for a Doge config.json. What model_doge.py does not compute is refused
    rather than approximated. Upcycling: a dense checkpoint with --is_moe=True (and optionally
    --n_experts, --n_experts_per_head, --balance_loss_weight) gets fresh routers and experts."""
    def refuse(what):
        raise UserError(f"hf:{repo} {what}, which model_doge.py does not implement; only transformers' "
                        f"DogeForCausalLM layout as SmallDoge's Doge-20M/60M/160M/320M use it can be loaded")

    n_head = hf["num_attention_heads"]
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"uses the activation {hf['hidden_act']} (Doge's is silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        refuse("has linear biases (attention_bias or mlp_bias)")
    if hf.get("sliding_window") is not None:
        refuse("uses sliding-window attention")
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
        refuse(f"has head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    if hf.get("dynamic_mask_ratio") or hf.get("num_cdmoe_experts"):
        refuse("is in the older small-doge layout (dynamic_mask_ratio or num_cdmoe_experts)")
    if not hf.get("tie_word_embeddings", False):
        refuse("has a separate lm_head (our Doge ties it to the embedding)")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}  # transformers 4 writes the first, 5 the second
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "dynamic") or \
            rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"uses {rope.get('rope_type') or rope.get('type')} RoPE scaling")
    # dynamic NTK scaling only rescales RoPE's base once a sequence is longer than max_position_embeddings;
    # up to that length it is plain RoPE, so a block_size within it is exact
    max_pos = hf.get("max_position_embeddings", 2048)
    if rope.get("original_max_position_embeddings"):
        max_pos = min(max_pos, rope["original_max_position_embeddings"])
    fields = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
                  n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
                  intermediate_size=hf["intermediate_size"], norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 1e4)))
    if hf.get("is_moe"):
        fields.update(is_moe=True, n_experts=hf["num_experts"], n_experts_per_head=hf["num_experts_per_tok"])
        if overrides.get("is_moe") is False:
            raise UserError(f"hf:{repo} is a CDMoE checkpoint; its experts need is_moe, so drop --is_moe=False")
        overrides = {k: v for k, v in overrides.items() if k != "is_moe"}
    fixed = sorted(set(overrides) & set(fields))
    if fixed:
        raise UserError(f"--{fixed[0]} is fixed by hf:{repo}'s weights; drop it")
    if dataset_vocab_size > hf["vocab_size"]:
        raise UserError(f"the dataset's vocabulary ({dataset_vocab_size:,}) is larger than hf:{repo}'s embedding ({hf['vocab_size']:,})")
    block_size = overrides.get("block_size", min(1024, max_pos))
    if block_size > max_pos:
        raise UserError(f"--block_size={block_size} is longer than hf:{repo}'s {max_pos} positions; beyond them its "
                        f"dynamic NTK RoPE scaling would apply, which model_doge.py does not implement")
    return {"keep_window_size": hf.get("keep_window_size", 2048), **overrides, **fields, "block_size": block_size}


# HF Doge's names inside layer i -> ours inside blocks.i (model_doge keeps HF's leaf names where it can)
DOGE_LEAVES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
               "input_residual": "input_residual", "post_attention_residual": "post_attention_residual",
               **{f"self_attn.{x}": f"attn.{x}" for x in ("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                           "o_proj.weight", "q_norm.weight", "k_norm.weight",
                                                           "dt_proj.weight", "A")},
               **{f"mlp.{x}_proj.weight": f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}}
DOGE_MOE_LEAVES = ("mlp.router_gate.weight", "mlp.down_embed.weight", "mlp.up_embed.weight")


def map_doge_tensors(tensors, n_layer, is_moe):
    """{our name: tensor} from DogeForCausalLM's names. A CDMoE's dense part keeps the MLP's names (CDMoE
    inherits MLP), so a dense checkpoint fills the dense part of an upcycled model as it is."""
    out = {"wte.weight": tensors.pop("model.embed_tokens.weight"), "norm_f.weight": tensors.pop("model.norm.weight")}
    tensors.pop("lm_head.weight", None)  # tied: it is wte
    for i in range(n_layer):
        leaves = {**DOGE_LEAVES, **({x: x for x in DOGE_MOE_LEAVES} if is_moe else {})}
        for theirs, ours in leaves.items():
            out[f"blocks.{i}.{ours}"] = tensors.pop(f"model.layers.{i}.{theirs}")
    if tensors:
        raise UserError(f"the checkpoint has tensors no DogeForCausalLM with this config.json has (e.g. "
                        f"{next(iter(tensors))}); is it in transformers' Doge layout?")
    return out


# -----------------------------------------------------------------------------
# tokenizer: the checkpoint's byte-level BPE (tokenizer.json) as a tiktoken encoding

def bytes_to_unicode():
    """GPT-2's byte-level alphabet: every byte as a printable character, as byte-level BPE vocabularies write them."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_descriptor(repo):
    """A compact, self-contained tokenizer description for meta.json and checkpoints:
    {"kind": "tiktoken", "name", "pattern", "ranks": base64 tokens in id order, "special", "normalize"}."""
    path = fetch_file(repo, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model") or {}
    pipeline = json.dumps([tok.get("normalizer"), tok.get("pre_tokenizer"), tok.get("decoder")], ensure_ascii=False)
    if model.get("byte_fallback") or "Metaspace" in pipeline or "▁" in pipeline:
        raise UserError(f"hf:{repo}'s tokenizer is a sentencepiece-style BPE (byte fallback, ▁ for spaces); "
                        f"only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmallDoge style) are supported")
    if model.get("type") != "BPE" or not model.get("vocab"):
        raise UserError(f"hf:{repo}'s tokenizer is not a byte-level BPE ({model.get('type')}); it cannot be used")
    normalizer = (tok.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise UserError(f"hf:{repo}'s tokenizer normalizes with {normalizer}; only NFC (Qwen2's) is supported")
    splits = [p for p in (tok.get("pre_tokenizer") or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) != 1 or "Regex" not in splits[0].get("pattern", {}):
        raise UserError(f"hf:{repo}'s tokenizer has no single Split regex pre-tokenizer (Qwen2 has one)")
    # added tokens (<|endoftext|>, <|begin_of_text|>, ...) are matched in the text before the BPE; Qwen2
    # numbers them after the vocabulary, SmallDoge's tokenizer first (ids 0..255), inside it
    special = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    try:
        vocab = {bytes(byte_of[c] for c in token): i for token, i in model["vocab"].items()
                 if special.get(token) != i}
    except KeyError:
        raise UserError(f"hf:{repo}'s vocabulary is not byte-level") from None
    # tiktoken merges the adjacent pair whose concatenation has the lowest id; that is HF's BPE only
    # if every merge's result has a larger id than the merges before it and than every single byte
    merges = [m.split(" ") if isinstance(m, str) else m for m in model.get("merges", [])]
    merged = [vocab.get(bytes(byte_of[c] for c in a + b)) for a, b in merges]
    singles = [i for token, i in vocab.items() if len(token) == 1]
    if len(singles) != 256 or None in merged or merged != sorted(merged) or (merged and merged[0] < max(singles)):
        raise UserError(f"hf:{repo}'s BPE ranks do not follow its merges in id order; tiktoken cannot reproduce it")
    inside = {content: i for content, i in special.items() if model["vocab"].get(content) == i}
    vocab.update({content.encode(): i for content, i in inside.items()})  # their place in the id order
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))) or len(vocab) != len(model["vocab"]):
        raise UserError(f"hf:{repo}'s vocabulary ids are not 0..{len(model['vocab']) - 1}, each once")
    by_id = sorted(vocab, key=vocab.get)
    return {"kind": "tiktoken", "name": f"hf:{repo}", "pattern": splits[0]["pattern"]["Regex"],
            "ranks": " ".join(base64.b64encode(t).decode() for t in by_id),
            "special": special, "normalize": normalizer}


def same_tokenizer(a, b):
    """Two descriptors encode alike (the name does not matter: Qwen2.5's sizes share one tokenizer)."""
    keys = ("kind", "encoding", "pattern", "ranks", "special", "normalize")
    return all(a.get(k) == b.get(k) for k in keys)


def tiktoken_encoding(desc):
    """(encode, decode) of a descriptor from tokenizer_descriptor. Added tokens such as
    <|endoftext|> are matched in the text, as Hugging Face's tokenizer does."""
    import tiktoken
    special_ids = set(desc["special"].values())  # an added token inside the vocabulary is only special
    ranks = {base64.b64decode(t): i for i, t in enumerate(desc["ranks"].split(" ")) if i not in special_ids}
    enc = tiktoken.Encoding(desc["name"], pat_str=desc["pattern"], mergeable_ranks=ranks,
                            special_tokens=desc["special"])

    def encode(text):
        if desc["normalize"]:
            text = unicodedata.normalize(desc["normalize"], text)
        return enc.encode(text, allowed_special="all")

    return encode, lambda ids: enc.decode([i for i in ids if i < enc.n_vocab])


# =============================================================================
# DAWN-39M: the DAWN authors' published checkpoint (Zenodo record 18060421; madst0614/DAWN, model
# v17.1 with per-token routing) as our model_dawn.DAWN, and its tokenizer, BERT's uncased WordPiece.
#
#     python prepare_data.py shakespeare --tokenizer=wordpiece:hf:google-bert/bert-base-uncased --name=shakespeare_bert
#     python train.py --model=dawn --init_from=PATH/dawn_39m_weights.pt --dataset=shakespeare_bert
#
# The file is a torch.save pickle {"model_state_dict": {reference name: tensor}, "config": the
# reference's DAWN(**config) keyword arguments, ...}. Tensors map one to one, except that the
# reference keeps the Q/K and V pools of each kind in one tensor (f_neurons = [F_qk; F_v]) and
# its router as three Linears (proj_all: the six attention queries, then one per knowledge routing)
# where ours is one Linear of eight queries in the same order. Dropped: the GlobalSSM (built by the
# reference but never run when both routings are per token, as in the 39M model), the usage EMAs
# (logging only), the tied lm_head, and the copies of the shared pools every reference layer lists
# in its state_dict (the same tensors).

DAWN_POOL_FIELDS = {  # our Config field: (reference feature-pool key, reference restore-pool key)
    "n_qk": ("n_feature_qk", "n_restore_qk"), "n_v": ("n_feature_v", "n_restore_v"),
    "n_know": ("n_feature_know", "n_restore_know"), "top_k_qk": ("top_k_feature_qk", "top_k_restore_qk"),
    "top_k_v": ("top_k_feature_v", "top_k_restore_v"), "top_k_know": ("top_k_feature_know", "top_k_restore_know")}
DAWN_RENAMED = {"n_layer": "n_layers", "n_head": "n_heads", "n_embd": "d_model", "block_size": "max_seq_len",
                "vocab_size": "vocab_size", "rank": "rank", "knowledge_rank": "knowledge_rank", "d_space": "d_space"}
DAWN_FIXED = sorted(set(DAWN_POOL_FIELDS) | set(DAWN_RENAMED) - {"block_size"})  # set by the weights, not the command line
DAWN_LAYER_PARTS = {"norm1.weight": "attn_norm.weight", "norm1.bias": "attn_norm.bias",
                    "attn.expand_O.weight": "W_O.weight", "norm2.weight": "mlp_norm.weight", "norm2.bias": "mlp_norm.bias"}


def is_dawn_checkpoint(init_from):
    """--init_from names a reference DAWN file (anything but scratch, resume and hf:...)."""
    return init_from not in ("scratch", "resume") and not init_from.startswith("hf:")


def read_dawn_checkpoint(path):
    """(config, state_dict) of a reference DAWN checkpoint, loaded as data only (weights_only)."""
    if not os.path.isfile(path):
        raise UserError(f"--init_from={path}: no such file; download dawn_39m_weights.pt from "
                        f"https://zenodo.org/records/18060421 (or use scratch, resume or hf:OWNER/NAME)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code as well as broken files
        why = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({e.__class__.__name__}: {why}); "
                        f"download it again (it is loaded as data only, never as code)") from None
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model_state_dict"), dict):
        state, config = ckpt["model_state_dict"], ckpt.get("config") or ckpt.get("model_config") or {}
    elif isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, config = ckpt, {}  # a bare state_dict, as the reference README's example loads
    elif isinstance(ckpt, dict) and "model_name" in ckpt:
        raise UserError(f"{path} was written by this repo's train.py; continue it with --init_from=resume "
                        f"--out_dir={os.path.dirname(path) or '.'}")
    else:
        raise UserError(f"{path} holds no model_state_dict; it is not a DAWN reference checkpoint")
    if not isinstance(config, dict):
        raise UserError(f"{path}: its config is a {type(config).__name__}, not a dict of DAWN's arguments")
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}  # saved from a torch.compile'd model
    if "shared_neurons.f_neurons" not in state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a DAWN v17.1 checkpoint (it has no shared_neurons.f_neurons)")
    version = str(config.get("model_version", ckpt.get("model_version", "17.1")))  # (a training checkpoint's)
    if not version.startswith("17.1") or "router.tau_proj.weight" in state:
        raise UserError(f"{path} is DAWN v{version}; only v17.1 (the published DAWN-39M) can be loaded")
    for flag in ("attention_token_routing", "knowledge_token_routing"):
        if config.get(flag, True) is False:
            raise UserError(f"{path} was built with {flag}=False: sequence-level routing (the DAWN-24M model) "
                            f"reads future tokens, and model_dawn.py implements only per-token routing")
    return config, state


def dawn_model_fields(path, config, state, overrides, dataset_vocab_size):
    """Our model_dawn Config fields for the checkpoint: shapes from its tensors and config (which must
    agree); dropout, router_dropout and the loss weights from the command line, else the reference's.
    What the tensors cannot say (heads, how f_neurons splits into Q/K and V, top-k) a file without a
    config takes from the dawn-39m preset if its shapes are that model's."""
    import model_dawn
    fixed = sorted(set(overrides) & set(DAWN_FIXED))
    if fixed:
        raise UserError(f"--{fixed[0]} is fixed by {path}'s weights; drop it")
    try:
        seen = {"vocab_size": state["token_emb.weight"].shape[0], "n_embd": state["token_emb.weight"].shape[1],
                "block_size": state["pos_emb.weight"].shape[0], "rank": state["shared_neurons.f_neurons"].shape[2],
                "knowledge_rank": state["shared_neurons.feature_know"].shape[2],
                "n_know": state["shared_neurons.feature_know"].shape[0],
                "d_space": state["router.neuron_router.neuron_emb"].shape[1],
                "n_layer": len({k.split(".")[1] for k in state if k.startswith("layers.")})}
    except (KeyError, IndexError):
        raise UserError(f"{path} lacks the embeddings or pools of a DAWN v17.1 checkpoint") from None
    preset = model_dawn.PRESETS["dawn-39m"]
    fits_preset = all(preset[k] == v for k, v in seen.items())

    def reference(key, field):
        if key in config:
            return config[key]
        if field in seen:
            return seen[field]
        if not config and fits_preset:
            return preset[field]
        raise UserError(f"{path} has no config[{key!r}]; without it the checkpoint's shape is ambiguous")

    fields = {field: reference(key, field) for field, key in DAWN_RENAMED.items()}
    for field, (feature_key, restore_key) in DAWN_POOL_FIELDS.items():
        fields[field], restore = reference(feature_key, field), reference(restore_key, field)
        if restore != fields[field]:
            raise UserError(f"{path}: {feature_key} = {fields[field]} but {restore_key} = {restore}; "
                            f"model_dawn.py gives a feature pool and its restore pool the same size and top-k")
    seen["n_qk+n_v"] = state["shared_neurons.f_neurons"].shape[0]
    fields["n_qk+n_v"] = fields["n_qk"] + fields["n_v"]
    for field, value in seen.items():
        if fields[field] != value:
            raise UserError(f"{path}: its config says {field} = {fields[field]}, its tensors {value}; the file is inconsistent")
    del fields["n_qk+n_v"]
    if dataset_vocab_size > fields["vocab_size"]:
        raise UserError(f"the dataset's vocabulary ({dataset_vocab_size:,}) is larger than {path}'s embedding "
                        f"({fields['vocab_size']:,})")
    block_size = overrides.get("block_size", fields["block_size"])
    if block_size > fields["block_size"]:
        raise UserError(f"--block_size={block_size} is longer than {path}'s {fields['block_size']} learned positions")
    defaults = {"dropout": float(config.get("dropout", preset["dropout"])),
                "router_dropout": float(config.get("router_dropout", preset["router_dropout"]))}
    return {**defaults, **overrides, **fields, "block_size": block_size}


def map_dawn_tensors(state, n_qk, n_v, n_layer):
    """{our name: tensor} from the reference's names (see the section comment)."""
    state = dict(state)
    neurons, router = "shared_neurons.", "router.neuron_router."
    f_neurons, r_neurons = state.pop(neurons + "f_neurons"), state.pop(neurons + "r_neurons")
    out = {"wte.weight": state.pop("token_emb.weight"), "wpe.weight": state.pop("pos_emb.weight"),
           "F_qk": f_neurons[:n_qk], "F_v": f_neurons[n_qk:], "R_qk": r_neurons[:n_qk], "R_v": r_neurons[n_qk:],
           "F_kn": state.pop(neurons + "feature_know"), "R_kn": state.pop(neurons + "restore_know"),
           "neuron_emb": state.pop(router + "neuron_emb"),
           "norm_f.weight": state.pop("norm.weight"), "norm_f.bias": state.pop("norm.bias")}
    for part in ("weight", "bias"):  # proj_all's six attention queries, then the two knowledge queries
        out[f"router.{part}"] = torch.cat([state.pop(f"{router}{p}.{part}")
                                           for p in ("proj_all", "proj_feature_know", "proj_restore_know")])
    for i in range(n_layer):
        for theirs, ours in DAWN_LAYER_PARTS.items():
            out[f"blocks.{i}.{ours}"] = state.pop(f"layers.{i}.{theirs}")
    shared = {neurons + name: t for name, t in [("f_neurons", f_neurons), ("r_neurons", r_neurons),
                                                 ("feature_know", out["F_kn"]), ("restore_know", out["R_kn"])]}
    for name in list(state):
        copy = re.fullmatch(r"layers\.\d+\.(?:attn|knowledge)\.(shared_neurons\.\w+)", name)
        if copy and copy.group(1) in shared:  # a layer's view of the shared pools: must be the same tensor
            t, pool = state.pop(name), shared[copy.group(1)]
            same_storage = t.data_ptr() == pool.data_ptr() and t.shape == pool.shape and t.stride() == pool.stride()
            if not same_storage and not torch.equal(t, pool):  # (torch.save keeps shared storage shared)
                raise UserError(f"the checkpoint's {name} differs from {copy.group(1)}; the file is corrupt")
        elif name.startswith("global_ssm.") or name.startswith(router + "usage_ema_") or name == "lm_head.weight":
            state.pop(name)  # the unused SSM, logging buffers, and the head tied to token_emb
    if state:
        raise UserError(f"the checkpoint has tensors no DAWN v17.1 model has (e.g. {next(iter(state))})")
    return out


def load_dawn_weights(model, path, state):
    """Copy every tensor of the reference state_dict into our model (wpe: its first block_size rows)."""
    c = model.config
    try:
        mapped = map_dawn_tensors(state, c.n_qk, c.n_v, c.n_layer)
    except KeyError as e:
        raise UserError(f"{path} lacks the tensor {e.args[0]}; the checkpoint is incomplete or not DAWN v17.1") from None
    mapped["wpe.weight"] = mapped["wpe.weight"][:c.block_size]
    ours = model.state_dict()
    with torch.no_grad():
        for name, t in mapped.items():
            if tuple(t.shape) != tuple(ours[name].shape):
                raise UserError(f"{path}: {name} has shape {tuple(t.shape)}, model_dawn.py expects {tuple(ours[name].shape)}")
            if not torch.isfinite(t).all():
                raise UserError(f"{path}: {name} holds inf or nan; download the file again")
            ours[name].copy_(t)  # state_dict tensors share storage with the parameters
    missing = set(ours) - set(mapped) - {"lm_head.weight"}
    if missing:  # model_dawn.py grew a parameter this mapping does not know
        raise UserError(f"the checkpoint provides no {sorted(missing)[0]} for model_dawn.py")


def check_dawn_tokenizer(desc, vocab_size, dataset):
    """The dataset must be tokenized with a WordPiece vocabulary of the checkpoint's size."""
    if desc.get("kind") != "wordpiece" or len(desc["vocab"].split("\n")) != vocab_size:
        raise UserError(f"dataset {dataset} was not tokenized with a {vocab_size:,}-token WordPiece vocabulary "
                        f"(DAWN-39M uses bert-base-uncased's); prepare it with: python prepare_data.py shakespeare "
                        f"--tokenizer=wordpiece:hf:google-bert/bert-base-uncased --name=NAME")


# -----------------------------------------------------------------------------
# BERT's WordPiece (what the DAWN reference tokenized C4 with: bert-base-uncased, no special tokens)
#
# Basic tokenization, then WordPiece on each word:
# - drop NUL, U+FFFD and control/format characters; every whitespace character is a separator;
# - every CJK ideograph is a word of its own; NFC;
# - per whitespace-separated token: lowercase, strip accents (NFD, drop the combining marks),
#   then every punctuation character (ASCII symbols included) becomes a word of its own;
# - WordPiece: the longest vocabulary entry that prefixes the word, then the longest "##" entry
#   for the rest, and so on; a word longer than 100 characters, or one that cannot be covered so,
#   is [UNK] as a whole.
# [PAD], [UNK], [CLS], [SEP] and [MASK] written in the text are those tokens.

WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
MAX_WORD_CHARS = 100


def wordpiece_descriptor(source):
    """{"kind": "wordpiece", "name", "vocab": the tokens in id order, one a line, "lowercase"} of a
    vocab.txt: source is its path, or hf:OWNER/NAME for that repo's vocab.txt on the Hugging Face Hub."""
    path = fetch_file(source[3:], "vocab.txt") if source.startswith("hf:") else source
    try:
        with open(path, encoding="utf-8") as f:
            tokens = f.read().split("\n")
    except OSError as e:
        raise UserError(f"cannot read the WordPiece vocabulary {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; a WordPiece vocab.txt holds one token a line") from None
    if tokens and tokens[-1] == "":
        tokens.pop()  # the final newline
    tokens = [t.rstrip("\r") for t in tokens]
    bad = [i for i, t in enumerate(tokens) if not t or any(c.isspace() for c in t)]
    if bad:
        raise UserError(f"{path}: line {bad[0] + 1} is empty or has spaces; a WordPiece vocab.txt holds one token a line")
    if "[UNK]" not in tokens:
        raise UserError(f"{path} has no [UNK] token; it is not a WordPiece vocab.txt")
    # an uncased vocabulary (bert-base-uncased) has no capital letters outside its [SPECIAL] tokens
    lowercase = not any(c.isupper() for t in tokens if not (t.startswith("[") and t.endswith("]")) for c in t)
    return {"kind": "wordpiece", "name": source, "vocab": "\n".join(tokens), "lowercase": lowercase}


def _is_punctuation(ch):
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(ch)[0] == "P"


def basic_words(text, lowercase=True):
    """The words of text before WordPiece (see the section comment)."""
    kept = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            kept.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch)[0] == "C":
            continue
        elif any(lo <= cp <= hi for lo, hi in CJK_RANGES):
            kept.append(f" {ch} ")
        else:
            kept.append(ch)
    words = []
    for token in unicodedata.normalize("NFC", "".join(kept)).split():
        if lowercase:
            token = "".join(c for c in unicodedata.normalize("NFD", token.lower()) if unicodedata.category(c) != "Mn")
        word = ""
        for ch in token:
            if _is_punctuation(ch):
                words += [word, ch] if word else [ch]
                word = ""
            else:
                word += ch
        if word:
            words.append(word)
    return words


def wordpiece_encoding(desc):
    """(encode, decode) of a descriptor from wordpiece_descriptor."""
    tokens = desc["vocab"].split("\n")
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token: its last line, as BertTokenizer
    unk = vocab["[UNK]"]
    specials = [t for t in WORDPIECE_SPECIALS if t in vocab]
    split_specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")")
    cache = {}

    def word_ids(word):
        if len(word) > MAX_WORD_CHARS:
            return [unk]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    ids.append(vocab[piece])
                    start = end
                    break
            else:
                return [unk]
        return ids

    def encode(text):
        ids = []
        for i, part in enumerate(split_specials.split(text)):
            if i % 2:  # a special token written in the text
                ids.append(vocab[part])
                continue
            for word in basic_words(part, desc["lowercase"]):
                if word not in cache:
                    cache[word] = word_ids(word)
                ids += cache[word]
        return ids

    def decode(ids):
        text = " ".join(tokens[i] for i in ids if i < len(tokens)).replace(" ##", "")
        for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                              (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            text = text.replace(before, after)  # undo the spaces WordPiece put around punctuation
        return text

    return encode, decode
