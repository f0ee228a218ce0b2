"""``jaxsparse classify``: label sentences with a trained classification adapter."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DESCRIPTION = """\
Classify sentences with the adapter in --adapter DIR (its base model is found from the adapter's
config). Prints one line per sentence: the predicted label, its probability, and the sentence
(its first 80 characters and "…" when longer). An empty or whitespace-only sentence is refused
(exit 2); blank lines read from stdin are skipped.

--adapter may be repeated to compare adapters: every sentence is then classified once by each
adapter, all in one batch where each row runs its own adapter (no merging, see jaxsparse.serve).
The adapters must share one base model and their classifier heads the same number of labels (each
keeps its own label names). Each line then starts with the adapter directory as given (a tab
before the label), sentences in input order and, within a sentence, adapters in --adapter order;
--json adds an "adapter" key.

A quantization_aware (QA-SparsePEFT, SQFT) adapter classifies alone, on the GPTQ --model and the
non-quantized sparse --non-quant-model it was quantized from: each adapted layer is
dequant(quant(W + masked update)) on --model's grid, exactly the checkpoint `jaxsparse merge
--non-quant-model` writes. Without --non-quant-model such an adapter is refused (exit 2).

examples:
  jaxsparse classify --adapter runs/default/adapter "A gorgeous, witty film." "Dull and lifeless."
  echo "An unexpected delight." | jaxsparse classify --adapter runs/default/adapter -
  jaxsparse classify --adapter runs/shira/adapter --adapter runs/sparta/adapter "A gorgeous, witty film."
  jaxsparse classify --adapter runs/sqft_qa/adapter --model runs/gptq --non-quant-model runs/sparse "Superb."
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from jaxsparse.cli.serving import add_served_args

    p = subparsers.add_parser(
        "classify",
        help="classify sentences with a trained adapter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_served_args(p, adapters="adapter directory written by `jaxsparse train` (or imported)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per sentence with all probabilities"
    )
    p.add_argument(
        "sentences", nargs="+", metavar="TEXT", help="sentences to classify ('-' reads lines from stdin)"
    )
    p.set_defaults(func=run)


# How much of a sentence is echoed back: enough to recognise it, not a 100 KB document.
ECHO_CHARS = 80


def echo(sentence: str) -> str:
    """``sentence`` as printed beside its label: one line, its first :data:`ECHO_CHARS` characters
    and "…" when longer.

    Example:
        >>> echo("a" * 100) == "a" * 80 + "…"
        True
    """
    line = " ".join(sentence.split())
    return line if len(line) <= ECHO_CHARS else line[:ECHO_CHARS] + "…"


def run(args: argparse.Namespace) -> int:
    sentences = []
    for s in args.sentences:
        if s == "-":
            sentences.extend(line.rstrip("\n") for line in sys.stdin if line.strip())
        else:
            sentences.append(s)
    empty = [i for i, s in enumerate(sentences, 1) if not s.strip()]
    if empty:
        # A model labels an empty input too (with some confidence): that label would mean nothing.
        raise ValueError(
            f"sentence {', '.join(map(str, empty))} of {len(sentences)} is empty or whitespace only; "
            "nothing was classified"
        )
    if not sentences:
        raise ValueError("no sentences to classify (stdin held only blank lines)")
    from jaxsparse.cli.quantization_aware import check_non_quant_args

    qa_dir = check_non_quant_args(list(args.adapter), args.non_quant_model, verb="classify")
    if len(args.adapter) > 1:
        return _run_many(args, sentences)
    from jaxsparse.inference import SequenceClassifier

    # A bad adapter or model is one line on stderr and exit 2, via jaxsparse.cli.main.
    if qa_dir is not None:
        clf = _quantization_aware_classifier(args, qa_dir)
    else:
        clf = SequenceClassifier.from_adapter(args.adapter[0], args.model)
    for sentence, row in zip(sentences, clf.classify(sentences), strict=True):
        _print_row(args, None, clf.labels, sentence, row)
    return 0


def _quantization_aware_classifier(args: argparse.Namespace, adapter_dir: str) -> Any:
    """A :class:`~jaxsparse.inference.SequenceClassifier` of a QA adapter merged into its two bases
    (:func:`jaxsparse.cli.serving.load_served_quantization_aware`)."""
    from jaxsparse.cli.serving import (
        base_model_path,
        check_adapter_dirs,
        load_served_quantization_aware,
        shared_tokenizer,
    )
    from jaxsparse.inference import AdapterLoadError, SequenceClassifier, adapter_labels

    check_adapter_dirs([adapter_dir])
    id2label = adapter_labels(adapter_dir)
    if not id2label:
        raise AdapterLoadError(f"{adapter_dir}: config.json has no id2label; not a classification adapter")
    base_path = base_model_path([adapter_dir], args.model)
    tokenizer = shared_tokenizer([adapter_dir], base_path)
    served = load_served_quantization_aware(adapter_dir, args.model, args.non_quant_model, verb="classify")
    if served.model.task != "seq_cls":
        raise AdapterLoadError(
            f"{adapter_dir}: a {served.model.task!r} adapter (adapter_config.json task_type); classify needs "
            "a sequence-classification one"
        )
    return SequenceClassifier(
        served.model, tokenizer, id2label, adapter_dir=adapter_dir, base_model=base_path, method="sqft"
    )


def _print_row(args: argparse.Namespace, adapter: str | None, labels: list[str], sentence: str, row) -> None:
    best = int(row.argmax())
    if args.json:
        record = {"adapter": adapter} if adapter is not None else {}
        record |= {
            "text": echo(sentence),
            "chars": len(sentence),
            "label": labels[best],
            "probabilities": {lab: float(p) for lab, p in zip(labels, row, strict=True)},
        }
        print(json.dumps(record))
    else:
        prefix = "" if adapter is None else f"{adapter}\t"
        print(f"{prefix}{labels[best]}\t{row[best]:.3f}\t{echo(sentence)}")


# Rows (sentence, adapter) per forward pass, and the sequence length buckets (as SequenceClassifier).
BATCH_ROWS = 32
MAX_LENGTH = 128


def _run_many(args: argparse.Namespace, sentences: list[str]) -> int:
    """Each sentence once per adapter, every row with its own adapter, in batches of
    :data:`BATCH_ROWS` rows (one compiled program)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxsparse import models, serve
    from jaxsparse.cli.serving import base_model_path, check_adapter_dirs, load_served, shared_tokenizer
    from jaxsparse.inference import AdapterLoadError, adapter_labels

    dirs = list(args.adapter)
    check_adapter_dirs(dirs)
    labels_of = {}
    for d in dirs:
        id2label = adapter_labels(d)
        if not id2label:
            raise AdapterLoadError(f"{d}: config.json has no id2label; not a classification adapter")
        labels_of[d] = [id2label[i] for i in sorted(id2label)]
    counts = {d: len(v) for d, v in labels_of.items()}
    if len(set(counts.values())) > 1:
        first = dirs[0]
        other = next(d for d in dirs if counts[d] != counts[first])
        raise serve.ServeError(
            f"classifier heads of different sizes cannot share one batch: {first} has {counts[first]} "
            f"labels, {other} has {counts[other]}; classify with them in separate calls"
        )
    base_path = base_model_path(dirs, args.model)
    tokenizer = shared_tokenizer(dirs, base_path)
    first_labels = dict(enumerate(labels_of[dirs[0]]))
    model = models.from_pretrained(
        base_path, task="seq_cls", num_labels=len(first_labels), id2label=first_labels
    )
    served = load_served(dirs, model)
    apply_fn = model.apply_fn

    @jax.jit
    def forward(params, bank, rows, ids, mask):
        logits = apply_fn(serve.per_row_params(params, bank, rows), ids, mask)
        return jax.nn.softmax(logits.astype(jnp.float32), -1)

    enc = tokenizer(sentences, truncation=True, max_length=MAX_LENGTH, padding="longest", return_tensors="np")
    length = min(MAX_LENGTH, -(-enc["input_ids"].shape[1] // 16) * 16)
    row_sentence = np.repeat(np.arange(len(sentences)), len(dirs))
    row_adapter = np.tile(np.arange(len(dirs)), len(sentences))
    total = len(row_sentence)
    size = BATCH_ROWS if total > BATCH_ROWS else max(1, 1 << (total - 1).bit_length())
    pad_id = tokenizer.pad_token_id or 0
    probs = []
    for start in range(0, total, size):
        chunk = np.arange(start, min(start + size, total))
        ids = np.full((size, length), pad_id, np.int32)
        mask = np.zeros((size, length), np.int32)
        adapter_rows = np.full(size, -1, np.int32)  # padding rows run the base model
        ids[: len(chunk), : enc["input_ids"].shape[1]] = enc["input_ids"][row_sentence[chunk]]
        mask[: len(chunk), : enc["input_ids"].shape[1]] = enc["attention_mask"][row_sentence[chunk]]
        mask[len(chunk) :, 0] = 1  # padding rows attend to one token (no all-masked softmax)
        adapter_rows[: len(chunk)] = row_adapter[chunk]
        out = forward(
            served.params, served.bank, jnp.asarray(adapter_rows), jnp.asarray(ids), jnp.asarray(mask)
        )
        probs.extend(np.asarray(out)[: len(chunk)])
    for r, row in enumerate(probs):
        d = dirs[row_adapter[r]]
        _print_row(args, d, labels_of[d], sentences[row_sentence[r]], row)
    return 0
