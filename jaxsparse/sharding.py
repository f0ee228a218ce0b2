"""Training past one device: a ``(data, fsdp)`` device mesh and where each array of a run lives.

- The frozen base parameters are sharded FSDP-style: each leaf is split along its largest axis
  that the ``fsdp`` axis divides (leaves no axis of which it divides stay replicated), and
  replicated over ``data``.
- Each batch is split over ``data`` (its leading axis); XLA's SPMD partitioner inserts the
  all-gathers and reductions, so the step computes what one device would.
- The adapter (and its optimizer state) is small: replicated on every device, or, with
  ``adapter_sharding="fsdp"``, split over ``fsdp`` like the base.

A mesh is written ``"data=2,fsdp=4"`` or ``{"data": 2, "fsdp": 4}``; an axis left out has size 1
and one axis may be ``-1`` (all the devices the other leaves). Arrays are placed with
:func:`jax.make_array_from_callback`, which works unchanged when the devices span several hosts
(``jax.distributed.initialize``; every process holds the same host data).

Example:
    >>> parse_mesh("data=2,fsdp=4")
    {'data': 2, 'fsdp': 4}
    >>> parse_mesh({"fsdp": -1})
    {'data': 1, 'fsdp': -1}
    >>> mesh_sizes({"data": 2, "fsdp": -1}, 8)
    {'data': 2, 'fsdp': 4}
    >>> try:
    ...     parse_mesh("data=2,tp=4")
    ... except ValueError as e:
    ...     print(e)
    unknown mesh axis 'tp'; allowed axes: ['data', 'fsdp']
    >>> import jax
    >>> mesh = make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    >>> dict(mesh.shape)
    {'data': 1, 'fsdp': 1}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
AXES = ("data", "fsdp")
ADAPTER_SHARDINGS = ("replicated", "fsdp")


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``{"data": d, "fsdp": f}`` from ``"data=2,fsdp=4"`` or a mapping (missing axes: 1; one
    axis may be -1). ``ValueError`` with a one-line reason for anything else."""
    if isinstance(spec, str):
        items: dict[str, Any] = {}
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected axis=size pairs like 'data=2,fsdp=4', got {spec!r}")
            try:
                items[name.strip()] = int(value)
            except ValueError:
                raise ValueError(
                    f"the size of axis {name.strip()!r} must be an integer, got {value!r}"
                ) from None
    elif isinstance(spec, Mapping):
        items = dict(spec)
    else:
        raise ValueError(f"expected 'data=2,fsdp=4' or a mapping of axis sizes, got {spec!r}")
    for name, size in items.items():
        if name not in AXES:
            raise ValueError(f"unknown mesh axis {name!r}; allowed axes: {list(AXES)}")
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(
                f"the size of axis {name!r} must be an integer >= 1 (or -1: the rest), got {size!r}"
            )
    if list(items.values()).count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1 (all the devices the other axes leave)")
    return {name: int(items.get(name, 1)) for name in AXES}


def describe(sizes: Mapping[str, int]) -> str:
    """``"data=2,fsdp=4"``: the command-line form of a mesh."""
    return ",".join(f"{name}={sizes[name]}" for name in AXES)


def mesh_sizes(spec: str | Mapping[str, int], device_count: int) -> dict[str, int]:
    """The axis sizes of ``spec`` on ``device_count`` devices (a -1 axis filled in); ``ValueError``
    when the mesh does not use exactly the devices there are."""
    sizes = parse_mesh(spec)
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if device_count % known:
            raise ValueError(
                f"mesh {describe(sizes)}: the other axes ({known} devices) do not divide the "
                f"{device_count} devices available"
            )
        sizes = {k: (device_count // known if v == -1 else v) for k, v in sizes.items()}
    elif known != device_count:
        raise ValueError(
            f"mesh {describe(sizes)} needs {known} devices but {device_count} are available "
            f"(jax.device_count()); the axis sizes must multiply to the device count, or set one axis to -1"
        )
    return sizes


def make_mesh(spec: str | Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` :class:`~jax.sharding.Mesh` over ``devices`` (default: all of them, every
    host's). Neighbouring devices (one host's, in JAX's order) share an ``fsdp`` group."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(spec, len(devices))
    return Mesh(np.array(devices).reshape(sizes["data"], sizes["fsdp"]), AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """Split the largest axis that ``fsdp`` divides (the first of equal ones); replicate otherwise."""
    n = mesh.shape["fsdp"]
    if n > 1:
        axes = [a for a, size in enumerate(shape) if size >= n and size % n == 0]
        if axes:
            axis = max(axes, key=lambda a: (shape[a], -a))
            return NamedSharding(mesh, P(*([None] * axis), "fsdp"))
    return replicated(mesh)


def batch_sharding(shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    """The leading (example) axis over ``data`` when it divides; replicated otherwise."""
    n = mesh.shape["data"]
    if n > 1 and len(shape) >= 1 and shape[0] % n == 0:
        return NamedSharding(mesh, P("data"))
    return replicated(mesh)


def put(x: Any, sharding: NamedSharding) -> jax.Array:
    """``x`` (host data or a local array, the same on every process) placed with ``sharding``."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
    """The base parameters FSDP-sharded (see :func:`fsdp_sharding`)."""
    return jax.tree_util.tree_map(lambda x: put(x, fsdp_sharding(np.shape(x), mesh)), params)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """A host batch split over ``data``."""
    return {k: put(v, batch_sharding(np.shape(v), mesh)) for k, v in batch.items()}


def tree_shardings(tree: PyTree, mesh: Mesh, mode: str = "replicated") -> PyTree:
    """Per-leaf shardings of a small tree (an adapter, an optimizer state): all replicated, or
    (``mode="fsdp"``) each leaf split along an axis ``fsdp`` divides."""
    if mode not in ADAPTER_SHARDINGS:
        raise ValueError(f"adapter sharding {mode!r} is not one of {list(ADAPTER_SHARDINGS)}")
    if mode == "replicated":
        return jax.tree_util.tree_map(lambda _: replicated(mesh), tree)
    return jax.tree_util.tree_map(lambda x: fsdp_sharding(np.shape(x), mesh), tree)


def place(tree: PyTree, shardings: PyTree) -> PyTree:
    """Each leaf of ``tree`` placed with the matching leaf of ``shardings``."""
    return jax.tree_util.tree_map(put, tree, shardings)


def gather(tree: PyTree, mesh: Mesh) -> PyTree:
    """``tree`` replicated on every device, so any process can read it whole (e.g. to save it)."""
    return jax.jit(lambda x: x, out_shardings=replicated(mesh))(tree)
