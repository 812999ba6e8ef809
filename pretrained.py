"""
Pretrained weights as our models: Qwen2 / Qwen2.5 from the Hugging Face Hub as our GPT, MoD or DTF,
SmallDoge's Doge (transformers' DogeForCausalLM, model_type doge) as our Doge, and the DAWN authors'
published DAWN-39M checkpoint as our DAWN. train.py --init_from=hf:OWNER/NAME or =FILE calls
from_pretrained; the files come through hub.py, the tokenizers are tokenizer.py's.

    python prepare_data.py shakespeare --tokenizer=hf:Qwen/Qwen2.5-0.5B --name=shakespeare_qwen
    python train.py --model=mod --init_from=hf:Qwen/Qwen2.5-0.5B --dataset=shakespeare_qwen
    python prepare_data.py shakespeare --tokenizer=hf:SmallDoge/Doge-20M --name=shakespeare_doge
    python train.py --model=doge --init_from=hf:SmallDoge/Doge-20M --dataset=shakespeare_doge [--is_moe=True]
    python prepare_data.py shakespeare --tokenizer=wordpiece:hf:google-bert/bert-base-uncased --name=shakespeare_bert
    python train.py --model=dawn --init_from=PATH/dawn_39m_weights.pt --dataset=shakespeare_bert

Transfer learning as in the Dynamic-Transformers reference: layer i of the checkpoint becomes our
block i (MoD: routed layers wrap a Block; DTF: pair p holds layers 2p and 2p+1 as its decision and
dynamic blocks), every pretrained tensor is used, and what the checkpoint does not have (routers,
thresholds, DTF's priors and gate scalars) keeps its fresh init. Doge's layer i is our block i
under the same leaf names; with --is_moe=True a dense Doge is upcycled as the Doge authors continue
their MoE models from dense ones: each dense MLP becomes the shared (dense) part of a CDMoE, whose
router and private experts start fresh.

config.json and the weights come from the network: every config field the loader uses is checked
(present, of its type, positive, consistent with the others and with the safetensors headers), and
the mapped tensors against our model built on the meta device, before a model is built for real;
a bad file is one line, and an absurd size never reaches the allocator.
"""
import math
import os
import re

import torch

from checkpoint import load_model_module
from cli import UserError
from hub import fetch_json, fetch_weights, read_safetensors
from tokenizer import describe, get_tokenizer, same_tokenizer


def from_pretrained(cfg, overrides, meta, weights=True):
    """Our model cfg.model with the weights cfg.init_from names: hf:OWNER/NAME (Qwen2 or Doge) or a DAWN
    reference checkpoint file. The checkpoint fixes the shapes (overrides, the command line's model
    options, may set the rest), and the dataset (meta: its meta.json) must be in its tokenizer.
    weights=False leaves the fresh init (under DDP the other processes receive rank 0's weights)."""
    module = load_model_module(cfg.model)
    if cfg.init_from.startswith("hf:"):
        repo = cfg.init_from[3:]
        fields = model_fields(repo, overrides, meta["vocab_size"], cfg.model)
        if not same_tokenizer(meta["tokenizer"], describe(cfg.init_from)):
            raise UserError(f"dataset {cfg.dataset} was not tokenized with hf:{repo}'s tokenizer; prepare it "
                            f"with: python prepare_data.py shakespeare --tokenizer=hf:{repo} --name=NAME")
        config = module.Config(**fields)
        if not weights:
            return module.Model(config)
        mapped = hf_tensors(repo, cfg.model, config)
        with torch.device("meta"):  # names and shapes checked against the model's before any memory is spent
            check_fit(module.Model(config), mapped, f"hf:{repo}")
        model = module.Model(config)
        fresh = kinds(copy_weights(model, mapped, f"hf:{repo}"))
        print(f"loaded hf:{repo}" + (f"; fresh: {', '.join(fresh)}" if fresh else ""))
        return model
    path = cfg.init_from
    config, state = read_dawn_checkpoint(path)
    fields = dawn_model_fields(path, config, state, overrides, meta["vocab_size"])
    desc = meta["tokenizer"]  # a WordPiece vocabulary of the checkpoint's size
    if desc["kind"] != "wordpiece" or get_tokenizer(desc).vocab_size != fields["vocab_size"]:
        raise UserError(f"dataset {cfg.dataset} was not tokenized with a {fields['vocab_size']:,}-token WordPiece "
                        f"vocabulary (DAWN-39M uses bert-base-uncased's); prepare it with: python prepare_data.py "
                        f"shakespeare --tokenizer=wordpiece:hf:google-bert/bert-base-uncased --name=NAME")
    model = module.Model(module.Config(**fields))
    if weights:
        load_dawn_weights(model, path, state)
        print(f"loaded {path}")
    return model


def checked_fields(source, fields, overrides, dataset_vocab_size, max_positions, positions="positions"):
    """fields (what the weights fix) with the command line's overrides for the rest, and block_size:
    the command line's, else the checkpoint's up to 1024, never past its max_positions."""
    fixed = sorted(set(overrides) & set(fields))
    if fixed:
        raise UserError(f"--{fixed[0]} is fixed by {source}'s weights; drop it")
    if dataset_vocab_size > fields["vocab_size"]:
        raise UserError(f"the dataset's vocabulary ({dataset_vocab_size:,}) is larger than {source}'s embedding "
                        f"({fields['vocab_size']:,})")
    block_size = overrides.get("block_size", min(1024, max_positions))
    if block_size > max_positions:
        raise UserError(f"--block_size={block_size} is longer than {source}'s {max_positions} {positions}")
    return {**overrides, **fields, "block_size": block_size}


def check_fit(model, mapped, source):
    """Every tensor of {our name: tensor} has a place of its shape in model (which may be on the meta device)."""
    state, model_file = model.state_dict(), f"{type(model).__module__}.py"
    for name, t in mapped.items():
        if name not in state:
            raise UserError(f"{model_file} has no {name} for {source}'s weights")
        if tuple(t.shape) != tuple(state[name].shape):
            raise UserError(f"{source}: {name} has shape {tuple(t.shape)}, {model_file} expects "
                            f"{tuple(state[name].shape)}")


def copy_weights(model, mapped, source):
    """Copy {our name: tensor} into model (in its parameters' dtype) after checking names, shapes and
    finiteness; returns the names of our parameters and buffers that mapped does not provide."""
    check_fit(model, mapped, source)
    state = model.state_dict()
    with torch.no_grad():
        for name, t in mapped.items():
            if not torch.isfinite(t).all():
                raise UserError(f"{source}: {name} holds inf or nan; download the file again")
            state[name].copy_(t)  # state_dict tensors share storage with the parameters
    return set(state) - set(mapped) - {"lm_head.weight"}  # lm_head is tied to wte


def kinds(names):
    """One entry per kind of parameter, not per layer: blocks.N.router for blocks.0.router, blocks.1.router."""
    return sorted({re.sub(r"\.\d+\.", ".N.", name) for name in names})


def number(source, key, value, kind=int, default=None):
    """A config value the loader uses: present (or a default), a whole number (kind int) or any number,
    above 0 and finite; config files come from the network, so anything else is one line."""
    value = default if value is None else value
    if value is None:
        raise UserError(f"{source} has no {key}; it is incomplete, so the checkpoint cannot be loaded")
    if type(value) not in ((int,) if kind is int else (int, float)) or not 0 < value < math.inf:
        raise UserError(f"{source}: {key} = {value!r:.40}, expected {'a whole' if kind is int else 'a'} "
                        f"number > 0; the checkpoint cannot be loaded as it is")
    return kind(value)


def check_heads(source, n_embd, n_head, n_kv_head):
    """config.json's attention shapes fit our attention (model_gpt.check_heads, in config.json's names)."""
    if n_embd % n_head or n_head % n_kv_head or (n_embd // n_head) % 2:
        raise UserError(f"{source}: hidden_size {n_embd}, num_attention_heads {n_head} and num_key_value_heads "
                        f"{n_kv_head} do not fit together (hidden_size must be num_attention_heads times an even "
                        f"head size, num_attention_heads a multiple of num_key_value_heads)")


def check_header(repo, tensors, config):
    """The weights' embedding and layers are the ones config.json describes (read from the safetensors
    headers only, before any model is built from config.json's sizes)."""
    embed = tensors.get("model.embed_tokens.weight")
    want = (config.vocab_size, config.n_embd)
    if embed is not None and tuple(embed.shape) != want:
        raise UserError(f"hf:{repo}'s config.json says vocab_size {want[0]} and hidden_size {want[1]}, but its "
                        f"model.embed_tokens.weight has shape {tuple(embed.shape)}; the checkpoint is inconsistent")
    layers = {int(m.group(1)) for name in tensors if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if layers != set(range(config.n_layer)):
        held = f"layers 0..{max(layers)}" if layers == set(range(max(layers) + 1)) else \
            f"{len(layers)} layers numbered {sorted(layers)[:4]}..." if layers else "no layers"
        raise UserError(f"hf:{repo}'s config.json says num_hidden_layers {config.n_layer}, but its weights hold "
                        f"{held}; the checkpoint is inconsistent")


def joined(source, parts, shapes):
    """torch.cat of the tensors {name: tensor} along dim 0, each checked against its expected shape first:
    a part of the wrong size would fail in torch.cat, or worse be hidden in a join of the right total size."""
    for (name, t), shape in zip(parts.items(), shapes):
        if tuple(t.shape) != tuple(shape):
            raise UserError(f"{source}: {name} has shape {tuple(t.shape)}, its config implies {tuple(shape)}; "
                            f"the checkpoint is inconsistent")
    return torch.cat(list(parts.values()))


# -----------------------------------------------------------------------------
# config.json -> our Config, and Qwen2's tensor names -> our state_dict

def read_config(repo):
    hf = fetch_json(repo, "config.json")
    architectures = hf.get("architectures") or []
    known = {"qwen2": "Qwen2ForCausalLM", "doge": "DogeForCausalLM"}
    if not isinstance(hf.get("model_type"), str) or not isinstance(architectures, list) or \
            hf["model_type"] not in known or architectures not in ([], [known[hf["model_type"]]]):
        names = ", ".join(map(str, architectures)) if isinstance(architectures, list) else repr(architectures)
        raise UserError(f"hf:{repo} is a {hf.get('model_type')} model ({names or 'no architecture'}); "
                        f"only Qwen2/Qwen2.5 checkpoints (model_type qwen2, Qwen2ForCausalLM: --model=gpt, mod or dtf) "
                        f"and Doge ones (model_type doge, DogeForCausalLM: --model=doge) can be loaded")
    if hf["model_type"] == "doge":
        return hf
    rope = rope_config(repo, hf)
    if rope.get("rope_type", rope.get("type", "default")) != "default" or hf.get("use_sliding_window"):
        raise UserError(f"hf:{repo} uses {rope.get('rope_type') or 'sliding-window attention'}; only plain RoPE "
                        f"with full attention (as Qwen2.5's base models) is supported")
    if not hf.get("tie_word_embeddings", False):
        raise UserError(f"hf:{repo} has a separate lm_head; our models tie it to the embedding, so only tied "
                        f"checkpoints load (Qwen2.5-0.5B, 1.5B and 3B are tied)")
    return hf


def rope_config(repo, hf):
    """RoPE's settings: transformers 4 writes them as rope_scaling, 5 as rope_parameters."""
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"hf:{repo}'s config.json: rope_scaling / rope_parameters is {rope!r:.40}, "
                        f"not an object; the checkpoint cannot be loaded as it is")
    return rope


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
    max_pos = hf.get("max_position_embeddings")
    max_pos = math.inf if max_pos is None else number(f"hf:{repo}'s config.json", "max_position_embeddings", max_pos)
    return checked_fields(f"hf:{repo}", {**common_fields(repo, hf), "qkv_bias": True}, overrides, dataset_vocab_size,
                          max_pos, "positions it was trained for")


def common_fields(repo, hf):
    """Our Config's shapes from the config.json fields Qwen2 and Doge share, each checked."""
    source = f"hf:{repo}'s config.json"
    n_embd = number(source, "hidden_size", hf.get("hidden_size"))
    n_head = number(source, "num_attention_heads", hf.get("num_attention_heads"))
    n_kv_head = number(source, "num_key_value_heads", hf.get("num_key_value_heads"), default=n_head)
    check_heads(source, n_embd, n_head, n_kv_head)
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise UserError(f"{source}: head_dim {hf['head_dim']} is not hidden_size / num_attention_heads = "
                        f"{n_embd // n_head}, which our attention assumes; the checkpoint cannot be loaded")
    theta = hf.get("rope_theta") or rope_config(repo, hf).get("rope_theta")  # (5 writes it in rope_parameters)
    return dict(vocab_size=number(source, "vocab_size", hf.get("vocab_size")),
                n_layer=number(source, "num_hidden_layers", hf.get("num_hidden_layers")),
                n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                intermediate_size=number(source, "intermediate_size", hf.get("intermediate_size")),
                rope_theta=number(source, "rope_theta", theta, float, default=1e4),
                norm_eps=number(source, "rms_norm_eps", hf.get("rms_norm_eps"), float, default=1e-6))


def layer_prefixes(model_name, n_layer):
    """Where Qwen layer i lives in our model's state_dict."""
    if model_name == "gpt":
        return [f"blocks.{i}." for i in range(n_layer)]
    if model_name == "mod":  # odd layers are MoDBlocks wrapping a Block (model_mod.MoD)
        return [f"blocks.{i}." if i % 2 == 0 else f"blocks.{i}.block." for i in range(n_layer)]
    if model_name == "dtf":  # pair p: decision block = layer 2p, dynamic block = layer 2p+1
        return [f"blocks.{i // 2}.{'decision' if i % 2 == 0 else 'dynamic'}." for i in range(n_layer)]
    raise UserError(f"pretrained Qwen2 weights load into gpt, mod or dtf, not {model_name}")


def map_tensors(tensors, prefixes, config, source):
    """{our name: tensor} from Qwen2's names. q, k, v are stacked in that order, as
    model_gpt.Attention splits qkv_proj's output (each checked against config's head counts first)."""
    out = {"wte.weight": tensors.pop("model.embed_tokens.weight"), "norm_f.weight": tensors.pop("model.norm.weight")}
    tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head too; it is wte
    head_size = config.n_embd // config.n_head
    rows = [config.n_head * head_size] + [config.n_kv_head * head_size] * 2
    for i, p in enumerate(prefixes):
        hf = f"model.layers.{i}."
        for part in ("weight", "bias"):
            names = [f"{hf}self_attn.{x}_proj.{part}" for x in "qkv"]
            out[f"{p}attn.qkv_proj.{part}"] = joined(source, {name: tensors.pop(name) for name in names},
                                                    [(n, config.n_embd) if part == "weight" else (n,) for n in rows])
        out[f"{p}attn.o_proj.weight"] = tensors.pop(f"{hf}self_attn.o_proj.weight")
        out[f"{p}attn_norm.weight"] = tensors.pop(f"{hf}input_layernorm.weight")
        out[f"{p}mlp_norm.weight"] = tensors.pop(f"{hf}post_attention_layernorm.weight")
        for x in ("gate", "up", "down"):
            out[f"{p}mlp.{x}_proj.weight"] = tensors.pop(f"{hf}mlp.{x}_proj.weight")
    if tensors:
        raise UserError(f"the checkpoint has tensors no Qwen2 model has (e.g. {next(iter(tensors))}); "
                        f"is it really Qwen2ForCausalLM?")
    return out


def hf_tensors(repo, model_name, config):
    """{our name: tensor} of hf:<repo>'s weights for our model `config` (memory-mapped: nothing is read
    until used), after checking them against config.json."""
    hf = read_config(repo)
    check_model(repo, hf, model_name)
    tensors = {}
    for path in fetch_weights(repo):
        tensors.update(read_safetensors(path))
    check_header(repo, tensors, config)
    try:
        if hf["model_type"] == "doge":
            return map_doge_tensors(tensors, config.n_layer, bool(hf.get("is_moe")))
        return map_tensors(tensors, layer_prefixes(model_name, config.n_layer), config, f"hf:{repo}")
    except KeyError as e:
        kind = "Doge" if hf["model_type"] == "doge" else "Qwen2"
        raise UserError(f"hf:{repo} lacks the tensor {e.args[0]}; the checkpoint is incomplete or not {kind}") from None


def load_weights(model, model_name, repo):
    """Copy every tensor of hf:<repo> into model (fp32 or whatever its parameters are); returns the
    kinds of our parameters and buffers the checkpoint does not provide (they keep their init)."""
    return kinds(copy_weights(model, hf_tensors(repo, model_name, model.config), f"hf:{repo}"))


# -----------------------------------------------------------------------------
# Doge: transformers' DogeForCausalLM config.json and tensor names -> model_doge

def doge_fields(repo, hf, overrides, dataset_vocab_size):
    """model_doge.Config fields for a Doge config.json. What model_doge.py does not compute is refused
    rather than approximated. Upcycling: a dense checkpoint with --is_moe=True (and optionally
    --n_experts, --n_experts_per_head, --balance_loss_weight) gets fresh routers and experts."""
    def refuse(what):
        raise UserError(f"hf:{repo} {what}, which model_doge.py does not implement; only transformers' "
                        f"DogeForCausalLM layout as SmallDoge's Doge-20M/60M/160M/320M use it can be loaded")

    source = f"hf:{repo}'s config.json"
    fields = common_fields(repo, hf)
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"uses the activation {hf['hidden_act']} (Doge's is silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        refuse("has linear biases (attention_bias or mlp_bias)")
    if hf.get("sliding_window") is not None:
        refuse("uses sliding-window attention")
    if hf.get("dynamic_mask_ratio") or hf.get("num_cdmoe_experts"):
        refuse("is in the older small-doge layout (dynamic_mask_ratio or num_cdmoe_experts)")
    if not hf.get("tie_word_embeddings", False):
        refuse("has a separate lm_head (our Doge ties it to the embedding)")
    rope = rope_config(repo, hf)
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "dynamic") or \
            rope.get("partial_rotary_factor", 1.0) != 1.0:
        refuse(f"uses {rope.get('rope_type') or rope.get('type')} RoPE scaling")
    # dynamic NTK scaling only rescales RoPE's base once a sequence is longer than max_position_embeddings;
    # up to that length it is plain RoPE, so a block_size within it is exact
    max_pos = number(source, "max_position_embeddings", hf.get("max_position_embeddings"), default=2048)
    if rope.get("original_max_position_embeddings"):
        max_pos = min(max_pos, number(source, "original_max_position_embeddings",
                                      rope["original_max_position_embeddings"]))
    if hf.get("is_moe") not in (None, False, True):
        raise UserError(f"{source}: is_moe = {hf['is_moe']!r:.40}, expected true or false")
    if hf.get("is_moe"):
        fields.update(is_moe=True, n_experts=number(source, "num_experts", hf.get("num_experts")),
                      n_experts_per_head=number(source, "num_experts_per_tok", hf.get("num_experts_per_tok")))
        if overrides.get("is_moe") is False:
            raise UserError(f"hf:{repo} is a CDMoE checkpoint; its experts need is_moe, so drop --is_moe=False")
        overrides = {k: v for k, v in overrides.items() if k != "is_moe"}
    checked = checked_fields(f"hf:{repo}", fields, overrides, dataset_vocab_size, max_pos,
                             "positions; beyond them its dynamic NTK RoPE scaling would apply, which model_doge.py "
                             "does not implement")
    return {"keep_window_size": number(source, "keep_window_size", hf.get("keep_window_size"), default=2048), **checked}


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
DAWN_LAYER_PARTS = {"norm1.weight": "attn_norm.weight", "norm1.bias": "attn_norm.bias",
                    "attn.expand_O.weight": "W_O.weight", "norm2.weight": "mlp_norm.weight", "norm2.bias": "mlp_norm.bias"}


def check_dawn_file(path):
    """--init_from=path names an existing file (train.py checks it before any data work)."""
    if not os.path.isfile(path):
        raise UserError(f"--init_from={path}: no such file; download dawn_39m_weights.pt from "
                        f"https://zenodo.org/records/18060421 (or use scratch, resume or hf:OWNER/NAME)")


def read_dawn_checkpoint(path):
    """(config, state_dict) of a reference DAWN checkpoint, loaded as data only (weights_only)."""
    check_dawn_file(path)
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

    fields = {field: number(f"{path}: config", key, reference(key, field)) for field, key in DAWN_RENAMED.items()}
    for field, (feature_key, restore_key) in DAWN_POOL_FIELDS.items():
        fields[field] = number(f"{path}: config", feature_key, reference(feature_key, field))
        restore = number(f"{path}: config", restore_key, reference(restore_key, field))
        if restore != fields[field]:
            raise UserError(f"{path}: {feature_key} = {fields[field]} but {restore_key} = {restore}; "
                            f"model_dawn.py gives a feature pool and its restore pool the same size and top-k")
    seen["n_qk+n_v"] = state["shared_neurons.f_neurons"].shape[0]
    fields["n_qk+n_v"] = fields["n_qk"] + fields["n_v"]
    for field, value in seen.items():
        if fields[field] != value:
            raise UserError(f"{path}: its config says {field} = {fields[field]}, its tensors {value}; the file is inconsistent")
    del fields["n_qk+n_v"]
    max_positions = fields.pop("block_size")  # wpe's rows: our block_size may be shorter
    checked = checked_fields(path, fields, overrides, dataset_vocab_size, max_positions, "learned positions")
    defaults = {key: config.get(key, preset[key]) for key in ("dropout", "router_dropout")}
    for key, p in defaults.items():
        if type(p) not in (int, float) or not 0 <= p < 1:
            raise UserError(f"{path}: config {key} = {p!r:.40}, expected a number in [0, 1)")
        defaults[key] = float(p)
    return {**defaults, **checked}


def map_dawn_tensors(state, config, source):
    """{our name: tensor} from the reference's names (see the section comment)."""
    n_qk, n_layer, s, d = config.n_qk, config.n_layer, config.d_space, config.n_embd
    state = dict(state)
    neurons, router = "shared_neurons.", "router.neuron_router."
    f_neurons, r_neurons = state.pop(neurons + "f_neurons"), state.pop(neurons + "r_neurons")
    out = {"wte.weight": state.pop("token_emb.weight"), "wpe.weight": state.pop("pos_emb.weight"),
           "F_qk": f_neurons[:n_qk], "F_v": f_neurons[n_qk:], "R_qk": r_neurons[:n_qk], "R_v": r_neurons[n_qk:],
           "F_kn": state.pop(neurons + "feature_know"), "R_kn": state.pop(neurons + "restore_know"),
           "neuron_emb": state.pop(router + "neuron_emb"),
           "norm_f.weight": state.pop("norm.weight"), "norm_f.bias": state.pop("norm.bias")}
    for part in ("weight", "bias"):  # proj_all's six attention queries, then the two knowledge queries
        names = [f"{router}{p}.{part}" for p in ("proj_all", "proj_feature_know", "proj_restore_know")]
        out[f"router.{part}"] = joined(source, {name: state.pop(name) for name in names},
                                       [(n, d) if part == "weight" else (n,) for n in (6 * s, s, s)])
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
        mapped = map_dawn_tensors(state, c, path)
    except KeyError as e:
        raise UserError(f"{path} lacks the tensor {e.args[0]}; the checkpoint is incomplete or not DAWN v17.1") from None
    mapped["wpe.weight"] = mapped["wpe.weight"][:c.block_size]
    missing = copy_weights(model, mapped, path)
    if missing:  # model_dawn.py grew a parameter this mapping does not know
        raise UserError(f"the checkpoint provides no {sorted(missing)[0]} for model_dawn.py")
