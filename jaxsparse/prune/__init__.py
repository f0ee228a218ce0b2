"""Pruning our models' parameter trees: magnitude and Wanda scores, unstructured and N:M patterns,
and the sparsity report.

One concept per module: :mod:`~jaxsparse.prune.scores` (what a weight is worth),
:mod:`~jaxsparse.prune.patterns` (which to zero given the scores), :mod:`~jaxsparse.prune.pruner`
(the whole model, layer by layer on calibration data) and :mod:`~jaxsparse.prune.report` (zeros per
layer / block / overall). Calibration data and the activation capture live in
:mod:`jaxsparse.calibration` (shared with quantization).

Example:
    >>> import jax.numpy as jnp
    >>> from jaxsparse import prune
    >>> k = jnp.array([[1.0], [-4.0], [2.0], [3.0]])
    >>> prune.prune_kernel(k, prune.magnitude_score(k), prune.Pattern.parse("2:4"), 0.5).ravel().tolist()
    [0.0, -4.0, 0.0, 3.0]
"""

from jaxsparse.prune.patterns import CLI_PATTERNS, Pattern, check_sparsity, keep_mask, pruned_per_row
from jaxsparse.prune.pruner import (
    PruneSpec,
    check_pattern_widths,
    prunable_linears,
    prune_kernel,
    prune_model,
    prune_spec,
)
from jaxsparse.prune.report import SparsityReport, nm_pattern, sparsity_report
from jaxsparse.prune.scores import METHODS, magnitude_score, wanda_score

__all__ = [
    "CLI_PATTERNS",
    "METHODS",
    "Pattern",
    "PruneSpec",
    "SparsityReport",
    "check_pattern_widths",
    "check_sparsity",
    "keep_mask",
    "magnitude_score",
    "nm_pattern",
    "prunable_linears",
    "prune_kernel",
    "prune_model",
    "prune_spec",
    "pruned_per_row",
    "sparsity_report",
    "wanda_score",
]
