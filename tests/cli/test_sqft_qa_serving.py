"""A quantization-aware (QA-SparsePEFT) adapter in `generate`, `classify`, `info` and `export`.

`generate` / `classify` with the GPTQ base as --model and the sparse base as --non-quant-model compute
what `jaxsparse merge --non-quant-model` writes: their logits equal the merged GPTQ checkpoint's
read back by transformers' layout (<= 1e-5, float32) and their greedy tokens / probabilities match,
while the old silent treatment (plain SparsePEFT on the dequantized GPTQ base) does not. Without
--non-quant-model a QA adapter is refused in one line naming the flag and adapter_config.json.
`info` states the flag and `export --format peft` keeps it. The tiny bases and the 4-step QA
training run are the session's (tests/cli/conftest.py), shared with test_sqft_qa_cli.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

from jaxsparse import adapter_io, models
from jaxsparse import delta as delta_lib
from jaxsparse.cli import main

PROMPTS = ["the quick brown fox", "birds sing in the tall green trees near"]
SENTENCES = ["the cat sleeps on the warm mat", "birds sing near the quiet river bank every morning"]
LABELS = ["neg", "pos"]
NEW_TOKENS = 6


def _refusal(adapter) -> str:
    return (
        f"adapter {adapter} is quantization-aware (adapter_config.json): pass the GPTQ base as --model and "
        "the sparse base as --non-quant-model"
    )


def _one_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"jaxsparse {verb}: error: ") and err.count("\n") == 1, err
    return err.strip()


def _left_padded(tokenizer, prompts):
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    width = max(map(len, encoded))
    ids = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, seq in enumerate(encoded):
        ids[i, width - len(seq) :], mask[i, width - len(seq) :] = seq, 1
    return ids, mask


@pytest.fixture(scope="module")
def merged_lm(qa_bases, qa_run, tmp_path_factory):
    """The QA training run's adapter merged into its GPTQ base (`jaxsparse merge --non-quant-model`)."""
    _, sparse, gptq = qa_bases
    merged = tmp_path_factory.mktemp("qa_serving") / "merged"
    argv = [
        "merge",
        "--model",
        str(gptq),
        "--non-quant-model",
        str(sparse),
        "--adapter",
        str(qa_run / "adapter"),
    ]
    assert main([*argv, "--output", str(merged)]) == 0
    return merged


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_generate_with_non_quant_model_equals_the_merged_gptq_checkpoint(qa_bases, qa_run, merged_lm, capsys):
    from jaxsparse.cli.serving import load_served, load_served_quantization_aware

    _, sparse, gptq = qa_bases
    adapter = qa_run / "adapter"
    argv = ["generate", "--adapter", str(adapter), "--model", str(gptq), "--non-quant-model", str(sparse)]
    for p in PROMPTS:
        argv += ["--prompt", p]
    capsys.readouterr()
    assert main([*argv, "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS

    # Every row, prompt (left-padded) then its new tokens, through the merged checkpoint read back.
    back = models.from_pretrained(str(merged_lm))  # the merged GPTQ checkpoint, dequantized on load
    prompt_ids, prompt_mask = _left_padded(models.load_tokenizer(str(merged_lm)), PROMPTS)
    width = prompt_ids.shape[1]
    new = np.zeros((len(rows), NEW_TOKENS), np.int32)
    for i, row in enumerate(rows):
        assert len(row["tokens"]) == NEW_TOKENS or row["stopped_at_eos"]
        new[i, : len(row["tokens"])] = row["tokens"]  # after an eos: any token (not compared)
    ids = np.concatenate([prompt_ids, new], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(new)], axis=1)
    want = np.asarray(back.apply_fn(back.params, ids, mask))
    # Greedy without the KV cache: each new token is the argmax of the merged model's logits.
    for i, row in enumerate(rows):
        n = len(row["tokens"])
        assert np.argmax(want[i, width - 1 : width - 1 + n], -1).tolist() == row["tokens"], PROMPTS[i]

    # The weights generate serves give the merged checkpoint's logits ...
    served = load_served_quantization_aware(str(adapter), str(gptq), str(sparse), verb="generate")
    got = np.asarray(served.model.apply_fn(served.params, ids, mask))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # (without --model: the GPTQ base the adapter records, the same weights)
    recorded = load_served_quantization_aware(str(adapter), None, str(sparse), verb="generate")
    jax.tree.map(np.testing.assert_array_equal, recorded.params, served.params)
    # ... which the old treatment (plain SparsePEFT on the dequantized GPTQ base) does not.
    naive = load_served([str(adapter)], models.from_pretrained(str(gptq)))
    assert np.abs(np.asarray(naive.model.apply_fn(naive.params, ids, mask)) - want).max() > 1e-3


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_classify_with_non_quant_model_equals_the_merged_gptq_checkpoint(qa_bases, tmp_path, capsys):
    from jaxsparse.methods import sqft
    from jaxsparse.quant.qa_base import read_grids

    _, sparse, gptq = qa_bases
    id2label = dict(enumerate(LABELS))
    gq = models.from_pretrained(str(gptq), task="seq_cls", num_labels=2, id2label=id2label)
    sp = models.from_pretrained(str(sparse), task="seq_cls", num_labels=2, id2label=id2label)
    cfg = sqft.SQFTConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj"],
        task_type="SEQ_CLS",
        sparse_adapter=True,
        quantization_aware=True,
    )
    params = sqft.qa_base_params(gq.params, sp.params, cfg)
    _, grids = read_grids(gptq)
    adapter = sqft.init(params, cfg, jax.random.key(0), grids=grids)
    # A random adapter (B starts at zero) and head, so that a wrong base or grid would show.
    leaves = delta_lib.trainable(adapter)
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(leaves))))
    noisy = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(keys), x.shape, x.dtype), leaves)
    adapter = delta_lib.with_trainable(adapter, noisy)
    out = tmp_path / "adapter"
    adapter_io.save_adapter(
        adapter, out, model=dataclasses.replace(gq, params=params), base_model_name_or_path=str(gptq)
    )
    config = gq.config
    config.architectures = ["LlamaForSequenceClassification"]
    config.save_pretrained(str(out))  # the labels, as `jaxsparse train` writes them beside the adapter
    assert json.loads((out / "adapter_config.json").read_text())["quantization_aware"] is True
    # The Python API cannot take the two bases: it refuses rather than serve plain SparsePEFT.
    from jaxsparse.inference import AdapterLoadError, SequenceClassifier

    with pytest.raises(
        AdapterLoadError, match=r"adapter_config.json: a quantization-aware .* --non-quant-model"
    ):
        SequenceClassifier.from_adapter(out, str(sparse))

    def probabilities(*argv):
        capsys.readouterr()
        assert main(["classify", *argv, "--json", *SENTENCES]) == 0, capsys.readouterr().err
        rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        # In label-id order (the merged checkpoint's config names its labels LABEL_0, LABEL_1).
        return np.array([list(r["probabilities"].values()) for r in rows])

    got = probabilities("--adapter", str(out), "--model", str(gptq), "--non-quant-model", str(sparse))
    merged = tmp_path / "merged"
    argv = ["merge", "--model", str(gptq), "--non-quant-model", str(sparse), "--adapter", str(out)]
    assert main([*argv, "--output", str(merged)]) == 0, capsys.readouterr().err
    want = probabilities("--adapter", str(merged))  # a full model directory: classified as it is
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert np.abs(want - 0.5).max() > 0.05  # the random head decides (not a constant 50/50)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_quantization_aware_adapter_without_its_bases_is_refused(qa_bases, qa_run, tmp_path, capsys):
    _, sparse, gptq = qa_bases
    adapter = qa_run / "adapter"
    assert main(["generate", "--adapter", str(adapter), "--prompt", "the quick"]) == 2
    assert _one_line(capsys, "generate") == f"jaxsparse generate: error: {_refusal(adapter)}"
    assert main(["classify", "--adapter", str(adapter), "--model", str(gptq), "the cat"]) == 2
    assert _one_line(capsys, "classify") == f"jaxsparse classify: error: {_refusal(adapter)}"

    # Beside another adapter (per-row serving) a QA adapter cannot run: refused, naming it.
    plain = tmp_path / "plain"  # the same factors without the flag: plain SparsePEFT
    shutil.copytree(adapter, plain)
    raw = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**raw, "quantization_aware": False}))
    two = ["--adapter", str(plain), "--adapter", str(adapter), "--non-quant-model", str(sparse)]
    assert main(["generate", *two, "--prompt", "the quick"]) == 2
    err = _one_line(capsys, "generate")
    assert f"adapter {adapter} is quantization-aware" in err and "generate it alone" in err, err

    # --non-quant-model with an adapter that is not quantization-aware: refused, not ignored.
    assert main(["generate", "--adapter", str(plain), "--non-quant-model", str(sparse), "--prompt", "a"]) == 2
    err = _one_line(capsys, "generate")
    assert (
        f"--non-quant-model is only for a quantization_aware (QA-SparsePEFT) adapter; {plain} is not one"
        in err
    )

    # The bases swapped: --model must be the GPTQ checkpoint, --non-quant-model must not be one.
    swapped = ["--adapter", str(adapter), "--model", str(sparse), "--non-quant-model", str(gptq)]
    assert main(["generate", *swapped, "--prompt", "a"]) == 2
    assert f"--non-quant-model {gptq} is a GPTQ checkpoint" in _one_line(capsys, "generate")
    wrong = ["--adapter", str(adapter), "--model", str(sparse), "--non-quant-model", str(sparse)]
    assert main(["generate", *wrong, "--prompt", "a"]) == 2
    assert f"--model {str(sparse)!r} is not a GPTQ checkpoint" in _one_line(capsys, "generate")


def test_info_states_and_export_keeps_quantization_aware(qa_bases, qa_run, tmp_path, capsys):
    from safetensors.numpy import load_file

    _, _, gptq = qa_bases
    adapter = qa_run / "adapter"
    capsys.readouterr()
    assert main(["info", str(adapter), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "sqft" and info["quantization_aware"] is True and info["sparse_adapter"] is True
    assert main(["info", str(adapter)]) == 0
    text = capsys.readouterr().out
    assert "sqft flags:   sparse_adapter=True, quantization_aware=True (QA-SparsePEFT: needs the GPTQ" in text

    original = load_file(str(adapter / "adapter_model.safetensors"))
    for name, extra in [("no_model", []), ("with_model", ["--model", str(gptq)])]:
        out = tmp_path / name
        assert (
            main(["export", "--adapter", str(adapter), "--format", "peft", *extra, "--output", str(out)]) == 0
        )
        raw = json.loads((out / "adapter_config.json").read_text())
        assert raw["quantization_aware"] is True and raw["sparse_adapter"] is True, name
        exported = load_file(str(out / "adapter_model.safetensors"))
        assert sorted(exported) == sorted(original)
        for key, value in original.items():
            np.testing.assert_array_equal(exported[key], value, err_msg=f"{name}: {key}")
    capsys.readouterr()
    assert main(["generate", "--adapter", str(tmp_path / "no_model"), "--prompt", "a"]) == 2
    assert _refusal(tmp_path / "no_model") in _one_line(capsys, "generate")
