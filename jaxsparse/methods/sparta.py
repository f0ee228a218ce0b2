"""SpaRTA: train a random fraction ``density`` of the entries of the targeted weights (Rios et al., 2025)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxsparse.methods.shira import _freeze


@dataclasses.dataclass(frozen=True)
class SpartaConfig:
    """SpaRTA config (hashable: lists become tuples).

    ``density`` is the fraction of each targeted weight's entries that train (SpaRTA's
    ``1 - sparsity``); ``target_modules=None`` means every 2-D weight except embeddings and the
    output head.
    """

    density: float = 0.01
    target_modules: Sequence[str] | str | None = None
    exclude_modules: Sequence[str] | str | None = None
    modules_to_save: Sequence[str] | None = None
    seed: int = 0
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("target_modules", "modules_to_save", "exclude_modules"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"SpartaConfig.density must be in (0, 1], got {self.density}")
