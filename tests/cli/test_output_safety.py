"""`jaxsparse export / import / merge` never destroy what was in --output (see tests/cli/safety.py).

A tiny Llama saved by our own writer and a SHiRA adapter for it: no PyTorch needed, fast.
"""

from __future__ import annotations

import jax
import pytest
import transformers

from jaxsparse import models
from jaxsparse.adapter_io import save_adapter
from jaxsparse.cli import main
from jaxsparse.methods import shira
from tests.cli.safety import CASES, check_output_safety


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety").absolute()
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    models.save_pretrained(models.init_params(config, task="causal_lm", seed=0), root / "model")
    model = models.from_pretrained(root / "model")
    adapter = shira.init(model.params, shira.ShiraConfig(r=1, target_modules=["q_proj"]), jax.random.key(0))
    save_adapter(adapter, root / "adapter", model=model)
    return root / "model", root / "adapter"


def _argv(verb, model, adapter, output, overwrite):
    flags = ["--overwrite"] if overwrite else []
    if verb == "export":
        return [
            "export",
            "--adapter",
            adapter,
            "--format",
            "sparta",
            "--model",
            model,
            "--output",
            output,
            *flags,
        ]
    return [verb, "--model", model, "--adapter", adapter, "--output", output, *flags]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("verb", ["export", "import", "merge"])
def test_writing_verbs_never_destroy_the_output(verb, case, inputs, tmp_path, monkeypatch, capsys):
    model, adapter = inputs

    def run(output: str, overwrite: bool) -> int:
        return main([str(a) for a in _argv(verb, model, adapter, output, overwrite)])

    check_output_safety(case, run, verb, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("verb", ["export", "import", "merge"])
def test_refusal_comes_before_any_model_is_loaded(verb, inputs, tmp_path, capsys, monkeypatch):
    model, adapter = inputs
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(models, "from_pretrained", no_loading)
    assert main([str(a) for a in _argv(verb, model, adapter, tmp_path / "out", False)]) == 2
    assert "is not empty" in capsys.readouterr().err
