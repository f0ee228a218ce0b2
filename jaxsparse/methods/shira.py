"""SHiRA: k = r * (m + n) trainable entries per targeted 2-D weight (Bhardwaj et al., 2024).

The config mirrors PEFT's ``ShiraConfig`` field for field (same names and defaults), plus the
mask strategies jaxsparse adds (``"magnitude"``, ``"gradient"``, or a custom ``mask_fn``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, set, frozenset)) else value


@dataclasses.dataclass(frozen=True)
class ShiraConfig:
    """PEFT-compatible SHiRA config (hashable: lists become tuples).

    ``target_modules``: list of module names (suffix match) or a full-match regex; ``None`` means
    every 2-D linear kernel except embeddings and the output head. ``mask_fn(weight, r, key) ->
    bool mask`` overrides ``mask_type`` (the count must be exactly ``r * (m + n)``).
    """

    r: int = 32
    mask_type: str = "random"
    random_seed: int | None = None
    target_modules: Sequence[str] | str | None = None
    fan_in_fan_out: bool = False
    init_weights: bool = True
    modules_to_save: Sequence[str] | None = None
    exclude_modules: Sequence[str] | str | None = None
    mask_fn: Callable[..., Any] | None = dataclasses.field(default=None, compare=False)
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save", "exclude_modules"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
