"""GGUF loading: tiny files written with llama.cpp's conventions (q/k rope permutation, Q8_0 and F32
tensors) load to the same logits as transformers' own GGUF loader; errors name what is wrong; the real
SmolLM2-135M Q4_1 file generates token-identical greedy continuations to transformers."""

from __future__ import annotations

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import models
from jaxsparse.models.generate import generate
from jaxsparse.models.gguf import load_gguf, read_gguf, unpermute_rope_rows
from jaxsparse.models.hub import CheckpointError

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 32, 2, 4, 2, 64, 64


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (the inverse of ours, written independently)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path, arch: str = "llama", *, tied: bool = False, seed: int = 0, quant=gguf.GGMLQuantizationType.Q8_0
):
    """A random tiny model in GGUF: matrices quantized with ``quant``, norms/biases F32.

    Returns the Hugging Face state dict of the *unquantized* weights (for the permutation test)."""
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    hf: dict[str, np.ndarray] = {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)

    def matrix(name, hf_name, out, inp, permute_heads=None):
        w = rng.normal(0, 0.3, size=(out, inp)).astype(np.float32)
        hf[hf_name] = w
        stored = llama_cpp_permute(w, permute_heads) if permute_heads else w
        if quant == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, stored)
        else:
            writer.add_tensor(name, gguf.quants.quantize(stored, quant), raw_dtype=quant)

    def vector(name, hf_name, n, mean=1.0):
        v = (mean + rng.normal(0, 0.2, size=n)).astype(np.float32)
        hf[hf_name] = v
        writer.add_tensor(name, v)

    permute = arch == "llama"
    matrix("token_embd.weight", "model.embed_tokens.weight", VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        vector(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", HIDDEN)
        matrix(
            f"blk.{i}.attn_q.weight",
            p + "self_attn.q_proj.weight",
            HIDDEN,
            HIDDEN,
            HEADS if permute else None,
        )
        matrix(
            f"blk.{i}.attn_k.weight",
            p + "self_attn.k_proj.weight",
            KV_HEADS * head_dim,
            HIDDEN,
            KV_HEADS if permute else None,
        )
        matrix(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", HIDDEN, HIDDEN)
        if arch == "qwen2":
            vector(f"blk.{i}.attn_q.bias", p + "self_attn.q_proj.bias", HIDDEN, mean=0.0)
            vector(f"blk.{i}.attn_k.bias", p + "self_attn.k_proj.bias", KV_HEADS * head_dim, mean=0.0)
            vector(f"blk.{i}.attn_v.bias", p + "self_attn.v_proj.bias", KV_HEADS * head_dim, mean=0.0)
        vector(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", HIDDEN)
        matrix(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", FFN, HIDDEN)
        matrix(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", HIDDEN, FFN)
    vector("output_norm.weight", "model.norm.weight", HIDDEN)
    if not tied:
        matrix("output.weight", "lm_head.weight", VOCAB, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


IDS = np.array([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14]])
MASK = (IDS != 0).astype(np.int64)


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_tiny_gguf_logits_match_transformers_gguf_loader(tmp_path, arch, tied):
    write_tiny_gguf(tmp_path / "tiny.gguf", arch, tied=tied)
    tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    with torch.no_grad():
        ref = tm(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()
    model = load_gguf(tmp_path / "tiny.gguf")
    assert model.config.model_type == arch and model.task == "causal_lm"
    assert model.config.tie_word_embeddings is tied
    ours = np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))
    keep = MASK.astype(bool)
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5


def test_rope_permutation_is_undone_exactly(tmp_path):
    hf = write_tiny_gguf(tmp_path / "f32.gguf", quant=gguf.GGMLQuantizationType.F32)
    config, state = read_gguf(tmp_path / "f32.gguf")
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (HEADS, KV_HEADS, 8)
    assert config.rope_parameters["rope_theta"] == 1000.0 and config.eos_token_id == 2
    assert set(state) == set(hf)
    for key, w in hf.items():
        np.testing.assert_array_equal(state[key], w, err_msg=key)
    rows = np.arange(16)[:, None]
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(rows, 2), 2), rows)


def test_gguf_loads_other_tasks_and_through_from_pretrained(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    cls = models.from_pretrained(tmp_path / "tiny.gguf", num_labels=3)
    assert cls.task == "seq_cls" and cls(jnp.asarray(IDS), jnp.asarray(MASK)).shape == (2, 3)
    base = load_gguf(tmp_path / "tiny.gguf", task="base", dtype=jnp.bfloat16)
    assert base(jnp.asarray(IDS)).shape == (2, 6, HIDDEN)
    assert base.params["embed_tokens"]["embedding"].dtype == jnp.bfloat16


def test_unsupported_quant_type_is_named(tmp_path):
    path = tmp_path / "q81.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, v in [
        (writer.add_block_count, 1),
        (writer.add_embedding_length, 32),
        (writer.add_head_count, 4),
        (writer.add_vocab_size, 64),
        (writer.add_head_count_kv, 4),
    ]:
        add(v)
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    writer.add_tensor(
        "token_embd.weight",
        np.zeros((64, 32 // block * size), np.uint8),
        raw_dtype=gguf.GGMLQuantizationType.Q8_1,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"'token_embd.weight' uses quantization type Q8_1"):
        load_gguf(path)


def test_unsupported_architecture_and_bad_file(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"architecture 'gpt2' is not supported"):
        load_gguf(path)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match=r"junk\.gguf: not a readable GGUF"):
        load_gguf(tmp_path / "junk.gguf")


@pytest.mark.real
def test_smollm2_greedy_continuations_match_transformers(smollm2_gguf):
    model = load_gguf(smollm2_gguf)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.tie_word_embeddings) == (
        30,
        576,
        True,
    )
    tokenizer = models.load_tokenizer(smollm2_gguf)
    tokenizer.padding_side = "left"
    prompts = ["The capital of Italy is", "def fibonacci(n):", "Once upon a time"]
    enc = tokenizer(prompts, return_tensors="np", padding=True)
    ours = np.asarray(generate(model, enc["input_ids"], enc["attention_mask"], max_new_tokens=8))
    tm = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name
    ).eval()
    with torch.no_grad():
        ref = tm.generate(
            input_ids=torch.as_tensor(enc["input_ids"]),
            attention_mask=torch.as_tensor(enc["attention_mask"]),
            do_sample=False,
            max_new_tokens=8,
        ).numpy()
    np.testing.assert_array_equal(ours, ref)
    first = tokenizer.decode(ours[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert first.startswith(" Rome."), first
