"""Whole-model quantization: GPTQ's per-layer Hessians are those of transformers' own forward hooks
(block 0 on the float model; block 1 on a model whose block 0 is already quantized), GPTQ beats RTN
on the model's output, and a pruned model stays exactly as sparse."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxsparse.models import from_torch
from jaxsparse.quant.gptq import gptq_quantize
from jaxsparse.quant.grid import dequantize
from jaxsparse.quant.quantizer import quantizable_linears, quantize_model
from jaxsparse.tree import get_leaf, replace_leaves


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch_model = transformers.LlamaForCausalLM(cfg).eval()
    ids = np.random.default_rng(0).integers(0, 64, (4, 16))
    return torch_model, from_torch(torch_model), ids


def _hook_hessian(torch_model, ids, name):
    seen = []
    module = torch_model.get_submodule(name)
    handle = module.register_forward_hook(
        lambda m, args, out: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))
    )
    with torch.no_grad():
        torch_model(torch.tensor(ids))
    handle.remove()
    x = torch.cat(seen).double().numpy()
    return 2 * x.T @ x / x.shape[0]


def test_gptq_layers_use_the_sequential_hessians(tiny):
    torch_model, model, ids = tiny
    new, layers = quantize_model(model, method="gptq", bits=4, group_size=16, input_ids=ids, progress=False)
    assert sorted(layers) == sorted(quantizable_linears(model)) and len(layers) == 14
    for p, qw in layers.items():
        np.testing.assert_array_equal(get_leaf(new.params, p + ".kernel"), dequantize(qw), err_msg=p)
    # block 0: hooks on the float model
    name = "model.layers.0.mlp.down_proj"
    h = _hook_hessian(torch_model, ids, name)
    ref = gptq_quantize(get_leaf(model.params, name + ".kernel"), h, bits=4, group_size=16)
    np.testing.assert_allclose(dequantize(layers[name]), dequantize(ref), atol=1e-6)
    # block 1: hooks on a torch model whose block 0 holds the quantized weights
    with torch.no_grad():
        for p, qw in layers.items():
            if p.startswith("model.layers.0."):
                torch_model.get_submodule(p).weight.copy_(torch.tensor(np.asarray(dequantize(qw)).T))
        name = "model.layers.1.self_attn.k_proj"
        h = _hook_hessian(torch_model, ids, name)
    ref = gptq_quantize(get_leaf(model.params, name + ".kernel"), h, bits=4, group_size=16)
    np.testing.assert_allclose(dequantize(layers[name]), dequantize(ref), atol=1e-6)


def test_gptq_beats_rtn_on_model_output_and_keeps_sparsity(tiny):
    _, model, ids = tiny
    rng = np.random.default_rng(1)
    pruned = {}
    for p in quantizable_linears(model):
        k = np.asarray(get_leaf(model.params, p + ".kernel"))
        pruned[p + ".kernel"] = np.where(rng.random(k.shape) < 0.5, 0.0, k).astype(np.float32)
    sparse = model.__class__(model.config, replace_leaves(model.params, pruned), model.apply_fn, model.task)
    ref = np.asarray(sparse(ids))
    errs = {}
    for method in ("rtn", "gptq"):
        new, _ = quantize_model(sparse, method=method, bits=2, group_size=16, input_ids=ids, progress=False)
        errs[method] = float(np.linalg.norm(np.asarray(new(ids)) - ref))
        for path, k in pruned.items():
            q = np.asarray(get_leaf(new.params, path))
            assert np.all(q[k == 0] == 0.0), path  # pruned weights stay exactly zero
    assert errs["gptq"] < errs["rtn"], errs


def test_bad_requests(tiny):
    model = tiny[1]
    with pytest.raises(ValueError, match="does not divide the input width 32"):
        quantize_model(model, method="rtn", group_size=24, progress=False)
    with pytest.raises(ValueError, match="GPTQ needs calibration input_ids"):
        quantize_model(model, method="gptq", group_size=16, progress=False)
    with pytest.raises(ValueError, match="unknown quantization method 'awq'"):
        quantize_model(model, method="awq", progress=False)


@pytest.mark.real
def test_real_smollm2_block0_gptq_beats_rtn(smollm2_gguf):
    from jaxsparse import calibration
    from jaxsparse.models import from_pretrained, load_tokenizer
    from jaxsparse.quant.grid import rtn_quantize

    model = from_pretrained(smollm2_gguf)
    text = " ".join(f"The river {i} runs past the old mill and the market square." for i in range(60))
    ids = np.asarray(load_tokenizer(smollm2_gguf)(text)["input_ids"][:256]).reshape(4, 64)
    captured = {}

    def update(block):
        for p in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
            captured[p] = (block.kernels[p], block.stats[p].hessian())
        return {}

    calibration.sequential_capture(
        model, ids, None, update=update, statistics=("xtx",), max_blocks=1, progress=False
    )
    for p, (kernel, h) in captured.items():
        k, h = np.asarray(kernel, np.float64), np.asarray(h, np.float64)

        def err(q, k=k, h=h):
            d = k - np.asarray(dequantize(q), np.float64)
            return float(np.trace(d.T @ h @ d))

        gptq = err(gptq_quantize(kernel, h, bits=4, group_size=64))
        rtn = err(rtn_quantize(kernel, bits=4, group_size=64))
        assert gptq < 0.8 * rtn, (p, gptq, rtn)
