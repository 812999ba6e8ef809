"""
Build tests/fixtures/doge_tiny/: a tiny random DogeForCausalLM and a byte-level BPE of the kind the
SmallDoge checkpoints ship, made and run by Hugging Face's own code, so that
tests/test_pretrained_doge.py can check our loader, model_doge.py and tokenizer against transformers
without importing it (or reaching the network).

    pip install transformers tokenizers && python tests/make_doge_fixtures.py

The config has the options of SmallDoge/Doge-20M's (tied embeddings, 1 KV head, dynamic NTK RoPE
scaling x4, rope_theta 1e4) at toy sizes, written as transformers 4.x wrote it (rope_theta and
rope_scaling at the top level), with keep_window_size 16 < the 24-token input so that the dynamic
mask's top-k runs. The tokenizer is laid out as the SmallDoge tokenizer's ancestor
(WonderfulMatrices' examples/tokenizer): special tokens first (ids 0..5), then the 256 byte-level
characters, then the merges; Llama-3's split regex; BOS added by the post-processor.

Writes config.json, tokenizer.json, model.safetensors (fp32) and expected.pt: fixed inputs of
distinct tokens (the top-k has no ties then), transformers' logits for them (eager attention, which
is causal in every transformers version), and transformers' token ids for a few strings (without
the BOS its post-processor adds; our datasets are plain token streams).
"""
import json
import os

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import DogeConfig, DogeForCausalLM, PreTrainedTokenizerFast

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "doge_tiny")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
           "<|end_header_id|>", "<|eot_id|>"]
STRINGS = ["Hello world", "ROMEO:\nWhat light through yonder window breaks?", "  leading and   inner spaces \n\n",
           "numbers 12345 and 3.14159", "unicode: café, naïve, 東京, 🙂", "a byte never seen: \x07\x00 and \u0300",
           "it's we'll THEY'RE", "<|end_of_text|>after a special token", "\n\nnewlines\r\n\tand tabs"]
CONFIG = dict(architectures=["DogeForCausalLM"], model_type="doge", vocab_size=400, hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              hidden_act="silu", hidden_dropout=0.0, attention_dropout=0.0, attention_bias=False, mlp_bias=False,
              max_position_embeddings=64, rope_theta=10000.0,
              rope_scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 64},
              keep_window_size=16, is_moe=False, num_experts=16384, num_experts_per_tok=64, rms_norm_eps=1e-6,
              initializer_range=0.02, tie_word_embeddings=True, use_cache=True, bos_token_id=0, eos_token_id=1,
              pad_token_id=2, sliding_window=None, torch_dtype="float32")


def make_tokenizer():
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = ["the king and queen of france shall speak to thee my lord what is this night",
              "ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun.",
              "numbers 0123456789 and 2024, 3.14, café naïve, leading  spaces\n\nnew lines"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<|finetune_right_pad_id|>")


def main():
    os.makedirs(OUT, exist_ok=True)
    tokenizer = make_tokenizer()
    assert len(tokenizer) <= CONFIG["vocab_size"], len(tokenizer)
    tokenizer.backend_tokenizer.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    config = DogeConfig.from_pretrained(OUT)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DogeForCausalLM(config).eval()
    with torch.no_grad():  # HF inits A = 0, norms and residual scales 1: randomise them so the test sees them
        for name, p in model.named_parameters():
            if name.endswith(".A"):
                p.copy_(torch.randn_like(p))
            elif "norm" in name or "residual" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(OUT + "-tmp", safe_serialization=True)
    os.replace(os.path.join(OUT + "-tmp", "model.safetensors"), os.path.join(OUT, "model.safetensors"))
    for name in os.listdir(OUT + "-tmp"):
        os.remove(os.path.join(OUT + "-tmp", name))
    os.rmdir(OUT + "-tmp")
    g = torch.Generator().manual_seed(1)
    idx = torch.stack([torch.randperm(config.vocab_size, generator=g)[:24] for _ in range(2)])  # distinct tokens
    with torch.no_grad():
        logits = model(idx).logits
    ids = {s: tokenizer.encode(s, add_special_tokens=False) for s in STRINGS}
    with_bos = tokenizer.encode(STRINGS[0])
    torch.save({"idx": idx, "logits": logits, "ids": ids, "with_bos": with_bos}, os.path.join(OUT, "expected.pt"))
    print(f"wrote {OUT}: {sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT)):,} bytes")


if __name__ == "__main__":
    main()
