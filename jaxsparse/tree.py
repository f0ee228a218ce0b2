"""Dotted paths over parameter pytrees and PEFT-style target selection.

A parameter path is the dotted form of a leaf's key path, e.g.
``"model.layers.0.self_attn.q_proj.kernel"``; its *module path* drops the last component
(``"model.layers.0.self_attn.q_proj"``). Our Flax models name modules after the Hugging Face
module paths, so PEFT ``target_modules`` apply to module paths unchanged.

Example:
    >>> import jax.numpy as jnp
    >>> params = {"enc": {"q_proj": {"kernel": jnp.zeros((4, 4))}, "norm": {"scale": jnp.ones(4)}}}
    >>> sorted(leaf_paths(params))
    ['enc.norm.scale', 'enc.q_proj.kernel']
    >>> select_modules(params, ["q_proj"])
    ['enc.q_proj']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax

PyTree = Any
TargetSpec = str | Sequence[str] | None


class TargetError(ValueError):
    """A target/exclusion specification does not match the parameter tree."""


def _key_str(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(key_path: Iterable[Any]) -> str:
    """Dotted string of a JAX key path (DictKey / SequenceKey / GetAttrKey entries)."""
    return ".".join(_key_str(k) for k in key_path)


def leaf_paths(tree: PyTree) -> dict[str, Any]:
    """All leaves of ``tree`` keyed by dotted path, in tree-flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_str(kp): leaf for kp, leaf in flat}


def module_of(param_path: str) -> str:
    """Module path of a parameter path: ``"a.b.kernel" -> "a.b"``."""
    return param_path.rpartition(".")[0]


def leaf_name(param_path: str) -> str:
    """Last component of a parameter path: ``"a.b.kernel" -> "kernel"``."""
    return param_path.rpartition(".")[2]


def get_leaf(tree: PyTree, path: str) -> Any:
    """The leaf at dotted ``path``; ``KeyError`` naming the path and its nearest existing parent."""
    node = tree
    parts = path.split(".")
    for depth, part in enumerate(parts):
        # Plain dicts (every Flax params tree) take the direct lookup: merge and switch walk a few
        # hundred paths per call, where the generic walk below was most of the host time.
        if type(node) is dict:
            key = _dict_key(node, part)
            if key in node:
                node = node[key]
                continue
        try:
            if isinstance(node, Mapping):
                node = node[part] if part in node else node[int(part)]
            elif isinstance(node, (list, tuple)):
                node = node[int(part)]
            else:
                node = getattr(node, part)
        except (KeyError, ValueError, IndexError, AttributeError, TypeError):
            where = ".".join(parts[:depth]) or "<root>"
            raise KeyError(f"parameter path {path!r} not found: {where!r} has no child {part!r}") from None
    return node


def replace_leaves(tree: PyTree, new_leaves: Mapping[str, Any]) -> PyTree:
    """A copy of ``tree`` with the leaves at the given dotted paths replaced (structure unchanged).

    Unknown paths raise ``KeyError`` naming them, so a typo never silently does nothing.
    """
    fast = _replace_in_dicts(tree, new_leaves)
    if fast is not None:
        return fast
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(kp) for kp, _ in flat]
    missing = sorted(set(new_leaves) - set(paths))
    if missing:
        raise KeyError(f"parameter paths not in the tree: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    leaves = [new_leaves.get(p, leaf) for p, (_, leaf) in zip(paths, flat, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _replace_in_dicts(tree: PyTree, new_leaves: Mapping[str, Any]) -> PyTree | None:
    """:func:`replace_leaves` for paths that run through plain dicts only, copying just the dicts
    on those paths (the rest of the tree is shared, as in the flatten/unflatten copy); ``None``
    when a path leaves plain dicts or does not exist, for the general path to handle or reject.

    Only array leaves are replaced here: a path that ends anywhere else (a sub-tree, ``None``)
    goes the general way, which refuses what is not a leaf path.
    """
    if type(tree) is not dict:
        return None
    copies: dict[tuple[str, ...], dict] = {(): dict(tree)}
    for path, leaf in new_leaves.items():
        parts = path.split(".")
        node, prefix = copies[()], ()
        for part in parts[:-1]:
            key = _dict_key(node, part)
            child = node.get(key)
            if type(child) is not dict:
                return None
            prefix = (*prefix, part)
            if prefix not in copies:
                copies[prefix] = node[key] = dict(child)
            node = copies[prefix]
        last = _dict_key(node, parts[-1])
        if not hasattr(node.get(last), "shape"):
            return None  # not an array leaf (a sub-tree, None, or missing): the general path decides
        node[last] = leaf
    return copies[()]


def _dict_key(node: dict, part: str) -> Any:
    # The key get_leaf() would take: the string, else its integer (layer stacks keyed 0, 1, ...).
    if part not in node and part.isdigit() and int(part) in node:
        return int(part)
    return part


def module_paths(tree: PyTree) -> list[str]:
    """Every module path (a path that has leaves directly under it), in flatten order, unique."""
    seen: dict[str, None] = {}
    for p in leaf_paths(tree):
        seen.setdefault(module_of(p), None)
    return list(seen)


def _name_matches(module: str, name: str) -> bool:
    return module == name or module.endswith("." + name)


def module_matcher(spec: TargetSpec) -> Callable[[str], bool]:
    """PEFT semantics: a list of names matches a module path equal to a name or ending in ``.name``;
    a string is a regex that must match the whole module path; ``None`` matches nothing."""
    if spec is None:
        return lambda module: False
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise TargetError(f"invalid target regex {spec!r}: {e}") from None
        return lambda module: pattern.fullmatch(module) is not None
    names = tuple(spec)
    return lambda module: any(_name_matches(module, n) for n in names)


def select_modules(
    params: PyTree,
    target_modules: TargetSpec,
    exclude_modules: TargetSpec = None,
    *,
    leaf: str = "kernel",
    ndim: int | None = 2,
    strict: bool = True,
) -> list[str]:
    """Module paths selected by ``target_modules`` minus ``exclude_modules``.

    Only modules that own a ``leaf`` parameter (with ``ndim`` dimensions, if given) are candidates:
    by default the 2-D ``kernel`` of a linear layer. With ``strict`` and a list spec, every name
    must match at least one candidate, else ``TargetError`` names the unknown ones (a regex must
    match at least one module).
    """
    paths = leaf_paths(params)
    candidates = [
        module_of(p)
        for p, x in paths.items()
        if leaf_name(p) == leaf and (ndim is None or getattr(x, "ndim", None) == ndim)
    ]
    include = module_matcher(target_modules)
    exclude = module_matcher(exclude_modules)
    chosen = [m for m in candidates if include(m) and not exclude(m)]
    if strict and target_modules is not None:
        if isinstance(target_modules, str):
            if not chosen:
                raise TargetError(
                    f"target regex {target_modules!r} matches no module with a {ndim}-D {leaf!r}; "
                    f"candidates look like {candidates[:3]}"
                )
        else:
            unknown = [n for n in target_modules if not any(_name_matches(m, n) for m in candidates)]
            if unknown:
                raise TargetError(
                    f"target_modules {unknown} match no module with a {ndim}-D {leaf!r} parameter; "
                    f"candidates look like {candidates[:3]}"
                )
    return chosen


def select_leaves_under(params: PyTree, modules_to_save: TargetSpec, *, strict: bool = True) -> list[str]:
    """Parameter paths of every leaf inside a module matched by ``modules_to_save`` (PEFT matching).

    Example: ``modules_to_save=["classifier"]`` selects ``classifier.kernel`` and ``classifier.bias``.
    """
    if modules_to_save is None or (not isinstance(modules_to_save, str) and len(modules_to_save) == 0):
        return []
    matches = module_matcher(modules_to_save)
    paths = list(leaf_paths(params))
    chosen = [p for p in paths if any(matches(prefix) for prefix in _prefixes(module_of(p)))]
    if strict and not isinstance(modules_to_save, str):
        modules = module_paths(params)
        unknown = [
            n for n in modules_to_save if not any(_name_matches(q, n) for m in modules for q in _prefixes(m))
        ]
        if unknown:
            raise TargetError(f"modules_to_save {unknown} match no module of the model")
    return chosen


def _prefixes(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]
