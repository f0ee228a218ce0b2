"""The model zoo: Flax NNX models named like Hugging Face modules, and Hugging Face loading/saving.

Example:
    >>> import jax.numpy as jnp, transformers
    >>> from jaxsparse import models
    >>> cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
    ...                               num_attention_heads=2, intermediate_size=32)
    >>> m = models.init_params(cfg, task="base")
    >>> m(jnp.array([[1, 2, 3]]), jnp.array([[1, 1, 0]])).shape
    (1, 3, 16)
"""

import importlib as _importlib

from jaxsparse.models.base import (
    ARCHITECTURES,
    TASKS,
    Architecture,
    Model,
    architecture,
    default_init,
    nnx_build,
    register,
)
from jaxsparse.models.hub import (
    CheckpointError,
    from_state_dict,
    from_torch,
    init_params,
    load_tokenizer,
    read_checkpoint,
    read_safetensors,
    save_pretrained,
    to_state_dict,
    write_safetensors,
)
from jaxsparse.models.pretrained import from_pretrained

# Modules that register an Architecture on import (llama.py registers the whole Llama family:
# llama, mistral, qwen2, gemma, phi3).
ARCHITECTURE_MODULES = ("bert", "distilbert", "gpt2", "llama")
for _name in ARCHITECTURE_MODULES:
    _importlib.import_module(f"jaxsparse.models.{_name}")

__all__ = [
    "ARCHITECTURES",
    "TASKS",
    "Architecture",
    "CheckpointError",
    "Model",
    "architecture",
    "default_init",
    "from_pretrained",
    "from_state_dict",
    "from_torch",
    "init_params",
    "load_tokenizer",
    "nnx_build",
    "read_checkpoint",
    "read_safetensors",
    "register",
    "save_pretrained",
    "to_state_dict",
    "write_safetensors",
]
