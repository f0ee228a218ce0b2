"""``jaxsparse classify``: label sentences with a trained classification adapter."""

from __future__ import annotations

import argparse
import json
import sys

DESCRIPTION = """\
Classify sentences with the adapter in --adapter DIR (its base model is found from the adapter's
config). Prints one line per sentence: the predicted label, its probability, and the sentence
(its first 80 characters and "…" when longer). An empty or whitespace-only sentence is refused
(exit 2); blank lines read from stdin are skipped.

examples:
  jaxsparse classify --adapter runs/default/adapter "A gorgeous, witty film." "Dull and lifeless."
  echo "An unexpected delight." | jaxsparse classify --adapter runs/default/adapter -
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "classify",
        help="classify sentences with a trained adapter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--adapter", required=True, metavar="DIR", help="adapter directory written by `jaxsparse train`"
    )
    p.add_argument("--model", metavar="PATH", help="base model (path or asset name) if not the adapter's own")
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
    from jaxsparse.inference import SequenceClassifier

    # A bad adapter or model is one line on stderr and exit 2, via jaxsparse.cli.main.
    clf = SequenceClassifier.from_adapter(args.adapter, args.model)
    probs = clf.classify(sentences)
    labels = clf.labels
    for sentence, row in zip(sentences, probs, strict=True):
        best = int(row.argmax())
        if args.json:
            print(
                json.dumps(
                    {
                        "text": echo(sentence),
                        "chars": len(sentence),
                        "label": labels[best],
                        "probabilities": {lab: float(p) for lab, p in zip(labels, row, strict=True)},
                    }
                )
            )
        else:
            print(f"{labels[best]}\t{row[best]:.3f}\t{echo(sentence)}")
    return 0
