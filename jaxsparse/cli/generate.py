"""``jaxsparse generate``: greedy text generation with one or many adapters in one batch.

Every prompt is continued once per ``--adapter`` (rows ordered prompt by prompt, adapter by adapter
within a prompt), all rows in one batched, KV-cached greedy generation. With one adapter it is
merged into the base weights once; with several, each row runs its own adapter without merging
(:mod:`jaxsparse.serve`), so N adapters cost one compiled program and one pass over the batch.

The loading of several adapters onto one base model (:mod:`jaxsparse.cli.serving`) is shared
with ``jaxsparse classify``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
Continue prompts greedily (the most probable token at each step, with the KV cache) with the
adapter(s) in --adapter DIR (their base model is found from the adapters' configs, or given with
--model). --adapter may be repeated: every prompt is then continued once per adapter, all rows in
one batch where each row runs its own adapter (no merging); the adapters must share one base model.

A quantization_aware (QA-SparsePEFT, SQFT) adapter runs alone, on the GPTQ --model and the
non-quantized sparse --non-quant-model it was quantized from: each adapted layer is
dequant(quant(W + masked update)) on --model's grid, exactly the checkpoint `jaxsparse merge
--non-quant-model` writes. Without --non-quant-model such an adapter is refused (exit 2).

Prints one line per (prompt, adapter), prompts in input order and, within a prompt, adapters in
--adapter order: the adapter directory as given, the prompt (its first 80 characters), and the
continuation, separated by tabs, with tabs, newlines and backslashes in the continuation written
as \\t, \\n and \\\\. --json prints one JSON object per line instead (adapter, prompt, completion,
token ids, and whether generation stopped at an end-of-sequence token).

examples:
  jaxsparse generate --adapter runs/lm/adapter --prompt "Once upon a time"
  jaxsparse generate --adapter runs/a/adapter --adapter runs/b/adapter --input prompts.txt --max-new-tokens 64
  echo "The weather today" | jaxsparse generate --adapter runs/lm/adapter --input -
  jaxsparse generate --adapter runs/sqft_qa/adapter --model runs/gptq --non-quant-model runs/sparse --prompt "Hi"
"""

# Rows of one generation call: more rows are generated in several calls of this size.
DEFAULT_BATCH_SIZE = 32


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from jaxsparse.cli.serving import add_served_args

    p = subparsers.add_parser(
        "generate",
        help="generate text greedily with one or many adapters in one batch",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_served_args(p, adapters="adapter directory (PEFT SHiRA/LoRA or SpaRTA) of a causal LM")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (may be repeated)")
    p.add_argument(
        "--input",
        metavar="FILE",
        help="a file of prompts, one per line ('-': stdin); blank lines are skipped",
    )
    p.add_argument(
        "--max-new-tokens", type=int, default=32, metavar="N", help="tokens to generate per row (default 32)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"rows per generation call (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    p.set_defaults(func=run)


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.input is not None:
        if args.input == "-":
            lines = sys.stdin.read().splitlines()
        else:
            try:
                lines = Path(args.input).read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise ValueError(f"--input {args.input}: not UTF-8 text ({e.reason})") from None
        prompts.extend(line for line in lines if line.strip())
    empty = [i for i, s in enumerate(prompts, 1) if not s.strip()]
    if empty:
        raise ValueError(
            f"prompt {', '.join(map(str, empty))} of {len(prompts)} is empty or whitespace only; nothing was generated"
        )
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --input FILE (the input held only blank lines)")
    return prompts


def _check_adapters_are_causal(adapter_dirs: list[str]) -> None:
    from jaxsparse.inference import AdapterLoadError

    for d in adapter_dirs:
        sparta_config = Path(d) / "config.json"
        if not (Path(d) / "adapter_config.json").is_file() and sparta_config.is_file():
            try:
                problem = json.loads(sparta_config.read_text(encoding="utf-8")).get("problem_type")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AdapterLoadError(f"{sparta_config}: not valid JSON ({e})") from None
            if problem == "single_label_classification":
                raise AdapterLoadError(
                    f"{sparta_config}: a SpaRTA classification adapter; generate needs a causal-LM adapter"
                )
        path = Path(d) / "adapter_config.json"
        if path.is_file():
            try:
                task = json.loads(path.read_text(encoding="utf-8")).get("task_type")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise AdapterLoadError(f"{path}: not valid JSON ({e})") from None
            if task not in (None, "CAUSAL_LM"):
                raise AdapterLoadError(
                    f"{path}: task_type {task!r}; generate needs a causal-LM adapter (task_type CAUSAL_LM)"
                )


def escape(text: str) -> str:
    """``text`` on one line of a tab-separated output: backslash, tab and newline escaped.

    Example:
        >>> escape("a\\tb\\nc\\\\")
        'a\\\\tb\\\\nc\\\\\\\\'
    """
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = _read_prompts(args)
    adapter_dirs = list(args.adapter)
    from jaxsparse.cli.quantization_aware import check_non_quant_args
    from jaxsparse.cli.serving import (
        base_model_path,
        check_adapter_dirs,
        load_served,
        load_served_quantization_aware,
        shared_tokenizer,
    )

    check_adapter_dirs(adapter_dirs)
    _check_adapters_are_causal(adapter_dirs)
    qa_dir = check_non_quant_args(adapter_dirs, args.non_quant_model, verb="generate")
    base_path = base_model_path(adapter_dirs, args.model)
    tokenizer = shared_tokenizer(adapter_dirs, base_path)

    import numpy as np

    from jaxsparse import models

    if qa_dir is not None:
        served = load_served_quantization_aware(qa_dir, args.model, args.non_quant_model, verb="generate")
        model = served.model
    else:
        model = models.from_pretrained(base_path, task="causal_lm")
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    empty = [i for i, ids in enumerate(encoded, 1) if not ids]
    if empty:
        raise ValueError(f"prompt {', '.join(map(str, empty))} encodes to no tokens; nothing was generated")
    longest = max(map(len, encoded)) + args.max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and longest > limit:
        raise ValueError(
            f"the longest prompt ({longest - args.max_new_tokens} tokens) + --max-new-tokens "
            f"{args.max_new_tokens} = {longest} exceeds the model's max_position_embeddings {limit}"
        )
    if qa_dir is None:
        served = load_served(adapter_dirs, model)
    # Rows: every prompt once per adapter, prompt-major.
    row_prompt = np.repeat(np.arange(len(prompts)), len(adapter_dirs))
    row_adapter = np.tile(np.arange(len(adapter_dirs)), len(prompts))
    eos = _eos_ids(model.config, tokenizer)
    tokens = _generate_rows(served, encoded, row_prompt, row_adapter, eos, args)
    for i, (p, n) in enumerate(zip(row_prompt, row_adapter, strict=True)):
        new, stopped = _until_eos(tokens[i], eos)
        completion = tokenizer.decode(new, skip_special_tokens=True)
        if args.json:
            record = {
                "adapter": adapter_dirs[n],
                "prompt": prompts[p],
                "completion": completion,
                "tokens": new,
                "stopped_at_eos": stopped,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            from jaxsparse.cli.classify import echo

            print(f"{adapter_dirs[n]}\t{echo(prompts[p])}\t{escape(completion)}")
    return 0


def _eos_ids(config: Any, tokenizer: Any) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return ()
    return (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)


def _until_eos(row: Any, eos: tuple[int, ...]) -> tuple[list[int], bool]:
    out = []
    for t in row:
        out.append(int(t))
        if int(t) in eos:
            return out, True
    return out, False


def _generate_rows(
    served: Any,
    encoded: list[list[int]],
    row_prompt: Any,
    row_adapter: Any,
    eos: tuple[int, ...],
    args: argparse.Namespace,
) -> list[Any]:
    """The new tokens of every row (``max_new_tokens`` each; padding after an eos), in row order."""
    import jax.numpy as jnp
    import numpy as np

    from jaxsparse import serve
    from jaxsparse.models.generate import generate

    width = max(map(len, encoded))
    rows_total = len(row_prompt)
    size = min(args.batch_size, rows_total)
    out: list[Any] = []
    for start in range(0, rows_total, size):
        chunk = np.arange(start, min(start + size, rows_total))
        # Every call has `size` rows (the last one padded with copies of its first row, which are
        # dropped), so one compiled program serves them all.
        picked = np.concatenate([chunk, np.full(size - len(chunk), chunk[0])])
        ids = np.zeros((size, width), np.int32)
        mask = np.zeros((size, width), np.int32)
        for b, r in enumerate(picked):
            seq = encoded[row_prompt[r]]
            ids[b, width - len(seq) :], mask[b, width - len(seq) :] = seq, 1
        params = served.params
        if served.bank is not None:
            params = serve.per_row_params(served.params, served.bank, jnp.asarray(row_adapter[picked]))
        tokens = generate(
            served.model,
            jnp.asarray(ids),
            jnp.asarray(mask),
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos or None,
            params=params,
        )
        tokens = np.asarray(tokens)[:, width:]
        out.extend(tokens[: len(chunk)])
    return out
