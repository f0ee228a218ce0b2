"""examples/sqft_pipeline.py end to end on a tiny 2-block Llama (tests/cli/tiny_llama.py): every stage
writes its outputs, the dense LoRA's merge loses the pruned base's zeros, the SparsePEFT merge keeps
every one of them (checked here against the checkpoints themselves, not only the script's report),
the perplexity is the NumPy NLL of transformers' logits, and --resume / the output rules behave."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from tests.cli.tiny_llama import TEXT, hf_weights, tiny_llama

ROOT = Path(__file__).resolve().parents[2]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def _load_script():
    spec = importlib.util.spec_from_file_location("sqft_pipeline", ROOT / "examples" / "sqft_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pipeline = _load_script()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    tiny_llama(model_dir).save_pretrained(model_dir)
    text = root / "docs.txt"
    text.write_text("\n".join(TEXT.split(" and ")))  # one document per line
    return model_dir, text


def _argv(tiny, out, *extra):
    model_dir, text = tiny
    return [
        "--output", str(out), "--model", str(model_dir), "--data", str(text), "--eval-size", "0.25",
        "--eval-blocks", "4", "--eval-seq-len", "16", "--eval-batch-size", "4",
        "--calib-samples", "4", "--calib-seq-len", "16", "--group-size", "16",
        "--r", "8", "--search-space", "8,6,4", "--steps", "4", "--batch-size", "2", "--seq-len", "16",
        "--learning-rate", "0.01", *extra,
    ]  # fmt: skip


def _linear_zeros(weights):
    return {
        k: int((v == 0).sum())
        for k, v in weights.items()
        if k.endswith(tuple(f"{m}.weight" for m in LINEARS))
    }


def _perplexity_oracle(model_dir, blocks):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(torch.tensor(blocks, dtype=torch.long)).logits.double().numpy()
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, blocks[:, 1:, None], axis=-1).mean()
    return math.exp(nll)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "out"
    results = pipeline.run(_argv(tiny, out, "--stages", "dense,pruned,lora,sparsepeft"))
    return out, results


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_stages_write_their_outputs_and_the_table(run):
    out, results = run
    assert list(results["rows"]) == ["dense", "pruned", "lora", "sparsepeft"]
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    table = (out / "table.md").read_text()
    assert (
        table.count("\n") == 2 + 4
        and "of the pruned base's zeros lost" in table
        and "every zero of the pruned base kept" in table
    )
    assert (out / "sqft_pipeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for stage in ("pruned", "lora", "sparsepeft"):
        assert (out / stage / "sparsity.json").is_file()
    assert (out / "lora" / "train.yaml").is_file() and (
        out / "sparsepeft" / "sub_adapter" / "adapter_config.json"
    ).is_file()
    # the heuristic sub-adapter: the middle of [8, 6, 4] on q/k/v, the full rank elsewhere
    assert results["rows"]["sparsepeft"]["ranks"] == {
        "down_proj": 8,
        "k_proj": 6,
        "q_proj": 6,
        "up_proj": 8,
        "v_proj": 6,
    }
    for row in results["rows"].values():
        assert row["wall_s"] > 0 and math.isfinite(row["perplexity"]) and row["perplexity"] > 1


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lora_loses_the_zeros_and_sparsepeft_keeps_them(run):
    out, results = run
    rows = results["rows"]
    base = hf_weights(out / "pruned" / "model")
    base_zeros = _linear_zeros(base)
    assert sum(base_zeros.values()) == rows["pruned"]["zeros"] == round(0.5 * rows["pruned"]["total"])
    # SparsePEFT: the very same zeros, and the adapted weights did change
    merged = hf_weights(out / "sparsepeft" / "merged")
    for key in base_zeros:
        assert np.array_equal(merged[key] == 0, base[key] == 0), key
    assert any(not np.array_equal(merged[k], base[k]) for k in base_zeros if k.endswith("q_proj.weight"))
    row = rows["sparsepeft"]
    assert row["zeros"] == row["base_zeros"] == row["base_zeros_kept"] == rows["pruned"]["zeros"]
    assert row["new_zeros"] == 0
    # dense LoRA: the targeted linears fill in, o_proj/gate_proj (no adapter) keep theirs
    lora = _linear_zeros(hf_weights(out / "lora" / "merged"))
    for key, zeros in lora.items():
        if key.endswith(tuple(f"{m}.weight" for m in TARGETS)):
            assert zeros < 0.01 * base_zeros[key], key
        else:
            assert zeros == base_zeros[key], key
    row = rows["lora"]
    assert row["zeros"] == sum(lora.values()) and row["base_zeros_kept"] < 0.5 * row["base_zeros"]
    assert rows["lora"]["by_module"]["q_proj"] < 0.01 and rows["lora"]["by_module"]["o_proj"] == 0.5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_perplexity_is_the_nll_of_transformers_logits(run, tiny):
    out, results = run
    p = pipeline.Pipeline(pipeline.parse_args(_argv(tiny, out)))
    blocks = p.held_out_blocks()
    assert blocks.shape == (4, 16)
    for stage, model_dir in (
        ("pruned", out / "pruned" / "model"),
        ("sparsepeft", out / "sparsepeft" / "merged"),
    ):
        expected = _perplexity_oracle(model_dir, blocks)
        assert results["rows"][stage]["perplexity"] == pytest.approx(expected, rel=1e-4), stage
    # the calibration text is exactly the training documents (the held-out ones are not in it)
    calibration = [
        json.loads(line)["text"] for line in (out / "data" / "calibration.jsonl").read_text().splitlines()
    ]
    split = p.split()
    assert calibration == list(split.train["text"]) and len(split.eval) > 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resume_reuses_finished_stages_and_the_output_rules(run, tiny, capsys):
    out, results = run
    before = (out / "lora" / "result.json").read_text()
    again = pipeline.run(_argv(tiny, out, "--stages", "pruned,lora", "--resume"))
    assert (out / "lora" / "result.json").read_text() == before and again["rows"] == results["rows"]
    assert "reusing" in capsys.readouterr().out
    # a non-empty DIR needs --resume/--overwrite; other settings cannot be resumed; a foreign DIR is refused
    assert pipeline.main(_argv(tiny, out, "--stages", "dense")) == 2
    assert "is not empty" in capsys.readouterr().err
    # a finished stage is reused only with its own settings; the base's settings hold for every stage
    assert pipeline.main(_argv(tiny, out, "--stages", "dense,lora", "--resume", "--steps", "5")) == 2
    assert "stage lora in" in (err := capsys.readouterr().err) and "other settings (steps)" in err
    assert pipeline.main(_argv(tiny, out, "--stages", "dense", "--resume", "--eval-blocks", "3")) == 2
    assert "settings differ" in (err := capsys.readouterr().err) and "(eval_blocks)" in err
    foreign = out.parent / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert pipeline.main(_argv(tiny, foreign, "--stages", "dense", "--overwrite")) == 2
    assert "not written by this script" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1
    assert pipeline.main(_argv(tiny, out / "x", "--stages", "dense,bogus")) == 2
    assert "--stages" in capsys.readouterr().err and not (out / "x").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_qa_stage_is_sparse_and_on_the_gptq_grid(run, tiny):
    reason = pipeline.qa_unavailable()
    if reason:
        pytest.skip(f"QA-SparsePEFT not available in this jaxsparse: {reason}")
    out, _ = run
    results = pipeline.run(_argv(tiny, out, "--stages", "qa", "--resume"))
    row = results["rows"]["qa"]
    grid = row["grid"]
    assert grid["same_grid"] and grid["layers"] == 2 * len(LINEARS) and grid["codes_changed"] > 0
    assert row["base_zeros_kept"] == row["base_zeros"] == results["rows"]["pruned"]["zeros"]
    assert math.isfinite(row["perplexity"]) and math.isfinite(row["gptq_base_perplexity"])
    # independently of the script: dequantize the merged codes (w = s[g] * (q - z[g])) and look at
    # every zero of the pruned base
    from safetensors.numpy import load_file

    def unpack(words):  # 8 four-bit codes per int32 word along axis 0, the first in the lowest bits
        w = words.view(np.uint32).astype(np.int64)
        return np.stack([(w >> (4 * j)) & 15 for j in range(8)], axis=1).reshape(-1, w.shape[1])

    base = hf_weights(out / "pruned" / "model")
    state = load_file(str(out / "qa" / "merged" / "model.safetensors"))
    qconfig = json.loads((out / "qa" / "merged" / "config.json").read_text())["quantization_config"]
    assert qconfig["bits"] == 4 and qconfig.get("checkpoint_format", "gptq") == "gptq"
    checked = 0
    for key, w in base.items():
        module = key[: -len(".weight")]
        if f"{module}.qweight" not in state:
            continue
        codes = unpack(state[f"{module}.qweight"])  # (in, out)
        zeros = unpack(state[f"{module}.qzeros"].T).T + 1  # (groups, out); the classic format stores z - 1
        g = state[f"{module}.g_idx"].astype(np.int64)
        dequant = state[f"{module}.scales"].astype(np.float32)[g] * (codes - zeros[g])
        assert np.all(dequant.T[w == 0] == 0), key
        checked += 1
    assert checked == 2 * len(LINEARS)


def test_qa_stage_refused_while_qa_is_missing(tiny, tmp_path, capsys):
    if pipeline.qa_unavailable() is None:
        pytest.skip("QA-SparsePEFT is available: the qa stage runs (test above)")
    assert pipeline.main(_argv(tiny, tmp_path / "o", "--stages", "qa")) == 2
    assert "stage qa needs QA-SparsePEFT" in capsys.readouterr().err and not (tmp_path / "o").exists()
