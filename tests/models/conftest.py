"""Parity helpers for the model tests: a padded batch and a transformers-vs-ours comparison."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch


@pytest.fixture
def padded_batch():
    """Token ids (B=3, T=6) with right padding (pad id 0) in two rows, and the matching mask."""
    ids = np.array([[5, 6, 7, 8, 9, 10], [11, 12, 13, 0, 0, 0], [14, 15, 16, 17, 18, 0]], dtype=np.int64)
    return ids, (ids != 0).astype(np.int64)


def torch_output(torch_model, ids, mask, **kwargs) -> np.ndarray:
    """``logits`` if the model has a head, else ``last_hidden_state``, as float32 NumPy."""
    torch_model.eval()
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            **{k: torch.as_tensor(v) for k, v in kwargs.items()},
        )
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return y.float().numpy()


def our_output(model, ids, mask, **kwargs) -> np.ndarray:
    fn = jax.jit(model.apply_fn)
    return np.asarray(
        fn(
            model.params,
            jnp.asarray(ids),
            jnp.asarray(mask),
            **{k: jnp.asarray(v) for k, v in kwargs.items()},
        )
    )


def max_diff(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Max |ours - ref|; per-token outputs are compared at non-pad positions only."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if ours.ndim == 3:
        keep = np.asarray(mask).astype(bool)
        return float(np.abs(ours[keep] - ref[keep]).max())
    return float(np.abs(ours - ref).max())


@pytest.fixture(name="torch_output")
def torch_output_fixture():
    """``torch_output(torch_model, ids, mask, **kw)``: transformers' logits / last hidden state."""
    return torch_output


@pytest.fixture(name="our_output")
def our_output_fixture():
    """``our_output(model, ids, mask, **kw)``: our jitted forward as NumPy."""
    return our_output


@pytest.fixture
def parity():
    """``parity(torch_model, model, ids, mask, **kw) -> max abs diff`` at non-pad positions."""

    def check(torch_model, model, ids, mask, **kwargs) -> float:
        return max_diff(
            our_output(model, ids, mask, **kwargs), torch_output(torch_model, ids, mask, **kwargs), mask
        )

    return check
