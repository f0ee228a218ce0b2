"""Rotary position embeddings (RoPE) from a Hugging Face config's rope settings.

transformers 5 keeps the rope settings in ``config.rope_parameters`` (``rope_type``, ``rope_theta``
and the type's own keys); older configs use ``rope_theta`` + ``rope_scaling``. Both are read.
Supported ``rope_type``: ``default``, ``linear``, ``dynamic`` (NTK), ``yarn``, ``longrope`` (Phi-3)
and ``llama3``, with the same float32 arithmetic as ``transformers.modeling_rope_utils``.

``dynamic`` and ``longrope`` depend on the sequence length (``max(position_ids) + 1``); that length
may be traced, so every function here is jit-able. Partial rotary embeddings
(``partial_rotary_factor`` < 1, Phi-3 style) rotate only the first dimensions of each head.

Example:
    >>> import jax.numpy as jnp, transformers
    >>> cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4)
    >>> cos, sin = rotary_cos_sin(cfg, jnp.arange(5)[None])
    >>> cos.shape, float(cos[0, 0, 0]), float(sin[0, 0, 0])
    ((1, 5, 8), 1.0, 0.0)
    >>> q = jnp.ones((1, 5, 4, 8))  # (batch, time, heads, head_dim)
    >>> apply_rotary(q, cos, sin).shape
    (1, 5, 4, 8)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def head_dim(config: Any) -> int:
    """Per-head size: ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config: Any) -> dict[str, Any]:
    """The config's rope settings as one flat dict with ``rope_type`` and ``rope_theta``.

    Example:
        >>> import transformers
        >>> cfg = transformers.LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})
        >>> p = rope_parameters(cfg)
        >>> p["rope_type"], p["factor"], p["rope_theta"]
        ('linear', 2.0, 10000.0)
    """
    params = getattr(config, "rope_parameters", None)
    if not params:  # pre-transformers-5 configs
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params = dict(params)
    if params and all(isinstance(v, Mapping) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters ({sorted(params)}) are not supported")
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    if params["rope_type"] not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {params['rope_type']!r}; supported: {ROPE_TYPES}")
    if "rope_theta" not in params:
        params["rope_theta"] = float(getattr(config, "rope_theta", 10000.0))
    if "partial_rotary_factor" not in params and getattr(config, "partial_rotary_factor", None) is not None:
        params["partial_rotary_factor"] = config.partial_rotary_factor
    return params


def rotary_dim(config: Any) -> int:
    """How many leading dimensions of each head are rotated."""
    return int(head_dim(config) * rope_parameters(config).get("partial_rotary_factor", 1.0))


def _base_inv_freq(base: float, dim: int) -> np.ndarray:
    # torch: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in float32
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponent)).astype(np.float32)


def _llama3(inv_freq: np.ndarray, p: Mapping[str, Any]) -> np.ndarray:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(config: Any, p: Mapping[str, Any], dim: int) -> tuple[np.ndarray, float]:
    base = p["rope_theta"]
    original = p.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = p.get("factor") or config.max_position_embeddings / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_weight = (1 - ramp).astype(np.float32)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = np.float32(1.0) / pos_freqs
    interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv.astype(np.float32), float(attention_factor)


def inv_frequencies(config: Any, seq_len: Any = None) -> tuple[Float[Array, " R"], float]:
    """Inverse frequencies (rotary_dim / 2,) and the cos/sin scaling factor, as transformers computes them.

    ``seq_len`` matters only for ``dynamic`` and ``longrope`` (may be a traced scalar); ``None``
    means "not longer than the trained context".

    Example:
        >>> import transformers
        >>> inv, scale = inv_frequencies(transformers.LlamaConfig(hidden_size=32, num_attention_heads=4))
        >>> inv.shape, scale
        ((4,), 1.0)
    """
    p = rope_parameters(config)
    rope_type, base, dim = p["rope_type"], float(p["rope_theta"]), rotary_dim(config)
    if rope_type == "default":
        return jnp.asarray(_base_inv_freq(base, dim)), 1.0
    if rope_type == "linear":
        return jnp.asarray(_base_inv_freq(base, dim) / np.float32(p["factor"])), 1.0
    if rope_type == "llama3":
        p.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        return jnp.asarray(_llama3(_base_inv_freq(base, dim), p)), 1.0
    if rope_type == "yarn":
        inv, scale = _yarn(config, p, dim)
        return jnp.asarray(inv), scale
    if rope_type == "dynamic":
        max_pos, factor = config.max_position_embeddings, p["factor"]
        length = (
            jnp.float32(max_pos) if seq_len is None else jnp.maximum(seq_len, max_pos).astype(jnp.float32)
        )
        scaled_base = jnp.float32(base) * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exponent = jnp.arange(0, dim, 2).astype(jnp.float32) / jnp.float32(dim)
        return 1.0 / jnp.power(scaled_base, exponent), 1.0
    # longrope: short factors within the trained context, long factors beyond it
    original = p.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = p.get("factor") or config.max_position_embeddings / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    powers = np.power(np.float32(base), exponent)
    short = np.float32(1.0) / (np.asarray(p["short_factor"], np.float32) * powers)
    long = np.float32(1.0) / (np.asarray(p["long_factor"], np.float32) * powers)
    if seq_len is None:
        return jnp.asarray(short), float(attention_factor)
    return jnp.where(seq_len > original, jnp.asarray(long), jnp.asarray(short)), float(attention_factor)


def _depends_on_length(config: Any) -> bool:
    return rope_parameters(config)["rope_type"] in ("dynamic", "longrope")


def rotary_cos_sin(
    config: Any, position_ids: Int[Array, "B T"], *, dtype: Any = jnp.float32
) -> tuple[Float[Array, "B T R"], Float[Array, "B T R"]]:
    """``cos`` and ``sin`` tables (B, T, rotary_dim) for ``position_ids``, cast to ``dtype``.

    For ``dynamic``/``longrope`` the sequence length is ``max(position_ids) + 1``, as in transformers.
    """
    position_ids = jnp.asarray(position_ids)
    seq_len = jnp.max(position_ids) + 1 if _depends_on_length(config) else None
    inv_freq, scaling = inv_frequencies(config, seq_len)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb) * jnp.float32(scaling), jnp.sin(emb) * jnp.float32(scaling)
    return cos.astype(dtype), sin.astype(dtype)


def _rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(
    x: Float[Array, "B T N D"], cos: Float[Array, "B T R"], sin: Float[Array, "B T R"]
) -> Float[Array, "B T N D"]:
    """Rotate the first ``R`` dims of every head of ``x`` (``x*cos + rotate_half(x)*sin``); the rest pass."""
    r = cos.shape[-1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, rest = x[..., :r], x[..., r:]
    rotated = rot * cos + _rotate_half(rot) * sin
    return jnp.concatenate([rotated, rest], axis=-1) if rest.shape[-1] else rotated
