"""`jaxsparse quantize` end to end on a tiny Llama HF directory (with a tiny trained tokenizer): the GPTQ
directory loads back to exactly the values of the --dequantized one (which transformers loads), pruned
zeros survive, and bad input is one line on stderr, exit 2, and no output left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxsparse.cli import main
from jaxsparse.models import from_pretrained
from jaxsparse.tree import leaf_paths
from tests.cli.tiny_llama import TEXT, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(root)
    with torch.no_grad():  # a pruned base: half of every block linear is zero
        for name, p in model.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                p.mul_((torch.rand(p.shape) > 0.5).float())
    model.save_pretrained(root)
    (root.parent / "calib.txt").write_text(TEXT)
    return root


def test_gptq_and_dequantized_outputs_agree(model_dir, tmp_path, capsys):
    argv = ["quantize", "--model", str(model_dir), "--method", "gptq", "--bits", "4", "--group-size", "16"]
    argv += [
        "--calibration",
        str(model_dir.parent / "calib.txt"),
        "--samples",
        "4",
        "--seq-len",
        "16",
        "--sym",
    ]
    gptq_dir, plain_dir = tmp_path / "gptq", tmp_path / "plain"
    assert main([*argv, "--output", str(gptq_dir)]) == 0
    assert "quantized 14 layers" in capsys.readouterr().out
    assert main([*argv, "--output", str(plain_dir), "--dequantized"]) == 0
    capsys.readouterr()
    config = json.loads((gptq_dir / "config.json").read_text())
    assert config["quantization_config"]["sym"] is True and config["quantization_config"]["group_size"] == 16
    assert "quantization_config" not in json.loads((plain_dir / "config.json").read_text())
    assert (gptq_dir / "tokenizer.json").is_file() and (plain_dir / "tokenizer.json").is_file()
    info = json.loads((gptq_dir / "quantization.json").read_text())["settings"]
    assert info["method"] == "gptq" and info["calibration"]["samples"] == 4 and info["layers"] == 14
    assert "model.layers.0.self_attn.q_proj.qweight" in load_file(gptq_dir / "model.safetensors")

    a, b = from_pretrained(gptq_dir), from_pretrained(plain_dir)
    for path, leaf in leaf_paths(a.params).items():
        np.testing.assert_array_equal(leaf, leaf_paths(b.params)[path], err_msg=path)
    before = {
        k: v.numpy()
        for k, v in transformers.AutoModelForCausalLM.from_pretrained(model_dir).state_dict().items()
    }
    after = transformers.AutoModelForCausalLM.from_pretrained(plain_dir).state_dict()
    for name, w in after.items():
        w = w.numpy()
        if ".layers." in name and name.endswith("proj.weight"):
            assert np.all(w[before[name] == 0] == 0), name  # pruned zeros survive
            assert len(np.unique(w[0, :16])) <= 16  # one group of a row: at most 2**4 values
        else:
            np.testing.assert_array_equal(w, before[name], err_msg=name)

    # An already quantized model is refused.
    assert (
        main(["quantize", "--model", str(gptq_dir), "--method", "rtn", "--output", str(tmp_path / "again")])
        == 2
    )
    assert "already quantized (quantization_config.quant_method 'gptq'" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_rtn_overwrite_and_refusals(model_dir, tmp_path, capsys):
    out = tmp_path / "rtn"
    argv = ["quantize", "--model", str(model_dir), "--method", "rtn", "--bits", "8", "--group-size", "-1"]
    assert main([*argv, "--output", str(out)]) == 0
    assert main([*argv, "--output", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([*argv, "--output", str(out), "--overwrite", "--bits", "2", "--group-size", "16"]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 2


@pytest.mark.parametrize(
    ("extra", "calib_text", "message"),
    [
        (["--bits", "3"], None, "bits must be one of (2, 4, 8), got 3"),
        (["--group-size", "24"], None, "group size 24 does not divide the input width 32"),
        (["--group-size", "0"], None, "group size must be a positive integer or -1"),
        (["--damp-percent", "1.5"], None, "--damp-percent must be in [0, 1)"),
        ([], "", "is empty"),
        ([], "too short", "fewer than one sequence of seq_len=16"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(model_dir, tmp_path, capsys, extra, calib_text, message):
    calib = model_dir.parent / "calib.txt"
    if calib_text is not None:
        calib = tmp_path / "bad-calib.txt"
        calib.write_text(calib_text)
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(model_dir), "--method", "gptq", "--calibration", str(calib)]
    argv += ["--group-size", "16", "--samples", "2", "--seq-len", "16", "--output", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any calibration progress bar
    assert err.startswith("jaxsparse quantize: error:") and message in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
