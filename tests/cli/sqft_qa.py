"""The tiny QA-SparsePEFT setup the SQFT CLI tests share (built once per session by the fixtures in
tests/cli/conftest.py): the tiny Llama magnitude-pruned to 50% (the sparse base), its 4-bit GPTQ
layout (the quantized base), and the `jaxsparse train` command of a 4-step quantization-aware run."""

from __future__ import annotations

from pathlib import Path

from jaxsparse.cli import main
from tests.cli.tiny_llama import TEXT, tiny_llama


def make_bases(root: Path) -> tuple[Path, Path, Path]:
    """(dense, sparse, gptq) directories under ``root``."""
    dense = root / "dense"
    tiny_llama(dense).save_pretrained(dense)
    sparse, gptq = root / "sparse", root / "gptq"
    prune = ["prune", "--model", str(dense), "--method", "magnitude", "--sparsity", "0.5"]
    assert main([*prune, "--output", str(sparse)]) == 0
    # RTN writes the same GPTQ layout as --method gptq in a fraction of the time (GPTQ's own grids,
    # act-order g_idx included, are covered in tests/methods/test_sqft_qa.py).
    quantize = ["quantize", "--model", str(sparse), "--method", "rtn", "--bits", "4", "--group-size", "16"]
    assert main([*quantize, "--output", str(gptq)]) == 0
    return dense, sparse, gptq


def train_argv(root: Path, sparse: Path, gptq: Path, run: Path, *extra: str) -> list[str]:
    """`jaxsparse train` of a quantization-aware SQFT adapter (NLS, SparsePEFT) for 4 steps."""
    text = root / "train.txt"
    text.write_text("\n".join(TEXT.split(" and ")))  # one document per line
    return [
        "train",
        "--set", "method=sqft",
        "--set", "task=causal_lm",
        "--set", f"model.path={gptq}",
        "--set", f"model.non_quant_path={sparse}",
        "--set", "data.source=text",
        "--set", f"data.path={text}",
        "--set", "data.max_length=16",
        "--set", "data.eval_size=0.2",
        "--set", "adapter.r=8",
        "--set", "adapter.lora_alpha=16",
        "--set", "adapter.lora_dropout=0.1",
        "--set", "adapter.sparse_adapter=true",
        "--set", "adapter.quantization_aware=true",
        "--set", "adapter.nls_target_modules=[q_proj,k_proj,v_proj]",
        "--set", "adapter.search_space=[8,6,4]",
        "--set", "adapter.modules_to_save=null",
        "--set", "train.steps=4",
        "--set", "train.batch_size=2",
        "--set", "train.eval_batch_size=4",
        "--set", "train.learning_rate=0.01",
        "--set", "train.warmup_steps=0",
        "--set", "train.eval_every=4",
        "--set", "train.log_every=2",
        "--set", "train.checkpoint_every=4",
        "--set", "train.progress=false",
        "--output", str(run),
        *extra,
    ]  # fmt: skip
