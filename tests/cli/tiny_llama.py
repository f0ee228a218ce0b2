"""The tiny Llama the compression and SQFT CLI tests share: a 2-block Llama with a BPE tokenizer trained
on :data:`TEXT`, so calibration, training and transformers' loading all run on it in seconds."""

from __future__ import annotations

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

TEXT = (
    "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat and "
    "birds sing in the tall green trees near the quiet river bank every single morning "
) * 20


def tiny_llama(root) -> transformers.LlamaForCausalLM:
    """Save the tokenizer into ``root`` and return the (unsaved) model, initialised from torch seed 0;
    callers may change its weights before ``save_pretrained(root)``."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    fast.save_pretrained(root)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=fast.eos_token_id,
    )
    return transformers.LlamaForCausalLM(cfg)


def hf_weights(directory) -> dict[str, np.ndarray]:
    """The state dict transformers loads from ``directory``, as NumPy arrays."""
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}
