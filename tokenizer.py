"""
Every tokenizer of this repo. A tokenizer is written down as a descriptor, a small JSON-able dict that
prepare_data.py stores in meta.json and train.py copies into every checkpoint, so that sample.py
decodes with exactly the tokenizer the data was made with:

    {"kind": "char", "chars": "\\n !..."}                    one token per character of the text
    {"kind": "tiktoken", "encoding": "r50k_base"}           a tiktoken encoding by name (GPT-2's BPE)
    {"kind": "bpe", "name": "hf:OWNER/NAME", "pattern", "ranks", "special", "normalize"}
                                                            a checkpoint's byte-level BPE (tokenizer.json), by tiktoken
    {"kind": "wordpiece", "name", "vocab", "lowercase"}     BERT's WordPiece (a vocab.txt), for DAWN-39M
    {"kind": "ids", "vocab_size": 256}                      bare token ids written as numbers (synthetic tasks: MQAR)

describe(option, text) makes the descriptor for prepare_data.py's --tokenizer option, and
get_tokenizer(descriptor) the Tokenizer: encode, decode, vocab_size (the rows of the embedding the
data needs) and token_bytes (what train.py's bits per byte divide by). A new tokenizer is a new kind
here: its descriptor in describe, its Tokenizer in KINDS.
"""
import base64
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Callable

import requests

from cli import UserError
from hub import fetch_file, fetch_json, forget

# GPT-2's BPE. tiktoken's "r50k_base" has the same ranks, pattern and <|endoftext|> (50256) as its
# "gpt2" encoding, and is one file (so an offline TIKTOKEN_CACHE_DIR can hold it).
GPT2 = {"kind": "tiktoken", "encoding": "r50k_base"}


@dataclass
class Tokenizer:
    encode: Callable[[str], list]   # text -> token ids
    decode: Callable[[list], str]   # token ids -> text (ids past the vocabulary are skipped)
    vocab_size: int                 # every id is below it: the embedding rows a model needs
    token_bytes: Callable[[], list]  # () -> vocab_size ints: the UTF-8 bytes of text each id stands for
                                     # (0 for special tokens and unused ids: they stand for no text)


def check_option(option):
    if option not in ("char", "gpt2") and not option.startswith(("hf:", "wordpiece:")):
        raise UserError(f"--tokenizer={option}: use char, gpt2, hf:OWNER/NAME (a Qwen2 or Doge checkpoint's tokenizer) "
                        f"or wordpiece:PATH/vocab.txt or wordpiece:hf:OWNER/NAME (a BERT vocabulary)")


def describe(option, text=""):
    """The descriptor for prepare_data.py's --tokenizer option: char (text's characters), gpt2,
    hf:OWNER/NAME (that checkpoint's BPE, to fine-tune it with train.py --init_from=hf:...), or
    wordpiece:PATH/vocab.txt or wordpiece:hf:OWNER/NAME (to fine-tune DAWN-39M)."""
    check_option(option)
    if option == "char":
        return {"kind": "char", "chars": "".join(sorted(set(text)))}
    if option.startswith("hf:"):
        return bpe_descriptor(option[3:])
    if option.startswith("wordpiece:"):
        return wordpiece_descriptor(option[len("wordpiece:"):])
    return GPT2


def upgrade(desc):
    """A descriptor as an older prepare_data.py wrote it, in today's form: a checkpoint's BPE was kind
    "tiktoken" too, told apart from a named encoding only by its "ranks"."""
    if desc.get("kind") == "tiktoken" and "ranks" in desc:
        return {**desc, "kind": "bpe"}
    return desc


def get_tokenizer(desc):
    """The Tokenizer of a descriptor from describe, meta.json or a checkpoint."""
    desc = upgrade(desc)
    if desc.get("kind") not in KINDS:
        raise UserError(f"unknown tokenizer {desc!r}")
    return KINDS[desc["kind"]](desc)


def same_tokenizer(a, b):
    """Two descriptors encode alike: equal but for the name (Qwen2.5's sizes share one tokenizer)."""
    a, b = upgrade(a), upgrade(b)
    return {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}


# -----------------------------------------------------------------------------
# char: one token per character

def char_tokenizer(desc):
    chars = desc["chars"]
    stoi = {c: i for i, c in enumerate(chars)}

    def encode(text):
        missing = sorted(set(text) - set(stoi))
        if missing:
            raise UserError(f"characters {''.join(missing)!r} are not in this model's vocabulary")
        return [stoi[c] for c in text]

    return Tokenizer(encode, lambda ids: "".join(chars[i] for i in ids), len(chars),
                     lambda: [len(c.encode()) for c in chars])


# -----------------------------------------------------------------------------
# tiktoken: a named encoding (GPT-2's)

def bpe_encoding(name):
    """tiktoken's encoding `name` (prepare_data.py's C4 path uses its batch encoder directly)."""
    import tiktoken
    try:
        return tiktoken.get_encoding(name)
    except requests.RequestException as e:  # tiktoken fetches its BPE file on first use
        raise UserError(f"tiktoken could not download the {name} BPE ({e.__class__.__name__}); connect "
                        f"to the internet once, or point TIKTOKEN_CACHE_DIR at a cache holding it") from None


def tiktoken_tokenizer(desc):
    enc = bpe_encoding(desc["encoding"])
    vocab_size = -(-enc.n_vocab // 64) * 64  # padded to a multiple of 64 (faster matmuls; the extra rows never occur)
    special = {enc.encode_single_token(t) for t in enc.special_tokens_set}

    def token_bytes():
        # a token's own bytes, not len(decode([i]).encode()): a BPE token may hold part of a
        # multi-byte character, which decodes alone to U+FFFD (3 bytes); <|endoftext|> separates documents
        return [0 if i in special or i >= enc.n_vocab else len(enc.decode_single_token_bytes(i))
                for i in range(vocab_size)]

    return Tokenizer(enc.encode_ordinary, lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]), vocab_size,
                     token_bytes)


# -----------------------------------------------------------------------------
# bpe: a checkpoint's byte-level BPE (tokenizer.json) as a tiktoken encoding

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


def bpe_descriptor(repo):
    """A compact, self-contained description of hf:<repo>'s tokenizer.json:
    {"kind": "bpe", "name", "pattern", "ranks": base64 tokens in id order, "special", "normalize"}.
    The file is downloaded, so any part of it may be of the wrong kind: that is one line too."""
    tok = fetch_json(repo, "tokenizer.json")
    try:
        return bpe_from_json(repo, tok)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"hf:{repo}'s tokenizer.json is malformed ({e.__class__.__name__}: {str(e)[:80]}); it is "
                        f"not a tokenizer this repo can read") from None


def bpe_from_json(repo, tok):
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
    desc = {"kind": "bpe", "name": f"hf:{repo}", "pattern": splits[0]["pattern"]["Regex"],
            "ranks": " ".join(base64.b64encode(t).decode() for t in by_id),
            "special": special, "normalize": normalizer}
    bpe_tokenizer(desc)  # tiktoken accepts its regex and ids (a ValueError or TypeError otherwise)
    return desc


def bpe_tokenizer(desc):
    """Added tokens such as <|endoftext|> are matched in the text, as Hugging Face's tokenizer does."""
    import tiktoken
    special_ids = set(desc["special"].values())  # an added token inside the vocabulary is only special
    ranks = {base64.b64decode(t): i for i, t in enumerate(desc["ranks"].split(" ")) if i not in special_ids}
    enc = tiktoken.Encoding(desc["name"], pat_str=desc["pattern"], mergeable_ranks=ranks,
                            special_tokens=desc["special"])

    def encode(text):
        if desc["normalize"]:
            text = unicodedata.normalize(desc["normalize"], text)
        return enc.encode(text, allowed_special="all")

    vocab_size = max([len(desc["ranks"].split(" ")), *[i + 1 for i in desc["special"].values()]])

    def token_bytes():  # each token's own bytes (it may be part of a character); added tokens: none
        lengths = [len(base64.b64decode(t)) for t in desc["ranks"].split(" ")]
        lengths += [0] * (vocab_size - len(lengths))
        for i in special_ids:
            lengths[i] = 0
        return lengths

    return Tokenizer(encode, lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]), vocab_size, token_bytes)


# -----------------------------------------------------------------------------
# wordpiece: BERT's (what the DAWN reference tokenized C4 with: bert-base-uncased, no special tokens)
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
    downloaded = source.startswith("hf:")
    path = fetch_file(source[3:], "vocab.txt") if downloaded else source
    try:
        with open(path, encoding="utf-8") as f:
            tokens = f.read().split("\n")
    except OSError as e:
        raise UserError(f"cannot read the WordPiece vocabulary {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        if downloaded:  # a damaged download: the next run fetches it again
            forget(path)
        raise UserError(f"{path} is not UTF-8 text; a WordPiece vocab.txt holds one token a line"
                        + ("; it was deleted from the cache: rerun to download it again" if downloaded else "")) from None
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


def wordpiece_tokenizer(desc):
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

    def token_bytes():
        # WordPiece keeps neither case, accents nor whitespace, so the bytes of the original text are
        # lost; this convention counts about those of decode's text: a "##" piece its bytes without "##",
        # a word-initial piece also the space before it, punctuation (split off words) no space,
        # [UNK] a one-byte word, the other special tokens nothing
        lengths = []
        for t in tokens:
            if t in WORDPIECE_SPECIALS:
                lengths.append(2 if t == "[UNK]" else 0)
            elif t.startswith("##"):
                lengths.append(len(t[2:].encode()))
            else:
                lengths.append(len(t.encode()) + (len(t) != 1 or not _is_punctuation(t)))
        return lengths

    return Tokenizer(encode, decode, len(tokens), token_bytes)


# -----------------------------------------------------------------------------
# ids: a synthetic task's tokens (prepare_data.py's mqar), which stand for no text: written as numbers

def ids_tokenizer(desc):
    vocab_size = desc["vocab_size"]

    def encode(text):
        try:
            ids = [int(word) for word in text.split()]
        except ValueError:
            raise UserError(f"this model reads token ids written as numbers, e.g. \"3 17 42\", not {text!r}") from None
        if any(not 0 <= i < vocab_size for i in ids):
            raise UserError(f"token ids must be in 0..{vocab_size - 1}")
        return ids

    # each id counts as one byte: bits per byte are bits per token, for MQAR bits per answer (its only
    # scored targets; train.py's evaluate counts 0 bytes for the ignored ones)
    return Tokenizer(encode, lambda ids: " ".join(str(i) for i in ids if i < vocab_size), vocab_size,
                     lambda: [1] * vocab_size)


KINDS = {"char": char_tokenizer, "tiktoken": tiktoken_tokenizer, "bpe": bpe_tokenizer, "wordpiece": wordpiece_tokenizer,
         "ids": ids_tokenizer}
