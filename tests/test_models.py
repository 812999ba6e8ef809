"""The contract every model_*.py at the top level keeps (Config, PRESETS, Model with forward,
stats, flops_per_token, init_cache and forward_cached), checked for each of them.

Adding a model file adds it to every test here: causality in eval and training mode, batch
independence, eval determinism, loss at init, learning, the import rule and the marked copies.
"""
import ast
import copy
import dataclasses
import importlib
import math
import os

import pytest
import torch

from conftest import MODEL_NAMES, ROOT, build, decode, tokens


def trained_a_little(name, steps=3):
    """A model after a few AdamW steps on random tokens: weights off their init and, for routed
    models, routing thresholds set by training forwards, so that some tokens are routed."""
    model = build(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    V, T = model.config.vocab_size, model.config.block_size
    model.train()
    for _ in range(steps):
        x = torch.randint(0, V, (8, T), generator=g)
        _, loss = model(x, torch.roll(x, -1, dims=1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def random_tokens(model, B, seed=2):
    return tokens(B, model.config.block_size, seed, model.config.vocab_size)


def logits_of(model, x, state, train):
    """Logits of one forward starting from `state`: a training forward may move running buffers
    (routing thresholds), so every compared forward starts from the same state."""
    model.load_state_dict(state)
    model.train(train)
    with torch.no_grad():
        return model(x)[0]


@pytest.fixture(scope="module", params=MODEL_NAMES)
def warm_model(request):
    return request.param, trained_a_little(request.param)


def test_there_are_models():
    """The glob finds the model files (a wrong ROOT or pattern would make every test here vacuous),
    and every model but the baseline has its own test file."""
    assert {"gpt", "mod", "dtf", "doge", "dawn", "bdh"} <= set(MODEL_NAMES), MODEL_NAMES
    for name in MODEL_NAMES:
        assert name == "gpt" or os.path.exists(os.path.join(ROOT, "tests", f"test_{name}.py")), name


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_interface(name):
    module = importlib.import_module(f"model_{name}")
    assert dataclasses.is_dataclass(module.Config)
    config = module.Config()  # every field has a default: the laptop config
    for field in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "dropout"):
        assert hasattr(config, field), field
    assert isinstance(module.PRESETS, dict) and module.PRESETS
    for preset, fields in module.PRESETS.items():
        unknown = set(fields) - {f.name for f in dataclasses.fields(module.Config)}
        assert not unknown, f"preset {preset} sets unknown fields {unknown}"
        with torch.device("meta"):  # build the paper-size model without allocating it
            module.Model(dataclasses.replace(config, **fields))
    model = build(name)
    x = random_tokens(model, 2)
    logits, loss = model(x)
    assert logits.shape == (2, config.block_size, config.vocab_size) and loss is None
    logits, loss = model(x, x)
    assert loss.dim() == 0 and torch.isfinite(loss)
    stats = model.stats()
    assert isinstance(stats, dict) and all(isinstance(v, float) for v in stats.values()), stats
    assert model.flops_per_token() > 0


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_causal(warm_model, train):
    name, model = warm_model
    state = copy.deepcopy(model.state_dict())
    x = random_tokens(model, 3)
    T = x.size(1)
    for p in (1, T // 3, T - 1):
        x2 = x.clone()
        x2[:, p:] = (x2[:, p:] + 1 + torch.arange(T - p)) % model.config.vocab_size
        a, b = logits_of(model, x, state, train), logits_of(model, x2, state, train)
        assert torch.equal(a[:, :p], b[:, :p]), f"{name}: logits before {p} depend on later tokens"
        assert not torch.equal(a[:, p:], b[:, p:]), "the changed tokens changed nothing: the test is blind"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_independent(warm_model, train):
    name, model = warm_model
    state = copy.deepcopy(model.state_dict())
    x = random_tokens(model, 4)
    x2 = x.clone()
    x2[1:] = random_tokens(model, 3, seed=3)
    a, b = logits_of(model, x, state, train), logits_of(model, x2, state, train)
    assert torch.equal(a[0], b[0]), f"{name}: a row's logits depend on the other rows"
    assert not torch.equal(a[1:], b[1:])


def test_eval_deterministic_and_stateless(warm_model):
    name, model = warm_model
    state = copy.deepcopy(model.state_dict())
    x = random_tokens(model, 2)
    model.eval()
    with torch.no_grad():
        a, b = model(x)[0], model(x)[0]
    assert torch.equal(a, b)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "an eval forward changed the model's state"


def test_prefix_forward_equals_full_forward(warm_model):
    """What a sampler computes (the prefix up to t) equals the full-window eval logits at t."""
    name, model = warm_model
    model.eval()
    x = random_tokens(model, 2)
    with torch.no_grad():
        full = model(x)[0]
        for t in (0, 5, x.size(1) // 2):
            prefix = model(x[:, :t + 1])[0]
            torch.testing.assert_close(prefix[:, -1], full[:, t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_at_init_is_log_vocab(name):
    model = build(name).eval()
    x = random_tokens(model, 8)
    with torch.no_grad():
        _, loss = model(x, torch.roll(x, -1, dims=1))
    assert abs(loss.item() - math.log(model.config.vocab_size)) < 0.25, loss.item()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_overfits_one_batch(name):
    model = build(name)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, model.config.vocab_size, (4, 33), generator=g)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(60):  # every model is at 0.02 or below by step 50 (GPT, the slowest; 2026-12-06)
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        _, loss = model(x, y)
    assert loss.item() < 0.1, f"{name} did not learn one batch: eval loss {loss.item():.3f}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward_under_bf16_autocast(name):
    model = build(name).train()
    x = random_tokens(model, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_gpt_flops_per_token_counts_its_matmuls():
    """GPT's flops_per_token (nanoGPT's 6 * parameters + 12 * L * d * T) against PyTorch's FLOP
    counter on one forward+backward of block_size tokens. The math SDPA backend runs attention as
    matmuls the counter sees (the fused CPU kernel has no FLOP formula). What the two count
    differently, exactly: the formula charges 6 FLOPs per token to the norm gains and q/k/v biases,
    which multiply no matrix; the counter counts every matmul, and attention over the full T x T
    square (the causal half is masked, not skipped) in both."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = build("gpt")
    T = model.config.block_size
    x = random_tokens(model, 1)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    not_matmuls = sum(p.numel() for name, p in model.named_parameters() if "norm" in name or name.endswith("bias"))
    assert not_matmuls == 4 * (2 * 128 + (4 + 2 * 2) * 32) + 128
    assert counter.get_total_flops() == T * (model.flops_per_token() - 6 * not_matmuls)


# --- the single-file rules -------------------------------------------------------------------

def parse(name):
    with open(os.path.join(ROOT, f"model_{name}.py")) as f:
        source = f.read()
    return source, ast.parse(source)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_imports_only_torch(name):
    _, tree = parse(name)
    allowed = {"torch", "math", "dataclasses", "typing"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots = {(node.module or "").split(".")[0]}
        else:
            continue
        assert roots <= allowed, f"model_{name}.py imports {roots - allowed}"


MARKER = "# Copied from model_"


def definitions(name):
    """{qualified name: AST node} for the classes, functions and methods of a model file
    ("RMSNorm", "GPT._init_weights"), and the file's source."""
    source, tree = parse(name)
    found = {}

    def visit(nodes, prefix):
        for node in nodes:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                found[prefix + node.name] = node
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return source, found


def copies(name):
    """{qualified name: (source file, source qualified name)} for every '# Copied from' marker: the
    marker sits on the line just above a class, a function or a method (or its decorators)."""
    source, defs = definitions(name)
    by_line = {min([node.lineno] + [d.lineno for d in node.decorator_list]): q for q, node in defs.items()}
    found = {}
    for i, line in enumerate(source.splitlines()):
        if line.strip().startswith(MARKER):
            other, _, source_name = line.strip()[len(MARKER):].split()[0].partition(".")
            copied = by_line.get(i + 2)
            assert copied is not None, f"model_{name}.py line {i + 1}: marker not directly above a def/class"
            found[copied] = (other, source_name)
    return found


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_marked_copies_are_identical(name):
    source, defs = definitions(name)
    for copied, (other, source_name) in copies(name).items():
        other_source, other_defs = definitions(other)
        assert source_name in other_defs, f"model_{other}.py has no {source_name}"
        mine, theirs = defs[copied], other_defs[source_name]
        text = ast.get_source_segment(source, mine)
        kind = "class" if isinstance(mine, ast.ClassDef) else "def"
        text = text.replace(f"{kind} {mine.name}", f"{kind} {theirs.name}", 1)
        assert text == ast.get_source_segment(other_source, theirs), \
            f"model_{name}.{copied} differs from model_{other}.{source_name}, which it is marked as copied from"


ADAPTED = "# Adapted from model_"


def adaptations(name):
    """[(line, source file, source qualified name)] for every '# Adapted from model_gpt.GPT.forward: ...'
    marker: a comment, maybe continued on further comment lines, directly above a class, a function or
    a method (or its decorators) that follows the named definition with the changes it lists."""
    source, defs = definitions(name)
    starts = {min([node.lineno] + [d.lineno for d in node.decorator_list]) for node in defs.values()}
    lines = source.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip().startswith(ADAPTED):
            other, _, source_name = line.strip()[len(ADAPTED):].split()[0].rstrip(":").partition(".")
            end = i + 1
            while end < len(lines) and lines[end].strip().startswith("#"):
                end += 1
            assert end + 1 in starts, f"model_{name}.py line {i + 1}: marker not directly above a def/class"
            found.append((i + 1, other, source_name))
    return found


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_adapted_markers_name_existing_definitions(name):
    """An 'Adapted from' marker cannot rot: the definition it names exists in the file it names."""
    for line, other, source_name in adaptations(name):
        where = f"model_{name}.py line {line}"
        assert os.path.exists(os.path.join(ROOT, f"model_{other}.py")), f"{where}: there is no model_{other}.py"
        assert source_name in definitions(other)[1], f"{where}: model_{other}.py has no {source_name}"


def origin(name, qualname):
    """Where a definition's text comes from: itself, or (following markers on it or on a class
    around it) the definition it was copied from."""
    marked = copies(name)
    parts = qualname.split(".")
    for i in range(len(parts), 0, -1):
        outer = ".".join(parts[:i])
        if outer in marked:
            other, source_name = marked[outer]
            return origin(other, ".".join([source_name] + parts[i:]))
    return name, qualname


def body_key(node):
    """The function's body as AST (docstring and comments left out) and how many statements it has."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    n_statements = sum(isinstance(n, ast.stmt) for s in body for n in ast.walk(s))
    return "\n".join(ast.dump(s) for s in body), n_statements


def test_identical_bodies_are_marked_copies():
    """A function or method of 3+ statements whose body (ignoring docstrings) is identical to one in
    another model file must be a marked copy of it (or both copies of the same third one): otherwise
    an edit of one silently leaves the other behind."""
    seen = {}  # body -> [(file, qualified name)]
    for name in MODEL_NAMES:
        for qualname, node in definitions(name)[1].items():
            if isinstance(node, ast.FunctionDef):
                key, n_statements = body_key(node)
                if n_statements >= 3:
                    seen.setdefault(key, []).append((name, qualname))
    unmarked = []
    for places in seen.values():
        origins = {origin(name, qualname) for name, qualname in places}
        if len(origins) > 1 and len({name for name, _ in places}) > 1:
            unmarked.append(", ".join(f"model_{n}.{q}" for n, q in places))
    assert not unmarked, (f"identical bodies not marked as copies of one another (mark the copies "
                          f"'{MARKER}X.Name' or factor them out): " + "; ".join(unmarked))


def fake_root(tmp_path, monkeypatch, fake_source):
    """A model directory holding model_gpt.py and model_fake.py = fake_source, for the tests of the
    copy checks."""
    import conftest
    with open(os.path.join(ROOT, "model_gpt.py")) as f:
        (tmp_path / "model_gpt.py").write_text(f.read())
    (tmp_path / "model_fake.py").write_text(fake_source)
    monkeypatch.setattr(conftest, "ROOT", str(tmp_path))
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    monkeypatch.setitem(globals(), "MODEL_NAMES", ["fake", "gpt"])


def gpt_text(qualname):
    source, defs = definitions("gpt")
    return ast.get_source_segment(source, defs[qualname])


def test_copy_check_can_fail(tmp_path, monkeypatch):
    """The copy test compares text: an edited copy must be caught, for a class and for a method."""
    rmsnorm = gpt_text("RMSNorm")
    fake_root(tmp_path, monkeypatch,
              "import torch\n\n\n# Copied from model_gpt.RMSNorm\n" + rmsnorm.replace("x.float()", "x.double()") + "\n")
    with pytest.raises(AssertionError, match="differs"):
        test_marked_copies_are_identical("fake")
    init = gpt_text("GPT._init_weights").replace("mean=0.0", "mean=0.1")
    fake_root(tmp_path, monkeypatch,
              f"class Fake:\n    # Copied from model_gpt.GPT._init_weights\n    {init}\n")
    with pytest.raises(AssertionError, match=r"model_fake.Fake._init_weights differs from model_gpt.GPT._init_weights"):
        test_marked_copies_are_identical("fake")


def test_unmarked_copy_check_can_fail(tmp_path, monkeypatch):
    """An unmarked method identical to GPT's must be caught, naming both places; marked, it passes."""
    init = gpt_text("GPT._init_weights")
    fake_root(tmp_path, monkeypatch, f"class Fake:\n    {init}\n")
    with pytest.raises(AssertionError, match=r"model_fake.Fake._init_weights, model_gpt.GPT._init_weights"):
        test_identical_bodies_are_marked_copies()
    fake_root(tmp_path, monkeypatch, f"class Fake:\n    # Copied from model_gpt.GPT._init_weights\n    {init}\n")
    test_identical_bodies_are_marked_copies()
    test_marked_copies_are_identical("fake")


def test_adapted_marker_check_can_fail(tmp_path, monkeypatch):
    """The model files have markers to check, and a marker naming a definition that does not exist
    (a renamed method), or one that stands above no definition, is caught."""
    assert sum(len(adaptations(name)) for name in MODEL_NAMES) >= 10
    forward = "    def forward(self, idx):\n        return idx\n"
    fake_root(tmp_path, monkeypatch, f"class Fake:\n    # Adapted from model_gpt.GPT.forward: no blocks\n{forward}")
    test_adapted_markers_name_existing_definitions("fake")
    fake_root(tmp_path, monkeypatch, f"class Fake:\n    # Adapted from model_gpt.GPT.fwd: no blocks,\n"
                                     f"    # and a second line\n{forward}")
    with pytest.raises(AssertionError, match="model_fake.py line 2: model_gpt.py has no GPT.fwd"):
        test_adapted_markers_name_existing_definitions("fake")
    fake_root(tmp_path, monkeypatch, f"class Fake:\n    # Adapted from model_gpt.GPT.forward: no blocks\n\n{forward}")
    with pytest.raises(AssertionError, match="line 2: marker not directly above a def/class"):
        test_adapted_markers_name_existing_definitions("fake")
    fake_root(tmp_path, monkeypatch, "# Adapted from model_bert.Bert: its pooler\ndef bert(idx):\n    return idx\n")
    with pytest.raises(AssertionError, match="line 1: there is no model_bert.py"):
        test_adapted_markers_name_existing_definitions("fake")


# --- incremental decoding: init_cache / forward_cached ---------------------------------------

@pytest.mark.parametrize("B", [1, 3])
def test_cached_decoding_equals_full_forward(warm_model, B):
    """A prompt, then one token at a time (and a chunk of several in the middle), up to block_size:
    every position's logits equal the full eval forward's, for one row and for different rows."""
    name, model = warm_model
    state = copy.deepcopy(model.state_dict())
    model.eval()
    x = random_tokens(model, B, seed=5)
    T = x.size(1)
    with torch.no_grad():
        full = model(x)[0]
    chunks = [5] + [1] * (T // 2 - 5) + [7] + [1] * (T - T // 2 - 7)
    for chunks in (chunks, [T]):
        got, _ = decode(model, x, chunks)
        assert got.shape == full.shape
        torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "cached decoding changed the model's state"


def test_cache_refuses_more_than_block_size(warm_model):
    name, model = warm_model
    model.eval()
    x = random_tokens(model, 1)
    cache = model.init_cache(1)
    model.forward_cached(x, cache)  # exactly block_size tokens: allowed
    with pytest.raises(ValueError, match="block_size"):
        model.forward_cached(x[:, :1], cache)
