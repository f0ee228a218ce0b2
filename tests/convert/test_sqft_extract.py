"""SQFT adapters on disk: the super-adapter records SQFT's flags and elastic config, and the
extracted sub-adapter, loaded by plain PEFT, gives the logits of our elastic adapter at those ranks."""

from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from jaxsparse import delta as delta_lib  # noqa: E402
from jaxsparse.adapter_io import load_adapter, save_adapter  # noqa: E402
from jaxsparse.convert import AdapterFormatError  # noqa: E402
from jaxsparse.convert.sqft_extract import extract_sub_adapter, rank_for, sub_adapter_ranks  # noqa: E402
from jaxsparse.methods import sqft  # noqa: E402
from jaxsparse.models import from_torch  # noqa: E402

NLS = ["q_proj", "k_proj", "v_proj"]


from tests.convert.test_peft_lora import llama  # noqa: E402, F401  (a fixture)


@pytest.fixture(scope="module")
def super_adapter(llama, tmp_path_factory):
    ours = from_torch(llama)
    cfg = sqft.SQFTConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
        nls_target_modules=NLS,
        search_space=[8, 6, 4],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    adapter = sqft.init(ours.params, cfg, jax.random.key(0))
    out = tmp_path_factory.mktemp("sqft") / "super"
    save_adapter(adapter, out, model=ours)
    return ours, adapter, out


def test_super_adapter_directory_is_peft_lora_plus_sqft_files(super_adapter):
    _, _, out = super_adapter
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["sparse_adapter"] is False and config["quantization_aware"] is False
    elastic = json.loads((out / "elastic_adapter_config.json").read_text())
    assert elastic == [
        {
            "target": [
                f"base_model.model.model.layers.{i}.self_attn.{m}.lora_A"
                for m in ("k_proj", "q_proj", "v_proj")
            ],
            "search_space": [8, 6, 4],
        }
        for i in range(2)
    ]


def _peft_logits(llama, adapter_dir, ids):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize(
    "version, ranks, expected", [("heuristic", None, [6, 6]), ("custom", [8, 4], [8, 4])]
)
def test_extracted_sub_adapter_in_peft_equals_our_elastic_adapter(
    llama, super_adapter, tmp_path, version, ranks, expected
):
    ours, adapter, out = super_adapter
    sub = tmp_path / "sub"
    chosen = extract_sub_adapter(out, sub, version=version, ranks=ranks)
    assert chosen == {f"model.layers.{i}.self_attn.{m}": expected[i] for i in range(2) for m in NLS}
    raw = json.loads((sub / "adapter_config.json").read_text())
    assert raw["rank_pattern"] == {m: w for m, w in chosen.items() if w != 8}
    ids = np.array([[1, 5, 9, 2, 30, 7, 3]])
    theirs = _peft_logits(llama, sub, ids)
    elastic = sqft.with_ranks(adapter, chosen)
    mine = np.asarray(
        ours.apply_fn(delta_lib.apply(ours.params, elastic, factored=True), ids, np.ones_like(ids))
    )
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)
    # a different sub-adapter gives different logits (the comparison can fail)
    full = np.asarray(
        ours.apply_fn(delta_lib.apply(ours.params, adapter, factored=True), ids, np.ones_like(ids))
    )
    assert np.abs(full - theirs).max() > 1e-3
    # we load the sub-adapter back as the same update: rank w, the super-adapter's scaling alpha / r
    loaded = load_adapter(sub, model=ours)
    d = loaded.deltas["model.layers.0.self_attn.q_proj.kernel"]
    assert d.rank == expected[0] and d.scale == pytest.approx(2.0)


def test_versions_follow_sqfts_rule():
    groups = [(["a", "b"], [32, 24, 16]), (["c"], [16, 8, 4, 2])]
    assert sub_adapter_ranks(groups, "maximal") == {"a": 32, "b": 32, "c": 16}
    assert sub_adapter_ranks(groups, "heuristic") == {"a": 24, "b": 24, "c": 8}  # index (len - 1) // 2
    assert sub_adapter_ranks(groups, "minimal") == {"a": 16, "b": 16, "c": 2}
    assert sub_adapter_ranks([(["a"], [32, 24, 16])], "custom", [16]) == {"a": 16}
    assert rank_for([5], "heuristic") == 5


def _assert_refused(call, match, out):
    with pytest.raises(ValueError, match=match):
        call()
    assert not out.exists()


def test_bad_extractions_are_refused_with_no_output(super_adapter, tmp_path):
    _, _, out = super_adapter
    sub = tmp_path / "sub"
    _assert_refused(
        lambda: extract_sub_adapter(out, sub, version="custom", ranks=[5]),
        "rank 5 .* not in its search space",
        sub,
    )
    _assert_refused(lambda: extract_sub_adapter(out, sub, version="custom"), "needs ranks", sub)
    _assert_refused(
        lambda: extract_sub_adapter(out, sub, version="custom", ranks=[8, 6, 4]),
        "3 ranks for 2 NLS groups",
        sub,
    )
    _assert_refused(
        lambda: extract_sub_adapter(out, sub, version="heuristic", ranks=[8]),
        "only with version 'custom'",
        sub,
    )

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / name).write_bytes((out / name).read_bytes())
    _assert_refused(lambda: extract_sub_adapter(bad, sub), "elastic_adapter_config.json: not found", sub)
    group = {"target": ["base_model.model.model.layers.0.self_attn.q_proj.lora_A"]}
    for space, match in (([16, 8], "rank 16 is above r=8"), ([4, 6], "strictly decreasing")):
        (bad / "elastic_adapter_config.json").write_text(json.dumps([{**group, "search_space": space}]))
        with pytest.raises(AdapterFormatError, match=match):
            extract_sub_adapter(bad, sub)
        assert not sub.exists()
