"""Target selection semantics, checked against PEFT's own matcher where PEFT defines them."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from jaxsparse import tree as tree_lib
from jaxsparse.tree import TargetError


def _params():
    def lin(i, o, bias=True):
        d = {"kernel": jnp.zeros((i, o))}
        if bias:
            d["bias"] = jnp.zeros(o)
        return d

    layer = {
        "self_attn": {"q_proj": lin(4, 4, False), "k_proj": lin(4, 2, False), "xq_proj": lin(4, 4)},
        "mlp": {"up_proj": lin(4, 8, False), "down_proj": lin(8, 4, False)},
        "input_layernorm": {"scale": jnp.ones(4)},
    }
    return {
        "model": {
            "embed_tokens": {"embedding": jnp.zeros((10, 4))},
            "layers": {"0": layer, "1": {k: dict(v) for k, v in layer.items()}},
            "conv": {"kernel": jnp.zeros((3, 3, 4, 4))},
        },
        "lm_head": lin(4, 10, False),
        "classifier": {"dense": lin(4, 4), "out_proj": lin(4, 2)},
    }


def test_leaf_paths_module_of_and_get_leaf():
    params = _params()
    paths = tree_lib.leaf_paths(params)
    assert "model.layers.0.self_attn.q_proj.kernel" in paths
    assert tree_lib.module_of("a.b.kernel") == "a.b"
    assert tree_lib.leaf_name("a.b.kernel") == "kernel"
    assert tree_lib.get_leaf(params, "model.layers.1.mlp.up_proj.kernel").shape == (4, 8)
    with pytest.raises(KeyError, match=r"'model.layers.1.mlp' has no child 'gate_proj'"):
        tree_lib.get_leaf(params, "model.layers.1.mlp.gate_proj.kernel")


def test_get_leaf_walks_lists():
    assert tree_lib.get_leaf({"h": [{"w": 1}, {"w": 2}]}, "h.1.w") == 2


def test_replace_leaves_keeps_structure_and_rejects_unknown_paths():
    params = _params()
    new = tree_lib.replace_leaves(params, {"lm_head.kernel": jnp.ones((4, 10))})
    assert float(new["lm_head"]["kernel"].sum()) == 40.0
    assert float(params["lm_head"]["kernel"].sum()) == 0.0
    with pytest.raises(KeyError, match=r"lm_head\.weight"):
        tree_lib.replace_leaves(params, {"lm_head.weight": jnp.ones((4, 10))})


def test_replace_leaves_fast_dict_path_equals_the_general_one():
    # Plain nested dicts take a copy-on-write path (merge calls this with a few hundred paths);
    # its result must be what flatten/unflatten gives, and the input must stay untouched.
    params = _params()
    paths = ["model.layers.0.self_attn.q_proj.kernel", "lm_head.kernel"]
    new_leaves = {p: tree_lib.get_leaf(params, p) + 1.0 for p in paths}
    fast = tree_lib.replace_leaves(params, new_leaves)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    general = jax.tree_util.tree_unflatten(
        treedef, [new_leaves.get(tree_lib.path_str(kp), leaf) for kp, leaf in flat]
    )
    assert jax.tree_util.tree_structure(fast) == treedef
    for a, b in zip(jax.tree_util.tree_leaves(fast), jax.tree_util.tree_leaves(general), strict=True):
        assert a is b
    assert fast["model"]["embed_tokens"] is params["model"]["embed_tokens"]  # untouched: shared
    assert float(params["lm_head"]["kernel"].sum()) == 0.0
    with pytest.raises(KeyError, match=r"parameter paths not in the tree: \['model.layers'\]"):
        tree_lib.replace_leaves(params, {"model.layers": jnp.ones(2)})  # a sub-tree, not a leaf
    listed = {"blocks": [{"w": jnp.zeros(2)}, {"w": jnp.zeros(2)}], "none": None}
    out = tree_lib.replace_leaves(listed, {"blocks.1.w": jnp.ones(2)})  # through a list: general path
    assert out["blocks"][1]["w"].tolist() == [1.0, 1.0] and out["blocks"][0]["w"].tolist() == [0.0, 0.0]
    with pytest.raises(KeyError, match=r"'none'"):
        tree_lib.replace_leaves(listed, {"none": jnp.ones(2)})


def test_replace_leaves_fast_path_takes_integer_keyed_layer_dicts():
    # Our models key their layer stacks 0, 1, ... (ints), and paths say "layers.0": the fast path
    # must walk them as get_leaf does (it fell back to flatten/unflatten, 3 ms per SmolLM2 merge).
    params = {"model": {"layers": {0: {"w": jnp.zeros(2)}, 1: {"w": jnp.zeros(2)}}, "norm": jnp.zeros(2)}}
    new = {"model.layers.1.w": jnp.ones(2)}
    fast = tree_lib._replace_in_dicts(params, new)
    assert fast is not None
    assert tree_lib.get_leaf(fast, "model.layers.1.w") is new["model.layers.1.w"]
    assert set(fast["model"]["layers"]) == {0, 1}  # the int key replaced, no "1" added beside it
    assert fast["model"]["layers"][0] is params["model"]["layers"][0]
    assert params["model"]["layers"][1]["w"].tolist() == [0.0, 0.0]
    general = tree_lib.replace_leaves(
        {"model": dict(params["model"], layers=list(params["model"]["layers"].values()))}, new
    )
    assert general["model"]["layers"][1]["w"] is new["model.layers.1.w"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.w"):
        tree_lib.replace_leaves(params, {"model.layers.2.w": jnp.ones(2)})


def test_list_spec_matches_whole_name_suffix_only():
    chosen = tree_lib.select_modules(_params(), ["q_proj"])
    assert chosen == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]  # not xq_proj


def test_list_spec_matches_dotted_suffix_and_exact_path():
    params = _params()
    assert tree_lib.select_modules(params, ["self_attn.k_proj"]) == [
        "model.layers.0.self_attn.k_proj",
        "model.layers.1.self_attn.k_proj",
    ]
    assert tree_lib.select_modules(params, ["lm_head"]) == ["lm_head"]


def test_regex_spec_must_match_the_whole_path():
    params = _params()
    assert tree_lib.select_modules(params, r".*\.1\.mlp\.(up|down)_proj") == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ]
    with pytest.raises(TargetError, match="matches no module"):
        tree_lib.select_modules(params, r"up_proj")  # a partial match is not a match


def test_exclusion_by_name_and_regex():
    params = _params()
    chosen = tree_lib.select_modules(params, ["q_proj", "k_proj"], ["k_proj"])
    assert all(m.endswith("q_proj") for m in chosen) and len(chosen) == 2
    chosen = tree_lib.select_modules(params, ["q_proj"], r"model\.layers\.0\..*")
    assert chosen == ["model.layers.1.self_attn.q_proj"]


def test_unknown_names_and_bad_regex_raise():
    with pytest.raises(TargetError, match=r"\['qkv'\]"):
        tree_lib.select_modules(_params(), ["q_proj", "qkv"])
    with pytest.raises(TargetError, match="invalid target regex"):
        tree_lib.select_modules(_params(), "(")
    assert tree_lib.select_modules(_params(), ["qkv"], strict=False) == []


def test_only_2d_kernels_are_candidates():
    params = _params()
    assert "model.conv" not in tree_lib.select_modules(params, r".*")
    assert tree_lib.select_modules(params, ["conv"], ndim=4) == ["model.conv"]
    with pytest.raises(TargetError):
        tree_lib.select_modules(params, ["embed_tokens"])  # an embedding has no kernel


def test_select_leaves_under_modules_to_save():
    params = _params()
    assert tree_lib.select_leaves_under(params, ["classifier"]) == [
        "classifier.dense.bias",
        "classifier.dense.kernel",
        "classifier.out_proj.bias",
        "classifier.out_proj.kernel",
    ]
    assert tree_lib.select_leaves_under(params, None) == []
    with pytest.raises(TargetError, match="score"):
        tree_lib.select_leaves_under(params, ["score"])


@pytest.mark.parametrize(
    "spec,exclude",
    [
        (["q_proj", "down_proj"], None),
        (["self_attn.q_proj", "lm_head"], ["layers.1.self_attn.q_proj"]),
        (r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj", None),
        (r".*proj", r".*\.0\..*"),
        (["dense"], None),
    ],
)
def test_selection_agrees_with_peft_matcher(spec, exclude):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    params = _params()
    config = LoraConfig(target_modules=spec, exclude_modules=exclude)
    modules = tree_lib.select_modules(params, spec, exclude, strict=False)
    candidates = tree_lib.select_modules(params, r".*", strict=False)
    found = {m: check_target_module_exists(config, m) for m in candidates}
    assert modules == [m for m, f in found.items() if f is True or isinstance(f, re.Match)]
