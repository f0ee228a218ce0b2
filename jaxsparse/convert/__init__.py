"""Import and export of on-disk adapter formats (PEFT SHiRA, PEFT LoRA, SpaRTA).

This package module holds what every format shares: the error type, reading a ``.safetensors``
file with errors that name it, and the **one** mapping between our flat indices into a Flax leaf
and coordinates into the matching Hugging Face tensor (:func:`to_hf_coords`,
:func:`from_hf_coords`). For a linear kernel, ours is (in, out) and Hugging Face's ``weight`` is
(out, in): the coordinates swap, except for ``fan_in_fan_out`` modules (GPT-2 ``Conv1D``), whose
Hugging Face weight is already (in, out). Which case applies comes from
:func:`jaxsparse.models.naming.hf_key`.

Example:
    >>> import numpy as np
    >>> coords, order = to_hf_coords(np.array([1, 2]), (2, 3), transposed=True)
    >>> coords.tolist()  # flat 1 = (in 0, out 1) -> (1, 0); flat 2 = (in 0, out 2) -> (2, 0)
    [[1, 0], [2, 0]]
    >>> from_hf_coords(coords, (2, 3), transposed=True, where="w")[0].tolist()
    [1, 2]
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


class AdapterFormatError(ValueError):
    """An adapter directory or file is not what its format requires (the message names file and key)."""


# Appended to errors where the adapter's sizes disagree with the base model's: by far the most
# common cause is loading an adapter into another checkpoint than the one it was trained on.
DIFFERENT_BASE_HINT = "(adapter made for a different base model?)"

# The PEFT release whose files we write byte for byte (its ``peft_version`` field and its key set);
# the test extra pins it, so CI compares against the files that release writes. Files from older
# or newer releases are read as long as their extra keys hold the "feature off" value.
PEFT_VERSION = "0.22.0"


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file; missing/truncated/corrupt files name the path."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterFormatError(f"{path}: file not found")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError, TypeError, AttributeError, MemoryError) as e:
        # The header is the file's word on dtypes and sizes; besides its own errors, safetensors'
        # NumPy backend raises AttributeError for a dtype NumPy lacks (F8_*) and MemoryError for
        # sizes no machine holds. Each means the same to the user: this file is not readable.
        raise AdapterFormatError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return tensors, metadata


def write_safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """Serialized safetensors (contiguous arrays; bfloat16 and other non-NumPy floats become float32)."""
    from safetensors.numpy import save

    arrays = {}
    for k, v in tensors.items():
        a = np.asarray(v)
        if a.dtype.kind == "V" or a.dtype.name == "bfloat16":
            a = a.astype(np.float32)
        arrays[k] = np.ascontiguousarray(a)
    return save(arrays, metadata=dict(metadata))


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file; missing or malformed files are an :class:`AdapterFormatError` naming it."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise AdapterFormatError(f"{path}: file not found") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise AdapterFormatError(f"{path}: cannot be read ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:
        # JSONDecodeError, UnicodeDecodeError, an integer past Python's digit limit, or nesting
        # deeper than the interpreter's recursion limit: all mean the file is not a config we read.
        raise AdapterFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# Value kinds a config field may hold, for :func:`check_field_types`.
NAMES = "a module name, a list of names or null"
NAME_LIST = "a list of names or null"
_KINDS: dict[str, Any] = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "null": lambda v: v is None,
    "object": lambda v: isinstance(v, dict),
    NAMES: lambda v: v is None or isinstance(v, str) or _KINDS[NAME_LIST](v),
    NAME_LIST: lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
}


def check_field_types(raw: Mapping[str, Any], kinds: Mapping[str, str], where: str) -> None:
    """Each key of ``kinds`` present in ``raw`` holds a value of that kind (``"int"``, ``"number"``,
    ``"bool"``, ``"str"``, ``"object"``, :data:`NAMES`, :data:`NAME_LIST`, or several joined by ``"|"``);
    otherwise an :class:`AdapterFormatError` naming ``where`` and the key.

    Example:
        >>> check_field_types({"r": 8, "target_modules": ["q"]}, {"r": "int", "target_modules": NAMES}, "c.json")
        >>> try:
        ...     check_field_types({"r": "8"}, {"r": "int"}, "c.json")
        ... except AdapterFormatError as e:
        ...     print(e)
        c.json: 'r' must be int, got '8'
    """
    for key, kind in kinds.items():
        if key in raw and not any(_KINDS[k](raw[key]) for k in kind.split("|")):
            raise AdapterFormatError(
                f"{where}: {key!r} must be {kind.replace('|', ' or ')}, got {raw[key]!r}"
            )


def hf_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    """Shape of the Hugging Face tensor for our leaf ``shape``."""
    return tuple(reversed(shape)) if transposed else tuple(shape)


def to_hf_coords(
    flat: np.ndarray, shape: tuple[int, ...], *, transposed: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Our flat indices into a leaf of ``shape`` -> ``(coords (n, ndim), order)`` in the Hugging Face tensor.

    Rows are sorted row-major in the Hugging Face layout (what ``mask.nonzero()`` / ``torch.where``
    give); ``order`` is the permutation to apply to the values (``values[order]``).
    """
    flat = np.asarray(flat, dtype=np.int64)
    numel = int(np.prod(shape))
    if flat.size and (flat.min() < 0 or flat.max() >= numel):
        raise ValueError(
            f"indices must lie in [0, {numel}) for a leaf of shape {shape}, got {flat.min()}..{flat.max()}"
        )
    ours = np.unravel_index(flat, shape) if flat.size else tuple(np.zeros(0, np.int64) for _ in shape)
    theirs = tuple(reversed(ours)) if transposed else ours
    target = hf_shape(shape, transposed)
    order = (
        np.argsort(np.ravel_multi_index(theirs, target), kind="stable")
        if flat.size
        else np.zeros(0, np.int64)
    )
    coords = (
        np.stack([np.asarray(c, np.int64)[order] for c in theirs], axis=1)
        if shape
        else np.zeros((flat.size, 0))
    )
    return coords.astype(np.int32), order


def from_hf_coords(
    coords: np.ndarray, shape: tuple[int, ...], *, transposed: bool, where: str
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (n, ndim) into the Hugging Face tensor -> ``(flat, order)`` for our leaf of ``shape``.

    ``flat`` is sorted (int32 while the leaf has < 2**31 entries, else int64); apply ``order`` to the
    values. Out-of-range or duplicate coordinates raise :class:`AdapterFormatError` naming ``where``.
    """
    target = hf_shape(shape, transposed)
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != len(target):
        raise AdapterFormatError(
            f"{where}: expected coordinates of shape (n, {len(target)}), got {coords.shape}"
        )
    if coords.dtype.kind == "f":
        # (bounded before the int64 cast, which would wrap larger values)
        if not np.all(np.abs(coords.astype(np.float64)) < 2**62) or np.any(coords != np.round(coords)):
            raise AdapterFormatError(f"{where}: float indices must hold whole numbers below 2**62")
    elif coords.dtype.kind not in "iu":
        raise AdapterFormatError(f"{where}: indices must be integers, got dtype {coords.dtype}")
    coords = coords.astype(np.int64)
    for axis, size in enumerate(target):
        col = coords[:, axis]
        bad = np.flatnonzero((col < 0) | (col >= size))
        if bad.size:
            raise AdapterFormatError(
                f"{where}: index out of range: entry {int(bad[0])} has coordinate {int(col[bad[0]])} on axis "
                f"{axis}, expected 0 <= i < {size} (tensor shape {target}) {DIFFERENT_BASE_HINT}"
            )
    theirs = tuple(coords[:, a] for a in range(len(target)))
    ours = tuple(reversed(theirs)) if transposed else theirs
    flat = np.ravel_multi_index(ours, shape) if coords.shape[0] else np.zeros(0, np.int64)
    order = np.argsort(flat, kind="stable")
    flat = flat[order]
    dup = np.flatnonzero(np.diff(flat) == 0)
    if dup.size:
        pos = np.unravel_index(flat[dup[0]], shape)
        raise AdapterFormatError(f"{where}: duplicate index {tuple(int(p) for p in pos)} (in our layout)")
    numel = int(np.prod(shape))
    return flat.astype(np.int32 if numel < 2**31 else np.int64), order


def check_values(values: np.ndarray, n: int, where: str) -> np.ndarray:
    """The (n,) float values of a delta: right shape, a float dtype, all finite."""
    values = np.asarray(values)
    if values.dtype.kind != "f" and values.dtype.name != "bfloat16":
        raise AdapterFormatError(f"{where}: expected float values, got dtype {values.dtype}")
    if values.shape != (n,):
        raise AdapterFormatError(f"{where}: expected shape ({n},) to match the indices, got {values.shape}")
    bad = np.flatnonzero(~np.isfinite(values.astype(np.float32)))
    if bad.size:
        raise AdapterFormatError(f"{where}: non-finite value {values[bad[0]]} at entry {int(bad[0])}")
    return values


def check_dense(value: np.ndarray, where: str) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind != "f" and value.dtype.name != "bfloat16":
        raise AdapterFormatError(f"{where}: expected a float tensor, got dtype {value.dtype}")
    if not np.all(np.isfinite(value.astype(np.float32))):
        raise AdapterFormatError(f"{where}: contains NaN or inf")
    return value


LAYOUT_METADATA_KEY = "jaxsparse_layout"


def layout_metadata(layout: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """safetensors metadata recording, per file key, our parameter path, leaf shape and transposition.

    PEFT and SpaRTA files do not record the shapes of the weights their indices point into; ours do,
    so an adapter we wrote loads without the base model. Other readers ignore the metadata.
    """
    return {"format": "pt", LAYOUT_METADATA_KEY: json.dumps(layout, sort_keys=True)}


def read_layout(metadata: Mapping[str, str], where: str) -> dict[str, dict[str, Any]] | None:
    raw = metadata.get(LAYOUT_METADATA_KEY)
    if raw is None:
        return None
    try:
        layout = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise AdapterFormatError(
            f"{where}: metadata {LAYOUT_METADATA_KEY!r} is not valid JSON ({e})"
        ) from None
    if not isinstance(layout, dict):
        raise AdapterFormatError(
            f"{where}: metadata {LAYOUT_METADATA_KEY!r} must be a JSON object, got {type(layout).__name__}"
        )
    out: dict[str, dict[str, Any]] = {}
    seen: dict[str, str] = {}
    for k, v in layout.items():
        # Everything below is used without a base model to check it: refuse what is not well formed.
        what = f"{where}: metadata {LAYOUT_METADATA_KEY!r} entry {k!r}"
        if not isinstance(v, dict):
            raise AdapterFormatError(f"{what} must be an object with path, shape, transposed")
        path, shape, transposed = v.get("path"), v.get("shape"), v.get("transposed")
        if not isinstance(path, str) or not path or path in seen:
            raise AdapterFormatError(f"{what}: 'path' must be a parameter path used once, got {path!r}")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            or math.prod(shape) >= 2**62
        ):
            raise AdapterFormatError(f"{what}: 'shape' must be a list of sizes >= 0, got {shape!r}")
        if not isinstance(transposed, bool):
            raise AdapterFormatError(f"{what}: 'transposed' must be true or false, got {transposed!r}")
        seen[path] = k
        out[k] = {"path": path, "shape": tuple(shape), "transposed": transposed}
    return out


def param_shapes(params: Any) -> dict[str, tuple[int, ...]]:
    """Our parameter path -> shape, for arrays or ``jax.ShapeDtypeStruct`` leaves."""
    from jaxsparse import tree as tree_lib

    return {p: tuple(getattr(x, "shape", ())) for p, x in tree_lib.leaf_paths(params).items()}


def resolve_param(
    hf_name: str,
    *,
    shapes: Mapping[str, tuple[int, ...]] | None,
    layout: Mapping[str, Mapping[str, Any]] | None,
    fan_in_fan_out: Any,
    where: str,
) -> tuple[str, tuple[int, ...], bool]:
    """``(our path, our leaf shape, transposed)`` for the Hugging Face parameter ``hf_name``.

    With the model's ``shapes`` the path is resolved by the naming rule and the shape is the
    model's (and must agree with the file's recorded layout, if any); without, the file's layout
    metadata is used; with neither, the shape is unknowable and an error says to pass params.
    """
    from jaxsparse.models import naming

    recorded = (layout or {}).get(hf_name)
    if shapes is not None:
        try:
            path = naming.param_path(hf_name, shapes)
        except KeyError:
            raise AdapterFormatError(f"{where}: {hf_name!r} names no parameter of the model") from None
        shape = shapes[path]
        if recorded is not None and tuple(recorded["shape"]) != shape:
            raise AdapterFormatError(
                f"{where}: adapter was made for {path!r} of shape {tuple(recorded['shape'])}, "
                f"the model's is {shape} {DIFFERENT_BASE_HINT}"
            )
        return path, shape, naming.hf_key(path, fan_in_fan_out=fan_in_fan_out)[1]
    if recorded is None:
        raise AdapterFormatError(
            f"{where}: the file does not record the shape of {hf_name!r} (not written by jaxsparse); "
            "pass the base model's params to load it"
        )
    return recorded["path"], tuple(recorded["shape"]), bool(recorded["transposed"])
