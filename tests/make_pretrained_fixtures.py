"""
Build tests/fixtures/qwen2_tiny/: a tiny random Qwen2ForCausalLM and its byte-level BPE, made and run
by Hugging Face's own code, so that tests/test_pretrained.py can check our loader, model and
tokenizer against transformers without importing it (or reaching the network).

    pip install transformers tokenizers && python tests/make_pretrained_fixtures.py

Writes config.json, tokenizer.json, model.safetensors (fp32) and bf16/model.safetensors, and
expected.pt: a fixed input, transformers' logits for it (fp32 weights, and the bf16 weights run in
fp32), and transformers' token ids for a few strings.
"""
import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2TokenizerFast

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "qwen2_tiny")
# Qwen2's pre-tokenizer regex, as in Qwen/Qwen2.5-0.5B's tokenizer.json
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
STRINGS = ["Hello world", "ROMEO:\nWhat light through yonder window breaks?", "  leading and   inner spaces \n\n",
           "numbers 12345 and 3.14159", "unicode: café, naïve, 東京, 🙂", "e\u0301 (NFC makes it é)",
           "it's we'll THEY'RE", "<|endoftext|>after a special token"]


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["the king and queen of france shall speak to thee my lord what is this night",
              "ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun.",
              "numbers 0123456789 and 2024, 3.14, café naïve"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    # added after training, so that they come after the BPE ranks as in Qwen2 (151643 onwards)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None)


def main():
    os.makedirs(os.path.join(OUT, "bf16"), exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(OUT)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # HF zero-inits the qkv biases and sets norms to 1: randomise them so the test sees them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(OUT, safe_serialization=True)
    idx = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(idx).logits
        bf16 = model.to(torch.bfloat16)
        bf16.save_pretrained(os.path.join(OUT, "bf16"), safe_serialization=True)
        logits_bf16 = bf16.float()(idx).logits  # the bf16-rounded weights, computed in fp32
    for folder in (OUT, os.path.join(OUT, "bf16")):
        for name in ("generation_config.json", "special_tokens_map.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))  # not read by our loader
    os.remove(os.path.join(OUT, "bf16", "config.json"))  # the same as the fp32 one
    ids = {s: tokenizer.encode(s) for s in STRINGS}
    torch.save({"idx": idx, "logits": logits, "logits_bf16": logits_bf16, "ids": ids}, os.path.join(OUT, "expected.pt"))
    print(f"wrote {OUT}: {sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs):,} bytes")


if __name__ == "__main__":
    main()
