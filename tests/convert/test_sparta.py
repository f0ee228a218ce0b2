"""SpaRTA layout (the authors' peft_sparta): exact round trip, their merge rule as oracle, bad input named."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxsparse import tree as tree_lib
from jaxsparse.convert import AdapterFormatError
from jaxsparse.convert.sparta import load_sparta, save_sparta
from jaxsparse.delta import Adapter, SparseDelta, apply
from jaxsparse.methods.sparta import SpartaConfig
from jaxsparse.models.naming import hf_key

H, FF, L = 8, 12, 3


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    layer = {
        "self_attn": {n: {"kernel": w(H, H)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"up_proj": {"kernel": w(H, FF)}, "down_proj": {"kernel": w(FF, H)}},
        "input_layernorm": {"scale": w(H)},
    }
    return {
        "model": {"embed_tokens": {"embedding": w(20, H)}, "layers": {"0": layer}, "norm": {"scale": w(H)}},
        "score": {"kernel": w(H, L)},
    }


def sparta_adapter(params, density=0.25, seed=1, head=True):
    rng = np.random.default_rng(seed)
    deltas = {}
    for path in (
        "model.layers.0.self_attn.v_proj.kernel",
        "model.layers.0.mlp.up_proj.kernel",
        "model.norm.scale",
    ):
        shape = tree_lib.get_leaf(params, path).shape
        numel = int(np.prod(shape))
        k = round(density * numel)
        idx = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int32)
        deltas[path] = SparseDelta(jnp.asarray(idx), jnp.asarray(rng.normal(size=k), jnp.float32), shape)
    dense = {"score.kernel": jnp.asarray(rng.normal(size=(H, L)), jnp.float32)} if head else {}
    config = SpartaConfig(
        density=density, target_modules=["v_proj", "up_proj"], modules_to_save=["score"] if head else None,
        seed=3, task_type="SEQ_CLS" if head else None,
    )  # fmt: skip
    return Adapter(deltas, dense, config=config)


def hf_state(params):
    out = {}
    for path, leaf in tree_lib.leaf_paths(params).items():
        key, transposed = hf_key(path)
        out[key] = np.asarray(leaf).T if transposed else np.asarray(leaf)
    return out


def assert_same_adapter(a, b):
    assert sorted(a.deltas) == sorted(b.deltas) and sorted(a.dense) == sorted(b.dense)
    for p, d in a.deltas.items():
        assert b.deltas[p].shape == d.shape
        np.testing.assert_array_equal(np.asarray(b.deltas[p].indices), np.asarray(d.indices))
        np.testing.assert_array_equal(np.asarray(b.deltas[p].values), np.asarray(d.values))
    for p, v in a.dense.items():
        np.testing.assert_array_equal(np.asarray(b.dense[p]), np.asarray(v))


def test_round_trip_exact_with_and_without_params(tmp_path):
    params = tiny_params()
    adapter = sparta_adapter(params)
    save_sparta(
        adapter, tmp_path / "a", base_model_name_or_path="tiny-llama", hf_config={"model_type": "llama"}
    )
    for back in (load_sparta(tmp_path / "a"), load_sparta(tmp_path / "a", params)):
        assert_same_adapter(adapter, back)
        assert back.config.density == 0.25 and back.config.target_modules == ("v_proj", "up_proj")
        assert back.config.base_model_name_or_path == "tiny-llama"
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["sparta_pretrained_model"] == "tiny-llama"
    assert cfg["problem_type"] == "single_label_classification"


def test_files_follow_authors_layout_and_merge_rule(tmp_path):
    """The authors' merge, param[idx] += delta per named parameter, reproduces our apply exactly."""
    params = tiny_params()
    adapter = sparta_adapter(params, head=False)
    save_sparta(adapter, tmp_path / "a", base_model_name_or_path="b", params=params)
    tensors = load_file(tmp_path / "a" / "sparse_deltas.safetensors")
    hf = hf_state(params)
    assert {k.partition(".")[2] for k in tensors} == set(
        hf
    )  # an entry for every parameter, as the authors write
    merged = {k: v.copy() for k, v in hf.items()}
    for name, w in merged.items():
        idx, d = tensors[f"indices.{name}"], tensors[f"deltas.{name}"]
        assert idx.dtype == np.int32 and idx.shape == (d.shape[0], w.ndim) and d.dtype == np.float32
        if len(idx):
            assert np.all(np.diff(np.ravel_multi_index(tuple(idx.T), w.shape)) > 0), "row-major sorted"
        w[tuple(idx.T)] = (w[tuple(idx.T)].astype(np.float32) + d).astype(w.dtype)
    ours = hf_state(apply(params, adapter))
    for name in hf:
        np.testing.assert_array_equal(merged[name], ours[name])
    assert tensors["indices.model.embed_tokens.weight"].shape == (0, 2)


def test_authors_files_need_params_and_head_init(tmp_path):
    torch = pytest.importorskip("torch")
    params = tiny_params()
    rng = np.random.default_rng(0)
    out = tmp_path / "authors"
    out.mkdir()
    (out / "config.json").write_text(
        json.dumps({"model_type": "llama", "sparta_pretrained_model": "base", "id2label": {"0": "a", "1": "b", "2": "c"},
                    "problem_type": "single_label_classification"})
    )  # fmt: skip
    v_idx = np.array([[0, 1], [2, 5], [7, 0]], np.int32)  # (out, in) rows
    v_val = rng.normal(size=3).astype(np.float32)
    head_init = rng.normal(size=(L, H)).astype(np.float32)
    head_delta = rng.normal(size=L * H).astype(np.float32)
    tensors = {
        "indices.model.layers.0.self_attn.v_proj.weight": v_idx, "deltas.model.layers.0.self_attn.v_proj.weight": v_val,
        "indices.model.norm.weight": np.zeros((0, 1), np.int32), "deltas.model.norm.weight": np.zeros(0, np.float32),
        "indices.score.weight": np.ascontiguousarray(np.argwhere(np.ones((L, H))), np.int32), "deltas.score.weight": head_delta,
    }  # fmt: skip
    save_file(tensors, out / "sparse_deltas.safetensors")
    torch.save(torch.from_numpy(head_init), out / "head_init.pt")
    with pytest.raises(AdapterFormatError, match="pass the base model's params"):
        load_sparta(out)
    adapter = load_sparta(out, params)
    assert adapter.config.task_type == "SEQ_CLS" and adapter.config.base_model_name_or_path == "base"
    assert list(adapter.deltas) == ["model.layers.0.self_attn.v_proj.kernel"]
    d = adapter.deltas["model.layers.0.self_attn.v_proj.kernel"]
    expected_flat = sorted(i * H + o for o, i in v_idx)  # our kernel is (in, out)
    assert d.indices.tolist() == expected_flat
    w = np.asarray(params["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"]).T.copy()
    w[tuple(v_idx.T)] += v_val
    np.testing.assert_array_equal(
        np.asarray(apply(params, adapter)["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"]).T, w
    )
    np.testing.assert_array_equal(
        np.asarray(adapter.dense["score.kernel"]).T, head_init + head_delta.reshape(L, H)
    )

    # the same adapter as the older pickle form: loaded only through weights_only=True
    (out / "sparse_deltas.safetensors").unlink()
    pt = {"indices": {}, "deltas": {}}
    for k, v in tensors.items():
        kind, _, name = k.partition(".")
        pt[kind][name] = torch.from_numpy(v)
    torch.save(pt, out / "sparse_deltas.pt")
    assert_same_adapter(adapter, load_sparta(out, params))


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_unsafe_pickle_refused(tmp_path):
    torch = pytest.importorskip("torch")
    out = tmp_path / "a"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"sparta_pretrained_model": "b"}))
    torch.save({"indices": {}, "deltas": {}, "x": _Evil()}, out / "sparse_deltas.pt")
    with pytest.raises(AdapterFormatError, match="weights_only=True"):
        load_sparta(out, tiny_params())


def _bad(tmp_path, mutate):
    params = tiny_params()
    src = tmp_path / "src"
    save_sparta(sparta_adapter(params), src, base_model_name_or_path="b")
    from safetensors import safe_open

    with safe_open(src / "sparse_deltas.safetensors", "np") as f:
        meta = f.metadata()
    tensors = load_file(src / "sparse_deltas.safetensors")
    mutate(tensors)
    dst = tmp_path / "bad"
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dst / "sparse_deltas.safetensors", metadata=meta)
    return dst, params


V = "model.layers.0.self_attn.v_proj.weight"


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda t: t.pop("deltas." + V), "'deltas.model.layers.0.self_attn.v_proj.weight' missing"),
        (lambda t: t["indices." + V].__setitem__((0, 0), H), "out of range"),
        (lambda t: t["indices." + V].__setitem__(1, t["indices." + V][0]), "duplicate"),
        (lambda t: t["deltas." + V].__setitem__(0, np.inf), "non-finite"),
        (lambda t: t.__setitem__("deltas." + V, t["deltas." + V][:-1]), "to match the indices"),
        (lambda t: t.__setitem__("indices." + V, t["indices." + V][:, :1]), r"shape \(n, 2\)"),
        (lambda t: t.__setitem__("bogus", np.zeros(1, np.float32)), "unexpected key 'bogus'"),
        (lambda t: [t.__setitem__(f"{k}.score.weight", t[f"{k}.score.weight"][1:]) for k in ("indices", "deltas")],
         "trained densely"),
        (lambda t: t.__setitem__("indices.nope.weight", np.zeros((1, 1), np.int32)), "missing"),
    ],
)  # fmt: skip
def test_bad_tensors_are_named(tmp_path, mutate, match):
    dst, params = _bad(tmp_path, mutate)
    with pytest.raises(AdapterFormatError, match=match) as e:
        load_sparta(dst, params)
    assert "sparse_deltas.safetensors" in str(e.value)


def test_not_a_sparta_dir_and_wrong_model(tmp_path):
    dst, params = _bad(tmp_path, lambda t: None)
    other = tiny_params()
    other["model"]["layers"]["0"]["self_attn"]["v_proj"]["kernel"] = jnp.zeros((H, H + 1))
    with pytest.raises(AdapterFormatError, match="different base model"):
        load_sparta(dst, other)
    (dst / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(AdapterFormatError, match="sparta_pretrained_model"):
        load_sparta(dst, params)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"sparta_pretrained_model": "b"}))
    with pytest.raises(AdapterFormatError, match="not a SpaRTA adapter"):
        load_sparta(tmp_path / "empty", params)


def test_write_is_atomic_on_bad_adapter(tmp_path):
    params = tiny_params()
    adapter = sparta_adapter(params, head=False)
    d = adapter.deltas["model.norm.scale"]
    bad = Adapter({"model.norm.scale": SparseDelta(d.indices.at[0].set(H), d.values, d.shape)})
    with pytest.raises(ValueError, match=r"model\.norm\.scale"):
        save_sparta(bad, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_head_init_is_safetensors_and_needs_no_torch(tmp_path, monkeypatch):
    """The head init is written as head_init.safetensors (key 'head', zeros); no torch import on export."""
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch blocked by the test")
        return real_import(name, *args, **kwargs)

    params = tiny_params()
    adapter = sparta_adapter(params)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    save_sparta(adapter, tmp_path / "a", base_model_name_or_path="b")
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        ".jaxsparse-output.json", "config.json", "head_init.safetensors", "sparse_deltas.safetensors",
    ]  # fmt: skip
    head = load_file(tmp_path / "a" / "head_init.safetensors")
    assert list(head) == ["head"] and head["head"].shape == (L, H) and not head["head"].any()
    assert_same_adapter(adapter, load_sparta(tmp_path / "a", params))

    # an authors'-style non-zero head init: the head is head_init + delta (HF layout (out, in))
    init = np.random.default_rng(7).normal(size=(L, H)).astype(np.float32)
    save_file({"head": init}, tmp_path / "a" / "head_init.safetensors")
    back = load_sparta(tmp_path / "a", params)
    np.testing.assert_array_equal(
        np.asarray(back.dense["score.kernel"]), np.asarray(adapter.dense["score.kernel"]) + init.T
    )
    save_file({"other": init}, tmp_path / "a" / "head_init.safetensors")
    with pytest.raises(AdapterFormatError, match=r"head_init\.safetensors: no 'head' tensor"):
        load_sparta(tmp_path / "a", params)


# --------------------------------------------------------------------------- the authors' own loaders
#
# `jaxsparse export --format sparta` of a model saved in a temp dir must load in peft_sparta's
# SpaRTAforCausalLM / SpaRTAforSequenceClassification, and give our logits. Their package loads the
# base in bfloat16 (`torch_dtype=torch.bfloat16`), merges as `(param.float() + delta).to(bfloat16)`
# and runs the classifier under bfloat16 autocast: tolerances come from bfloat16's 8-bit significand
# (relative spacing 2**-8 = 0.0039 near 1, so one rounding moves a weight by at most 2**-9 relative).


BF16_LOGIT_TOL = 2**-5  # |theirs - ours| <= 3% of the largest logit; measured ~0.5% on these 2-layer models
TINY_VOCAB = 64


def _tiny_llama_dir(root, *, tie: bool):
    """A random 2-layer Llama causal LM with a word-level tokenizer, saved as transformers does."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, tie_word_embeddings=tie,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(TINY_VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # The authors' classifier loads the tokenizer from sparta_pretrained_model and checks its size.
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="t1", unk_token="t0"
    ).save_pretrained(root)
    return root


def _random_sparta(model, config, seed=0):
    """SpaRTA's mask on ``model`` with non-zero values (and a random head), large next to bf16 rounding."""
    from jaxsparse.methods import sparta

    adapter = sparta.init(model.params, config)
    rng = np.random.default_rng(seed)
    deltas = {
        p: SparseDelta(d.indices, jnp.asarray(rng.normal(scale=0.1, size=d.k), jnp.float32), d.shape)
        for p, d in adapter.deltas.items()
    }
    dense = {
        p: jnp.asarray(rng.normal(scale=0.5, size=v.shape), jnp.float32) for p, v in adapter.dense.items()
    }
    return Adapter(deltas, dense, config=config)


def _export(tmp_path, adapter, model, recorded_base, *extra_argv):
    """Our native adapter (recording its base as the trainer does), then `jaxsparse export --format sparta`."""
    from jaxsparse.adapter_io import save_adapter
    from jaxsparse.cli import main

    save_adapter(adapter, tmp_path / "native", model=model, base_model_name_or_path=recorded_base)
    out = tmp_path / "exp"
    assert (
        main(
            [
                "export",
                "--adapter",
                str(tmp_path / "native"),
                "--format",
                "sparta",
                "--output",
                str(out),
                *extra_argv,
            ]
        )
        == 0
    )
    return out


def _assert_merged_weights_match(torch_model, params, adapter, prefix=""):
    """Their merged bf16 weights equal our merge up to the two bf16 roundings, entry by entry:
    |bf16(bf16(w) + d) - (w + d)| <= 2**-9 |w| + 2**-9 |w + d| (bounded here with a factor 2 margin)."""
    base, ours = hf_state(params), hf_state(apply(params, adapter))
    theirs = {prefix + k: v.detach().float().numpy() for k, v in torch_model.named_parameters()}
    assert set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    for name, value in theirs.items():
        bound = 2**-8 * (np.abs(base[name]) + np.abs(ours[name]))
        worst = np.max(np.abs(value - ours[name]) - bound)
        assert worst <= 0, f"{name}: off by {worst} beyond bf16 rounding"


@pytest.mark.parametrize("tie", [True, False])
def test_authors_causal_lm_loads_our_export(tmp_path, monkeypatch, tie):
    peft_sparta = pytest.importorskip("peft_sparta")
    torch = pytest.importorskip("torch")
    from jaxsparse import models

    monkeypatch.chdir(tmp_path)  # --model given as a relative path: the export must record it absolute
    model_dir = _tiny_llama_dir(tmp_path / "base", tie=tie)
    model = models.from_pretrained(model_dir)
    config = SpartaConfig(
        density=0.1, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    adapter = _random_sparta(model, config)
    # 1-D (norm) and embedding entries too: the authors' layout holds any parameter
    extra = {
        "model.norm.scale": SparseDelta(jnp.array([1, 5, 30], jnp.int32), jnp.array([0.5, -0.3, 0.2]), (32,)),
        "model.embed_tokens.embedding": SparseDelta(
            jnp.array([7, 100, 2000], jnp.int32), jnp.array([0.4, 0.3, -0.6]), (TINY_VOCAB, 32)
        ),
    }
    adapter = Adapter({**adapter.deltas, **extra}, adapter.dense, config=config)
    exp = _export(tmp_path, adapter, model, str(model_dir), "--model", "base")

    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["sparta_pretrained_model"] == str(model_dir.resolve())
    theirs = peft_sparta.SpaRTAforCausalLM(str(exp))
    assert next(theirs.base_model.parameters()).dtype == torch.bfloat16
    _assert_merged_weights_match(theirs.base_model, model.params, adapter)

    ids = np.array([[3, 9, 4, 17, 5, 60, 2, 8]])
    with torch.no_grad():
        their_logits = theirs(input_ids=torch.from_numpy(ids)).logits.float().numpy()
    our_logits = np.asarray(model.apply_fn(apply(model.params, adapter), jnp.asarray(ids)))
    base_logits = np.asarray(model.apply_fn(model.params, jnp.asarray(ids)))
    tol = BF16_LOGIT_TOL * np.abs(our_logits).max()
    np.testing.assert_allclose(their_logits, our_logits, atol=tol, rtol=0)
    # the adapter's effect is far above the tolerance
    assert np.abs(our_logits - base_logits).max() > 10 * tol


def test_authors_classifier_loads_our_export_of_an_asset_trained_adapter(tmp_path, monkeypatch):
    """The issue's case: a classifier trained on an asset (the adapter records the asset's name),
    exported without --model: config.json gets id2label, problem_type and the base's absolute path,
    and the deltas file an entry for every parameter of the headless base (their loader indexes all)."""
    peft_sparta = pytest.importorskip("peft_sparta")
    torch = pytest.importorskip("torch")
    from jaxsparse import config as config_lib
    from jaxsparse import models

    model_dir = _tiny_llama_dir(tmp_path / "base", tie=True)
    monkeypatch.setitem(config_lib.ASSET_MODELS, "tiny-asset", ("no_such_package", "base"))
    real_resolve = config_lib.resolve_model_path
    monkeypatch.setattr(
        config_lib, "resolve_model_path", lambda s: str(model_dir) if s == "tiny-asset" else real_resolve(s)
    )
    id2label = {0: "negative", 1: "neutral", 2: "positive"}
    model = models.from_pretrained(model_dir, task="seq_cls", id2label=id2label)
    config = SpartaConfig(
        density=0.1, target_modules=["v_proj", "o_proj"], modules_to_save=["score"], task_type="SEQ_CLS"
    )
    adapter = _random_sparta(model, config)
    exp = _export(tmp_path, adapter, model, "tiny-asset")  # no --model: the recorded asset is resolved
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["sparta_pretrained_model"] == str(model_dir.resolve())
    assert cfg["problem_type"] == "single_label_classification"
    assert cfg["id2label"] == {str(k): v for k, v in id2label.items()}
    theirs = peft_sparta.SpaRTAforSequenceClassification(str(exp))
    assert next(theirs.base_model.parameters()).dtype == torch.bfloat16
    _assert_merged_weights_match(theirs.base_model, model.params, adapter, prefix="model.")
    # the head is float32 in their loader: head_init (zeros) + our head, exactly
    np.testing.assert_array_equal(
        theirs.head.weight.detach().numpy(), np.asarray(adapter.dense["score.kernel"]).T
    )

    ids = np.array([[3, 9, 4, 17, 5, 60, 2, 8], [11, 12, 13, 14, 15, 16, 18, 19]])
    their_logits = theirs(torch.from_numpy(ids)).numpy()
    our_logits = np.asarray(model.apply_fn(apply(model.params, adapter), jnp.asarray(ids)))
    base_logits = np.asarray(model.apply_fn(model.params, jnp.asarray(ids)))
    tol = BF16_LOGIT_TOL * np.abs(our_logits).max()
    np.testing.assert_allclose(their_logits, our_logits, atol=tol, rtol=0)
    assert np.abs(our_logits - base_logits).max() > 10 * tol
    # their text API: the tokenizer from the base dir, labels from our id2label
    text = "t3 t9 t4 t5 t60 t2"
    text_ids = theirs.tokenizer([text], return_tensors="np")["input_ids"]
    text_logits = np.asarray(model.apply_fn(apply(model.params, adapter), jnp.asarray(text_ids)))
    assert theirs.decide_class([text]) == [id2label[int(np.argmax(text_logits[0]))]]
