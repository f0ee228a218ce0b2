"""Whole-model pruning: Wanda equals a NumPy Wanda on the same captured activations; layer selection;
rows are PyTorch output rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from jaxsparse import calibration
from jaxsparse.models import from_torch, to_state_dict
from jaxsparse.prune import prunable_linears, prune_model, prune_spec
from jaxsparse.tree import TargetError, get_leaf


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return from_torch(transformers.LlamaForCausalLM(cfg).eval())


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return from_torch(transformers.GPT2LMHeadModel(cfg).eval())


def numpy_wanda(weight_out_in: np.ndarray, x: np.ndarray, sparsity: float, nm: tuple[int, int] | None):
    """The Wanda reference on a PyTorch-layout weight (out, in) and inputs x (tokens, in), in float64."""
    metric = np.abs(weight_out_in) * np.sqrt((x.astype(np.float64) ** 2).sum(0))[None, :]
    mask = np.zeros_like(metric, dtype=bool)  # True = pruned
    if nm is None:
        k = int(metric.shape[1] * sparsity)
        idx = np.argsort(metric, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, idx, True, axis=1)
    else:
        n, m = nm
        for start in range(0, metric.shape[1], m):
            idx = np.argsort(metric[:, start : start + m], axis=1, kind="stable")[:, : m - n]
            np.put_along_axis(mask[:, start : start + m], idx, True, axis=1)
    return np.where(mask, 0.0, weight_out_in)


@pytest.mark.parametrize(("pattern", "nm"), [("unstructured", None), ("2:4", (2, 4)), ("4:8", (4, 8))])
def test_wanda_equals_numpy_on_the_same_captured_activations(llama, pattern, nm):
    ids = np.random.default_rng(0).integers(0, 64, (4, 16))
    ours = prune_model(llama, method="wanda", sparsity=0.5, pattern=pattern, input_ids=ids, progress=False)

    # The NumPy reference prunes from the raw inputs the capture records (checked against
    # transformers' hooks in tests/test_calibration.py), block by block as well.
    def numpy_update(block):
        new = {}
        for p, kernel in block.kernels.items():
            x = np.asarray(block.stats[p].inputs).reshape(-1, kernel.shape[0])
            new[p] = numpy_wanda(np.asarray(kernel).T, x, 0.5, nm).T
        return new

    reference = calibration.sequential_capture(
        llama, ids, update=numpy_update, statistics=("inputs",), progress=False
    )
    for p in calibration.linear_paths(llama):
        got = np.asarray(get_leaf(ours.params, p + ".kernel"))
        want = np.asarray(get_leaf(reference.params, p + ".kernel"))
        np.testing.assert_array_equal(got == 0, want == 0, err_msg=p)
        np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=p)
    # and Wanda is not magnitude: on these activations the masks differ somewhere
    mag = prune_model(llama, method="magnitude", sparsity=0.5, pattern=pattern, progress=False)
    p = "model.layers.1.mlp.down_proj"
    assert (
        np.asarray(get_leaf(mag.params, p + ".kernel")) != np.asarray(get_leaf(ours.params, p + ".kernel"))
    ).any()


def test_default_targets_are_the_block_linears_only(llama):
    paths = prunable_linears(llama)
    assert len(paths) == 3 * 7 and all(".layers." in p for p in paths)
    ids = np.random.default_rng(0).integers(0, 64, (2, 8))
    pruned = prune_model(llama, method="wanda", sparsity=0.5, input_ids=ids, progress=False)
    for untouched in ("lm_head.kernel", "model.embed_tokens.embedding", "model.norm.scale"):
        np.testing.assert_array_equal(get_leaf(pruned.params, untouched), get_leaf(llama.params, untouched))


def test_targets_narrow_the_selection(llama):
    assert prunable_linears(llama, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{n}" for i in range(3) for n in ("q_proj", "v_proj")
    ]
    pruned = prune_model(llama, method="magnitude", sparsity=0.25, targets=["down_proj"], progress=False)
    for p in calibration.linear_paths(llama):
        k = np.asarray(get_leaf(pruned.params, p + ".kernel"))
        assert (k == 0).any() == p.endswith("down_proj")
    with pytest.raises(ValueError, match="not linear layers inside the transformer blocks"):
        prunable_linears(llama, ["lm_head"])
    with pytest.raises(TargetError, match="match no module"):
        prunable_linears(llama, ["nope_proj"])


@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_rows_are_pytorch_output_rows(model_name, request):
    """Exactly floor(s * in) zeros in every row of the saved PyTorch weight (GPT-2 Conv1D is (in, out))."""
    model = request.getfixturevalue(model_name)
    pruned = prune_model(model, method="magnitude", sparsity=0.3, progress=False)
    state = to_state_dict(pruned)
    fan_in_fan_out = model_name == "gpt2"
    for p in calibration.linear_paths(pruned):
        w = np.asarray(state[p + ".weight"])
        w = w.T if fan_in_fan_out else w  # (out, in)
        assert ((w == 0).sum(axis=1) == int(0.3 * w.shape[1])).all(), p


def test_max_blocks_prunes_only_the_first_blocks(llama):
    ids = np.random.default_rng(0).integers(0, 64, (2, 8))
    pruned = prune_model(llama, method="wanda", sparsity=0.5, input_ids=ids, max_blocks=1, progress=False)
    assert (np.asarray(get_leaf(pruned.params, "model.layers.0.mlp.up_proj.kernel")) == 0).mean() == 0.5
    assert not (np.asarray(get_leaf(pruned.params, "model.layers.1.mlp.up_proj.kernel")) == 0).any()


def test_bad_requests(llama):
    with pytest.raises(ValueError, match="needs calibration input_ids"):
        prune_model(llama, method="wanda", sparsity=0.5, progress=False)
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_spec("random", 0.5)
    with pytest.raises(ValueError, match="needs a sparsity"):
        prune_spec("wanda", None)
    with pytest.raises(ValueError, match=r"means sparsity 0\.5"):
        prune_spec("wanda", 0.6, "2:4")
    with pytest.raises(ValueError, match=r"down_proj: pattern 2:5: M=5 does not divide the input width 48"):
        prune_model(llama, method="magnitude", pattern="2:5", progress=False)
