"""
Time this repo's models against the original implementations in one process (a benchmark, not a test).

    python bench_originals.py --originals=../originals                 # every original found there
    python bench_originals.py --originals=../originals --models=gpt,bdh --rounds=31
    python bench_originals.py --originals=../originals --compile=True   # both models of each pair compiled
    python bench_originals.py --decode=True --rounds=5                  # greedy decoding vs transformers' generate

The originals are not dependencies of this repo: clone the ones you want into --originals, a folder
each, under these names (the files read from each are in brackets):

    nanoGPT/  https://github.com/karpathy/nanoGPT   (model.py: GPT, GPTConfig)
    bdh/      https://github.com/pathwaycom/bdh     (bdh.py: BDH, BDHConfig)
    DAWN/     https://github.com/madst0614/DAWN     (models/model_v17_1.py: DAWN, per-token routing)
    Dynamic-Transformers/  https://github.com/fredericowieser/Dynamic-Transformers at commit 41cdd9c
              (git checkout 41cdd9c; src/models/mod and src/models/dtf: MoDForCausalLM, DTFForCausalLM;
              they need transformers 4.x, 4.54.1 works, and omegaconf)

and Hugging Face's DogeForCausalLM is timed when `transformers` (5.x) is installed. Missing ones are
skipped with a line saying so (MoD and DTF need transformers 4, Doge 5: two environments).

Each pair is built at this repo's laptop config (vocab 65, block 64, 4 layers, width 128, dropout 0)
with the original's matching options, and one training step is the same for both: forward with
targets, the cross-entropy loss (plus, for DAWN, the auxiliary losses its training script adds, with
the same weights as ours; for MoD, the router losses its forward adds; for DTF, its prior's loss at
our weight), backward, gradient clipping to 1.0 and a plain torch.optim.AdamW step, on
the same batch of random tokens (batch 12 x 64). Steps alternate, one of ours and one of the
original's, so that a slow moment of the machine hits both; after the warm-up steps the median of
each is printed with the speed-up (the original's ms / ours). Run it on an otherwise idle machine.

--decode=True times greedy decoding against the tool users would otherwise pick for a Qwen2 or Doge
checkpoint, Hugging Face transformers' generate (pip install transformers; 5.x has both models). For
each of --shapes, transformers' Qwen2ForCausalLM or DogeForCausalLM is built with random weights and
saved as a checkpoint, and pretrained.py loads it into our GPT or Doge as `train.py --init_from=hf:`
would, so both hold the same weights. Both then decode the same random 16-token prompt plus
--new_tokens, at each of --batch_sizes: ours with sample.py's generate (top_k=1), theirs with
model.generate(do_sample=False), alternating call by call for --rounds rounds after a warm-up; the
median tokens/s of each (prompt included in the time), their ratio, and whether they produced the
same tokens (or the first generated position where they differ: fp32 ties could in principle differ).
"""
import dataclasses
import importlib.util
import os
import shutil
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import model_doge
import model_gpt
from cli import UserError, parse_options
from model_bdh import BDH
from model_bdh import Config as BDHOursConfig
from model_dawn import DAWN
from model_dawn import Config as DAWNOursConfig
from model_doge import Config as DogeOursConfig
from model_doge import Doge
from model_dtf import DTF
from model_dtf import Config as DTFOursConfig
from model_gpt import GPT
from model_gpt import Config as GPTOursConfig
from model_mod import MoD
from model_mod import Config as MoDOursConfig
from sample import generate


@dataclasses.dataclass
class BenchOriginalsConfig:
    originals: str = "../originals"  # a folder holding nanoGPT/, bdh/, DAWN/, Dynamic-Transformers/ as cloned
    models: str = "gpt,bdh,dawn,doge,mod,dtf"  # comma-separated; the first column of the table
    batch_size: int = 12
    warmup: int = 3              # steps of each before the timed ones
    rounds: int = 21             # timed steps of each, alternating
    compile: bool = False        # torch.compile both models of each pair (the warm-up steps compile)
    decode: bool = False         # time greedy decoding against transformers' generate instead (below)
    shapes: str = "laptop,doge-20m,qwen2.5-0.5b"  # --decode: comma-separated names of DECODE_SHAPES
    batch_sizes: str = "1,8"     # --decode: the batch sizes each shape is decoded at
    new_tokens: int = 256        # --decode: tokens generated after the 16-token prompt


def load_file(path, name):
    """Import one .py file of an original as a module, with its folder on sys.path for its imports."""
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Each builder returns (ours, theirs, loss_of_theirs), or a string saying why the original is missing.
# loss_of_theirs(model, x, y) is the training loss the original's own training code optimises.

def gpt_pair(root):
    path = os.path.join(root, "nanoGPT", "model.py")
    if not os.path.exists(path):
        return f"{path} not found (git clone https://github.com/karpathy/nanoGPT)"
    ng = load_file(path, "nanogpt_model")
    c = GPTOursConfig()
    theirs = ng.GPT(ng.GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                 n_head=c.n_head, n_embd=c.n_embd, dropout=0.0, bias=False))
    return GPT(dataclasses.replace(c, dropout=0.0)), theirs, lambda m, x, y: m(x, y)[1]


def bdh_pair(root):
    path = os.path.join(root, "bdh", "bdh.py")
    if not os.path.exists(path):
        return f"{path} not found (git clone https://github.com/pathwaycom/bdh)"
    ref = load_file(path, "bdh_reference")
    c = BDHOursConfig(dropout=0.0)
    theirs = ref.BDH(ref.BDHConfig(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head, dropout=0.0,
                                   mlp_internal_dim_multiplier=c.mlp_internal_dim_multiplier,
                                   vocab_size=c.vocab_size))
    return BDH(c), theirs, lambda m, x, y: m(x, y)[1]


def dawn_pair(root):
    path = os.path.join(root, "DAWN", "models", "model_v17_1.py")
    if not os.path.exists(path):
        return f"{path} not found (git clone https://github.com/madst0614/DAWN)"
    ref = load_file(path, "dawn_reference")
    c = DAWNOursConfig()
    theirs = ref.DAWN(vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
                      rank=c.rank, knowledge_rank=c.knowledge_rank, max_seq_len=c.block_size, d_space=c.d_space,
                      n_feature_qk=c.n_qk, n_restore_qk=c.n_qk, n_feature_v=c.n_v, n_restore_v=c.n_v,
                      n_feature_know=c.n_know, n_restore_know=c.n_know,
                      top_k_feature_qk=c.top_k_qk, top_k_restore_qk=c.top_k_qk, top_k_feature_v=c.top_k_v,
                      top_k_restore_v=c.top_k_v, top_k_feature_know=c.top_k_know,
                      top_k_restore_know=c.top_k_know, dropout=0.0, use_ssm_context=False,
                      attention_token_routing=True, knowledge_token_routing=True)

    def loss(m, x, y):  # its forward shifts the labels itself (labels = the input, as its train script)
        ce = m(x, labels=x)[0]
        return (ce + c.lb_loss_weight * m.aux_loss + c.orth_loss_weight * m.orthogonality_loss()
                + c.div_loss_weight * m.knowledge_diversity_loss())
    return DAWN(c), theirs, loss


def doge_pair(root):
    try:
        from transformers import DogeConfig, DogeForCausalLM
    except ImportError:
        return "transformers (5.x, with DogeForCausalLM) is not installed"
    c = DogeOursConfig()
    theirs = DogeForCausalLM(DogeConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
        max_position_embeddings=c.block_size, keep_window_size=c.keep_window_size, rope_theta=c.rope_theta,
        rms_norm_eps=c.norm_eps, tie_word_embeddings=True, attention_dropout=0.0, hidden_dropout=0.0,
        is_moe=False, attn_implementation="sdpa"))
    return Doge(c), theirs, lambda m, x, y: F.cross_entropy(m(input_ids=x).logits.flatten(0, 1), y.flatten())


def dynamic_transformers(root, kind, c, **options):
    """The Dynamic-Transformers repository's MoDForCausalLM or DTFForCausalLM (commit 41cdd9c) at our
    Qwen-style config c plus its own options, or a string saying why it cannot be built here."""
    repo = os.path.join(root, "Dynamic-Transformers")
    if not os.path.exists(os.path.join(repo, "src", "models", "dtf", "model.py")):
        return (f"{repo}/src/models/dtf/model.py not found (git clone https://github.com/fredericowieser/"
                f"Dynamic-Transformers, then git checkout 41cdd9c in it)")
    sys.path.insert(0, repo)
    try:
        from transformers import Qwen2Config
        from src.models import DTFForCausalLM, MoDForCausalLM
    except Exception as e:  # ImportError, or transformers 5, whose Qwen2 pieces it cannot build on
        return f"its models do not import here ({e.__class__.__name__}: {str(e)[:80]}); they need transformers 4.x and omegaconf"
    q = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                    num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                    max_position_embeddings=c.block_size, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                    tie_word_embeddings=True, attention_dropout=0.0, use_cache=False, **options)
    q._attn_implementation = "sdpa"  # what its training script picks without flash-attention
    return {"mod": MoDForCausalLM, "dtf": DTFForCausalLM}[kind](q)


def mod_pair(root):
    c = MoDOursConfig()
    theirs = dynamic_transformers(root, "mod", c, mod_capacity=c.mod_capacity, mod_aux_loss_weight=0.01,
                                  causal_loss_weight=0.01)
    if isinstance(theirs, str):
        return theirs
    # its forward shifts the labels itself and adds its routers' auxiliary losses to "loss"
    return MoD(c), theirs, lambda m, x, y: m(input_ids=x, labels=x)["loss"]


def dtf_pair(root):
    c = DTFOursConfig()
    theirs = dynamic_transformers(
        root, "dtf", c, dtf_capacity=c.dtf_capacity, prior_loss_weight=c.prior_loss_weight, causal_loss_weight=0.01,
        beta_ce_init=c.beta_ce_init, beta_cu_init=c.beta_cu_init, cu_detection_multiplier_init=c.m_cu_init,
        ce_criterion_offset_init=c.o_ce_init, prior_ffn_intermediate_size_factor=c.prior_ffn_factor,
        ma_window=c.ma_window)
    if isinstance(theirs, str):
        return theirs

    def loss(m, x, y):  # "loss" is the LM loss alone here; the prior's loss is added as ours adds it
        out = m(input_ids=x, labels=x)
        return out["loss"] + c.prior_loss_weight * out["prior_loss"]
    return DTF(c), theirs, loss


PAIRS = {"gpt": gpt_pair, "bdh": bdh_pair, "dawn": dawn_pair, "doge": doge_pair, "mod": mod_pair, "dtf": dtf_pair}
ORIGINALS = {"gpt": "nanoGPT's GPT", "bdh": "pathwaycom/bdh", "dawn": "DAWN v17.1, per-token routing",
             "doge": "transformers DogeForCausalLM, sdpa", "mod": "Dynamic-Transformers MoD, 41cdd9c",
             "dtf": "Dynamic-Transformers DTF, 41cdd9c"}  # the second column of the table


def train_step(model, optimizer, loss_of, x, y):
    loss = loss_of(model, x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# --decode=True: greedy decoding, ours against Hugging Face transformers' generate on the same weights

# shape: (our model, our Config fields at that shape); transformers' model is the architecture
# pretrained.py loads into it (gpt: Qwen2ForCausalLM, doge: DogeForCausalLM) at the same shape
DECODE_SHAPES = {
    "laptop": ("gpt", {}),  # model_gpt.Config's defaults: vocab 65, width 128, 4 layers
    "doge-20m": ("doge", {**model_doge.PRESETS["doge-20m"], "vocab_size": 32768}),
    "qwen2.5-0.5b": ("gpt", {**model_gpt.PRESETS["qwen2.5-0.5b"], "vocab_size": 151936}),
}
PROMPT = 16


def hf_model(name, positions):
    """transformers' model of the shape `name` with random weights, and our model name. Its 1-D
    parameters (norm gains, Doge's residual scales and A, Qwen2's q/k/v biases) start at 1 or 0, so
    they are perturbed: the tokens check must see that every one of them is carried over."""
    from transformers import DogeConfig, DogeForCausalLM, Qwen2Config, Qwen2ForCausalLM
    model, fields = DECODE_SHAPES[name]
    c = dataclasses.replace({"gpt": GPTOursConfig, "doge": DogeOursConfig}[model](), **fields)
    common = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                  max_position_embeddings=max(c.block_size, positions), rope_theta=c.rope_theta,
                  rms_norm_eps=c.norm_eps, tie_word_embeddings=True, eos_token_id=None)
    if model == "doge":
        theirs = DogeForCausalLM(DogeConfig(**common, keep_window_size=c.keep_window_size, is_moe=False))
    else:
        theirs = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return theirs.eval(), model


def load_as_users_do(theirs, model, repo, positions):
    """Our model with theirs's weights, through pretrained.py as `train.py --init_from=hf:<repo>` loads
    them: theirs is saved as transformers saves a checkpoint into the hub cache, as a download leaves it
    (each file with its recorded sha256), so pretrained.py reads config.json and the safetensors there."""
    import pretrained
    from checkpoint import load_model_module
    from hub import cache_dir, record_sha256
    folder = cache_dir(repo)
    theirs.save_pretrained(folder)
    for f in os.listdir(folder):
        record_sha256(os.path.join(folder, f))
    module = load_model_module(model)
    fields = pretrained.model_fields(repo, {"block_size": positions}, 0, model)
    ours = module.Model(module.Config(**fields))
    fresh = pretrained.load_weights(ours, model, repo)
    if fresh:
        raise RuntimeError(f"{repo}: {fresh} not loaded")
    return ours.eval()


def decode_ours(model, prompt, n):
    return generate(model, prompt, n, top_k=1)  # sample.py's sampler: greedy at top_k=1


def decode_theirs(model, prompt, n):
    return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                          pad_token_id=0)


def first_difference(a, b):
    """'identical', or the first generated position where the two batches of tokens differ."""
    if a.shape == b.shape and torch.equal(a, b):
        return "identical"
    n = min(a.size(1), b.size(1))
    differs = (a[:, :n] != b[:, :n]).any(0).nonzero()
    return f"differ from token {int(differs[0]) - PROMPT if len(differs) else n - PROMPT}"


def bench_decode(opts):
    try:
        import transformers
    except ImportError:
        raise UserError("--decode=True needs Hugging Face transformers (5.x, with Qwen2ForCausalLM and "
                        "DogeForCausalLM): pip install transformers") from None
    import tempfile
    shapes, batch_sizes = opts.shapes.split(","), [int(b) for b in opts.batch_sizes.split(",")]
    for name in shapes:
        if name not in DECODE_SHAPES:
            raise UserError(f"--shapes: no shape {name!r}; choose from {', '.join(DECODE_SHAPES)}")
    n, positions = opts.new_tokens, PROMPT + opts.new_tokens
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"greedy, {PROMPT}-token random prompt + {n} new tokens, fp32, ours (sample.py generate, top_k=1) vs "
          f"model.generate(do_sample=False), alternating, {opts.rounds} rounds after a warm-up, median")
    print("| shape | params | batch | ours tok/s | transformers tok/s | ours / transformers | tokens |")
    print("|---|---:|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DYNLM_CACHE"] = tmp  # hub.py's cache: the checkpoints below are written there
        for name in shapes:
            torch.manual_seed(0)
            theirs, model = hf_model(name, positions)
            ours = load_as_users_do(theirs, model, f"bench/{name}", positions)
            runs = {"ours": (ours, decode_ours), "theirs": (theirs, decode_theirs)}
            g = torch.Generator().manual_seed(0)
            prompts = {b: torch.randint(0, ours.config.vocab_size, (b, PROMPT), generator=g) for b in batch_sizes}
            for b in batch_sizes:  # warm-up: first calls allocate and pick kernels
                for model_, decode in runs.values():
                    decode(model_, prompts[b], 4)
            times = {(b, k): [] for b in batch_sizes for k in runs}
            same = {}
            for _ in range(opts.rounds):
                for b in batch_sizes:
                    out = {}
                    for k, (model_, decode) in runs.items():
                        t0 = time.perf_counter()
                        out[k] = decode(model_, prompts[b], n)
                        times[b, k].append(time.perf_counter() - t0)
                    same[b] = first_difference(out["ours"], out["theirs"])
            params = sum(p.numel() for p in ours.parameters())
            for b in batch_sizes:
                tok_s = {k: b * n / statistics.median(times[b, k]) for k in runs}
                ours_s, theirs_s = (f"{tok_s[k]:,.0f}" if tok_s[k] >= 100 else f"{tok_s[k]:.3g}" for k in runs)
                print(f"| {name} | {params / 1e6:.1f}M | {b} | {ours_s} | {theirs_s} | "
                      f"{tok_s['ours'] / tok_s['theirs']:.2f}x | {same[b]} |", flush=True)
            del theirs, ours, runs
            shutil.rmtree(os.path.join(tmp, "hf"))


def main(argv):
    opts, = parse_options(argv, BenchOriginalsConfig(), doc=__doc__)
    if opts.decode:
        return bench_decode(opts)
    names = opts.models.split(",")
    for name in names:
        if name not in PAIRS:
            raise UserError(f"--models: no original is known for {name!r}; choose from {', '.join(PAIRS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {opts.batch_size} x 64, "
          f"fwd+bwd+clip+AdamW{', both compiled' if opts.compile else ''}, {opts.rounds} alternating steps each after {opts.warmup} warm-up, median")
    print("| model | original | params (ours / theirs) | ours ms/step | original ms/step | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for name in names:
        torch.manual_seed(0)
        pair = PAIRS[name](opts.originals)
        if isinstance(pair, str):
            print(f"| {name} | skipped: {pair} | | | | |")
            continue
        ours, theirs, their_loss = pair
        runs = {"ours": (ours, lambda m, x, y: m(x, y)[1]), "theirs": (theirs, their_loss)}
        optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, (m, _) in runs.items()}
        if opts.compile:  # a compiled module shares the parameters (and attributes) of the eager one
            runs = {k: (torch.compile(m), loss_of) for k, (m, loss_of) in runs.items()}
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 65, (opts.batch_size, 64), generator=g)
        y = torch.randint(0, 65, (opts.batch_size, 64), generator=g)
        times = {k: [] for k in runs}
        for step in range(opts.warmup + opts.rounds):
            for k, (model, loss_of) in runs.items():
                model.train()
                t0 = time.perf_counter()
                train_step(model, optimizers[k], loss_of, x, y)
                if step >= opts.warmup:
                    times[k].append(time.perf_counter() - t0)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        params = [sum(p.numel() for p in m.parameters()) for m, _ in runs.values()]
        print(f"| {name} | {ORIGINALS[name]} | "
              f"{params[0]:,} / {params[1]:,} | {ms['ours']:.1f} | {ms['theirs']:.1f} | "
              f"{ms['theirs'] / ms['ours']:.2f}x |")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"bench_originals.py: error: {e}")
