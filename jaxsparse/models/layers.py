"""Building blocks shared by the model zoo: activations by Hugging Face name, layers initialised like
transformers, attention with padding/causal masks (grouped-query aware) and last-token pooling.

Modules here create Flax NNX parameters with the Hugging Face layout conventions of
:mod:`jaxsparse.models.naming` (``kernel`` (in, out), ``embedding``, ``scale``); the model files
choose the attribute names so that parameter paths equal Hugging Face module paths.

Matmul precision follows JAX's ``jax_default_matmul_precision`` (no layer pins it): on CPU every
setting is full float32; on GPU/TPU the default trades float32 matmul accuracy for speed (TF32 /
bfloat16 passes), and ``jax.default_matmul_precision("highest")`` (or the environment variable
``JAX_DEFAULT_MATMUL_PRECISION=highest``) gives the float32 numerics our parity tests check.

Example:
    >>> import jax.numpy as jnp
    >>> q = k = v = jnp.ones((1, 3, 2, 4))  # (batch, time, heads, head_dim)
    >>> mask = combine_masks(padding_mask(jnp.array([[1, 1, 0]])), causal_mask(3, 3))
    >>> dot_product_attention(q, k, v, mask=mask).shape
    (1, 3, 2, 4)
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from jaxsparse import factored


def gelu_erf(x: jax.Array) -> jax.Array:
    """Exact GELU by ATen's formula, ``x/2 * (1 + erf(x/sqrt 2))`` (``torch.nn.functional.gelu``).

    ``jax.nn.gelu(approximate=False)`` goes through ``erfc``, which XLA:CPU expands into three
    fusions and a costlier backward (2.3x slower forward on MiniLM's FFN, BENCHMARKS.md 2c/2d).
    Both formulas are within 1e-6 absolute of each other; for ``x < -3`` this one keeps the same
    rounding torch's kernel has (``1 + erf`` cancels), so it is also the closer one to PyTorch.

    Example:
        >>> round(float(gelu_erf(jnp.float32(1.0))), 6)
        0.841345
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


# Hugging Face ``ACT2FN`` names -> JAX functions with the same numerics.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_erf,
    "gelu_python": gelu_erf,
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The activation a Hugging Face config names (``hidden_act`` / ``activation_function``).

    Example:
        >>> float(activation("relu")(jnp.array(-1.0)))
        0.0
    """
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class Linear(nnx.Linear):
    """``nnx.Linear`` whose kernel may also be a :class:`jaxsparse.factored.AdaptedKernel`.

    Same parameters, initialisation and numerics as ``nnx.Linear`` for an array kernel; an adapted
    kernel (from ``delta.apply(..., factored=True)``) is applied by :func:`jaxsparse.factored.matmul`
    with its delta beside the frozen weight.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.kernel.get_value()
        bias = self.bias.get_value() if self.bias is not None else None
        if isinstance(kernel, factored.AdaptedKernel):
            (inputs, bias) = self.promote_dtype((inputs, bias), dtype=self.dtype)
        else:
            inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = factored.matmul(inputs, kernel, precision=self.precision)
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y


def linear(
    in_features: int,
    out_features: int,
    *,
    std: float = 0.02,
    use_bias: bool = True,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> Linear:
    """:class:`Linear` (kernel (in, out)) in ``dtype`` for params and compute, HF init (normal(std), zero bias)."""
    return Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=dtype,
        kernel_init=nnx.initializers.normal(std),
        bias_init=nnx.initializers.zeros,
        rngs=rngs,
    )


def embed(num_embeddings: int, features: int, *, std: float = 0.02, dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """``nnx.Embed`` (leaf ``embedding``) in ``dtype``, HF init normal(std)."""
    return nnx.Embed(
        num_embeddings,
        features,
        dtype=dtype,
        param_dtype=dtype,
        embedding_init=nnx.initializers.normal(std),
        rngs=rngs,
    )


def layer_norm(features: int, *, eps: float, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """``torch.nn.LayerNorm`` numerics: two-pass variance, statistics in float32, leaves ``scale``/``bias``."""
    return nnx.LayerNorm(
        features,
        epsilon=eps,
        dtype=dtype,
        param_dtype=dtype,
        use_fast_variance=False,
        rngs=rngs,
    )


def tied_logits(hidden: Float[Array, "B T H"], embedding: Float[Array, "V H"]) -> Float[Array, "B T V"]:
    """Logits of an LM head tied to the input embedding (``hidden @ embedding.T``)."""
    return jnp.einsum("bth,vh->btv", hidden, embedding.astype(hidden.dtype))


def split_heads(x: Float[Array, "B T HD"], num_heads: int) -> Float[Array, "B T N D"]:
    """(B, T, N*D) -> (B, T, N, D)."""
    return x.reshape(*x.shape[:-1], num_heads, x.shape[-1] // num_heads)


def merge_heads(x: Float[Array, "B T N D"]) -> Float[Array, "B T ND"]:
    """(B, T, N, D) -> (B, T, N*D)."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def padding_mask(attention_mask: Int[Array, "B Tk"] | None) -> Bool[Array, "B 1 1 Tk"] | None:
    """Keys a query may attend to, from a transformers ``attention_mask`` (1 = token, 0 = padding)."""
    if attention_mask is None:
        return None
    return (jnp.asarray(attention_mask) != 0)[:, None, None, :]


def causal_mask(q_len: int, k_len: int, offset: Any = 0) -> Bool[Array, "1 1 Tq Tk"]:
    """Query ``i`` (at absolute position ``offset + i``) may attend to keys ``0 .. offset + i``.

    ``offset`` (the number of cached positions before the queries; may be traced) serves KV-cache
    decoding. Example: ``causal_mask(1, 4, offset=3)`` lets the single new query see all 4 keys.
    """
    q_pos = jnp.arange(q_len)[:, None] + offset
    k_pos = jnp.arange(k_len)[None, :]
    return (k_pos <= q_pos)[None, None]


def combine_masks(*masks: Any) -> Any:
    """Logical AND of the masks that are not ``None`` (``None`` if all are)."""
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


class Dropout:
    """Dropout for one forward pass: each call site draws its own key from ``rng``; no ``rng``, no dropout.

    Models take it as ``dropout_rng=`` (training); without it (the default) every site is the
    identity, so inference is deterministic. Kept units are scaled by ``1 / (1 - rate)``, as in
    ``torch.nn.Dropout``. Sites are numbered in call order, so one key gives one reproducible mask set.

    Example:
        >>> x = jnp.ones((10_000,))
        >>> y = Dropout(jax.random.key(0))(x, 0.25)
        >>> abs(float((y == 0).mean()) - 0.25) < 0.02, sorted({float(v) for v in y.tolist()})
        (True, [0.0, 1.3333333730697632])
        >>> bool((Dropout(None)(x, 0.25) == x).all())
        True
    """

    def __init__(self, rng: jax.Array | None):
        self.rng = rng
        self._sites = 0

    def __call__(self, x: jax.Array, rate: float | None) -> jax.Array:
        if self.rng is None or not rate:
            return x
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
        self._sites += 1
        keep = jax.random.bernoulli(jax.random.fold_in(self.rng, self._sites), 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


NO_DROPOUT = Dropout(None)


def dot_product_attention(
    query: Float[Array, "B Tq N D"],
    key: Float[Array, "B Tk K D"],
    value: Float[Array, "B Tk K D"],
    *,
    mask: Bool[Array, "B N Tq Tk"] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    dropout: Dropout = NO_DROPOUT,
    dropout_rate: float = 0.0,
    heads_major: bool = False,
) -> Float[Array, "B Tq N D"]:
    """Softmax attention as transformers' eager/SDPA path computes it, grouped-query aware.

    ``key``/``value`` may have fewer heads ``K`` than ``query`` (``N`` a multiple of ``K``): each key
    head serves ``N // K`` consecutive query heads, like ``repeat_kv``. ``mask`` (broadcastable to
    (B, N, Tq, Tk), True = may attend) removes keys with the dtype's most negative value, not
    ``-inf``, so a fully padded query row stays finite. Scores and softmax run in float32 and the
    result is cast back to the query dtype. ``scale`` defaults to ``1/sqrt(D)``; ``softcap`` applies
    ``softcap * tanh(scores / softcap)`` (Gemma 2). ``dropout`` at ``dropout_rate`` drops attention
    probabilities (after the softmax, as transformers does).

    ``heads_major=True`` contracts heads-major (B, N, T, D) copies of q/k/v, which XLA:CPU runs as
    plain batched matmuls: the same full-sequence result (max difference 0.0 on MiniLM) and a faster
    training step (BENCHMARKS.md 2d). Encoders use it. Decoders keep the default: there a one-query
    KV-cache step must sum like the full recomputation, and the heads-major products drift from it
    by more than 1e-5 (``tests/models/test_generate.py``).
    """
    num_heads, num_kv = query.shape[2], key.shape[2]
    if num_heads % num_kv:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of key/value heads ({num_kv})")
    if num_kv != num_heads:
        key = jnp.repeat(key, num_heads // num_kv, axis=2)
        value = jnp.repeat(value, num_heads // num_kv, axis=2)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    query32, key32, value32 = (t.astype(jnp.float32) for t in (query, key, value))
    if heads_major:
        query32, key32, value32 = (jnp.swapaxes(t, 1, 2) for t in (query32, key32, value32))
        scores = jnp.einsum("bnqd,bnkd->bnqk", query32, key32)
    else:
        scores = jnp.einsum("bqnd,bknd->bnqk", query32, key32)
    scores = scores * jnp.float32(scale)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate)
    if heads_major:
        out = jnp.swapaxes(jnp.einsum("bnqk,bnkd->bnqd", weights, value32), 1, 2)
    else:
        out = jnp.einsum("bnqk,bknd->bqnd", weights, value32)
    return out.astype(query.dtype)


# What a checkpointed block keeps for the backward pass, by ``remat_blocks`` mode: "full" keeps
# only the block's input (jax.checkpoint's default), "dots" keeps the matmul outputs.
REMAT_POLICIES: dict[str, Callable[..., bool] | None] = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
}

# How the transformer blocks traced now are rematerialised: None (not at all) or a REMAT_POLICIES key.
_REMAT_BLOCKS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "jaxsparse_remat_blocks", default=None
)


def remat_mode(mode: bool | str | None) -> str | None:
    """The :data:`REMAT_POLICIES` key a ``train.remat`` value names: ``True`` is ``"full"``,
    ``False``/``None`` is off (``None``).

    Example:
        >>> remat_mode(True), remat_mode("dots"), remat_mode(False)
        ('full', 'dots', None)
    """
    if mode is None or mode is False:
        return None
    if mode is True:
        return "full"
    if mode not in REMAT_POLICIES:
        raise ValueError(f"remat must be true, false or one of {sorted(REMAT_POLICIES)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def remat_blocks(mode: bool | str = True) -> Iterator[None]:
    """Gradient checkpointing for the forward passes *traced* inside the context: every transformer
    block of the zoo's models runs under ``jax.checkpoint`` (:func:`call_block`). The result is
    unchanged; what the backward pass keeps depends on ``mode``:

    - ``True`` / ``"full"``: only each block's input; the backward recomputes the whole block
      (memory O(layers) instead of O(layers x block activations), one extra forward of compute);
    - ``"dots"``: each block's matmul outputs; the backward recomputes only the elementwise work
      (GELU, softmax, norms, residual adds) from them. On CPU this cost within 2% of the step time
      and cut XLA's activation memory by 21-33% on MiniLM and SmolLM2-135M (BENCHMARKS.md, 3c);
    - ``False``: off.

    A trace-time switch, like ``jax.default_matmul_precision``: enter it inside the function that
    ``jax.jit``/``jax.grad`` traces (the trainer's ``apply_model`` does), not around the call of an
    already-compiled function.

    Example:
        >>> import transformers
        >>> from jaxsparse.models import init_params
        >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        >>> m = init_params(cfg, task="causal_lm")
        >>> def loss(p):
        ...     with remat_blocks("dots"):
        ...         return m.apply_fn(p, jnp.array([[1, 2, 3]])).sum()
        >>> "remat" in str(jax.make_jaxpr(jax.grad(loss))(m.params))  # the checkpoint primitive
        True
    """
    token = _REMAT_BLOCKS.set(remat_mode(mode))
    try:
        yield
    finally:
        _REMAT_BLOCKS.reset(token)


def call_block(block: nnx.Module, x: jax.Array, *rest: Any) -> Any:
    """``block(x, *rest)``, under ``nnx.remat`` (``jax.checkpoint``) inside :func:`remat_blocks`.

    The module's parameters and ``x`` are the checkpointed function's inputs (their gradients flow
    through it); ``rest`` (masks, rotary tables, caches, the :class:`Dropout` of the pass) is closed
    over, so the recomputed forward draws the same dropout masks.
    """
    mode = _REMAT_BLOCKS.get()
    if mode is None:
        return block(x, *rest)
    return nnx.remat(lambda module, hidden: module(hidden, *rest), policy=REMAT_POLICIES[mode])(block, x)


def last_token_index(
    input_ids: Int[Array, "B T"], attention_mask: Int[Array, "B T"] | None, pad_token_id: int | None
) -> Int[Array, " B"]:
    """Index of each row's last real token, as transformers' ``*ForSequenceClassification`` picks it.

    With a ``pad_token_id``: the rightmost token that is not padding (works for left and right
    padding; transformers ignores ``attention_mask`` here, and so do we, for parity). Without one,
    transformers takes the last position and refuses batches > 1; we use the rightmost position with
    ``attention_mask == 1`` instead (the last position when no mask is given).

    Example:
        >>> last_token_index(jnp.array([[5, 6, 0], [0, 7, 8]]), None, 0).tolist()
        [1, 2]
    """
    positions = jnp.arange(input_ids.shape[1])
    if pad_token_id is not None:
        real = input_ids != pad_token_id
    elif attention_mask is not None:
        real = jnp.asarray(attention_mask) != 0
    else:
        return jnp.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    return jnp.argmax(positions * real.astype(positions.dtype), axis=-1)


def gather_rows(hidden: Float[Array, "B T H"], index: Int[Array, " B"]) -> Float[Array, "B H"]:
    """``hidden[b, index[b]]`` for every row ``b``."""
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
