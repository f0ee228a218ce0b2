"""GPTQ checkpoints: what we write follows the documented layout (read back here with safetensors and an
independent unpacking), transformers reads its config, and write -> from_pretrained gives exactly the
dequantized kernels (Llama, and GPT-2's Conv1D layout); act-order g_idx and gptqmodel's v2 format read."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from jaxsparse.models import from_pretrained, init_params, save_pretrained
from jaxsparse.models.hub import CheckpointError
from jaxsparse.quant.gptq import gptq_quantize, hessian
from jaxsparse.quant.grid import dequantize, rtn_quantize
from jaxsparse.quant.quantizer import quantizable_linears
from jaxsparse.quant.save import save_gptq
from jaxsparse.tree import get_leaf, leaf_paths
from tests.quant.test_packing import _independent_dequant


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
    )  # fmt: skip
    return init_params(cfg, task="causal_lm", seed=0)


def _quantize_all(model, *, sym=False, act_order=False, prune=False):
    """GPTQ with act-order (a permuted g_idx) on some layers; RTN elsewhere (fast)."""
    rng = np.random.default_rng(0)
    out = {}
    for p in quantizable_linears(model):
        k = np.asarray(get_leaf(model.params, p + ".kernel"))
        if prune:
            k = np.where(rng.random(k.shape) < 0.5, 0.0, k).astype(np.float32)
        if act_order and k.shape == (32, 32):
            x = rng.normal(size=(64, 32)).astype(np.float32) * rng.uniform(0.1, 3, size=32).astype(np.float32)
            out[p] = gptq_quantize(k, hessian(x), bits=4, group_size=16, sym=sym, act_order=True)
            assert np.asarray(out[p].g_idx).tolist() != sorted(np.asarray(out[p].g_idx).tolist())
        else:
            out[p] = rtn_quantize(k, bits=4, group_size=16, sym=sym)
    return out


@pytest.mark.parametrize("sym,act_order", [(False, False), (True, True)])
def test_write_then_load_gives_the_dequantized_kernels(tmp_path, sym, act_order):
    model = _llama()
    layers = _quantize_all(model, sym=sym, act_order=act_order, prune=True)
    out = tmp_path / "q"
    save_gptq(model, layers, out, desc_act=act_order, damp_percent=0.01)

    raw = json.loads((out / "config.json").read_text())
    qcfg = raw["quantization_config"]
    assert {k: qcfg[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": 4, "group_size": 16, "sym": sym, "desc_act": act_order,
        "checkpoint_format": "gptq",
    }  # fmt: skip
    assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    assert transformers.AutoConfig.from_pretrained(out).quantization_config["bits"] == 4

    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.self_attn.q_proj"
    assert f"{name}.weight" not in tensors and f"{name}.bias" in tensors
    assert tensors[f"{name}.qweight"].shape == (4, 32) and tensors[f"{name}.qzeros"].shape == (2, 4)
    assert tensors[f"{name}.scales"].dtype == np.float16 and tensors[f"{name}.g_idx"].dtype == np.int32
    assert "model.embed_tokens.weight" in tensors and "model.layers.0.input_layernorm.weight" in tensors
    for p, qw in layers.items():
        t = {s: tensors[f"{p}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}
        np.testing.assert_array_equal(_independent_dequant(t, 4, classic=True), np.asarray(dequantize(qw)).T)

    back = from_pretrained(out)
    assert not hasattr(back.config, "quantization_config")
    for path, leaf in leaf_paths(back.params).items():
        module = path.rpartition(".")[0]
        if module in layers and path.endswith(".kernel"):
            np.testing.assert_array_equal(leaf, dequantize(layers[module]), err_msg=path)
        else:
            np.testing.assert_array_equal(leaf, get_leaf(model.params, path), err_msg=path)
    assert (
        np.asarray(back.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"] == 0).mean() >= 0.5
    )  # sparse
    # The loaded model saves as a plain checkpoint that transformers loads without a GPTQ backend.
    plain = tmp_path / "plain"
    save_pretrained(back, plain)
    assert "quantization_config" not in json.loads((plain / "config.json").read_text())
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(plain)
    w = torch_model.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    np.testing.assert_array_equal(w, np.asarray(dequantize(layers["model.layers.0.mlp.down_proj"])).T)


def test_gpt2_conv1d_layout(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
    model = init_params(cfg, task="causal_lm", seed=1)
    layers = {
        p: rtn_quantize(get_leaf(model.params, p + ".kernel"), bits=8, group_size=-1)
        for p in quantizable_linears(model)
    }
    save_gptq(model, layers, tmp_path / "g", method="rtn")
    tensors = load_file(tmp_path / "g" / "model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.qweight"].shape == (8, 96)  # (in * 8 / 32, out)
    back = from_pretrained(tmp_path / "g")
    for p, qw in layers.items():
        np.testing.assert_array_equal(get_leaf(back.params, p + ".kernel"), dequantize(qw))
    ids = jnp.array([[1, 2, 3, 4]])
    assert np.abs(np.asarray(back(ids)) - np.asarray(model(ids))).max() < 0.05


def test_reads_gptq_v2_and_missing_g_idx(tmp_path):
    model = _llama()
    layers = _quantize_all(model)
    out = tmp_path / "q"
    save_gptq(model, layers, out, checkpoint_format="gptq_v2")
    tensors = load_file(out / "model.safetensors")
    # Old AutoGPTQ checkpoints may lack g_idx: i // group_size is implied.
    save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, out / "model.safetensors")
    back = from_pretrained(out)
    p = "model.layers.0.self_attn.o_proj"
    np.testing.assert_array_equal(get_leaf(back.params, p + ".kernel"), dequantize(layers[p]))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"quant_method": "awq"}, "quant_method 'awq' is not supported (only 'gptq')"),
        ({"bits": 3}, "quantization_config.bits is 3"),
        ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ],
)
def test_unsupported_quantization_configs(tmp_path, edit, message):
    model = _llama()
    out = tmp_path / "q"
    save_gptq(model, _quantize_all(model), out)
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"].update(edit)
    (out / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as e:
        from_pretrained(out)
    assert message in str(e.value) and str(out) in str(e.value)


def test_missing_tensor_is_named(tmp_path):
    model = _llama()
    out = tmp_path / "q"
    save_gptq(model, _quantize_all(model), out)
    tensors = load_file(out / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.qzeros"]
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(
        (ValueError, CheckpointError), match=r"model.layers.1.mlp.up_proj: GPTQ tensors \['qzeros'\]"
    ):
        from_pretrained(out)


def test_save_refuses_mixed_specs_and_wrong_shapes(tmp_path):
    model = _llama()
    a = rtn_quantize(get_leaf(model.params, "model.layers.0.mlp.up_proj.kernel"), bits=4, group_size=16)
    b = rtn_quantize(get_leaf(model.params, "model.layers.0.mlp.down_proj.kernel"), bits=8, group_size=16)
    with pytest.raises(ValueError, match="must share bits/group_size/sym"):
        save_gptq(model, {"model.layers.0.mlp.up_proj": a, "model.layers.0.mlp.down_proj": b}, tmp_path / "x")
    with pytest.raises(ValueError, match="does not match the model's"):
        save_gptq(model, {"model.layers.0.mlp.down_proj": a}, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
