"""The real SmolLM2-135M (GGUF, ../shared/ASSETS.md) on two blocks and short sequences: the capture
equals transformers' hooks on the same weights, and Wanda prunes exactly half of every row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxsparse import calibration
from jaxsparse.models import from_pretrained, load_tokenizer, to_state_dict
from jaxsparse.prune import prune_model
from jaxsparse.tree import get_leaf

pytestmark = pytest.mark.real


def test_smollm2_capture_and_wanda_on_two_blocks(smollm2_gguf, bbc_dir):
    model = from_pretrained(smollm2_gguf)
    tokenizer = load_tokenizer(smollm2_gguf)
    texts = calibration.load_calibration_texts("bbc_news")[:20]
    cal = calibration.calibration_tokens(texts, tokenizer, samples=2, seq_len=32, seed=0)

    # transformers on the very same (dequantized) weights, hooked on two blocks' linears
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "architectures": None})
    torch_model = transformers.LlamaForCausalLM(config).eval()
    state = {k: torch.as_tensor(np.array(v)) for k, v in to_state_dict(model).items()}
    missing, unexpected = torch_model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # the (tied) head is not hooked
    names = [
        p for p in calibration.linear_paths(model) if p.startswith(("model.layers.0.", "model.layers.1."))
    ]
    seen: dict[str, np.ndarray] = {}
    modules = dict(torch_model.named_modules())
    for n in names:
        modules[n].register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].detach().numpy()))
    with torch.no_grad():
        torch_model(input_ids=torch.as_tensor(cal.input_ids.astype(np.int64)))

    captured: dict[str, calibration.LinearStats] = {}
    calibration.sequential_capture(
        model,
        cal.input_ids,
        update=lambda b: captured.update(b.stats) or {},
        statistics=("inputs",),
        max_blocks=2,
        progress=False,
    )
    assert sorted(captured) == sorted(names) and len(names) == 14
    for n in names:
        x, ref = np.asarray(captured[n].inputs), seen[n]
        assert np.abs(x - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), n

    pruned = prune_model(
        model, method="wanda", sparsity=0.5, input_ids=cal.input_ids, max_blocks=2, progress=False
    )
    for n in names:
        kernel = np.asarray(get_leaf(pruned.params, n + ".kernel"))
        assert ((kernel == 0).sum(axis=0) == kernel.shape[0] // 2).all(), n
    # block 0 saw no pruned predecessor: its mask is the NumPy Wanda on transformers' activations
    q = "model.layers.0.self_attn.q_proj"
    w = np.asarray(get_leaf(model.params, q + ".kernel")).T  # (out, in)
    x = seen[q].reshape(-1, w.shape[1]).astype(np.float64)
    metric = np.abs(w) * np.sqrt((x**2).sum(0))[None, :]
    pruned_ref = np.argsort(metric, axis=1)[:, : w.shape[1] // 2]
    expected = np.zeros_like(w, dtype=bool)
    np.put_along_axis(expected, pruned_ref, True, axis=1)
    np.testing.assert_array_equal(np.asarray(get_leaf(pruned.params, q + ".kernel")).T == 0, expected)
    untouched = "model.layers.2.mlp.up_proj.kernel"
    np.testing.assert_array_equal(get_leaf(pruned.params, untouched), get_leaf(model.params, untouched))
