"""
Build tests/fixtures/shakespeare_tiny/: the start of tiny Shakespeare and the part of GPT-2's BPE it
needs, so that the tests of prepare_data.py, train.py's default dataset and GPT-2 tokenization run
offline in a plain clone, with GPT-2's own token ids.

    python tests/make_shakespeare_fixtures.py tinyshakespeare.txt TIKTOKEN_CACHE_DIR

(the text is karpathy/char-rnn's data/tinyshakespeare/input.txt; the cache directory holds tiktoken's
r50k_base file, as tiktoken writes it after one download.) Writes:

input.txt           the first ~7.5 KB of the text, up to the end of a speech
r50k_base.tiktoken  tiktoken's format (base64 token, space, rank) for the 256 single bytes and every
                    token that tiktoken's merges pass through while encoding input.txt, its 90/10
                    train/val halves (prepare_data.py encodes them apart) and STRINGS, at their
                    r50k_base ranks. BPE merges the adjacent pair of lowest rank; every pair it merges
                    on these texts is here, so leaving out the others changes nothing on them (checked
                    here against the full encoding). Other text still encodes, into other tokens.
"""
import base64
import os
import sys

import regex
import tiktoken
import tiktoken_ext.openai_public as openai_public

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "shakespeare_tiny")
CHARS = 7500
STRINGS = ["First Citizen:", "Hello, world!"]  # the ids tests/test_data.py checks


def merged_tokens(piece, ranks):
    """The tokens byte-pair merging makes on its way through one pre-tokenized piece, and the piece
    itself if it is a token (tiktoken then takes it whole)."""
    parts, made = [bytes([b]) for b in piece], {piece} & ranks.keys()
    while True:
        pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not pairs:
            return made
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        made.add(parts[i])


def main(text_path, cache_dir):
    os.environ["TIKTOKEN_CACHE_DIR"] = cache_dir
    full = openai_public.r50k_base()
    ranks, pattern = full["mergeable_ranks"], full["pat_str"]
    with open(text_path, encoding="utf-8") as f:
        text = f.read()
    text = text[:CHARS].rsplit("\n\n", 1)[0] + "\n"
    n = int(0.9 * len(text))  # prepare_data.prepare_text's split
    texts = [text, text[:n], text[n:], *STRINGS]
    kept = {bytes([b]) for b in range(256)}
    for t in texts:
        for piece in regex.findall(pattern, t):
            kept |= merged_tokens(piece.encode("utf-8"), ranks)
    subset = sorted(kept, key=ranks.get)
    reference = tiktoken.Encoding("r50k_base", pat_str=pattern, mergeable_ranks=ranks,
                                  special_tokens=full["special_tokens"])
    small = tiktoken.Encoding("subset", pat_str=pattern, mergeable_ranks={t: ranks[t] for t in subset},
                              special_tokens=full["special_tokens"])
    for t in texts:
        assert small.encode_ordinary(t) == reference.encode_ordinary(t), t[:40]
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "input.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(OUT, "r50k_base.tiktoken"), "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {ranks[t]}\n" for t in subset)
    print(f"wrote {OUT}: input.txt {len(text):,} characters ({len(reference.encode_ordinary(text[:n])):,} + "
          f"{len(reference.encode_ordinary(text[n:])):,} GPT-2 tokens), r50k_base.tiktoken {len(subset):,} tokens")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python tests/make_shakespeare_fixtures.py tinyshakespeare.txt TIKTOKEN_CACHE_DIR")
    main(*sys.argv[1:])
