"""`jaxsparse prune` and `jaxsparse check-sparsity` end to end on a tiny Llama saved as a HF directory
(with a tiny trained tokenizer): transformers loads the output, rows hold the asked zeros, and bad
input is one line on stderr, exit 2, and no output left behind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxsparse.cli import main
from tests.cli.tiny_llama import TEXT, hf_weights, tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(root).save_pretrained(root)
    calib = root.parent / "calib.txt"
    calib.write_text(TEXT)
    return root


def test_wanda_unstructured_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(model_dir), "--method", "wanda", "--sparsity", "0.5"]
    argv += ["--calibration", str(model_dir.parent / "calib.txt"), "--samples", "4", "--seq-len", "16"]
    assert main([*argv, "--output", str(out)]) == 0
    assert "50.00% of their weights are zero" in capsys.readouterr().out
    before, after = hf_weights(model_dir), hf_weights(out)
    for name, w in after.items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert ((w == 0).sum(axis=1) == w.shape[1] // 2).all(), name
        else:  # embeddings, norms, head untouched
            np.testing.assert_array_equal(w, before[name], err_msg=name)
    assert (out / "tokenizer.json").is_file()
    info = json.loads((out / "pruning.json").read_text())
    assert info["settings"]["calibration"]["samples"] == 4 and info["report"]["overall"]["sparsity"] == 0.5

    assert main(["check-sparsity", "--model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall"]["sparsity"] == 0.5 and len(report["layers"]) == 14
    assert [b["name"] for b in report["blocks"]] == ["model.layers.0", "model.layers.1"]
    assert main(["check-sparsity", "--model", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "50.00%" in table

    # --overwrite replaces our own previous output
    assert main([*argv, "--output", str(out), "--overwrite", "--pattern", "2:4", "--sparsity", "0.5"]) == 0
    capsys.readouterr()
    assert main(["check-sparsity", "--model", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {layer["nm_pattern"] for layer in report["layers"]} == {"2:4"}


def test_magnitude_4_8_targets(model_dir, tmp_path, capsys):
    out = tmp_path / "mag"
    argv = ["prune", "--model", str(model_dir), "--method", "magnitude", "--pattern", "4:8"]
    assert main([*argv, "--targets", "down_proj", "--output", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [layer["name"] for layer in report["layers"] if layer["zeros"]] == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    w = hf_weights(out)["model.layers.0.mlp.down_proj.weight"]  # (out, in): groups of 8 inputs per row
    assert ((w.reshape(w.shape[0], -1, 8) != 0).sum(-1) <= 4).all()


@pytest.mark.parametrize(
    ("extra", "calib_text", "message"),
    [
        (["--sparsity", "1.0"], None, r"sparsity 1.0 must lie in [0, 1)"),
        (["--sparsity", "-0.1"], None, r"sparsity -0.1 must lie in [0, 1)"),
        (["--pattern", "5:4"], None, "N (5) must not exceed M (4)"),
        (["--pattern", "2:5"], None, "M=5 does not divide the input width"),
        (["--sparsity", "0.5"], "", "is empty"),
        (["--sparsity", "0.5"], "too short", "fewer than one sequence of seq_len=16"),
        (
            ["--sparsity", "0.5", "--targets", "lm_head"],
            None,
            "not linear layers inside the transformer blocks",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(model_dir, tmp_path, capsys, extra, calib_text, message):
    calib = model_dir.parent / "calib.txt"
    if calib_text is not None:
        calib = tmp_path / "bad-calib.txt"
        calib.write_text(calib_text)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(model_dir), "--method", "wanda", "--calibration", str(calib)]
    argv += ["--samples", "2", "--seq-len", "16", "--output", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar: one line
    assert err.startswith("jaxsparse prune: error:") and message in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_refuses_a_non_empty_output(model_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["prune", "--model", str(model_dir), "--method", "magnitude", "--sparsity", "0.5"]
    assert main([*argv, "--output", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main([*argv, "--output", str(out), "--overwrite"]) == 2
    assert "not written by jaxsparse" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_check_sparsity_missing_model(tmp_path, capsys):
    assert main(["check-sparsity", "--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("jaxsparse check-sparsity: error:")
