"""Read and write SpaRTA adapters in the layout of the SpaRTA authors' package (``peft_sparta``).

Confirmed by reading IBM/SpaRTA's ``peft_sparta`` 0.0.3 (``sparta.py``: ``SpaRTA.save(merged=False)``;
``loader.py``: ``load_sparse_deltas``, ``SpaRTAforCausalLM``, ``SpaRTAforSequenceClassification``), and
tested by loading our files with it (``tests/convert/test_sparta.py``):

- ``config.json``: the base model's Hugging Face config plus ``sparta_pretrained_model``, which their
  loaders hand to transformers' ``from_pretrained`` (we write an existing local path absolute); for
  classification also ``id2label`` and ``problem_type: "single_label_classification"`` (both asserted
  by their classifier).
- ``sparse_deltas.safetensors``: ``indices.<name>`` int32 (n, ndim) -- one row of coordinates per
  trained entry, as ``mask.nonzero()`` gives them (row-major sorted) -- and ``deltas.<name>`` float32
  (n,), for ``<name>`` the transformers ``named_parameters()`` names (the authors write an entry,
  possibly empty, for every parameter). Merge rule: ``param[idx] = (param[idx].float() + delta).to(dtype)``.
  Older adapters ship a torch pickle ``sparse_deltas.pt`` holding ``{"indices": {...}, "deltas": {...}}``;
  we load it only through ``torch.load(weights_only=True)``.
- A classification head ``score.weight`` is trained in full from its initial value, saved beside the
  deltas as ``head_init.safetensors`` (key ``head``) or, in older adapters, ``head_init.pt``: the head
  is ``head_init + deltas["score.weight"].view(num_labels, hidden)``.

- Tokens added to the vocabulary: ``new_embeddings_init.safetensors`` (key ``new_embeddings``, shape
  (added, hidden)) or ``new_embeddings_init.pt`` (a plain tensor, what their trainer writes) holds the
  new embedding rows' initial values, which the authors' classifier loader appends to the base's
  embedding before merging the deltas (the embedding's deltas are over them); the tokenizer (with the
  new tokens) is saved beside the adapter, where that loader looks first. We write the ``.pt`` when
  torch is installed: their loader opens the ``.safetensors`` spelling with a ``torch.device``, which
  safetensors >= 0.8 refuses. Their causal-LM loader reads neither (it cannot load an adapter with new
  tokens: it merges into the base's vocabulary only).

Our additions, ignored by the authors' code: ``sparta_modules_to_save`` in ``config.json`` lists the
parameters trained densely (their delta is over a zero initial value unless a head init exists;
we write ``head_init.safetensors`` zeros for ``score.weight``, so the authors' classifier loader gets
the exact head and export needs no torch); ``jaxsparse_sparta_config`` holds our :class:`SpartaConfig`; the
safetensors metadata records each weight's shape so our files load without the base model;
``jaxsparse_new_tokens`` (in ``config.json``) counts the added tokens, and an untied ``lm_head``'s
new rows go to ``new_lm_head_init.safetensors`` (key ``new_lm_head``, (added, hidden)), so
:func:`grow_for_adapter` rebuilds the resized base from the original one. Under the authors'
``sparsity`` the head trains as a delta over its random initial value; the export writes it as the
full trained head (``initial + delta``, over a ``head_init`` of zeros), which needs ``params``.

Example:
    >>> import tempfile, jax.numpy as jnp
    >>> from jaxsparse.delta import Adapter, SparseDelta
    >>> from jaxsparse.methods.sparta import SpartaConfig
    >>> d = SparseDelta(jnp.array([1, 6], jnp.int32), jnp.array([0.5, -1.0]), (4, 2))
    >>> adapter = Adapter({"model.v_proj.kernel": d}, config=SpartaConfig(density=0.25))
    >>> out = tempfile.mkdtemp() + "/adapter"
    >>> save_sparta(adapter, out, base_model_name_or_path="my-base")
    >>> back = load_sparta(out)
    >>> back.deltas["model.v_proj.kernel"].indices.tolist(), back.config.density
    ([1, 6], 0.25)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxsparse import tree as tree_lib
from jaxsparse.atomic import atomic_dir, atomic_write_bytes, atomic_write_text
from jaxsparse.convert import (
    DIFFERENT_BASE_HINT,
    NAME_LIST,
    NAMES,
    AdapterFormatError,
    check_dense,
    check_field_types,
    check_values,
    from_hf_coords,
    hf_shape,
    layout_metadata,
    param_shapes,
    read_json,
    read_layout,
    read_safetensors,
    resolve_param,
    to_hf_coords,
    write_safetensors_bytes,
)
from jaxsparse.delta import Adapter, SparseDelta
from jaxsparse.methods.sparta import CLASSIFIER_HEADS, SpartaConfig, heads_as_dense
from jaxsparse.models import naming
from jaxsparse.models.new_tokens import ADDED_TOKENS_KEY, embedding_path, with_new_rows

PyTree = Any
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "sparse_deltas.safetensors"
PICKLE_NAME = "sparse_deltas.pt"
HEAD_INIT_NAME = "head_init.safetensors"
HEAD_INIT_KEY = "head"
HEAD_INIT_PICKLE = "head_init.pt"
HEAD_NAME = "score.weight"
BASE_KEY = "sparta_pretrained_model"
DENSE_KEY = "sparta_modules_to_save"
CONFIG_KEY = "jaxsparse_sparta_config"
NUM_PARAMETERS_KEY = "jaxsparse_num_parameters"
NEW_EMBEDDINGS_NAME = "new_embeddings_init.safetensors"
NEW_EMBEDDINGS_KEY = "new_embeddings"
NEW_EMBEDDINGS_PICKLE = "new_embeddings_init.pt"
NEW_LM_HEAD_NAME = "new_lm_head_init.safetensors"
NEW_LM_HEAD_KEY = "new_lm_head"
_CONFIG_FIELDS = (
    "density",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "seed",
    "task_type",
    "sparsity",
    "frozen_modules",
    "trainable_tokens",
    "dropout",
)
# trainable_tokens (a list of ints) is checked by SpartaConfig itself.
_CONFIG_KINDS = {
    "density": "number|null",
    "target_modules": NAMES,
    "exclude_modules": NAMES,
    "modules_to_save": NAME_LIST,
    "seed": "int",
    "task_type": "str|null",
    "sparsity": "number|null",
    "frozen_modules": NAME_LIST,
    "dropout": "number",
}


def _config_dict(hf_config: Any) -> dict[str, Any]:
    if hf_config is None:
        return {}
    if hasattr(hf_config, "to_dict"):
        return dict(hf_config.to_dict())
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    raise TypeError(f"hf_config must be a transformers config or a dict, got {type(hf_config).__name__}")


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def sparta_tensors(
    adapter: Adapter, *, params: PyTree | None = None, fan_in_fan_out: Sequence[str] = ()
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]], list[str]]:
    """``(tensors, layout, dense_names)`` in the authors' key layout.

    With ``params``, every other parameter of the model gets an empty entry (as the authors write,
    and as their causal-LM loader expects).
    """
    tensors: dict[str, np.ndarray] = {}
    layout: dict[str, dict[str, Any]] = {}
    dense_names: list[str] = []
    for path, d in adapter.deltas.items():
        if not isinstance(d, SparseDelta):
            raise ValueError(f"{path}: the SpaRTA format holds sparse deltas only, got {type(d).__name__}")
        name, transposed = naming.hf_key(path, fan_in_fan_out=fan_in_fan_out)
        try:
            coords, order = to_hf_coords(np.asarray(d.indices), d.shape, transposed=transposed)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        tensors[f"indices.{name}"] = coords
        tensors[f"deltas.{name}"] = np.asarray(d.values)[order]
        layout[name] = {"path": path, "shape": list(d.shape), "transposed": transposed}
    for path, value in adapter.dense.items():
        name, transposed = naming.hf_key(path, fan_in_fan_out=fan_in_fan_out)
        value = np.asarray(value)
        hf_value = value.T if transposed else value
        tensors[f"indices.{name}"] = np.argwhere(np.ones(hf_value.shape, bool)).astype(np.int32)
        tensors[f"deltas.{name}"] = np.ascontiguousarray(hf_value).reshape(-1)
        layout[name] = {"path": path, "shape": list(value.shape), "transposed": transposed}
        dense_names.append(name)
    if params is not None:
        for path, shape in param_shapes(params).items():
            name, transposed = naming.hf_key(path, fan_in_fan_out=fan_in_fan_out)
            if f"indices.{name}" not in tensors:
                tensors[f"indices.{name}"] = np.zeros((0, len(shape)), np.int32)
                tensors[f"deltas.{name}"] = np.zeros((0,), np.float32)
    return tensors, layout, sorted(dense_names)


def save_sparta(
    adapter: Adapter,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    hf_config: Any = None,
    params: PyTree | None = None,
    fan_in_fan_out: Sequence[str] = (),
    overwrite: bool = False,
    tokenizer: Any = None,
) -> None:
    """Write ``adapter`` as a SpaRTA adapter directory (with ``tokenizer`` saved inside, if given).

    ``hf_config`` (a transformers config or its dict) is copied into ``config.json`` as the authors
    do; ``params`` adds the empty entries for untouched parameters. The directory appears complete or
    not at all; an existing non-empty one is refused unless ``overwrite`` and it is a previous
    jaxsparse output (see :func:`jaxsparse.atomic.atomic_dir`).
    """
    config = adapter.config
    if isinstance(config, SpartaConfig) and config.sparsity is not None:
        if params is None:
            if any(p.split(".", 1)[0] in CLASSIFIER_HEADS for p in adapter.deltas):
                raise ValueError(
                    "a SpaRTA adapter trained with sparsity holds its head as a delta over the model's "
                    "initial head: pass params (or the model) to export it"
                )
        else:
            adapter = heads_as_dense(adapter, params)
    tensors, layout, dense_names = sparta_tensors(adapter, params=params, fan_in_fan_out=fan_in_fan_out)
    out = _config_dict(hf_config)
    added = int(out.get(ADDED_TOKENS_KEY) or 0)
    new_rows = _new_token_rows(params, added) if added else {}
    base = (
        base_model_name_or_path
        or getattr(config, "base_model_name_or_path", None)
        or out.get("_name_or_path")
    )
    if base and os.path.exists(base):
        # The authors' loaders hand this to transformers' from_pretrained from any working directory.
        base = os.path.abspath(base)
    out[BASE_KEY] = base
    out[DENSE_KEY] = dense_names
    if params is not None:
        out[NUM_PARAMETERS_KEY] = sum(int(np.prod(s)) for s in param_shapes(params).values())
    if isinstance(config, SpartaConfig):
        out[CONFIG_KEY] = {f: _jsonable(getattr(config, f)) for f in _CONFIG_FIELDS}
        if config.task_type == "SEQ_CLS":
            # transformers' to_dict() holds problem_type=None; the authors' classifier asserts this value.
            out["problem_type"] = out.get("problem_type") or "single_label_classification"
    data = write_safetensors_bytes(tensors, layout_metadata(layout))
    with atomic_dir(out_dir, overwrite=overwrite, format="sparta") as tmp:
        atomic_write_text(os.path.join(tmp, CONFIG_NAME), json.dumps(out, indent=2, sort_keys=True) + "\n")
        atomic_write_bytes(os.path.join(tmp, WEIGHTS_NAME), data)
        if HEAD_NAME in dense_names:
            # Our head delta is over a zero init; the authors' classifier loader adds head_init back.
            shape = tuple(int(s) for s in tensors[f"indices.{HEAD_NAME}"].max(axis=0) + 1)
            head = write_safetensors_bytes({HEAD_INIT_KEY: np.zeros(shape, np.float32)}, {"format": "pt"})
            atomic_write_bytes(os.path.join(tmp, HEAD_INIT_NAME), head)
        for name, (key, rows) in new_rows.items():
            if name == NEW_EMBEDDINGS_NAME and (pt := _torch_tensor_bytes(rows)) is not None:
                # The authors' classifier loader opens new_embeddings_init.safetensors with a torch.device,
                # which safetensors >= 0.8 refuses; their trainer's own .pt loads everywhere.
                atomic_write_bytes(os.path.join(tmp, NEW_EMBEDDINGS_PICKLE), pt)
                continue
            atomic_write_bytes(
                os.path.join(tmp, name), write_safetensors_bytes({key: rows}, {"format": "pt"})
            )
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)


def _torch_tensor_bytes(array: np.ndarray) -> bytes | None:
    """``torch.save`` of ``array`` as a plain tensor (loadable with ``weights_only=True``), or ``None``
    without torch."""
    try:
        import io

        import torch
    except ImportError:
        return None
    buffer = io.BytesIO()
    torch.save(torch.from_numpy(np.array(array, np.float32, copy=True)), buffer)
    return buffer.getvalue()


def _new_token_rows(params: PyTree | None, added: int) -> dict[str, tuple[str, np.ndarray]]:
    """``{file: (key, rows)}``: the initial rows of the ``added`` last tokens (the base params hold
    them: training changes only the adapter), for the embedding and an untied ``lm_head``."""
    if params is None:
        raise ValueError(f"the model has {added} added tokens: pass params (or the model) to export them")
    leaves = tree_lib.leaf_paths(params)
    embedding = np.asarray(leaves[embedding_path(params)], np.float32)
    out = {NEW_EMBEDDINGS_NAME: (NEW_EMBEDDINGS_KEY, np.ascontiguousarray(embedding[-added:]))}
    if "lm_head.kernel" in leaves:
        head = np.asarray(leaves["lm_head.kernel"], np.float32)  # (hidden, vocab)
        out[NEW_LM_HEAD_NAME] = (NEW_LM_HEAD_KEY, np.ascontiguousarray(head[:, -added:].T))
    return out


def grow_for_adapter(model: Any, adapter_dir: str | os.PathLike) -> Any:
    """``model`` grown by the tokens a SpaRTA adapter added (its ``new_embeddings_init``; for an untied
    ``lm_head`` also our ``new_lm_head_init``), as the authors' classifier loader does; ``model``
    itself when the adapter added none. The rows come from ``new_embeddings_init.safetensors`` or,
    as the authors' trainer writes them, ``new_embeddings_init.pt`` (``weights_only`` loading)."""
    adapter_dir = os.fspath(adapter_dir)
    path = os.path.join(adapter_dir, NEW_EMBEDDINGS_NAME)
    pt_path = os.path.join(adapter_dir, NEW_EMBEDDINGS_PICKLE)
    if os.path.isfile(path):
        tensors, _ = read_safetensors(path)
        if NEW_EMBEDDINGS_KEY not in tensors:
            raise AdapterFormatError(f"{path}: no {NEW_EMBEDDINGS_KEY!r} tensor (found {sorted(tensors)})")
        rows = check_dense(tensors[NEW_EMBEDDINGS_KEY], f"{path}: {NEW_EMBEDDINGS_KEY}").astype(np.float32)
    elif os.path.isfile(pt_path):
        path = pt_path
        rows = check_dense(_pt_array(_torch_load(pt_path), pt_path), pt_path).astype(np.float32)
    else:
        return model
    leaves = tree_lib.leaf_paths(model.params)
    hidden = np.shape(leaves[embedding_path(model.params)])[1]
    if rows.ndim != 2 or rows.shape[1] != hidden:
        raise AdapterFormatError(
            f"{path}: shape {rows.shape}, expected (added, {hidden}) {DIFFERENT_BASE_HINT}"
        )
    head_rows = None
    if "lm_head.kernel" in leaves:
        head_path = os.path.join(adapter_dir, NEW_LM_HEAD_NAME)
        if not os.path.isfile(head_path):
            raise AdapterFormatError(
                f"{adapter_dir}: the adapter adds {rows.shape[0]} tokens but has no {NEW_LM_HEAD_NAME} for the "
                "model's untied lm_head"
            )
        head_tensors, _ = read_safetensors(head_path)
        if NEW_LM_HEAD_KEY not in head_tensors:
            raise AdapterFormatError(
                f"{head_path}: no {NEW_LM_HEAD_KEY!r} tensor (found {sorted(head_tensors)})"
            )
        head_rows = check_dense(head_tensors[NEW_LM_HEAD_KEY], f"{head_path}: {NEW_LM_HEAD_KEY}")
        if head_rows.shape != rows.shape:
            raise AdapterFormatError(f"{head_path}: shape {head_rows.shape}, expected {rows.shape}")
    return with_new_rows(model, rows, head_rows)


def _torch_load(path: str) -> Any:
    try:
        import torch
    except ImportError:
        raise AdapterFormatError(
            f"{path}: a torch file; install torch to read it (we never unpickle otherwise)"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for unsafe or corrupt files
        raise AdapterFormatError(
            f"{path}: cannot be loaded with torch.load(weights_only=True) (refusing to unpickle arbitrary "
            f"objects; re-save it as safetensors): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _read_deltas(
    adapter_dir: str,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str], str]:
    st_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    pt_path = os.path.join(adapter_dir, PICKLE_NAME)
    indices: dict[str, np.ndarray] = {}
    deltas: dict[str, np.ndarray] = {}
    if os.path.isfile(st_path):
        tensors, metadata = read_safetensors(st_path)
        for key, value in tensors.items():
            kind, _, name = key.partition(".")
            if kind == "indices" and name:
                indices[name] = value
            elif kind == "deltas" and name:
                deltas[name] = value
            else:
                raise AdapterFormatError(
                    f"{st_path}: unexpected key {key!r} (expected 'indices.<name>' or 'deltas.<name>')"
                )
        return indices, deltas, metadata, st_path
    if os.path.isfile(pt_path):
        obj = _torch_load(pt_path)
        if not isinstance(obj, Mapping) or not {"indices", "deltas"} <= set(obj):
            raise AdapterFormatError(f"{pt_path}: expected a dict with 'indices' and 'deltas'")
        for part, store in (("indices", indices), ("deltas", deltas)):
            if not isinstance(obj[part], Mapping):
                raise AdapterFormatError(
                    f"{pt_path}: '{part}' must map parameter names to tensors, got {type(obj[part]).__name__}"
                )
            for name, value in obj[part].items():
                store[str(name)] = _pt_array(value, f"{pt_path}: {part}[{name!r}]")
        return indices, deltas, {}, pt_path
    raise AdapterFormatError(f"{adapter_dir}: no {WEIGHTS_NAME} or {PICKLE_NAME} (not a SpaRTA adapter)")


def _read_head_init(adapter_dir: str) -> tuple[np.ndarray | None, str]:
    """The initial classifier head (``head_init.safetensors`` key ``head``, else ``head_init.pt``)."""
    st_path = os.path.join(adapter_dir, HEAD_INIT_NAME)
    pt_path = os.path.join(adapter_dir, HEAD_INIT_PICKLE)
    if os.path.isfile(st_path):
        tensors, _ = read_safetensors(st_path)
        if HEAD_INIT_KEY not in tensors:
            raise AdapterFormatError(f"{st_path}: no {HEAD_INIT_KEY!r} tensor (found {sorted(tensors)})")
        return check_dense(tensors[HEAD_INIT_KEY], f"{st_path}: {HEAD_INIT_KEY}").astype(np.float32), st_path
    if os.path.isfile(pt_path):
        value = _pt_array(_torch_load(pt_path), pt_path)
        return check_dense(value, pt_path).astype(np.float32), pt_path
    return None, st_path


def _pt_array(value: Any, where: str) -> np.ndarray:
    """A tensor from a torch file as NumPy (floats as float32); anything else is refused."""
    import torch  # only reached after _torch_load imported it

    if not isinstance(value, torch.Tensor) or value.is_complex():
        raise AdapterFormatError(
            f"{where}: expected a real tensor, got {type(value).__name__} {getattr(value, 'dtype', '')}"
        )
    value = value.detach().cpu()
    return value.float().numpy() if value.is_floating_point() else value.numpy()


def load_sparta(
    adapter_dir: str | os.PathLike, params: PyTree | None = None, *, fan_in_fan_out: Sequence[str] = ()
) -> Adapter:
    """A SpaRTA adapter directory as our :class:`~jaxsparse.delta.Adapter`.

    ``params`` (arrays or ``jax.ShapeDtypeStruct``) resolves names and shapes and is required for
    adapters the authors' code wrote. Empty entries are dropped. Errors name the file and key.
    """
    adapter_dir = os.fspath(adapter_dir)
    cfg_path = os.path.join(adapter_dir, CONFIG_NAME)
    raw = read_json(cfg_path)
    if BASE_KEY not in raw:
        raise AdapterFormatError(f"{cfg_path}: no {BASE_KEY!r} key (not a SpaRTA adapter config)")
    indices, deltas, metadata, source = _read_deltas(adapter_dir)
    layout = read_layout(metadata, source)
    shapes = param_shapes(params) if params is not None else None
    for name in sorted(set(indices) ^ set(deltas)):
        missing = "deltas" if name in indices else "indices"
        raise AdapterFormatError(
            f"{source}: '{missing}.{name}' missing (every parameter needs indices and deltas)"
        )
    check_field_types(raw, {BASE_KEY: "str|null", DENSE_KEY: NAME_LIST, CONFIG_KEY: "object|null"}, cfg_path)
    head_init, head_path = _read_head_init(adapter_dir)
    dense_names = set(raw.get(DENSE_KEY) or ()) | ({HEAD_NAME} if head_init is not None else set())

    sparse_out: dict[str, SparseDelta] = {}
    dense_out: dict[str, Any] = {}
    for name in sorted(indices):
        where = f"{source}: {name}"
        coords = np.asarray(indices[name])
        if coords.ndim == 2 and coords.shape[0] == 0 and name not in dense_names:
            continue
        path, shape, transposed = resolve_param(
            name, shapes=shapes, layout=layout, fan_in_fan_out=fan_in_fan_out, where=where
        )
        flat, order = from_hf_coords(coords, shape, transposed=transposed, where=f"{source}: indices.{name}")
        values = check_values(deltas[name], coords.shape[0], f"{source}: deltas.{name}")[order]
        if name in dense_names:
            numel = int(np.prod(shape))
            if flat.size != numel:
                raise AdapterFormatError(
                    f"{where}: trained densely ({DENSE_KEY}) but has {flat.size} of {numel} entries "
                    f"{DIFFERENT_BASE_HINT}"
                )
            init = np.zeros(numel, np.float32)
            if name == HEAD_NAME and head_init is not None:
                if head_init.shape != hf_shape(shape, transposed):
                    raise AdapterFormatError(
                        f"{head_path}: shape {head_init.shape}, expected {hf_shape(shape, transposed)} for {name} "
                        f"{DIFFERENT_BASE_HINT}"
                    )
                init = (head_init.T if transposed else head_init).reshape(-1).astype(np.float32)
            dense_out[path] = jnp.asarray(
                check_dense((init + values.astype(np.float32)).reshape(shape), where)
            )
        else:
            sparse_out[path] = SparseDelta(jnp.asarray(flat), jnp.asarray(values), shape)
    return Adapter(sparse_out, dense_out, config=_sparta_config(raw, sparse_out, cfg_path))


def _sparta_config(raw: dict[str, Any], deltas: dict[str, SparseDelta], where: str) -> SpartaConfig:
    base = raw.get(BASE_KEY)
    saved = raw.get(CONFIG_KEY)
    if isinstance(saved, Mapping):
        check_field_types(saved, _CONFIG_KINDS, f"{where}: {CONFIG_KEY}")
        kwargs = {f: saved[f] for f in _CONFIG_FIELDS if f in saved}
        try:
            return SpartaConfig(**kwargs, base_model_name_or_path=base)
        except (TypeError, ValueError) as e:
            raise AdapterFormatError(f"{where}: {CONFIG_KEY!r} is invalid: {e}") from None
    # An adapter from the authors' code: record what the files say.
    k = sum(d.k for d in deltas.values())
    numel = sum(int(np.prod(d.shape)) for d in deltas.values())
    density = min(1.0, k / numel) if k else 1.0
    task = "SEQ_CLS" if raw.get("problem_type") == "single_label_classification" else None
    targets = sorted({tree_lib.module_of(p) for p in deltas}) or None
    return dataclasses.replace(
        SpartaConfig(density=density),
        target_modules=tuple(targets) if targets else None,
        task_type=task,
        base_model_name_or_path=base,
    )
