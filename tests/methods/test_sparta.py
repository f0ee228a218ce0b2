"""SpaRTA init: round(density * numel) random entries per targeted weight, reproducible."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse.methods import HEAD_MODULES, sparta
from jaxsparse.methods.sparta import SpartaConfig
from jaxsparse.tree import TargetError


def _llama_like():
    layer = {
        "self_attn": {n: {"kernel": jnp.ones((24, 24))} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"up_proj": {"kernel": jnp.ones((24, 40))}, "down_proj": {"kernel": jnp.ones((40, 24))}},
        "input_layernorm": {"scale": jnp.ones(24)},
    }
    return {
        "model": {
            "embed_tokens": {"embedding": jnp.ones((50, 24))},
            "layers": {"0": layer},
            "norm": {"scale": jnp.ones(24)},
        },
        "lm_head": {"kernel": jnp.ones((24, 50))},
        "score": {"kernel": jnp.ones((24, 2))},
    }


@settings(max_examples=5, deadline=None)
@given(density=st.floats(0.001, 1.0), seed=st.integers(0, 2**20))
def test_counts_are_round_density_times_numel(density, seed):
    adapter = sparta.init(_llama_like(), SpartaConfig(density=density, seed=seed))
    assert len(adapter.deltas) == 6
    for path, d in adapter.deltas.items():
        numel = int(np.prod(d.shape))
        assert d.k == max(1, round(density * numel)), path
        idx = np.asarray(d.indices)
        assert np.all(np.diff(idx) > 0) and idx[0] >= 0 and idx[-1] < numel
        np.testing.assert_array_equal(np.asarray(d.values), 0.0)


def test_default_targets_skip_embeddings_norms_and_heads():
    adapter = sparta.init(_llama_like(), SpartaConfig(density=0.1))
    assert not any(
        p.startswith(("lm_head", "score", "model.embed_tokens", "model.norm")) for p in adapter.deltas
    )
    assert {"lm_head", "score"} <= set(HEAD_MODULES)


def test_paper_recipe_v_o_plus_head():
    adapter = sparta.init(
        _llama_like(),
        SpartaConfig(density=0.05, target_modules=["v_proj", "o_proj"], modules_to_save=["score"]),
    )
    assert sorted(adapter.deltas) == [
        "model.layers.0.self_attn.o_proj.kernel",
        "model.layers.0.self_attn.v_proj.kernel",
    ]
    assert list(adapter.dense) == ["score.kernel"]
    assert adapter.num_trainable() == 2 * round(0.05 * 576) + 48


def test_seed_and_key_determinism():
    params = _llama_like()
    a = sparta.init(params, SpartaConfig(density=0.1, seed=3))
    b = sparta.init(params, SpartaConfig(density=0.1), key=jax.random.key(3))
    c = sparta.init(params, SpartaConfig(density=0.1, seed=4))
    for p in a.deltas:
        np.testing.assert_array_equal(np.asarray(a.deltas[p].indices), np.asarray(b.deltas[p].indices))
        assert not np.array_equal(np.asarray(a.deltas[p].indices), np.asarray(c.deltas[p].indices))


def test_bad_config_and_targets():
    with pytest.raises(ValueError, match="density"):
        SpartaConfig(density=1.5)
    with pytest.raises(TargetError, match="gate_proj"):
        sparta.init(_llama_like(), SpartaConfig(target_modules=["gate_proj"]))
    with pytest.raises(TargetError, match="selects no parameter"):
        sparta.init(_llama_like(), SpartaConfig(exclude_modules=r".*"))
