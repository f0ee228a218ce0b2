"""PEFT SHiRA layout: PEFT's own files parse, our files load in PEFT, round trips are exact, bad input is named."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxsparse import tree as tree_lib  # noqa: E402
from jaxsparse.convert import AdapterFormatError  # noqa: E402
from jaxsparse.convert.peft_shira import load_peft_shira, save_peft_shira  # noqa: E402
from jaxsparse.delta import Adapter, SparseDelta, apply  # noqa: E402
from jaxsparse.methods.shira import ShiraConfig  # noqa: E402
from jaxsparse.models.naming import hf_key  # noqa: E402

PEFT_CONFIG_KEYS = {
    "auto_mapping", "base_model_name_or_path", "fan_in_fan_out", "inference_mode", "init_weights",
    "mask_type", "modules_to_save", "peft_type", "peft_version", "r", "random_seed", "revision",
    "target_modules", "task_type",
}  # fmt: skip


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def params_from_torch(model):
    """Our params tree for a torch model by the naming rule: Linear weight -> kernel (in, out)."""
    kinds = {name: type(m) for name, m in model.named_modules()}
    params: dict = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        array = value.detach().numpy().copy()
        if leaf == "weight" and kinds.get(module) is torch.nn.Linear:
            leaf, array = "kernel", array.T
        elif leaf == "weight" and kinds.get(module) is torch.nn.Embedding:
            leaf = "embedding"
        elif leaf == "weight" and kinds.get(module) is torch.nn.LayerNorm:
            leaf = "scale"
        elif leaf not in ("weight", "bias"):
            continue  # buffers such as position_ids
        node = params
        for part in module.split("."):
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(array)
    return params


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A SHiRA adapter saved by PEFT itself, with non-zero weights and a SEQ_CLS head."""
    model = tiny_bert()
    cfg = peft.ShiraConfig(r=1, target_modules=["query", "value"], task_type="SEQ_CLS", init_weights=False)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    out = tmp_path_factory.mktemp("peft") / "shira"
    pm.save_pretrained(out)
    merged = {k: v.detach().numpy().copy() for k, v in pm.merge_and_unload().state_dict().items()}
    return out, merged


def test_peft_files_parse_and_merge_like_peft(peft_dir):
    out, merged = peft_dir
    params = params_from_torch(tiny_bert())
    adapter = load_peft_shira(out, params)
    assert adapter.config.r == 1 and adapter.config.task_type == "SEQ_CLS"
    assert sorted(adapter.deltas) == [
        "bert.encoder.layer.0.attention.self.query.kernel",
        "bert.encoder.layer.0.attention.self.value.kernel",
    ]
    assert sorted(adapter.dense) == ["classifier.bias", "classifier.kernel"]
    effective = apply(params, adapter)
    for path in [*adapter.deltas, *adapter.dense]:
        key, transposed = hf_key(path)
        ours = np.asarray(tree_lib.get_leaf(effective, path))
        np.testing.assert_array_equal(ours.T if transposed else ours, merged[key])
    for d in adapter.deltas.values():
        assert d.k == 32 and d.indices.dtype == jnp.int32
        assert np.all(np.diff(np.asarray(d.indices)) > 0)


def test_peft_file_without_params_asks_for_them(peft_dir):
    with pytest.raises(AdapterFormatError, match="pass the base model's params"):
        load_peft_shira(peft_dir[0])


def random_shira_adapter(params, targets, r, seed=0, head=True):
    rng = np.random.default_rng(seed)
    deltas = {}
    for path in targets:
        shape = tree_lib.get_leaf(params, path).shape
        k = r * (shape[0] + shape[1])
        idx = np.sort(rng.choice(shape[0] * shape[1], size=k, replace=False)).astype(np.int32)
        deltas[path] = SparseDelta(jnp.asarray(idx), jnp.asarray(rng.normal(size=k), jnp.float32), shape)
    dense = {}
    if head:
        dense = {
            "classifier.kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32),
            "classifier.bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        }
    config = ShiraConfig(
        r=r,
        target_modules=["query", "value"],
        modules_to_save=["classifier"] if head else None,
        task_type="SEQ_CLS",
    )
    return Adapter(deltas, dense, config=config)


TARGETS = [
    "bert.encoder.layer.0.attention.self.query.kernel",
    "bert.encoder.layer.0.attention.self.value.kernel",
]


def test_our_files_load_in_peft_with_same_outputs(tmp_path, peft_dir):
    base = tiny_bert()
    params = params_from_torch(base)
    adapter = random_shira_adapter(params, TARGETS, r=2)
    save_peft_shira(adapter, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_written = json.loads((peft_dir[0] / "adapter_config.json").read_text())
    assert set(written) == set(peft_written) == PEFT_CONFIG_KEYS
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    for k, v in tensors.items():
        if k.endswith("shira_indices"):
            assert v.dtype == np.int32 and v.shape == (2, 64)
            flat = v[0].astype(np.int64) * 16 + v[1]
            assert np.all(np.diff(flat) > 0), "row-major sorted (out, in) pairs"

    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "ours").eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        peft_logits = pm(input_ids=ids).logits.numpy()
        merged = pm.merge_and_unload()
    merged_sd = {k: v.numpy() for k, v in merged.state_dict().items()}
    effective = apply(params, adapter)
    oracle = tiny_bert()
    new_sd = {}
    for path in [*adapter.deltas, *adapter.dense]:
        key, transposed = hf_key(path)
        ours = np.asarray(tree_lib.get_leaf(effective, path))
        ours = ours.T if transposed else ours
        np.testing.assert_array_equal(ours, merged_sd[key])
        new_sd[key] = torch.from_numpy(np.array(ours))
    oracle.load_state_dict(new_sd, strict=False)
    with torch.no_grad():
        np.testing.assert_allclose(oracle(input_ids=ids).logits.numpy(), peft_logits, atol=1e-5)
    assert not np.allclose(tiny_bert()(input_ids=ids).logits.detach().numpy(), peft_logits, atol=1e-3)


def test_round_trip_is_exact(tmp_path):
    params = params_from_torch(tiny_bert())
    adapter = random_shira_adapter(params, TARGETS, r=1, seed=3)
    save_peft_shira(adapter, tmp_path / "a", base_model_name_or_path="tiny-bert")
    for back in (load_peft_shira(tmp_path / "a"), load_peft_shira(tmp_path / "a", params)):
        assert back.config == dataclasses.replace(adapter.config, base_model_name_or_path="tiny-bert")
        assert sorted(back.deltas) == sorted(adapter.deltas) and sorted(back.dense) == sorted(adapter.dense)
        for p, d in adapter.deltas.items():
            np.testing.assert_array_equal(np.asarray(back.deltas[p].indices), np.asarray(d.indices))
            np.testing.assert_array_equal(np.asarray(back.deltas[p].values), np.asarray(d.values))
            assert back.deltas[p].shape == d.shape
        for p, v in adapter.dense.items():
            np.testing.assert_array_equal(np.asarray(back.dense[p]), np.asarray(v))
    save_peft_shira(load_peft_shira(tmp_path / "a"), tmp_path / "b")
    first, second = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "b"))
    assert first.keys() == second.keys()
    for k in first:
        assert first[k].dtype == second[k].dtype
        np.testing.assert_array_equal(first[k], second[k])
    assert (tmp_path / "a" / "adapter_config.json").read_text() == (
        tmp_path / "b" / "adapter_config.json"
    ).read_text()


def test_write_pads_to_peft_layout_or_refuses(tmp_path):
    """k not r * (in + out): zero-padded so PEFT loads it with the same outputs; Conv1D: refused, nothing written."""
    base = tiny_bert()
    params = params_from_torch(base)
    adapter = random_shira_adapter(params, TARGETS, r=1)
    d = adapter.deltas[TARGETS[0]]
    odd = Adapter(
        {TARGETS[0]: SparseDelta(d.indices[:-1], d.values[:-1], d.shape)},
        adapter.dense,
        config=adapter.config,
    )
    save_peft_shira(odd, tmp_path / "padded")
    tensors = load_file(tmp_path / "padded" / "adapter_model.safetensors")
    assert (
        tensors[Q + ".shira_weight"].shape == (32,) and np.count_nonzero(tensors[Q + ".shira_weight"]) == 31
    )
    pm = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "padded").eval()
    with torch.no_grad():
        merged = pm.merge_and_unload().state_dict()
    key, _ = hf_key(TARGETS[0])
    expected = np.asarray(tree_lib.get_leaf(apply(params, odd), TARGETS[0])).T
    np.testing.assert_array_equal(merged[key].numpy(), expected)

    with pytest.raises(ValueError, match=r"Conv1D.*only torch\.nn\.Linear"):
        save_peft_shira(odd, tmp_path / "x", fan_in_fan_out=["query"])
    assert not (tmp_path / "x").exists()


def _corrupt(tmp_path, mutate, name="bad"):
    params = params_from_torch(tiny_bert())
    src = tmp_path / "src"
    if not src.exists():
        save_peft_shira(random_shira_adapter(params, TARGETS, r=1, seed=5), src)
    dst = tmp_path / name
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    from safetensors import safe_open

    with safe_open(src / "adapter_model.safetensors", "np") as f:
        meta = f.metadata()
    mutate(tensors, dst)
    if tensors is not None and not (dst / "adapter_model.safetensors").exists():
        save_file(tensors, dst / "adapter_model.safetensors", metadata=meta)
    return dst, params


Q = "base_model.model.bert.encoder.layer.0.attention.self.query"


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t, d: t.pop(Q + ".shira_weight"), "shira_weight missing"),
        (lambda t, d: t[Q + ".shira_indices"].__setitem__((1, 0), 16), "out of range"),
        (lambda t, d: t[Q + ".shira_indices"].__setitem__((slice(None), 1), t[Q + ".shira_indices"][:, 0]), "duplicate"),
        (lambda t, d: t[Q + ".shira_weight"].__setitem__(3, np.nan), "non-finite"),
        (lambda t, d: t.__setitem__(Q + ".shira_weight", t[Q + ".shira_weight"].astype(np.int32)), "float values"),
        (lambda t, d: t.__setitem__(Q + ".shira_indices", t[Q + ".shira_indices"][:, :-1]), "shape"),
        (lambda t, d: t.__setitem__(Q + ".shira_indices", t[Q + ".shira_indices"][0]), r"shape \(2, k\)"),
        (lambda t, d: t.__setitem__("bert.pooler.dense.weight", np.zeros((16, 16), np.float32)), "does not start with"),
        (lambda t, d: t.__setitem__("base_model.model.nope.weight", np.zeros(3, np.float32)), "names no parameter"),
        (lambda t, d: t.__setitem__("base_model.model.classifier.weight", np.zeros((3, 15), np.float32)), "expected shape"),
    ],
)  # fmt: skip
def test_bad_tensors_are_named(tmp_path, mutate, match):
    dst, params = _corrupt(tmp_path, mutate)
    with pytest.raises(AdapterFormatError, match=match) as e:
        load_peft_shira(dst, params)
    assert "adapter_model.safetensors" in str(e.value)


def test_truncated_and_corrupt_files(tmp_path):
    dst, params = _corrupt(tmp_path, lambda t, d: None)
    data = (dst / "adapter_model.safetensors").read_bytes()
    (dst / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors: corrupt or truncated"):
        load_peft_shira(dst, params)
    (dst / "adapter_model.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(AdapterFormatError, match="corrupt or truncated"):
        load_peft_shira(dst, params)
    os.remove(dst / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="file not found"):
        load_peft_shira(dst, params)


def test_bad_config(tmp_path):
    dst, params = _corrupt(tmp_path, lambda t, d: None)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(AdapterFormatError, match="expected 'SHIRA'"):
        load_peft_shira(dst, params)
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(AdapterFormatError, match="r=2"):
        load_peft_shira(dst, params)
    (dst / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json: not valid JSON"):
        load_peft_shira(dst, params)


def test_wrong_base_model_shape(tmp_path):
    dst, _ = _corrupt(tmp_path, lambda t, d: None)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3)  # fmt: skip
    other = params_from_torch(transformers.BertForSequenceClassification(cfg))
    with pytest.raises(AdapterFormatError, match="different base model"):
        load_peft_shira(dst, other)


def test_peft_written_file_into_other_base_gets_the_hint(peft_dir):
    """PEFT's files record no shapes: the size mismatch shows up as k or a head shape, with the hint."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3)  # fmt: skip
    other = params_from_torch(transformers.BertForSequenceClassification(cfg))
    with pytest.raises(
        AdapterFormatError, match=r"r \* \(in \+ out\) = 64 \(adapter made for a different base"
    ):
        load_peft_shira(peft_dir[0], other)
