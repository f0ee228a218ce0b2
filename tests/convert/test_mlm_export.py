"""Exports of masked-language-model adapters (issue 18), against PEFT and the SpaRTA authors' code.

PEFT has no task type for MLM: an adapter without ``task_type`` records the model's class in
``auto_mapping`` (``PeftModel.save_pretrained``). Our SHiRA export writes what PEFT writes for the
same model (checked against PEFT's own file), keeps it through our import and re-export, and with
``modules_to_save: [cls.predictions.transform]`` PEFT loads it and gives our logits. A SpaRTA export
names the MLM class in ``config.json`` (so our importer loads the MLM heads, even on an encoder-only
base), merges under the authors' own rule to our logits, and reads back exactly.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from jaxsparse import adapter_io, models  # noqa: E402
from jaxsparse import delta as delta_lib  # noqa: E402
from jaxsparse.cli import main  # noqa: E402
from jaxsparse.cli.common import adapter_hints, load_base_for_adapter  # noqa: E402
from jaxsparse.methods import shira, sparta  # noqa: E402

IDS = np.array([[2, 5, 6, 7, 4, 9, 3], [2, 10, 4, 12, 3, 0, 0]])
MASK = (IDS != 0).astype(np.int64)


def _bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def mlm_base(tmp_path_factory):
    """A tiny BertForMaskedLM saved by transformers, and our model of it."""
    root = tmp_path_factory.mktemp("mlm_export").absolute()
    torch.manual_seed(0)
    transformers.BertForMaskedLM(_bert_config()).save_pretrained(root / "base")
    model = models.from_pretrained(root / "base")
    assert model.task == "masked_lm"
    return root, model


def _noisy(adapter, seed: int, scale: float):
    leaves = delta_lib.trainable(adapter)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(leaves))))
    noisy = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), leaves)
    return delta_lib.with_trainable(adapter, noisy)


def _ours(model, adapter) -> np.ndarray:
    params = delta_lib.apply(model.params, adapter)
    return np.asarray(model.apply_fn(params, jnp.asarray(IDS), jnp.asarray(MASK)))


def _peft_auto_mapping(tmp_path) -> dict:
    """What PEFT itself writes for a SHiRA adapter without task_type on BertForMaskedLM."""
    pm = peft.get_peft_model(
        transformers.BertForMaskedLM(_bert_config()), peft.ShiraConfig(r=1, target_modules=["query"])
    )
    pm.save_pretrained(tmp_path / "peft_written")
    return json.loads((tmp_path / "peft_written" / "adapter_config.json").read_text())


def test_shira_masked_lm_export_records_auto_mapping_as_peft_does(mlm_base, tmp_path):
    root, model = mlm_base
    config = shira.ShiraConfig(
        r=1, target_modules=["query", "value"], modules_to_save=["cls.predictions.transform"]
    )
    adapter = _noisy(shira.init(model.params, config, jax.random.key(0)), 1, 0.3)
    assert sorted(adapter.dense) == [
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.scale",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.kernel",
    ]
    out = tmp_path / "shira"
    adapter_io.save_adapter(adapter, out, model=model, base_model_name_or_path=str(root / "base"))
    raw = json.loads((out / "adapter_config.json").read_text())
    reference = _peft_auto_mapping(tmp_path)
    assert (
        reference["task_type"] is None and reference["auto_mapping"]["base_model_class"] == "BertForMaskedLM"
    )
    assert raw["task_type"] is None
    assert raw["auto_mapping"] == reference["auto_mapping"]
    assert raw["modules_to_save"] == ["cls.predictions.transform"]
    assert adapter_hints(str(out))["task"] == "masked_lm"

    # PEFT loads it on transformers' model (the transform replaced) and gives our logits
    base = transformers.BertForMaskedLM.from_pretrained(root / "base")
    tm = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        ref = tm(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()
    ours, plain = _ours(model, adapter), _ours(model, delta_lib.Adapter({}))
    keep = MASK.astype(bool)
    assert np.abs(ours[keep] - plain[keep]).max() > 1e-2  # the adapter (and the transform) matter
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5

    # our import keeps the class; a re-export without the model and `jaxsparse export` write it again
    back = adapter_io.load_adapter(out)
    assert back.config.base_model_class == "BertForMaskedLM"
    adapter_io.save_adapter(back, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert again["auto_mapping"] == reference["auto_mapping"]
    assert main(["export", "--adapter", str(out), "--format", "peft", "--output", str(tmp_path / "cli")]) == 0
    exported = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert exported["auto_mapping"] == reference["auto_mapping"] and exported["task_type"] is None


def test_peft_written_masked_lm_shira_round_trips_its_auto_mapping(mlm_base, tmp_path):
    """PEFT's own file (task_type absent, auto_mapping set) -> our importer -> our writer: the same config."""
    root, model = mlm_base
    base = transformers.BertForMaskedLM.from_pretrained(root / "base")
    pm = peft.get_peft_model(base, peft.ShiraConfig(r=1, target_modules=["query", "value"]))
    pm.save_pretrained(tmp_path / "peft")
    original = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    adapter = adapter_io.load_adapter(tmp_path / "peft", model=model)
    adapter_io.save_adapter(adapter, tmp_path / "ours", model=model)
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["auto_mapping"] == original["auto_mapping"]
    assert written["task_type"] is None


def test_shira_import_refuses_a_malformed_auto_mapping(mlm_base, tmp_path):
    _root, model = mlm_base
    adapter = shira.init(model.params, shira.ShiraConfig(r=1, target_modules=["query"]), jax.random.key(0))
    adapter_io.save_adapter(adapter, tmp_path / "a", model=model)
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "auto_mapping": {"parent_library": "x"}}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: 'auto_mapping' must be null or an object"):
        adapter_io.load_adapter(tmp_path / "a")


def _their_merge(torch_model, adapter_dir) -> None:
    """The SpaRTA authors' merge rule (peft_sparta.loader), in float32: every named parameter gets
    ``param[indices] += deltas`` from their reader of the file."""
    from peft_sparta.loader import load_sparse_deltas

    sparse = load_sparse_deltas(str(adapter_dir))
    with torch.no_grad():
        for name, param in torch_model.named_parameters():
            index = sparse["indices"][name].unbind(1)
            param[index] = param[index] + sparse["deltas"][name].float()


def test_sparta_masked_lm_export_merges_under_the_authors_rule_and_reads_back(mlm_base, tmp_path):
    pytest.importorskip("peft_sparta")
    root, model = mlm_base
    config = sparta.SpartaConfig(density=0.05)
    adapter = _noisy(sparta.init(model.params, config, jax.random.key(0)), 2, 0.3)
    assert any(p.startswith("cls.") for p in adapter.deltas)  # the MLM head's transform is adapted too
    out = tmp_path / "sparta"
    adapter_io.save_adapter(adapter, out, model=model, base_model_name_or_path=str(root / "base"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["BertForMaskedLM"]
    assert cfg["sparta_pretrained_model"] == str(root / "base")

    theirs = transformers.BertForMaskedLM.from_pretrained(root / "base").eval()
    _their_merge(theirs, out)
    with torch.no_grad():
        ref = theirs(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK)).logits.numpy()
    ours, plain = _ours(model, adapter), _ours(model, delta_lib.Adapter({}))
    keep = MASK.astype(bool)
    assert np.abs(ours[keep] - plain[keep]).max() > 1e-2
    assert np.abs(ours[keep] - ref[keep]).max() <= 1e-5

    back = adapter_io.load_adapter(out, model=model)
    assert sorted(back.deltas) == sorted(adapter.deltas)
    for path, d in adapter.deltas.items():
        np.testing.assert_array_equal(np.asarray(back.deltas[path].indices), np.asarray(d.indices))
        np.testing.assert_array_equal(np.asarray(back.deltas[path].values), np.asarray(d.values))


def test_sparta_masked_lm_export_on_an_encoder_only_base_loads_the_mlm_heads(tmp_path):
    """The MiniLM case: the checkpoint is a BertModel; the adapter names BertForMaskedLM, so our
    importer loads the base with the (fresh, tied) MLM heads the adapter's cls.* deltas need."""
    torch.manual_seed(0)
    transformers.BertModel(_bert_config()).save_pretrained(tmp_path / "encoder")
    model = models.from_pretrained(tmp_path / "encoder", task="masked_lm")
    adapter = _noisy(sparta.init(model.params, sparta.SpartaConfig(density=0.05), jax.random.key(1)), 3, 0.3)
    assert any(p.startswith("cls.") for p in adapter.deltas)
    adapter_io.save_adapter(
        adapter, tmp_path / "a", model=model, base_model_name_or_path=str(tmp_path / "encoder")
    )
    loaded, hints = load_base_for_adapter(None, str(tmp_path / "a"))
    assert hints["task"] == "masked_lm" and loaded.task == "masked_lm"
    back = adapter_io.load_adapter(tmp_path / "a", model=loaded)
    np.testing.assert_allclose(_ours(loaded, back), _ours(model, adapter), atol=1e-6, rtol=0)


def test_training_config_takes_modules_to_save_for_masked_lm(mlm_base, tmp_path):
    """`adapter.modules_to_save: [cls.predictions.transform]` reaches the method for task masked_lm
    (the default `[classifier]`, a classification head, means none there)."""
    from jaxsparse import config as config_lib
    from jaxsparse import trainer

    root, model = mlm_base
    text = tmp_path / "text.txt"
    text.write_text("a line of text\n")

    def method_config(*extra):
        overrides = ["task=masked_lm", "method=shira", f"model.path={root / 'base'}", "data.source=text"]
        overrides += [f"data.path={text}", "adapter.target_modules=[query,value]", "adapter.r=1", *extra]
        return trainer.method_config(config_lib.load_config(None, overrides))

    assert method_config().modules_to_save is None
    config = method_config("adapter.modules_to_save=[cls.predictions.transform]")
    assert config.modules_to_save == ("cls.predictions.transform",) and config.task_type is None
    adapter = shira.init(model.params, config, jax.random.key(0))
    assert sorted(adapter.dense) == [
        "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.transform.LayerNorm.scale",
        "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.dense.kernel",
    ]
