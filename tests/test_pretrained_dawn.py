"""DAWN's reference checkpoint and BERT's WordPiece (pretrained.py) against the originals' own
outputs, offline: tests/fixtures/dawn_tiny/ was written by tests/make_dawn_fixtures.py with the DAWN
authors' model_v17_1.py (a tiny random model in the layout of their dawn_39m_weights.pt) and
transformers' BertTokenizer (ids for a tiny vocab.txt)."""
import json
import os

import pytest
import torch

import model_dawn
import pretrained
from cli import UserError
from conftest import FIXTURES, assert_one_line_error, make_text, read, run, saved_checkpoint
from tokenizer import get_tokenizer, wordpiece_descriptor

FIXTURE = os.path.join(FIXTURES, "dawn_tiny")
WEIGHTS = os.path.join(FIXTURE, "dawn_tiny_weights.pt")
VOCAB = os.path.join(FIXTURE, "vocab.txt")
EXPECTED = torch.load(os.path.join(FIXTURE, "expected.pt"), weights_only=True)


def reference_file():
    return torch.load(WEIGHTS, weights_only=True)


def load(path=WEIGHTS, **overrides):
    config, state = pretrained.read_dawn_checkpoint(path)
    model = model_dawn.DAWN(model_dawn.Config(**pretrained.dawn_model_fields(path, config, state, overrides, 0)))
    pretrained.load_dawn_weights(model, path, state)
    return model.eval()


def save(tmp_path, obj, name="bad.pt"):
    path = str(tmp_path / name)
    torch.save(obj, path)
    return path


def test_logits_equal_the_reference():
    model = load()
    c = model.config  # the shapes and routing the reference's config and tensors say
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (2, 4, 32, 64, 161)
    assert (c.rank, c.knowledge_rank, c.d_space, c.n_qk, c.n_v, c.n_know) == (8, 6, 16, 6, 10, 8)
    assert (c.top_k_qk, c.top_k_v, c.top_k_know, c.dropout, c.router_dropout) == (2, 3, 2, 0.1, 0.1)
    with torch.no_grad():
        logits = model(EXPECTED["idx"])[0]
    torch.testing.assert_close(logits, EXPECTED["logits"], atol=1e-5, rtol=0)
    cache = model.init_cache(2)  # and the incremental decoding sample.py uses gives the same
    with torch.no_grad():
        stepped = torch.cat([model.forward_cached(EXPECTED["idx"][:, t:t + 1], cache) for t in range(24)], dim=1)
    torch.testing.assert_close(stepped, EXPECTED["logits"], atol=1e-5, rtol=0)


def test_shorter_block_size_keeps_the_first_positions():
    model = load(block_size=16)
    assert model.wpe.weight.shape == (16, 32)
    with torch.no_grad():  # causal: the first 16 positions see nothing after them, in either model
        logits = model(EXPECTED["idx"][:, :16])[0]
    torch.testing.assert_close(logits, EXPECTED["logits"][:, :16], atol=1e-5, rtol=0)


def test_auxiliary_losses_equal_the_reference():
    model = load(dropout=0.0, router_dropout=0.0).train()
    model(EXPECTED["idx"], EXPECTED["idx"])
    aux = model.last["aux"]
    for key in ("lb", "orth", "div"):  # reference: its aux_loss, orthogonality_loss(), knowledge_diversity_loss()
        assert abs(aux[key].item() - EXPECTED["aux"][key]) < 1e-5 * max(1.0, EXPECTED["aux"][key]), key


def test_the_39m_config_is_our_preset():
    # tensors of the published shapes (on the meta device: shapes, no memory), reference names
    d, r, s, V, T, N = 384, 64, 256, 30522, 512, {"qk": 64, "v": 264, "know": 160}
    state = {"token_emb.weight": (V, d), "pos_emb.weight": (T, d), "shared_neurons.f_neurons": (N["qk"] + N["v"], d, r),
             "shared_neurons.feature_know": (N["know"], d, r), "router.neuron_router.neuron_emb": (2 * sum(N.values()), s),
             **{f"layers.{i}.norm1.weight": (d,) for i in range(12)}}
    state = {k: torch.empty(shape, device="meta") for k, shape in state.items()}
    # the model section of the reference's train_config_v17_1_40M_c4_5B_seed1_token_routing_v_expand6.yaml
    config = {"d_model": d, "n_layers": 12, "n_heads": 6, "rank": r, "knowledge_rank": r, "max_seq_len": T,
              "vocab_size": V, "d_space": s, "dropout": 0.1, "router_dropout": 0.1, "state_dim": 64,
              **{f"n_{step}_{pool}": n for step in ("feature", "restore") for pool, n in N.items()},
              **{f"top_k_{step}_{pool}": 12 for step in ("feature", "restore") for pool in N},
              "attention_token_routing": True, "knowledge_token_routing": True, "use_ssm_context": False}
    preset = model_dawn.PRESETS["dawn-39m"]
    for given in (config, {}):  # a bare state_dict of these shapes takes the preset's heads, split and top-k
        fields = pretrained.dawn_model_fields("dawn_39m_weights.pt", given, state, {}, V)
        assert fields == preset  # (the loss weights stay our Config defaults, the reference's 39M training values)


def test_wordpiece_ids_equal_bert_tokenizer():
    desc = wordpiece_descriptor(VOCAB)
    assert desc["lowercase"] and len(desc["vocab"].split("\n")) == 161
    tok = get_tokenizer(json.loads(json.dumps(desc)))  # as read back from meta.json
    encode, decode = tok.encode, tok.decode
    for text, (ids, decoded) in EXPECTED["ids"].items():
        assert encode(text) == ids, text
        assert decode(ids) == decoded, text
    assert decode(encode("Hello, World! The KING's night.")) == "hello, world! the king's night."
    assert decode(encode("Café naïve")) == "cafe naive"  # lowercased, accents stripped, as BERT-uncased sees it
    vocab = desc["vocab"].split("\n")
    assert [vocab[i] for i in encode("unaffable running")] == ["un", "##aff", "##able", "run", "##ning"]


def test_vocab_from_the_hub_is_cached(hub):
    hub.serve("google-bert/bert-base-uncased", {"vocab.txt": read(VOCAB)})
    desc = wordpiece_descriptor("hf:google-bert/bert-base-uncased")
    assert desc["vocab"] == wordpiece_descriptor(VOCAB)["vocab"]
    n = len(hub.requests)
    wordpiece_descriptor("hf:google-bert/bert-base-uncased")
    assert len(hub.requests) == n  # the second time from the cache


def test_bad_vocab_files(tmp_path):
    bad = tmp_path / "vocab.txt"
    bad.write_text("[PAD]\nthe\n\nking\n[UNK]\n")
    with pytest.raises(UserError, match="line 3 is empty or has spaces"):
        wordpiece_descriptor(str(bad))
    bad.write_text("[PAD]\nthe\nking\n")
    with pytest.raises(UserError, match="has no .UNK. token"):
        wordpiece_descriptor(str(bad))
    bad.write_bytes(b"\xff\xfe[UNK]\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        wordpiece_descriptor(str(bad))
    with pytest.raises(UserError, match="cannot read the WordPiece vocabulary"):
        wordpiece_descriptor(str(tmp_path / "missing.txt"))
    bad.write_text("[UNK]\nThe\nking\n")  # a cased vocabulary is not lowercased
    assert wordpiece_descriptor(str(bad))["lowercase"] is False


class NotData:  # a pickled object: torch.load(weights_only=True) refuses it
    pass


def test_bad_checkpoints_give_one_line_errors(tmp_path):
    ckpt = reference_file()
    state, config = ckpt["model_state_dict"], ckpt["config"]
    with pytest.raises(UserError, match="no such file; download dawn_39m_weights.pt from https://zenodo.org/records/18060421"):
        pretrained.read_dawn_checkpoint(str(tmp_path / "missing.pt"))
    data = read(WEIGHTS)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint .*download it again"):
        pretrained.read_dawn_checkpoint(str(truncated))
    with pytest.raises(UserError, match="is not a readable PyTorch checkpoint .UnpicklingError"):
        pretrained.read_dawn_checkpoint(save(tmp_path, {"model_state_dict": state, "config": NotData()}))
    with pytest.raises(UserError, match="written by this repo's train.py; continue it with --init_from=resume"):
        pretrained.read_dawn_checkpoint(save(tmp_path, {"model_name": "dawn", "model": {}}))
    with pytest.raises(UserError, match="not a DAWN v17.1 checkpoint"):
        pretrained.read_dawn_checkpoint(save(tmp_path, {"model_state_dict": {"wte.weight": torch.zeros(2)}}))
    with pytest.raises(UserError, match="is DAWN v18.2; only v17.1"):
        pretrained.read_dawn_checkpoint(save(tmp_path, {**ckpt, "config": {**config, "model_version": "18.2"}}))
    with pytest.raises(UserError, match="attention_token_routing=False: sequence-level routing .the DAWN-24M model. reads future tokens"):
        pretrained.read_dawn_checkpoint(save(tmp_path, {**ckpt, "config": {**config, "attention_token_routing": False}}))
    with pytest.raises(UserError, match="its config says n_qk.n_v = 17, its tensors 16; the file is inconsistent"):
        load(save(tmp_path, {**ckpt, "config": {**config, "n_feature_qk": 7, "n_restore_qk": 7}}))
    with pytest.raises(UserError, match="its config says n_know = 9, its tensors 8"):
        load(save(tmp_path, {**ckpt, "config": {**config, "n_feature_know": 9, "n_restore_know": 9}}))
    with pytest.raises(UserError, match="n_feature_v = 10 but n_restore_v = 9; model_dawn.py gives"):
        load(save(tmp_path, {**ckpt, "config": {**config, "n_restore_v": 9}}))
    with pytest.raises(UserError, match="has no config.'top_k_feature_qk'."):
        load(save(tmp_path, {**ckpt, "config": {k: v for k, v in config.items() if k != "top_k_feature_qk"}}))
    with pytest.raises(UserError, match="has no config.'n_heads'.; without it the checkpoint's shape is ambiguous"):
        load(save(tmp_path, state))  # a bare state_dict: only dawn-39m's shapes can do without a config
    with pytest.raises(UserError, match="lacks the tensor layers.1.norm2.bias"):
        load(save(tmp_path, {**ckpt, "model_state_dict": {k: v for k, v in state.items() if k != "layers.1.norm2.bias"}}))
    with pytest.raises(UserError, match="has tensors no DAWN v17.1 model has .e.g. extra.weight"):
        load(save(tmp_path, {**ckpt, "model_state_dict": {**state, "extra.weight": torch.zeros(1)}}))
    copy = {**state, "layers.0.attn.shared_neurons.f_neurons": state["shared_neurons.f_neurons"] + 1}
    with pytest.raises(UserError, match="layers.0.attn.shared_neurons.f_neurons differs from shared_neurons.f_neurons"):
        load(save(tmp_path, {**ckpt, "model_state_dict": copy}))
    nan = {**state, "norm.bias": torch.full_like(state["norm.bias"], float("nan"))}
    with pytest.raises(UserError, match="norm_f.bias holds inf or nan"):
        load(save(tmp_path, {**ckpt, "model_state_dict": nan}))
    with pytest.raises(UserError, match="--n_layer is fixed by .*'s weights; drop it"):
        load(n_layer=3)
    with pytest.raises(UserError, match="--block_size=128 is longer than .* 64 learned positions"):
        load(block_size=128)
    compiled = {"_orig_mod." + k: v for k, v in state.items()}  # saved from a torch.compile'd model: fine
    model = load(save(tmp_path, {**ckpt, "model_state_dict": compiled}))
    with torch.no_grad():
        torch.testing.assert_close(model(EXPECTED["idx"])[0], EXPECTED["logits"], atol=1e-5, rtol=0)


def test_fine_tune_and_sample_end_to_end(hub, tmp_path):
    hub.serve("google-bert/bert-base-uncased", {"vocab.txt": read(VOCAB)})  # the vocabulary from the stand-in hub
    text = tmp_path / "text.txt"
    text.write_text(make_text(20000))
    data = str(tmp_path / "data")
    r = run("prepare_data.py", "shakespeare", "--tokenizer=wordpiece:hf:google-bert/bert-base-uncased",
            f"--input={text}", "--name=bert", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    out = str(tmp_path / "out")
    common = ["--model=dawn", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
              "--eval_iters=1", "--batch_size=2", "--block_size=32", "--device=cpu", "--compile=False"]
    r = run("train.py", f"--init_from={WEIGHTS}", "--dataset=bert", *common)
    assert r.returncode == 0, r.stderr
    assert f"loaded {WEIGHTS}" in r.stdout
    r = run("sample.py", f"--out_dir={out}", "--num_samples=1", "--max_new_tokens=8", "--start=The KING of",
            "--device=cpu")
    assert r.returncode == 0 and r.stdout.startswith("the king of "), r.stderr
    # --max_iters=0 saves the loaded weights untrained: train.py's checkpoint computes the reference's logits
    r = run("train.py", f"--init_from={WEIGHTS}", "--dataset=bert", *common[:2], f"--out_dir={out}0", "--max_iters=0",
            "--eval_iters=1", "--batch_size=2", "--device=cpu", "--compile=False")
    assert r.returncode == 0, r.stderr
    ckpt = saved_checkpoint(f"{out}0")
    assert ckpt["iter_num"] == 0 and ckpt["tokenizer"]["kind"] == "wordpiece"
    model = model_dawn.DAWN(model_dawn.Config(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(EXPECTED["idx"])[0], EXPECTED["logits"], atol=1e-5, rtol=0)
    # a dataset in another tokenizer, another model, and a file that is not a checkpoint: one line each
    r = run("prepare_data.py", "shakespeare_char", f"--input={text}", "--name=chars", f"--data_dir={data}")
    assert r.returncode == 0, r.stderr
    common.append("--overwrite=True")  # out_dir holds the fine-tuned checkpoint; these runs stop before saving
    r = run("train.py", f"--init_from={WEIGHTS}", "--dataset=chars", *common)
    assert_one_line_error(r, "train.py", "dataset chars was not tokenized with a 161-token WordPiece vocabulary")
    r = run("train.py", f"--init_from={WEIGHTS}", "--dataset=bert", *common[1:], "--model=gpt")
    assert_one_line_error(r, "train.py", "a checkpoint file loads only with --model=dawn")
    r = run("train.py", f"--init_from={text}", "--dataset=bert", *common)
    assert_one_line_error(r, "train.py", f"{text} is not a readable PyTorch checkpoint")
