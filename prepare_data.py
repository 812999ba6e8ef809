"""
Prepare a dataset for train.py: get the text, tokenize it, write uint16 token files.

    python prepare_data.py shakespeare_char                  # tiny Shakespeare, one token per character
    python prepare_data.py shakespeare                       # tiny Shakespeare, GPT-2 BPE (tiktoken)
    python prepare_data.py shakespeare --tokenizer=hf:Qwen/Qwen2.5-0.5B --name=shakespeare_qwen  # a checkpoint's BPE
    python prepare_data.py shakespeare --tokenizer=wordpiece:hf:google-bert/bert-base-uncased --name=shakespeare_bert  # DAWN-39M's
    python prepare_data.py shakespeare_char --input=my.txt --name=mytext    # any UTF-8 text file
    python prepare_data.py c4 --tokens=5e9                   # C4 English, GPT-2 BPE, token shards
    python prepare_data.py mqar --num_kv_pairs=32 --seq_len=128 --name=mqar_kv32  # synthetic recall (MQAR)

Writes data/<name>/train.bin, val.bin (C4: train_000.bin, ..., val_000.bin) and meta.json (the vocabulary size and how to rebuild the
tokenizer, which train.py copies into every checkpoint so that sample.py can decode).
A .bin file is a 1024-byte header (int32: magic, version, token count, bytes per token or 0 for 2,
zeros) followed by the tokens as uint16 (uint32 for vocabularies past 65,536, like Qwen's), so a truncated or foreign file is detected instead of silently trained on.
Every file is written to a temporary name and renamed, so an interrupted run never leaves a file
that looks complete; rerunning the same command resumes a partial download.
MQAR also writes train.answers.bin and val.answers.bin: 1 at each token that is an answer, 0 elsewhere;
meta.json says "masked": true and the sequences' length, and train.py trains on whole sequences whose
other targets are ignored.
"""
import dataclasses
import gzip
import json
import multiprocessing
import os
import re
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass

import numpy as np

from cli import UserError, options_help, parse_options
from hub import check_url, download, file_sha256
from tokenizer import GPT2, bpe_encoding, check_option, describe, get_tokenizer

MAGIC, VERSION, HEADER_INTS = 20261122, 1, 256  # header: 256 int32 = 1024 bytes

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # 1,115,394 bytes


# -----------------------------------------------------------------------------
# token files

def write_tokens(path, tokens):
    """Write header + tokens (uint16, or uint32 when an id needs it) to path through a temporary file and a rename."""
    tokens = np.asarray(tokens)
    dtype = np.uint32 if tokens.size and tokens.max() >= 2**16 else np.uint16
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:4] = MAGIC, VERSION, tokens.size, np.dtype(dtype).itemsize
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(dtype).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not write {path}: {e.strerror} (is the disk full?)") from None


def read_tokens(path):
    """The tokens of a .bin file as a read-only np.memmap, after checking its header."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header.size < 4 or header[0] != MAGIC or header[1] != VERSION or header[3] not in (0, 2, 4):
        raise UserError(f"{path} is not a token file of this repo (bad header); prepare it again "
                        f"with prepare_data.py")
    n_tokens, dtype = int(header[2]), np.uint32 if header[3] == 4 else np.uint16  # 0: files from before uint32
    found = (os.path.getsize(path) - 4 * HEADER_INTS) // np.dtype(dtype).itemsize
    if found != n_tokens:
        raise UserError(f"{path} should hold {n_tokens:,} tokens but holds {found:,} (truncated?); "
                        f"prepare it again with prepare_data.py")
    return np.memmap(path, dtype=dtype, mode="r", offset=4 * HEADER_INTS, shape=(n_tokens,))


def write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# datasets

def prepare_text(out_dir, text, tokenizer):
    """Tokenize one text with the --tokenizer option `tokenizer` (tokenizer.py): first 90% train,
    last 10% val (nanoGPT's split), plus meta.json."""
    desc = describe(tokenizer, text)
    tok = get_tokenizer(desc)
    n = int(0.9 * len(text))
    train, val = tok.encode(text[:n]), tok.encode(text[n:])
    if len(val) < 2:
        raise UserError("the text is too short to split into train and val")
    write_tokens(os.path.join(out_dir, "train.bin"), train)
    write_tokens(os.path.join(out_dir, "val.bin"), val)
    write_json(os.path.join(out_dir, "meta.json"), {"vocab_size": tok.vocab_size, "tokenizer": desc})
    print(f"{out_dir}: vocabulary {tok.vocab_size:,}, train {len(train):,} tokens, val {len(val):,} tokens")


def prepare_shakespeare(out_dir, tokenizer, input="", url=SHAKESPEARE_URL):
    if input:
        if not os.path.exists(input):
            raise UserError(f"--input file {input} does not exist")
        if not os.path.isfile(input):
            raise UserError(f"--input={input} is a directory; give a UTF-8 text file")
        src = input
    else:
        src = os.path.join(out_dir, "input.txt")
        sha256 = SHAKESPEARE_SHA256 if url == SHAKESPEARE_URL else None
        if not os.path.exists(src):
            print(f"downloading tiny Shakespeare from {url}")
            download(url, src, sha256=sha256, local_hint="prepare a local copy with: python prepare_data.py "
                     f"{'shakespeare_char' if tokenizer == 'char' else 'shakespeare'} --input=FILE")
        elif sha256 and file_sha256(src) != sha256:  # e.g. another text, prepared under this name with --input
            raise UserError(f"{src} is not tiny Shakespeare (its sha256 is not the download's): another text "
                            f"prepared under this --name, or a damaged copy; delete it to download tiny "
                            f"Shakespeare again, or prepare that text with --input={src}")
    try:
        with open(src, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise UserError(f"{src} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read {src}: {e.strerror}") from None
    prepare_text(out_dir, text, tokenizer)
    copy = os.path.join(out_dir, "input.txt")
    if input and os.path.abspath(input) != os.path.abspath(copy):  # the text, where a download would be
        write_text(copy, text)  # (bench.py --mode=tokenize reads it)


# -----------------------------------------------------------------------------
# C4 (allenai/c4, English): 1024 train and 8 validation files of gzipped JSON lines {"text": ...}.
# Each downloaded file becomes one token shard; documents are separated by <|endoftext|>.

C4_URL = "https://huggingface.co/datasets/allenai/c4/resolve/main"
C4_FILES = {"train": 1024, "val": 8}


def c4_file(split, i):
    return f"en/c4-{'train' if split == 'train' else 'validation'}.{i:05d}-of-{C4_FILES[split]:05d}.json.gz"


def encode_documents(docs):
    """<|endoftext|> + tokens for each document, as one uint16 array (runs in a worker process)."""
    enc = bpe_encoding(GPT2["encoding"])
    eot = np.array([enc.eot_token], dtype=np.uint16)
    return np.concatenate([part for ids in enc.encode_ordinary_batch(docs, num_threads=1)
                           for part in (eot, np.array(ids, dtype=np.uint16))])


def tokenize_c4_file(gz_path, out_path, procs, batch_docs=256):
    """Tokenize one json.gz into one token shard with `procs` processes. The gzip is read to its end
    (which checks its CRC) before the shard is written: a corrupt download is deleted, never used."""
    label = os.path.basename(gz_path)
    chunks, pending, n_docs, n_tokens, start = [], deque(), 0, 0, time.time()

    def collect():
        nonlocal n_tokens
        chunks.append(pending.popleft().get())
        n_tokens += len(chunks[-1])
        rate = n_tokens / max(time.time() - start, 1e-9)
        print(f"\rtokenizing {label}: {n_docs:,} documents, {n_tokens / 1e6:.1f}M tokens, "
              f"{rate / 1e6:.2f}M tokens/s", end="", file=sys.stderr, flush=True)

    try:
        with gzip.open(gz_path, "rt", encoding="utf-8") as f, multiprocessing.Pool(procs) as pool:
            batch = []
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == batch_docs:
                    pending.append(pool.apply_async(encode_documents, (batch,)))
                    n_docs, batch = n_docs + len(batch), []
                    if len(pending) > 2 * procs:  # bounded: memory holds tokens, not the whole text
                        collect()
            if batch:
                pending.append(pool.apply_async(encode_documents, (batch,)))
                n_docs += len(batch)
            while pending:
                collect()
    except (OSError, EOFError, zlib.error, ValueError, KeyError) as e:  # gzip, CRC, JSON, UTF-8
        os.remove(gz_path)
        raise UserError(f"{gz_path} is corrupt ({e.__class__.__name__}: {e}); it was deleted, rerun to "
                        f"download it again") from None
    finally:
        print(file=sys.stderr)
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
    write_tokens(out_path, tokens)
    return len(tokens)


def prepare_c4(out_dir, tokens=0, shards=0, val_shards=1, base_url=C4_URL, procs=0):
    """Download and tokenize C4 shard by shard until `shards` train shards (or `tokens` train tokens)
    exist, plus `val_shards` validation shards. Complete, verified shards are skipped on a rerun."""
    if tokens and shards:
        raise UserError("give --tokens or --shards, not both")
    shards = shards or (0 if tokens else 1)
    if shards > C4_FILES["train"] or not 1 <= val_shards <= C4_FILES["val"]:
        raise UserError(f"C4 has {C4_FILES['train']} train and {C4_FILES['val']} validation files")
    procs = procs or os.cpu_count()
    os.makedirs(os.path.join(out_dir, "raw"), exist_ok=True)

    def ensure(split, i):
        out_path = os.path.join(out_dir, f"{split}_{i:03d}.bin")
        if os.path.exists(out_path):
            try:
                return len(read_tokens(out_path))  # complete and verified: nothing to do
            except UserError:
                os.remove(out_path)
        gz_path = os.path.join(out_dir, "raw", os.path.basename(c4_file(split, i)))
        if not os.path.exists(gz_path):
            download(f"{base_url}/{c4_file(split, i)}", gz_path,
                     local_hint="download from a mirror with the same en/c4-*.json.gz layout: --base_url=URL")
        n = tokenize_c4_file(gz_path, out_path, procs)
        os.remove(gz_path)  # the token shard is the product; the text can be downloaded again
        return n

    for i in range(val_shards):
        ensure("val", i)
    total, i = 0, 0
    while (i < shards) if shards else (total < tokens):
        if i == C4_FILES["train"]:
            raise UserError(f"C4 has only {total:,} train tokens")
        total += ensure("train", i)
        i += 1
    write_json(os.path.join(out_dir, "meta.json"),
               {"vocab_size": get_tokenizer(GPT2).vocab_size, "tokenizer": GPT2})
    print(f"{out_dir}: {i} train shards, {total:,} train tokens, {val_shards} val shards")


# -----------------------------------------------------------------------------
# MQAR: multi-query associative recall (Arora et al. 2023, "Zoology", arXiv 2312.04927), generated from
# the paper's description of the task and its synthetic data. A sequence of seq_len + 1 tokens (seq_len inputs,
# their targets shifted by one) begins with K key-value pairs k1 v1 k2 v2 ... kK vK; the query region
# after them holds Q of those keys again, each followed by its value, amid random filler tokens:
#
#     k1 v1 k2 v2 k3 v3 | f f k2 v2 f f f k1 v1 f k3 v3 f f ...      (the answers: the v after each query)
#
# Only the answers are targets: a model must recall which value followed that key earlier in the same
# sequence. A recurrent model keeps every pair in its fixed state; attention looks it up.

POWER_A = 0.01  # the paper's query slots: p(slot g) proportional to g^(a - 1) for g = 1, 2, ...


def mqar_sequences(rng, n, vocab_size, num_kv_pairs, num_queries, seq_len):
    """(tokens, answers): n sequences of seq_len + 1 tokens, and True at each answer."""
    K, Q, S = num_kv_pairs, num_queries, seq_len + 1
    half = vocab_size // 2
    # keys from the first half of the vocabulary, values from the second, K distinct of each per
    # sequence (a query has one answer): a random permutation's first K, per row
    keys = rng.random((n, half)).argsort(axis=1)[:, :K]
    values = half + rng.random((n, vocab_size - half)).argsort(axis=1)[:, :K]
    tokens = rng.integers(0, vocab_size, (n, S))  # filler: any token (the paper's random non-queries)
    tokens[:, 0:2 * K:2], tokens[:, 1:2 * K:2] = keys, values
    # the queries: the query region's slots are token pairs (key, value) at 2K + 2g; Q distinct slots,
    # drawn without replacement with a power law over g, the distance from the pairs (most queries
    # come soon after them, a few far away). Adding Gumbel noise to log p and taking the Q largest
    # draws Q without replacement, for every row at once (Kool et al. 2019, "Stochastic Beams").
    slots = (S - 2 * K) // 2
    log_p = (POWER_A - 1) * np.log(np.arange(1, slots + 1))
    gaps = np.argsort(-(log_p + rng.gumbel(size=(n, slots))), axis=1)[:, :Q]
    asked = rng.random((n, K)).argsort(axis=1)[:, :Q]  # which pairs are queried, in random order
    rows, where = np.arange(n)[:, None], 2 * K + 2 * gaps
    tokens[rows, where] = np.take_along_axis(keys, asked, axis=1)
    tokens[rows, where + 1] = np.take_along_axis(values, asked, axis=1)
    answers = np.zeros((n, S), dtype=bool)
    answers[rows, where + 1] = True
    return tokens, answers


def prepare_mqar(out_dir, vocab_size=256, num_kv_pairs=8, num_queries=0, seq_len=64, train_seqs=100_000,
                 val_seqs=2_000, seed=0):
    K, Q = num_kv_pairs, num_queries or num_kv_pairs
    if not 1 <= K <= vocab_size // 2:
        raise UserError(f"--num_kv_pairs={K}: K distinct keys need K <= vocab_size / 2 = {vocab_size // 2}; "
                        f"lower it or raise --vocab_size")
    if not 0 < Q <= K:
        raise UserError(f"--num_queries={num_queries}: at most the {K} keys (0: every key once)")
    if (seq_len + 1 - 2 * K) // 2 < Q:
        raise UserError(f"--seq_len={seq_len} leaves no room for {Q} queries after {K} pairs (it needs "
                        f"2K + 2Q - 1 = {2 * K + 2 * Q - 1} or more)")
    if train_seqs < 1 or val_seqs < 1:
        raise UserError("--train_seqs and --val_seqs must be at least 1")
    rng = np.random.default_rng(seed)
    train, train_answers = mqar_sequences(rng, train_seqs, vocab_size, K, Q, seq_len)
    # val never repeats a train sequence's pairs: it measures recall in context, not memorised pairs
    seen = {row.tobytes() for row in train[:, :2 * K]}
    val, val_answers = np.zeros((0, seq_len + 1), dtype=np.int64), np.zeros((0, seq_len + 1), dtype=bool)
    for _ in range(100):
        tokens, answers = mqar_sequences(rng, val_seqs - len(val), vocab_size, K, Q, seq_len)
        new = np.array([row.tobytes() not in seen for row in tokens[:, :2 * K]])
        val, val_answers = np.concatenate([val, tokens[new]]), np.concatenate([val_answers, answers[new]])
        if len(val) == val_seqs:
            break
    else:
        raise UserError(f"--vocab_size={vocab_size} has too few distinct sets of {K} pairs for "
                        f"{train_seqs:,} train sequences and {val_seqs:,} others; raise --vocab_size")
    # the accuracies a model reaches without recalling anything, to read val_acc against: any value, one of
    # the sequence's K values, or one of those not answered yet in this sequence (the i-th query has K - i
    # left, as each key is asked at most once): only above the last has a model recalled pairs
    chance = {"any_value": 1 / (vocab_size - vocab_size // 2), "sequence_value": 1 / K,
              "elimination": sum(1 / (K - i) for i in range(Q)) / Q}
    for split, tokens, answers in (("train", train, train_answers), ("val", val, val_answers)):
        write_tokens(os.path.join(out_dir, f"{split}.bin"), tokens.ravel())
        write_tokens(os.path.join(out_dir, f"{split}.answers.bin"), answers.ravel())
    write_json(os.path.join(out_dir, "meta.json"),
               {"vocab_size": vocab_size, "tokenizer": {"kind": "ids", "vocab_size": vocab_size},
                "masked": True, "seq_len": seq_len,  # train.py: whole sequences, targets only at answers
                "mqar": {"num_kv_pairs": K, "num_queries": Q, "train_seqs": train_seqs, "val_seqs": val_seqs,
                         "seed": seed, "chance": chance}})
    print(f"{out_dir}: MQAR, {K} key-value pairs and {Q} queries in each sequence of {seq_len} tokens, "
          f"vocabulary {vocab_size}; {train_seqs:,} train and {val_seqs:,} val sequences; accuracy without recall: "
          f"{chance['any_value']:.3f} (any value), {chance['sequence_value']:.3f} (a value of the sequence), "
          f"{chance['elimination']:.3f} (one not yet answered)")


# the options of every dataset, then each dataset's own (prepare's keyword arguments)

@dataclass
class PrepareConfig:
    name: str = ""             # the folder under data_dir; default: the dataset's name
    data_dir: str = "data"


@dataclass
class ShakespeareCharConfig:
    input: str = ""            # a local UTF-8 text file instead of the download
    url: str = SHAKESPEARE_URL


@dataclass
class ShakespeareConfig:
    input: str = ""            # a local UTF-8 text file instead of the download
    url: str = SHAKESPEARE_URL
    tokenizer: str = "gpt2"    # gpt2, or hf:OWNER/NAME: a Qwen2 or Doge checkpoint's BPE, to fine-tune it; or
                               # wordpiece:PATH/vocab.txt or wordpiece:hf:OWNER/NAME: BERT's WordPiece (DAWN-39M)


@dataclass
class C4Config:
    tokens: int = 0            # train tokens wanted, e.g. 5e9: as many train files as they need
    shards: int = 0            # or a number of train files (neither: 1)
    val_shards: int = 1
    base_url: str = C4_URL
    procs: int = 0             # tokenizing processes; 0: all cores


@dataclass
class MQARConfig:
    vocab_size: int = 256      # keys from the first half, values from the second
    num_kv_pairs: int = 8      # K: key-value pairs to remember in each sequence
    num_queries: int = 0       # Q: keys asked again in each sequence; 0: every key once (the paper's setting)
    seq_len: int = 64          # input tokens per sequence: train with --block_size=seq_len
    train_seqs: int = 100_000
    val_seqs: int = 2_000
    seed: int = 0


DATASETS = {"shakespeare_char": ShakespeareCharConfig, "shakespeare": ShakespeareConfig, "c4": C4Config,
            "mqar": MQARConfig}


def prepare(dataset, data_dir="data", name="", **options):
    """Prepare `dataset` into data_dir/(name or dataset)/; returns that directory."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if name and not (re.fullmatch(r"[\w.-]+", name) and name.strip(".")):  # one folder inside data_dir
        raise UserError(f"--name={name} is not a folder name (letters, digits, -, _ and ., no / or ..); "
                        f"choose e.g. --name=mytext, and --data_dir=DIR for where it goes")
    for key in ("url", "base_url"):
        if key in options:
            check_url(options[key], f"--{key}")  # before any folder is made
    out_dir = os.path.join(data_dir, name or dataset)
    os.makedirs(out_dir, exist_ok=True)
    if dataset == "c4":
        prepare_c4(out_dir, **options)
    elif dataset == "mqar":
        prepare_mqar(out_dir, **options)
    else:
        tokenizer = "char" if dataset == "shakespeare_char" else options.pop("tokenizer", "gpt2")
        check_option(tokenizer)  # before any download
        prepare_shakespeare(out_dir, tokenizer, **options)
    return out_dir


def main(argv):
    datasets = [a for a in argv if not a.startswith("-")]
    if "-h" in argv or "--help" in argv:
        print(f"{__doc__.strip()}\n\nusage: python prepare_data.py DATASET [--key=value ...]\n\n"
              f"{options_help(PrepareConfig(), 'options of every dataset')}")
        for dataset, config in DATASETS.items():
            print(f"\n{options_help(config(), f'{dataset} options')}")
        return
    if len(datasets) != 1 or datasets[0] not in DATASETS:
        raise UserError(f"name one dataset: {', '.join(DATASETS)} (see --help)")
    dataset = datasets[0]
    common, options = parse_options([a for a in argv if a != dataset], PrepareConfig(), DATASETS[dataset]())
    prepare(dataset, common.data_dir, common.name, **dataclasses.asdict(options))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"prepare_data.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("\nprepare_data.py: interrupted; rerun the same command to resume")
