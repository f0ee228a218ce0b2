"""The one rule that maps our parameter paths to Hugging Face state-dict keys and back.

Our Flax models name modules exactly as the Hugging Face modules; only leaf names and the
linear-weight layout differ:

==================  ==================  ======================================
ours (leaf)         Hugging Face        layout
==================  ==================  ======================================
``X.kernel``        ``X.weight``        (in, out) vs (out, in): transposed, except for
                                        ``fan_in_fan_out`` modules (GPT-2 ``Conv1D``), stored (in, out)
``X.embedding``     ``X.weight``        same
``X.scale``         ``X.weight``        same (norms)
anything else       same name           same
==================  ==================  ======================================

Example:
    >>> hf_key("model.layers.0.self_attn.q_proj.kernel")
    ('model.layers.0.self_attn.q_proj.weight', True)
    >>> hf_key("transformer.h.0.attn.c_attn.kernel", fan_in_fan_out=("c_attn",))
    ('transformer.h.0.attn.c_attn.weight', False)
    >>> param_path("bert.embeddings.word_embeddings.weight", {"bert.embeddings.word_embeddings.embedding"})
    'bert.embeddings.word_embeddings.embedding'
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

WEIGHT_LEAVES = ("kernel", "embedding", "scale")


def _is_fan_in_fan_out(module: str, fan_in_fan_out: Sequence[str]) -> bool:
    return any(module == n or module.endswith("." + n) for n in fan_in_fan_out)


def hf_key(path: str, *, fan_in_fan_out: Sequence[str] = ()) -> tuple[str, bool]:
    """Hugging Face key of our parameter ``path`` and whether the array is transposed between them."""
    module, _, leaf = path.rpartition(".")
    if leaf in WEIGHT_LEAVES:
        transposed = leaf == "kernel" and not _is_fan_in_fan_out(module, fan_in_fan_out)
        return f"{module}.weight", transposed
    return path, False


def param_path(key: str, known_paths: Collection[str]) -> str:
    """Our parameter path for Hugging Face ``key``, resolved against the model's ``known_paths``.

    Raises ``KeyError`` naming the key and the candidates tried when the model has no such parameter.
    """
    module, _, leaf = key.rpartition(".")
    candidates = [f"{module}.{w}" for w in WEIGHT_LEAVES] if leaf == "weight" else []
    candidates.append(key)
    for c in candidates:
        if c in known_paths:
            return c
    raise KeyError(f"checkpoint key {key!r} has no parameter in the model (tried {candidates})")
