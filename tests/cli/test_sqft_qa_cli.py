"""QA-SparsePEFT from the command line on a tiny Llama: prune -> quantize (GPTQ) -> train with
adapter.quantization_aware (model.path the GPTQ directory, model.non_quant_path the sparse model, NLS)
-> extract-sub-adapter -> merge --non-quant-model -> check-sparsity. The merged GPTQ checkpoint keeps
the base's scales/zeros/g_idx, its codes are the NumPy oracle quant(W + s*BA*(W != 0)), every zero of
the sparse base stays zero, and read back it gives our fake-quantized training forward's logits; bad
input is one line on stderr, exit 2, nothing written."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxsparse.cli import main
from tests.cli.sqft_qa import train_argv as _train_argv

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@pytest.fixture
def bases(qa_bases):
    """(dense, sparse, gptq): the session's tiny QA bases (tests/cli/conftest.py)."""
    return qa_bases


def _one_line(capsys, verb):
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"jaxsparse {verb}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _hf_kernels(directory) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file as load

    return {k: v.astype(np.float64) for k, v in load(str(directory / "model.safetensors")).items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_prune_quantize_train_qa_extract_merge_check_sparsity(bases, qa_run, tmp_path, capsys):
    from jaxsparse import delta as delta_lib
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.convert.peft_lora import lora_config_from_peft, read_adapter_config
    from jaxsparse.methods import sqft
    from jaxsparse.models import from_pretrained
    from jaxsparse.quant.qa_base import read_grids

    _, sparse, gptq = bases
    run = qa_run  # the session's 4-step QA training run (tests/cli/conftest.py)
    capsys.readouterr()
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["quantization_aware"] is True and config["sparse_adapter"] is True
    assert config["lora_dropout"] == 0.1 and config["base_model_name_or_path"].endswith("gptq")

    # `jaxsparse eval` puts the saved adapter back on the GPTQ grid: the run's own final perplexity.
    assert main(["eval", "--config", str(run / "config.yaml"), "--adapter", str(adapter), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r.get("split") == "eval" and r["step"] == 4][-1]
    np.testing.assert_allclose(evaluated["perplexity"], final["perplexity"], rtol=1e-5)

    sub = tmp_path / "sub"
    cmd = ["extract-sub-adapter", "--adapter", str(adapter), "--version", "heuristic", "--output", str(sub)]
    assert main(cmd) == 0
    assert json.loads((sub / "adapter_config.json").read_text())["quantization_aware"] is True

    merged = tmp_path / "merged"
    argv = ["merge", "--model", str(gptq), "--non-quant-model", str(sparse), "--adapter", str(sub)]
    assert main([*argv, "--output", str(merged)]) == 0, capsys.readouterr().err
    assert "on its GPTQ grid (10 of 14 quantized layers re-quantized" in capsys.readouterr().out
    assert json.loads((merged / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert (merged / "tokenizer.json").is_file()

    # The tensors: the base's grid unchanged, untargeted layers bit-identical, targeted codes = oracle.
    base_t, out_t = load_file(str(gptq / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert sorted(base_t) == sorted(out_t)
    w_sparse = _hf_kernels(sparse)
    factors = load_file(str(sub / "adapter_model.safetensors"))
    _, base_layers = read_grids(gptq)
    _, out_layers = read_grids(merged)
    changed = 0
    for module, grid in base_layers.items():
        for name in ("qzeros", "scales", "g_idx"):
            np.testing.assert_array_equal(out_t[f"{module}.{name}"], base_t[f"{module}.{name}"])
        if not any(module.endswith(t) for t in TARGETS):
            np.testing.assert_array_equal(out_t[f"{module}.qweight"], base_t[f"{module}.qweight"])
            continue
        w = w_sparse[f"{module}.weight"].T  # (in, out)
        a = factors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)  # (r, in)
        b = factors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)  # (out, r)
        m = (w + 2.0 * (b @ a).T * (w != 0)).astype(np.float32)  # scale alpha / r = 2 at every rank
        g = np.asarray(grid.g_idx)
        s, z = np.asarray(grid.scales)[g], np.asarray(grid.zeros)[g]
        codes = np.clip(np.round(m / s) + z, 0, 15)
        np.testing.assert_array_equal(np.asarray(out_layers[module].codes), codes, err_msg=module)
        dq = s.astype(np.float64) * (codes - z)
        assert np.all(dq[w == 0] == 0), module  # every zero of the sparse base stays zero
        changed += int(not np.array_equal(out_t[f"{module}.qweight"], base_t[f"{module}.qweight"]))
    assert changed == 2 * len(TARGETS)

    # Read back (dequantized), the merged model gives the logits of our fake-quantized training forward.
    gq, sp = from_pretrained(str(gptq)), from_pretrained(str(sparse))
    cfg = lora_config_from_peft(read_adapter_config(sub))
    params = sqft.qa_base_params(gq.params, sp.params, cfg)
    ad = sqft.with_qa_grids(load_adapter(sub, model=dataclasses.replace(gq, params=params)), base_layers)
    ids = np.array([[1, 5, 9, 2, 30, 7, 3, 11]])
    mask = np.ones_like(ids)
    train_logits = gq.apply_fn(delta_lib.apply(params, ad, factored=True), ids, mask)
    back = from_pretrained(str(merged))
    merged_logits = back.apply_fn(back.params, ids, mask)
    np.testing.assert_allclose(np.asarray(merged_logits), np.asarray(train_logits), atol=1e-5, rtol=0)
    base_logits = gq.apply_fn(gq.params, ids, mask)
    assert np.abs(np.asarray(merged_logits) - np.asarray(base_logits)).max() > 1e-4  # the adapter acts

    # --max-shard-size shards the GPTQ checkpoint as transformers does; the tensors are the same.
    sharded = tmp_path / "sharded"
    assert main([*argv, "--output", str(sharded), "--max-shard-size", "10KB"]) == 0, capsys.readouterr().err
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (sharded / "model.safetensors").exists()
    from jaxsparse.models import read_checkpoint

    back_sharded = read_checkpoint(sharded)
    for shard in shards:  # at most 10 kB of tensors per file, unless one tensor alone is larger
        held = [k for k, f in index["weight_map"].items() if f == shard]
        assert len(held) == 1 or sum(back_sharded[k].nbytes for k in held) <= 10_000, shard
    assert sorted(back_sharded) == sorted(out_t)
    for key, tensor in out_t.items():
        np.testing.assert_array_equal(back_sharded[key], tensor, err_msg=key)
    capsys.readouterr()

    assert main(["check-sparsity", "--model", str(merged), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["sparsity"] >= 0.5  # the base's zeros kept (plus weights that round to 0)

    # --- bad input: one line, exit 2, nothing written -----------------------------------------
    bad = tmp_path / "bad"
    assert main([*argv[:3], *argv[5:], "--output", str(bad)]) == 2  # no --non-quant-model
    err = _one_line(capsys, "merge")
    assert f"adapter {sub} is quantization-aware (adapter_config.json): pass the GPTQ base as --model" in err
    assert err.endswith("and the sparse base as --non-quant-model") and not bad.exists()
    wrong = ["merge", "--model", str(sparse), "--non-quant-model", str(sparse), "--adapter", str(sub)]
    assert main([*wrong, "--output", str(bad)]) == 2  # --model is not the GPTQ base
    assert "is not a GPTQ checkpoint" in _one_line(capsys, "merge") and not bad.exists()
    other = tmp_path / "other"  # a Llama of another size as the non-quantized base
    config = transformers.AutoConfig.from_pretrained(sparse)
    config.intermediate_size = 64
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(other)
    capsys.readouterr()
    wrong = ["merge", "--model", str(gptq), "--non-quant-model", str(other), "--adapter", str(sub)]
    assert main([*wrong, "--output", str(bad)]) == 2
    err = _one_line(capsys, "merge")
    assert "has shape (64, 32) but --model" in err and not bad.exists(), err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--set", "model.non_quant_path=null"], "needs 'model.non_quant_path'"),
        (["--set", "adapter.quantization_aware=false"], "'model.non_quant_path' is only used with"),
        (["--set", "model.path={sparse}"], "is not a GPTQ checkpoint"),
        (["--set", "model.non_quant_path={gptq}"], "is itself a GPTQ checkpoint"),
        (["--set", "model.non_quant_path={other}"], "has shape"),
        (["--set", "method=lora"], "not supported by method 'lora'"),
    ],
)
def test_bad_train_configs_are_one_line_and_write_nothing(bases, tmp_path, capsys, extra, message):
    _, sparse, gptq = bases
    other = tmp_path / "other"
    if "{other}" in extra[-1]:
        config = transformers.AutoConfig.from_pretrained(sparse)
        config.intermediate_size = 64
        transformers.LlamaForCausalLM(config).save_pretrained(other)
        (other / "tokenizer.json").write_bytes((sparse / "tokenizer.json").read_bytes())
    extra = [e.format(sparse=sparse, gptq=gptq, other=other) for e in extra]
    run = tmp_path / "run"
    assert main(_train_argv(tmp_path, sparse, gptq, run, *extra)) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the "loading ..." log line
    assert last.startswith("jaxsparse train: error:") and message in last, last
    assert not run.exists()
