"""SQFT from the command line on a tiny 50%-sparse Llama: `jaxsparse merge` keeps the base's zeros
for a sparse_adapter (ours, or a PEFT LoRA with the flag added by hand), `jaxsparse train` with
method sqft writes a super-adapter, `jaxsparse extract-sub-adapter` cuts it, and bad input is one
line on stderr, exit 2, nothing written."""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
import transformers

from jaxsparse.cli import main
from tests.cli.tiny_llama import TEXT, hf_weights, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


def _tiny_llama(root, *, sparse: bool):
    model = tiny_llama(root).eval()
    if sparse:  # 50% unstructured magnitude sparsity in every decoder linear, as a pruned base
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".layers." in name and name.endswith("proj.weight"):
                    p[p.abs() <= p.abs().median()] = 0.0
    model.save_pretrained(root)
    return model


@pytest.fixture(scope="module")
def sparse_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse-llama")
    return root, _tiny_llama(root, sparse=True)


def _peft_adapter(base_model, out, *, sparse_flag: bool):
    """A plain PEFT LoRA (non-zero B), optionally with SQFT's flag added to its config by hand."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    model = peft.get_peft_model(copy.deepcopy(base_model), config)
    model.save_pretrained(str(out))
    if sparse_flag:
        path = out / "adapter_config.json"
        raw = json.loads(path.read_text())
        raw["sparse_adapter"] = True
        path.write_text(json.dumps(raw))
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_merge_of_a_sparse_adapter_keeps_every_zero_and_matches_the_oracle(sparse_base, tmp_path, capsys):
    base_dir, base_model = sparse_base
    factors = _peft_adapter(base_model, tmp_path / "adapter", sparse_flag=True)
    out = tmp_path / "merged"
    assert (
        main(
            ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]
        )
        == 0
    )
    capsys.readouterr()
    before, after = hf_weights(base_dir), hf_weights(out)
    checked = 0
    for key, w in before.items():
        module = key[: -len(".weight")]
        a = factors.get(f"base_model.model.{module}.lora_A.weight")
        if a is None:
            np.testing.assert_array_equal(after[key], w, err_msg=key)
            continue
        b = factors[f"base_model.model.{module}.lora_B.weight"]
        oracle = w.astype(np.float64) + (2.0 * b.astype(np.float64) @ a.astype(np.float64)) * (w != 0)
        np.testing.assert_allclose(after[key], oracle, rtol=1e-5, atol=1e-6, err_msg=key)
        assert (after[key] == 0).sum() == (w == 0).sum() > 0 and np.array_equal(after[key] == 0, w == 0), key
        checked += 1
    assert checked == 2 * len(TARGETS)

    # the merged checkpoint runs the same in transformers and in our model (<= 1e-5)
    from jaxsparse.models import from_pretrained

    ids = np.array([[1, 5, 9, 2, 30, 7, 3, 11]])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        ref = theirs(torch.tensor(ids)).logits.numpy()
    ours = from_pretrained(str(out))
    np.testing.assert_allclose(
        np.asarray(ours.apply_fn(ours.params, ids, np.ones_like(ids))), ref, atol=1e-5, rtol=0
    )

    # check-sparsity sees the base's 50% kept
    assert main(["check-sparsity", "--model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert abs(report["overall"]["sparsity"] - 0.5) < 0.01


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_same_lora_without_the_flag_loses_the_sparsity(sparse_base, tmp_path, capsys):
    base_dir, base_model = sparse_base
    _peft_adapter(base_model, tmp_path / "adapter", sparse_flag=False)
    out = tmp_path / "merged"
    assert (
        main(
            ["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]
        )
        == 0
    )
    w = hf_weights(out)["model.layers.0.self_attn.q_proj.weight"]
    assert (w == 0).mean() < 0.01


def test_sparse_adapter_into_a_base_without_zeros_warns(tmp_path, capsys):
    dense_dir = tmp_path / "dense"
    dense_dir.mkdir()
    dense = _tiny_llama(dense_dir, sparse=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft_adapter(dense, tmp_path / "adapter", sparse_flag=True)
    argv = [
        "merge",
        "--model",
        str(dense_dir),
        "--adapter",
        str(tmp_path / "adapter"),
        "--output",
        str(tmp_path / "m"),
    ]
    with pytest.warns(
        UserWarning, match="sparse_adapter is set but the base model has no zeros .* plain LoRA"
    ):
        assert main(argv) == 0


def _one_line(capsys, verb):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxsparse {verb}: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_train_sqft_then_extract_and_merge(sparse_base, tmp_path, capsys):
    base_dir, _ = sparse_base
    text = tmp_path / "train.txt"
    text.write_text("\n".join(TEXT.split(" and ")))  # one document per line
    run = tmp_path / "run"
    argv = [
        "train",
        "--set", "method=sqft",
        "--set", "task=causal_lm",
        "--set", f"model.path={base_dir}",
        "--set", "data.source=text",
        "--set", f"data.path={text}",
        "--set", "data.max_length=16",
        "--set", "data.eval_size=0.2",
        "--set", "adapter.r=8",
        "--set", "adapter.lora_alpha=16",
        "--set", "adapter.sparse_adapter=true",
        "--set", "adapter.nls_target_modules=[q_proj,k_proj,v_proj]",
        "--set", "adapter.search_space=[8,6,4]",
        "--set", "adapter.modules_to_save=null",
        "--set", "train.steps=4",
        "--set", "train.batch_size=2",
        "--set", "train.eval_batch_size=4",
        "--set", "train.warmup_steps=0",
        "--set", "train.eval_every=4",
        "--set", "train.log_every=2",
        "--set", "train.checkpoint_every=4",
        "--set", "train.progress=false",
        "--output", str(run),
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["sparse_adapter"] is True and config["r"] == 8
    assert sorted(config["target_modules"]) == sorted(TARGETS)
    elastic = json.loads((adapter / "elastic_adapter_config.json").read_text())
    assert [g["search_space"] for g in elastic] == [[8, 6, 4]] * 2 and len(elastic[0]["target"]) == 3

    assert main(["info", str(adapter)]) == 0
    assert "method:       sqft (peft format)" in capsys.readouterr().out

    sub = tmp_path / "sub"
    cmd = ["extract-sub-adapter", "--adapter", str(adapter), "--version", "heuristic", "--output", str(sub)]
    assert main(cmd) == 0
    assert "heuristic sub-adapter (rank 6 x 6 elastic modules)" in capsys.readouterr().out
    raw = json.loads((sub / "adapter_config.json").read_text())
    assert set(raw["rank_pattern"].values()) == {6} and raw["sparse_adapter"] is True
    assert main(cmd) == 2  # the output exists: refused without --overwrite
    _one_line(capsys, "extract-sub-adapter")
    assert main([*cmd, "--overwrite"]) == 0
    capsys.readouterr()

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(base_dir), "--adapter", str(sub), "--output", str(merged)]) == 0
    before, after = hf_weights(base_dir), hf_weights(merged)
    for key in before:
        if any(key.endswith(f"{m}.weight") for m in TARGETS):
            assert np.array_equal(after[key] == 0, before[key] == 0), key
            assert not np.array_equal(after[key], before[key]), key  # the adapter did train

    # bad input: one line, exit 2, nothing written
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main([*cmd[:-1], str(bad), "--version", "custom", "--ranks", "5"]) == 2
    assert "rank 5" in _one_line(capsys, "extract-sub-adapter") and not bad.exists()
    assert main(["extract-sub-adapter", "--adapter", str(sub), "--output", str(bad)]) == 2
    assert "not an NLS super-adapter" in _one_line(capsys, "extract-sub-adapter") and not bad.exists()
