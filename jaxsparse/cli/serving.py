"""Several adapters served on one base model, per row (what ``classify`` and ``generate`` share).

:func:`base_model_path` finds the one base model the adapters name (or ``--model``),
:func:`shared_tokenizer` the one tokenizer their rows are encoded with, and :func:`load_served`
loads every adapter onto the base and stacks them (:func:`jaxsparse.serve.stack_adapters`), each
failure naming the adapter directory. A quantization-aware (QA-SparsePEFT) adapter is served alone on
its two bases (:func:`load_served_quantization_aware`): a GPTQ ``--model`` and ``--non-quant-model``.

Example:
    >>> check_adapter_dirs(["/nonexistent/adapter"])
    Traceback (most recent call last):
    ...
    jaxsparse.inference.AdapterLoadError: /nonexistent/adapter: adapter directory not found
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Served:
    """A base model and the adapters of several directories, ready to serve per row.

    ``bank`` is ``None`` for a single adapter, which ``params`` then already has merged in."""

    model: Any
    params: Any
    bank: Any
    adapter_dirs: list[str]


def add_served_args(parser: Any, *, adapters: str) -> None:
    """The arguments of a serving verb: ``--adapter DIR`` (repeatable), ``--model``, ``--non-quant-model``.

    ``adapters`` says which adapter directories the verb serves (the ``--adapter`` help).
    """
    from jaxsparse.cli.quantization_aware import NON_QUANT_HELP

    parser.add_argument(
        "--adapter",
        required=True,
        action="append",
        metavar="DIR",
        help=f"{adapters}; repeat to serve several adapters, one per row, in one batch",
    )
    parser.add_argument(
        "--model", metavar="PATH", help="base model (path or asset name) if not the one the adapters name"
    )
    parser.add_argument("--non-quant-model", metavar="DIR", help=NON_QUANT_HELP)


def check_adapter_dirs(adapter_dirs: list[str]) -> None:
    from jaxsparse.inference import AdapterLoadError, is_full_model

    for d in adapter_dirs:
        if not Path(d).is_dir():
            raise AdapterLoadError(f"{d}: adapter directory not found")
        if is_full_model(d):
            raise AdapterLoadError(
                f"{d}: a full fine-tuned model, not an adapter; per-row serving needs adapters "
                "(use it alone, or as --model)"
            )


def base_model_path(adapter_dirs: list[str], model: str | None) -> str:
    """The one base model the adapters are served on: ``model`` if given, else the one every
    adapter names (a :class:`jaxsparse.serve.ServeError` when they name different ones)."""
    from jaxsparse import config as config_lib
    from jaxsparse.inference import AdapterLoadError, adapter_base_model
    from jaxsparse.serve import ServeError

    if model is not None:
        path = config_lib.resolve_model_path(model)
        if not Path(path).exists():
            raise AdapterLoadError(
                f"--model {model!r}: not found (a model directory, .gguf file or asset name)"
            )
        return path
    named: dict[str, str] = {}
    for d in adapter_dirs:
        base = adapter_base_model(d)
        if not base:
            raise AdapterLoadError(f"{d}: the adapter config names no base model; pass --model")
        named[d] = base
    resolved = {d: os.path.realpath(config_lib.resolve_model_path(b)) for d, b in named.items()}
    if len(set(resolved.values())) > 1:
        first = adapter_dirs[0]
        other = next(d for d in adapter_dirs if resolved[d] != resolved[first])
        raise ServeError(
            f"adapters of different base models cannot share one batch: {first} names {named[first]!r}, "
            f"{other} names {named[other]!r}; serve them in separate calls (or pass --model)"
        )
    path = config_lib.resolve_model_path(named[adapter_dirs[0]])
    if not Path(path).exists():
        raise AdapterLoadError(
            f"{adapter_dirs[0]}: base model {named[adapter_dirs[0]]!r} not found; pass --model (a path)"
        )
    return path


def shared_tokenizer(adapter_dirs: list[str], base_path: str) -> Any:
    """The tokenizer saved beside the first adapter (else the base model's); every other adapter
    that saved one must have the same vocabulary, since all rows are encoded once."""
    from jaxsparse.models import load_tokenizer
    from jaxsparse.serve import ServeError

    saved = [d for d in adapter_dirs if (Path(d) / "tokenizer_config.json").is_file()]
    tokenizer = load_tokenizer(saved[0] if saved else base_path)
    vocab = tokenizer.get_vocab()
    for d in saved[1:]:
        if load_tokenizer(d).get_vocab() != vocab:
            raise ServeError(
                f"{d}: its tokenizer's vocabulary differs from {saved[0]}'s; adapters served in one "
                "batch must share one tokenizer"
            )
    from jaxsparse.models.hub import pad_with_eos

    try:
        pad_with_eos(tokenizer)  # rows are padded into one batch, as in training
    except ValueError as e:
        raise ServeError(f"{saved[0] if saved else base_path}: {e}") from None
    return tokenizer


def load_served(adapter_dirs: list[str], model: Any) -> Served:
    """Load every adapter in ``adapter_dirs`` onto ``model`` (a loaded base model) and stack them.

    Each adapter is checked against the base (a bad one names its directory); adapters whose
    structure per-row serving cannot run (e.g. a replaced module other than a linear layer) are
    refused with their directory named. One adapter is merged instead of stacked."""
    from jaxsparse import serve
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.delta import apply

    adapters = [load_adapter(d, model=model) for d in adapter_dirs]
    if len(adapters) == 1:
        return Served(model, apply(model.params, adapters[0]), None, list(adapter_dirs))
    try:
        bank = serve.stack_adapters(model.params, adapters)
    except serve.ServeError as e:
        for d, adapter in zip(adapter_dirs, adapters, strict=True):
            try:
                serve.stack_adapters(model.params, [adapter])
            except serve.ServeError as one:
                raise serve.ServeError(f"{d}: cannot be served per row in one batch: {one}") from None
        raise serve.ServeError(f"{', '.join(adapter_dirs)}: cannot be served in one batch: {e}") from None
    return Served(model, model.params, bank, list(adapter_dirs))


def load_served_quantization_aware(
    adapter_dir: str, model_path: str | None, non_quant_path: str, *, verb: str
) -> Served:
    """One quantization-aware adapter (:func:`jaxsparse.cli.quantization_aware.check_non_quant_args`)
    merged into its bases as ``jaxsparse merge --non-quant-model`` writes it: each adapted layer
    ``dequant(quant(W + masked update))`` on the GPTQ ``model_path``'s grid, every other layer the GPTQ
    model's (:func:`jaxsparse.cli.quantization_aware.load_quantization_aware`)."""
    import dataclasses

    from jaxsparse.cli.quantization_aware import load_quantization_aware
    from jaxsparse.delta import apply

    qa = load_quantization_aware(model_path, non_quant_path, adapter_dir, verb=verb)
    merged = dataclasses.replace(qa.model, params=apply(qa.model.params, qa.adapter))
    return Served(merged, merged.params, None, [adapter_dir])
