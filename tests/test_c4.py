"""C4 preparation, offline: fake shards in the real format (gzipped JSON lines with a "text" field)
served by a local HTTP server on 127.0.0.1 under the real en/c4-*.json.gz layout."""
import gzip
import io
import json
import os

import numpy as np
import pytest

import hub
import train
from cli import UserError
from conftest import make_text
from prepare_data import c4_file, prepare, read_tokens
from tokenizer import GPT2, bpe_encoding


def c4_gzip(docs):
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        for i, text in enumerate(docs):
            f.write((json.dumps({"text": text, "timestamp": "2019-04-25T12:57:54Z",
                                 "url": f"https://example.com/{i}"}) + "\n").encode())
    return buf.getvalue()


def docs_for(split, i, n=60):
    return [make_text(200 + 37 * j, seed=1000 * i + j + (0 if split == "train" else 500)) + " é—ü"
            for j in range(n)]


@pytest.fixture
def c4_server(file_server, gpt2_bpe, monkeypatch):
    monkeypatch.setattr(hub.time, "sleep", lambda s: None)  # no backoff waits in tests
    for split, count in (("train", 3), ("val", 1)):
        for i in range(count):
            file_server.files["/" + c4_file(split, i)] = c4_gzip(docs_for(split, i))
    return file_server


def expected_tokens(docs):
    enc = bpe_encoding(GPT2["encoding"])
    return [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)]


def test_full_prepare_run(tmp_path, c4_server):
    out = prepare("c4", data_dir=str(tmp_path), shards=2, val_shards=1, base_url=c4_server.url, procs=2)
    assert sorted(os.listdir(out)) == ["meta.json", "raw", "train_000.bin", "train_001.bin", "val_000.bin"]
    assert os.listdir(os.path.join(out, "raw")) == []  # the downloaded text is removed once tokenized
    assert read_tokens(os.path.join(out, "train_001.bin")).tolist() == expected_tokens(docs_for("train", 1))
    assert read_tokens(os.path.join(out, "val_000.bin")).tolist() == expected_tokens(docs_for("val", 0))
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta == {"vocab_size": 50304, "tokenizer": {"kind": "tiktoken", "encoding": "r50k_base"}}
    n_requests = len(c4_server.requests)
    prepare("c4", data_dir=str(tmp_path), shards=2, val_shards=1, base_url=c4_server.url, procs=2)
    assert len(c4_server.requests) == n_requests  # complete, verified shards are skipped


def test_tokens_option_decides_the_number_of_shards(tmp_path, c4_server):
    one = len(expected_tokens(docs_for("train", 0)))
    out = prepare("c4", data_dir=str(tmp_path), tokens=one + 1, base_url=c4_server.url, procs=1)
    assert sorted(f for f in os.listdir(out) if f.startswith("train")) == ["train_000.bin", "train_001.bin"]


def test_dropped_connection_resumes_to_identical_tokens(tmp_path, c4_server):
    import random
    rng = random.Random(0)  # random letters barely compress: a file of several 64 KiB download chunks
    docs = ["".join(rng.choices("abcdefghij klmnopqrstuvwxyz", k=20_000)) for _ in range(15)]
    c4_server.files["/" + c4_file("val", 0)] = c4_gzip(docs)
    c4_server.drop_after, c4_server.drops = 150_000, 2
    out = prepare("c4", data_dir=str(tmp_path), shards=1, base_url=c4_server.url, procs=1)
    assert [r for _, r in c4_server.requests if r]  # Range requests resumed the broken download
    assert read_tokens(os.path.join(out, "val_000.bin")).tolist() == expected_tokens(docs)


def test_corrupt_gzip_is_deleted_and_fetched_again(tmp_path, c4_server):
    good = c4_server.files["/" + c4_file("train", 0)]
    c4_server.files["/" + c4_file("train", 0)] = good[:len(good) // 2]  # a truncated upload
    with pytest.raises(UserError, match="is corrupt .* it was deleted, rerun"):
        prepare("c4", data_dir=str(tmp_path), shards=1, base_url=c4_server.url, procs=1)
    assert not os.path.exists(tmp_path / "c4" / "raw" / os.path.basename(c4_file("train", 0)))
    assert not os.path.exists(tmp_path / "c4" / "train_000.bin")
    c4_server.files["/" + c4_file("train", 0)] = good
    prepare("c4", data_dir=str(tmp_path), shards=1, base_url=c4_server.url, procs=1)
    assert len(read_tokens(str(tmp_path / "c4" / "train_000.bin"))) == len(expected_tokens(docs_for("train", 0)))


def test_missing_file_names_the_url_and_the_mirror_option(tmp_path, c4_server):
    with pytest.raises(UserError, match=r"HTTP 404 for .*/nowhere/en/c4-validation.00000-of-00008.json.gz.*--base_url"):
        prepare("c4", data_dir=str(tmp_path), shards=1, base_url=c4_server.url + "/nowhere", procs=1)


def test_truncated_shard_is_rebuilt(tmp_path, c4_server):
    out = prepare("c4", data_dir=str(tmp_path), shards=1, base_url=c4_server.url, procs=1)
    path = os.path.join(out, "train_000.bin")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    prepare("c4", data_dir=str(tmp_path), shards=1, base_url=c4_server.url, procs=1)
    assert read_tokens(path).tolist() == expected_tokens(docs_for("train", 0))


def test_train_on_multi_shard_dataset(tmp_path, c4_server, capsys):
    """train.py (in this process, where gpt2_bpe's encoding is) trains on a dataset of several shards."""
    prepare("c4", data_dir=str(tmp_path), shards=3, base_url=c4_server.url, procs=2)
    train.main(["--model=gpt", "--dataset=c4", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}",
                "--max_iters=3", "--eval_iters=1", "--log_interval=1", "--batch_size=2", "--block_size=32",
                "--n_layer=1", "--device=cpu", "--compile=False"])
    out = capsys.readouterr().out
    assert "iter 3:" in out and "step 3: train loss" in out


def test_batches_cover_every_shard():
    """get_batch draws windows from all shards, in proportion to their sizes."""
    import torch
    shards = [np.full(1000, 1, dtype=np.uint16), np.full(3000, 2, dtype=np.uint16)]
    x, _ = train.get_batch(shards, 4000, 16, torch.Generator().manual_seed(0), torch.device("cpu"))
    share = (x[:, 0] == 2).float().mean().item()
    assert set(x[:, 0].tolist()) == {1, 2} and abs(share - 2983 / (983 + 2983)) < 0.03
