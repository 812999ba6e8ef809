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
