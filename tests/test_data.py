"""prepare_data.py: token files, tokenizers and downloads (offline: a local HTTP server on 127.0.0.1)."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import hub
import prepare_data
from cli import UserError
from conftest import ROOT, assert_one_line_error, make_text
from hub import download
from prepare_data import prepare, read_tokens, write_tokens
from tokenizer import GPT2, get_tokenizer


def test_token_file_round_trip_and_header_checks(tmp_path):
    path = str(tmp_path / "x.bin")
    tokens = np.array([0, 1, 65535, 42], dtype=np.int64)
    write_tokens(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * len(tokens)
    assert read_tokens(path).tolist() == tokens.tolist()
    assert not os.path.exists(path + ".tmp")
    with open(path, "r+b") as f:  # truncate: the header's count no longer matches
        f.truncate(1024 + 2 * 3)
    with pytest.raises(UserError, match="should hold 4 tokens but holds 3"):
        read_tokens(path)
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(np.arange(600, dtype=np.uint16).tobytes())  # e.g. a headerless nanoGPT file
    with pytest.raises(UserError, match="bad header"):
        read_tokens(str(foreign))
    write_tokens(path, [70000, 3])  # ids past uint16 (Qwen's vocabulary) are stored as uint32
    assert os.path.getsize(path) == 1024 + 4 * 2 and read_tokens(path).tolist() == [70000, 3]


def test_prepare_char_from_local_file(tmp_path):
    text = make_text(5000)
    src = tmp_path / "my.txt"
    src.write_text(text)
    out = prepare("shakespeare_char", data_dir=str(tmp_path / "data"), name="mytext", input=str(src))
    assert out == str(tmp_path / "data" / "mytext")
    meta = json.load(open(os.path.join(out, "meta.json")))
    chars = "".join(sorted(set(text)))
    assert meta == {"vocab_size": len(chars), "tokenizer": {"kind": "char", "chars": chars}}
    train, val = read_tokens(os.path.join(out, "train.bin")), read_tokens(os.path.join(out, "val.bin"))
    assert len(train) == 4500 and len(val) == 500  # nanoGPT's 90/10 split
    decode = get_tokenizer(meta["tokenizer"]).decode
    assert decode(train.tolist()) + decode(val.tolist()) == text


def test_char_tokenizer_rejects_unknown_characters():
    tok = get_tokenizer({"kind": "char", "chars": "ab\n"})
    encode, decode = tok.encode, tok.decode
    assert decode(encode("ab\nba")) == "ab\nba"
    with pytest.raises(UserError, match="not in this model's vocabulary"):
        encode("abc")


def test_prepare_command_line_errors(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "prepare_data.py", *args, f"--data_dir={tmp_path}"],
                              cwd=ROOT, capture_output=True, text=True)
    for args, message in ((["nope"], "name one dataset: shakespeare_char, shakespeare, c4"),
                          (["shakespeare_char", "--input=/does/not/exist"], "does not exist"),
                          (["shakespeare_char", "--colour=red"], "unknown option --colour=red; the options are --name, --data_dir, --input, --url"),
                          (["c4", "--input=x.txt"], "unknown option --input=x.txt; the options are --name, --data_dir, --tokens, --shards"),
                          (["c4", "--shards=many"], "--shards=many: expected int, a whole number")):
        assert_one_line_error(run(*args), "prepare_data.py", message)


def test_download_from_local_server_with_sha256(tmp_path, file_server):
    data = make_text(200_000).encode()
    file_server.files["/input.txt"] = data
    path = str(tmp_path / "input.txt")
    download(file_server.url + "/input.txt", path, sha256=hashlib.sha256(data).hexdigest())
    assert open(path, "rb").read() == data
    assert not os.path.exists(path + ".part")


def test_download_resumes_after_dropped_connections(tmp_path, file_server, monkeypatch):
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)  # no backoff waits in tests
    data = make_text(300_000).encode()
    file_server.files["/big.txt"] = data
    file_server.drop_after, file_server.drops = 70_000, 2  # the first two responses break off
    path = str(tmp_path / "big.txt")
    download(file_server.url + "/big.txt", path, sha256=hashlib.sha256(data).hexdigest())
    assert open(path, "rb").read() == data
    starts = [int(r[len("bytes="):-1]) if r else 0 for _, r in file_server.requests]
    assert len(starts) == 3 and 0 == starts[0] < starts[1] < starts[2]  # each retry resumed, none restarted


def test_download_errors_are_actionable(tmp_path, file_server, monkeypatch):
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    with pytest.raises(UserError, match="HTTP 404"):
        download(file_server.url + "/missing.txt", str(tmp_path / "m.txt"))
    file_server.files["/f.txt"] = b"hello world"
    path = str(tmp_path / "f.txt")
    with pytest.raises(UserError, match="sha256"):
        download(file_server.url + "/f.txt", path, sha256="0" * 64)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")  # bad bytes are not kept
    with pytest.raises(UserError, match="failed 2 times"):  # nothing listens on this port any more
        dead = file_server.url
        file_server.close()
        download(dead + "/f.txt", path, retries=2)


def test_prepare_shakespeare_char_through_download(tmp_path, file_server, shakespeare_path):
    data = open(shakespeare_path, "rb").read()
    file_server.files["/input.txt"] = data
    r = subprocess.run([sys.executable, "prepare_data.py", "shakespeare_char", f"--data_dir={tmp_path}",
                        f"--url={file_server.url}/input.txt"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "shakespeare_char" / "meta.json"))
    assert meta["vocab_size"] == 65
    assert len(read_tokens(str(tmp_path / "shakespeare_char" / "train.bin"))) == 1_003_854
    assert len(read_tokens(str(tmp_path / "shakespeare_char" / "val.bin"))) == 111_540
    assert hashlib.sha256(data).hexdigest() == prepare_data.SHAKESPEARE_SHA256


def test_gpt2_bpe_offline(tiktoken_cache):
    tok = get_tokenizer(GPT2)
    encode, decode = tok.encode, tok.decode
    assert encode("First Citizen:") == [5962, 22307, 25]  # GPT-2's ids
    assert decode(encode("Hello, world!")) == "Hello, world!"


def test_prepare_shakespeare_bpe(tmp_path, tiktoken_cache, shakespeare_path):
    out = prepare("shakespeare", data_dir=str(tmp_path), input=shakespeare_path)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta == {"vocab_size": 50304, "tokenizer": {"kind": "tiktoken", "encoding": "r50k_base"}}
    train = read_tokens(os.path.join(out, "train.bin"))
    assert train[:3].tolist() == [5962, 22307, 25]
    assert 250_000 < len(train) < 350_000 and train.max() < 50257
