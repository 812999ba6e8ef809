"""What the test files share, defined once: pytest loads this file before them, and they import its
helpers by name (`from conftest import build, run`); the MoD/DTF routing helpers live in routing.py.
No test file imports another.

Everything is offline and inside the repository: texts are generated (make_text) or committed
(tests/fixtures/shakespeare_tiny: the start of tiny Shakespeare and the part of GPT-2's BPE it needs),
downloads come from a local HTTP server (file_server, hub), and scripts run as subprocesses (run).
"""
import base64
import dataclasses
import glob
import importlib
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
SHAKESPEARE = os.path.join(FIXTURES, "shakespeare_tiny", "input.txt")  # the first 7,476 characters
# the full originals the committed fixtures were cut from, where this checkout sits beside a ../shared/
# that has them; only the checks of those fixtures read them, and pass without them
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

MODEL_NAMES = sorted(os.path.basename(p)[len("model_"):-len(".py")]
                     for p in glob.glob(os.path.join(ROOT, "model_*.py")))

# A suite started in the background by a script (`pytest &`) inherits SIGINT ignored, and so would
# every script the Ctrl-C tests start, which would then never see their Ctrl-C: restore the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -----------------------------------------------------------------------------
# texts and tokenizers

def make_text(n_chars=30000, seed=0):
    """A deterministic English-like text (no files needed): words drawn from a small lexicon."""
    import random
    rng = random.Random(seed)
    words = ("the king and queen of france shall speak to thee my lord what is this night "
             "a fair day for love and war we will go now").split()
    lines, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 12))).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)[:n_chars]


def gpt2_subset_ranks():
    """{token bytes: rank} of tests/fixtures/shakespeare_tiny/r50k_base.tiktoken (tiktoken's format)."""
    with open(os.path.join(FIXTURES, "shakespeare_tiny", "r50k_base.tiktoken")) as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f)}


@pytest.fixture
def gpt2_bpe(monkeypatch):
    """GPT-2's BPE offline, in this process (and in worker processes it forks): tiktoken's r50k_base
    encoding, its own pattern and <|endoftext|> = 50256 (so n_vocab stays 50,257), with the ranks of
    tests/fixtures/shakespeare_tiny/r50k_base.tiktoken, the tokens that the fixture's input.txt and a
    few strings go through (tests/make_shakespeare_fixtures.py). Those texts get GPT-2's own ids; any
    other text still encodes and decodes exactly, into other tokens than GPT-2's. Every other id below
    50,256 holds a stand-in, b"\xfe" + id + b"\xfe", so that tables over the whole vocabulary (bits
    per byte's token_bytes) can be built: no text can form one (UTF-8 never holds the byte 0xfe), so no
    encoding changes. A script started as a subprocess does not see it: run train.py's main in-process
    on GPT-2 data."""
    import tiktoken
    import tiktoken.registry
    import tiktoken_ext.openai_public as openai_public
    ranks = gpt2_subset_ranks()
    taken = set(ranks.values())
    ranks.update({b"\xfe" + r.to_bytes(3, "big") + b"\xfe": r for r in range(50256) if r not in taken})
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks)
    params = openai_public.r50k_base()
    monkeypatch.setitem(tiktoken.registry.ENCODINGS, "r50k_base", tiktoken.Encoding(**params))


# -----------------------------------------------------------------------------
# models

def build(name, **overrides):
    """model_<name>'s Model at its laptop config with `overrides`, every dropout off unless given
    (causality is defined with dropout 0), from seed 0."""
    module = importlib.import_module(f"model_{name}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    no_dropout = {f: 0.0 for f in fields if "dropout" in f}
    torch.manual_seed(0)
    return module.Model(module.Config(**{**no_dropout, **overrides}))


def tokens(B=4, T=64, seed=1, vocab_size=65):
    """B rows of T random token ids (the laptop configs' vocabulary is 65 characters)."""
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


PROMPT_THEN_TOKENS = [5] + [1] * 27 + [7] + [1] * 25  # 64 tokens: a prompt, then a chunk of several mid-way


def decode(model, x, chunks, after_each=None):
    """Feed x (B, T) through forward_cached in chunks of the given sizes, calling after_each(cache, t)
    after each; the logits concatenated, and the cache."""
    cache, out, t = model.init_cache(x.size(0)), [], 0
    for n in chunks:
        out.append(model.forward_cached(x[:, t:t + n], cache))
        t += n
        if after_each:
            after_each(cache, t)
    return torch.cat(out, dim=1), cache


# -----------------------------------------------------------------------------
# scripts

def run(script, *args, launcher=(), cwd=ROOT, env=None):
    """Run a script of the repository (a path relative to ROOT) with python, one thread (several
    processes share 2 cores) and this process's environment (so a monkeypatched DYNLM_HF_URL reaches
    it). The completed process; the caller checks returncode."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *launcher, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# a run of train.py in a second or two: a 1-layer model, 2 rows a batch, one batch an evaluation
TINY_MODEL = ["--n_layer=1", "--n_embd=16", "--n_head=2", "--n_kv_head=1", "--block_size=16"]
TINY_RUN = [*TINY_MODEL, "--batch_size=2", "--eval_iters=1", "--log_interval=1", "--warmup_iters=0",
            "--device=cpu", "--compile=False"]


def run_args(data_dir, out, *more):
    """train.py's options for a TINY_RUN on data_dir's "tiny" into out (a resume keeps its model's)."""
    tiny = [a for a in TINY_RUN if a not in TINY_MODEL] if "--init_from=resume" in more else TINY_RUN
    return ["--dataset=tiny", f"--data_dir={data_dir}", f"--out_dir={out}", *tiny, *more]


def fit(data_dir, out, *more):
    """train.py's main, in this process, for 2 iterations of a TINY_RUN (evaluated at 0 and 2)."""
    import train
    return train.main(run_args(data_dir, out, "--max_iters=2", "--eval_interval=2", *more))


def read_log(out_dir):
    """The records of out_dir/log.jsonl."""
    import json
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_one_line_error(result, program, message):
    """A failed command printed exactly one line, '<program>: error: ...' containing `message`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), result.stderr
    assert message in lines[0], lines[0]


def saved_checkpoint(out_dir):
    """The ckpt.pt a run wrote to out_dir, read as it is on disk (not through checkpoint.py)."""
    return torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data directory with two character-level datasets prepared from generated text: tiny (30,000
    characters) and other (8,000, with characters tiny lacks). Shared by a test file's tests; a test
    may prepare further datasets into it under names of its own."""
    from prepare_data import prepare
    root = tmp_path_factory.mktemp("data")
    for name, text in (("tiny", make_text(30000)), ("other", make_text(8000, seed=1) + "XYZ!")):
        (root / f"{name}.txt").write_text(text)
        prepare("shakespeare_char", data_dir=str(root), name=name, input=str(root / f"{name}.txt"))
    return str(root)


# -----------------------------------------------------------------------------
# downloads: a local server, and the Hugging Face Hub on it

class FileServer:
    """A tiny HTTP server on 127.0.0.1 for download tests: serves `files` ({path: bytes}) with HTTP
    Range support, 404 for anything else, and cuts the connection after `drop_after` bytes for the
    first `drops` requests of a file (a flaky network)."""

    def __init__(self):
        import http.server
        import threading
        server = self
        self.files, self.drop_after, self.drops, self.requests = {}, None, 0, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if server.drops > 0 and server.drop_after is not None:
                    server.drops -= 1
                    self.wfile.write(body[:server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()


def read(*parts):
    """The bytes of the file at os.path.join(*parts)."""
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def fixture_files(folder, *names):
    """{name: bytes} of files in tests/fixtures/<folder>/ (a name may have a subfolder: "bf16/x")."""
    return {os.path.basename(name): read(FIXTURES, folder, name) for name in names}


@pytest.fixture
def hub(file_server, tmp_path, monkeypatch):
    """file_server as the Hugging Face Hub ($DYNLM_HF_URL) with an empty download cache ($DYNLM_CACHE),
    for this process and the scripts it runs; hub.serve(repo, {file name: bytes}) publishes files."""
    def serve(repo, files):
        for name, data in files.items():
            file_server.files[f"/{repo}/resolve/main/{name}"] = data

    file_server.serve = serve
    monkeypatch.setenv("DYNLM_HF_URL", file_server.url)
    monkeypatch.setenv("DYNLM_CACHE", str(tmp_path / "cache"))
    return file_server


@pytest.fixture
def qwen2_hub(hub):
    """hub with tests/fixtures/qwen2_tiny (a 2-layer Qwen2 written by transformers, see
    make_pretrained_fixtures.py) as the repo tiny/qwen2, and with its bf16 weights as tiny/qwen2-bf16."""
    hub.serve("tiny/qwen2", fixture_files("qwen2_tiny", "config.json", "tokenizer.json", "model.safetensors"))
    hub.serve("tiny/qwen2-bf16", fixture_files("qwen2_tiny", "config.json", "tokenizer.json", "bf16/model.safetensors"))
    return hub


def safetensors_bytes(tensors):
    """A safetensors file of fp32 tensors ({name: tensor}), as the hub serves weights."""
    import json
    header, data = {}, b""
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    head = json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + data
