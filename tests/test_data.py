"""prepare_data.py: token files, tokenizers and downloads (offline: a local HTTP server on 127.0.0.1)."""
import hashlib
import json
import os

import numpy as np
import pytest

import hub
import prepare_data
from cli import UserError
from conftest import SHAKESPEARE, SHARED, assert_one_line_error, gpt2_subset_ranks, make_text, read, run
from hub import download
from prepare_data import prepare, read_tokens, write_tokens
from tokenizer import GPT2, bpe_encoding, get_tokenizer


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
    for args, message in ((["nope"], "name one dataset: shakespeare_char, shakespeare, c4"),
                          (["shakespeare_char", "--input=/does/not/exist"], "does not exist"),
                          (["shakespeare_char", "--colour=red"], "unknown option --colour=red; the options are --name, --data_dir, --input, --url"),
                          (["c4", "--input=x.txt"], "unknown option --input=x.txt; the options are --name, --data_dir, --tokens, --shards"),
                          (["c4", "--shards=many"], "--shards=many: expected int, a whole number")):
        assert_one_line_error(run("prepare_data.py", *args, f"--data_dir={tmp_path}"), "prepare_data.py", message)


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


def test_prepare_shakespeare_char_through_download(tmp_path, file_server):
    text = read(SHAKESPEARE).decode()
    file_server.files["/input.txt"] = text.encode()
    r = run("prepare_data.py", "shakespeare_char", f"--data_dir={tmp_path}", f"--url={file_server.url}/input.txt")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(tmp_path / "shakespeare_char" / "meta.json"))
    assert meta == {"vocab_size": len(set(text)), "tokenizer": {"kind": "char", "chars": "".join(sorted(set(text)))}}
    n = int(0.9 * len(text))  # nanoGPT's split
    decode = get_tokenizer(meta["tokenizer"]).decode
    assert decode(read_tokens(str(tmp_path / "shakespeare_char" / "train.bin")).tolist()) == text[:n]
    assert decode(read_tokens(str(tmp_path / "shakespeare_char" / "val.bin")).tolist()) == text[n:]
    assert read(tmp_path / "shakespeare_char" / "input.txt") == text.encode()  # kept, for bench.py


def test_shakespeare_download_is_checked_against_its_sha256(tmp_path, file_server, monkeypatch):
    """The default URL's download must be tiny Shakespeare, byte for byte (prepare_data.SHAKESPEARE_SHA256):
    a file served in its place (here the committed excerpt) is refused and not kept. With ../shared's
    copy of the whole text, that copy passes and gives nanoGPT's token counts."""
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)
    monkeypatch.setattr(prepare_data, "download", lambda url, path, **kwargs: download(
        file_server.url + "/input.txt" if url == prepare_data.SHAKESPEARE_URL else url, path, **kwargs))
    file_server.files["/input.txt"] = read(SHAKESPEARE)
    with pytest.raises(UserError, match="sha256"):
        prepare("shakespeare_char", data_dir=str(tmp_path))
    assert os.listdir(tmp_path / "shakespeare_char") == []
    whole = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if os.path.exists(whole):
        file_server.files["/input.txt"] = read(whole)
        out = prepare("shakespeare_char", data_dir=str(tmp_path))
        assert json.load(open(os.path.join(out, "meta.json")))["vocab_size"] == 65
        assert len(read_tokens(os.path.join(out, "train.bin"))) == 1_003_854
        assert len(read_tokens(os.path.join(out, "val.bin"))) == 111_540


def test_gpt2_bpe_offline(gpt2_bpe):
    tok = get_tokenizer(GPT2)
    encode, decode = tok.encode, tok.decode
    assert encode("First Citizen:") == [5962, 22307, 25]  # GPT-2's ids
    assert encode("Hello, world!") == [15496, 11, 995, 0]
    assert tok.vocab_size == 50304  # GPT-2's 50,257 ids, padded to a multiple of 64
    text = make_text(2000) + " é—ü 東京 🙂"  # beyond the fixture's tokens: other ids, the same text back
    assert decode(encode(text)) == text


def test_prepare_shakespeare_bpe(tmp_path, gpt2_bpe):
    out = prepare("shakespeare", data_dir=str(tmp_path), input=SHAKESPEARE)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta == {"vocab_size": 50304, "tokenizer": {"kind": "tiktoken", "encoding": "r50k_base"}}
    train, val = read_tokens(os.path.join(out, "train.bin")), read_tokens(os.path.join(out, "val.bin"))
    assert train[:3].tolist() == [5962, 22307, 25]
    assert (len(train), len(val)) == (1_895, 213)  # GPT-2's counts (tests/make_shakespeare_fixtures.py)
    assert get_tokenizer(GPT2).decode(train.tolist() + val.tolist()) == read(SHAKESPEARE).decode()


R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"  # tiktoken's


def test_committed_shakespeare_fixture_is_cut_from_the_originals(gpt2_bpe, monkeypatch):
    """r50k_base.tiktoken is a closed piece of a BPE: 256 single bytes, and every other token the
    merge of two tokens of lower rank in it. Where ../shared holds the originals: input.txt is the
    start of tiny Shakespeare, which has prepare_data.py's sha256, and every token is r50k_base's,
    at its rank, so the fixture's texts encode as with the whole of GPT-2's BPE."""
    ranks = gpt2_subset_ranks()
    assert len(set(ranks.values())) == len(ranks) and sum(len(t) == 1 for t in ranks) == 256
    for t in ranks:
        assert len(t) == 1 or any(max(ranks.get(t[:i], 1e9), ranks.get(t[i:], 1e9)) < ranks[t]
                                  for i in range(1, len(t))), t
    whole = os.path.join(SHARED, "data", "tinyshakespeare.txt")
    if os.path.exists(whole):
        assert hashlib.sha256(read(whole)).hexdigest() == prepare_data.SHAKESPEARE_SHA256
        assert read(whole).startswith(read(SHAKESPEARE))
    cache = os.path.join(SHARED, "tiktoken_cache")
    if os.path.exists(os.path.join(cache, hashlib.sha1(R50K_URL.encode()).hexdigest())):  # tiktoken's file name
        import tiktoken
        import tiktoken.load
        import tiktoken_ext.openai_public as openai_public
        monkeypatch.setenv("TIKTOKEN_CACHE_DIR", cache)
        monkeypatch.setattr(openai_public, "load_tiktoken_bpe", tiktoken.load.load_tiktoken_bpe)
        full = openai_public.r50k_base()  # GPT-2's whole BPE from the cache (tiktoken checks its sha256)
        assert all(full["mergeable_ranks"].get(t) == r for t, r in ranks.items())
        reference, enc = tiktoken.Encoding(**full), bpe_encoding("r50k_base")
        text = read(SHAKESPEARE).decode()
        n = int(0.9 * len(text))
        for part in (text[:n], text[n:]):
            assert enc.encode_ordinary(part) == reference.encode_ordinary(part)
