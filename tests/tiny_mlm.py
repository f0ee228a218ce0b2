"""The tiny masked-LM checkpoint the MLM tests train on (tests/test_mlm.py, tests/methods/test_sparse_lora.py)."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far", "away", "and", "then", "came", "back")
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_tiny_distilbert_mlm(root: Path) -> Path:
    """A one-layer DistilBertForMaskedLM directory over ``SPECIAL + WORDS`` with its BERT tokenizer."""
    import transformers

    from jaxsparse import models

    vocab = [*SPECIAL, *WORDS]
    config = transformers.DistilBertConfig(
        vocab_size=len(vocab), dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=32
    )
    model_dir = root / "tiny-distilbert-mlm"
    models.save_pretrained(models.init_params(config, task="masked_lm", seed=0), model_dir)
    (model_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (model_dir / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 32})
    )
    return model_dir
