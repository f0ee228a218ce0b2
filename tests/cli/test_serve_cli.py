"""Many adapters from the command line: `jaxsparse classify --adapter A --adapter B ...` and
`jaxsparse generate`, one batch with per-row adapters (jaxsparse.serve), no merge.

Every row of a multi-adapter call equals the model merged with that row's adapter alone: the
classifier's probabilities (<= 1e-5, fp32) against the single-adapter `classify` (which merges) and
the generated tokens (exact) against `generate` on the merged parameters. The adapters are random
(noised) so that they disagree and a wrong adapter on a row would show. Bad input is one line, exit 2.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxsparse import adapter_io, models
from jaxsparse import delta as delta_lib
from jaxsparse import merge as merge_lib
from jaxsparse.cli import main
from jaxsparse.methods import lora, shira, sparta
from jaxsparse.models.generate import generate
from tests.cli.tiny_llama import tiny_llama

_spec = importlib.util.spec_from_file_location(
    "_trainer_helpers_serve", Path(__file__).resolve().parents[1] / "test_trainer.py"
)
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

SENTENCES = ["the movie was good", "awful and dull plot", "quite superb acting and fun"]
PROMPTS = ["the quick brown fox", "birds sing in the tall green trees near"]


def _noisy(adapter, seed: int, scale: float):
    leaves = delta_lib.trainable(adapter)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(leaves))))
    noisy = jax.tree.map(lambda x: x + scale * jax.random.normal(next(keys), x.shape, x.dtype), leaves)
    return delta_lib.with_trainable(adapter, noisy)


def _one_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"jaxsparse {verb}: error: ") and err.count("\n") == 1, err
    return err


def _json_rows(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


# --------------------------------------------------------------------------- classify


def _save_classifier_adapter(adapter, out: Path, model, model_dir: Path, labels: list[str]) -> str:
    """What `jaxsparse train` writes for seq_cls: the adapter, config.json with id2label, tokenizer."""
    adapter_io.save_adapter(adapter, out, model=model, base_model_name_or_path=str(model_dir))
    if not (out / "config.json").exists():
        config = models.from_pretrained(
            model_dir, task="seq_cls", num_labels=len(labels), id2label=dict(enumerate(labels))
        ).config
        config.architectures = ["BertForSequenceClassification"]
        config.save_pretrained(str(out))
    models.load_tokenizer(model_dir).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_classify").absolute()
    model_dir, _ = helpers.write_tiny_bert(root)
    labels = ["neg", "pos"]
    model = models.from_pretrained(model_dir, task="seq_cls", num_labels=2, id2label=dict(enumerate(labels)))
    key = jax.random.key(0)
    made = {
        "shira": _noisy(
            shira.init(
                model.params,
                shira.ShiraConfig(
                    r=2,
                    target_modules=["query", "value", "dense"],
                    modules_to_save=["classifier"],
                    task_type="SEQ_CLS",  # as `jaxsparse train` sets it
                ),
                key,
            ),
            1,
            0.5,
        ),
        "sparta": _noisy(
            sparta.init(model.params, sparta.SpartaConfig(density=0.1, task_type="SEQ_CLS"), key), 2, 0.3
        ),
        "lora": _noisy(
            lora.init(
                model.params,
                lora.LoraConfig(r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"]),
                key,
            ),
            3,
            0.5,
        ),
    }
    dirs = {
        name: _save_classifier_adapter(a, root / name, model, model_dir, labels) for name, a in made.items()
    }
    three = models.from_pretrained(model_dir, task="seq_cls", num_labels=3)
    dirs["three_labels"] = _save_classifier_adapter(
        shira.init(three.params, shira.ShiraConfig(r=1, modules_to_save=["classifier"]), key),
        root / "three",
        three,
        model_dir,
        ["a", "b", "c"],
    )
    return root, model_dir, dirs


def test_classify_rows_equal_each_adapter_merged_alone(classifiers, capsys):
    _, _, dirs = classifiers
    names = ["shira", "sparta", "lora"]
    argv = ["classify", "--json"]
    for name in names:
        argv += ["--adapter", dirs[name]]
    assert main([*argv, *SENTENCES]) == 0
    rows = _json_rows(capsys)
    # prompt-major: each sentence once per adapter, adapters in --adapter order
    assert [(r["adapter"], r["text"]) for r in rows] == [(dirs[n], s) for s in SENTENCES for n in names]
    seen = set()
    for name in names:
        assert main(["classify", "--json", "--adapter", dirs[name], *SENTENCES]) == 0
        alone = _json_rows(capsys)
        mine = [r for r in rows if r["adapter"] == dirs[name]]
        for got, want in zip(mine, alone, strict=True):
            assert got["label"] == want["label"]
            np.testing.assert_allclose(
                list(got["probabilities"].values()), list(want["probabilities"].values()), atol=1e-5, rtol=0
            )
        seen.add(tuple(round(v, 4) for r in alone for v in r["probabilities"].values()))
    assert len(seen) == len(names)  # the adapters disagree, so a row served the wrong one would fail


def test_classify_text_output_names_the_adapter(classifiers, capsys):
    _, _, dirs = classifiers
    assert main(["classify", "--adapter", dirs["shira"], "--adapter", dirs["lora"], SENTENCES[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [dirs["shira"], dirs["lora"]]
    assert all(line.split("\t")[1] in ("neg", "pos") and line.endswith(SENTENCES[0]) for line in lines)


def test_classify_refuses_heads_of_different_sizes(classifiers, capsys):
    _, _, dirs = classifiers
    assert main(["classify", "--adapter", dirs["shira"], "--adapter", dirs["three_labels"], "good"]) == 2
    err = _one_line(capsys, "classify")
    assert "classifier heads of different sizes cannot share one batch" in err
    assert "has 2 labels" in err and "has 3" in err


def test_classify_refuses_adapters_of_different_base_models(classifiers, capsys):
    root, model_dir, dirs = classifiers
    other_base = root / "other-base"
    if not other_base.exists():
        shutil.copytree(model_dir, other_base)
    moved = root / "shira_other"
    if not moved.exists():
        shutil.copytree(dirs["shira"], moved)
        cfg = json.loads((moved / "adapter_config.json").read_text())
        (moved / "adapter_config.json").write_text(
            json.dumps({**cfg, "base_model_name_or_path": str(other_base)})
        )
    assert main(["classify", "--adapter", dirs["shira"], "--adapter", str(moved), "good"]) == 2
    err = _one_line(capsys, "classify")
    assert "adapters of different base models cannot share one batch" in err and str(moved) in err
    # --model serves both on one base (the copy is the same model)
    assert (
        main(
            [
                "classify",
                "--model",
                str(model_dir),
                "--adapter",
                dirs["shira"],
                "--adapter",
                str(moved),
                "good",
            ]
        )
        == 0
    )
    capsys.readouterr()


def test_classify_refuses_a_missing_adapter(classifiers, tmp_path, capsys):
    _, _, dirs = classifiers
    assert main(["classify", "--adapter", dirs["shira"], "--adapter", str(tmp_path / "nope"), "good"]) == 2
    assert f"{tmp_path / 'nope'}: adapter directory not found" in _one_line(capsys, "classify")


# --------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_generate").absolute()
    base = root / "base"
    tiny_llama(base).save_pretrained(base)
    model = models.from_pretrained(base, task="causal_lm")
    key = jax.random.key(4)
    all_linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    made = {
        "shira": _noisy(
            shira.init(model.params, shira.ShiraConfig(r=2, target_modules=all_linears), key), 5, 1.0
        ),
        "shira_few": _noisy(
            shira.init(model.params, shira.ShiraConfig(r=2, target_modules=["q_proj", "down_proj"]), key),
            6,
            1.0,
        ),
        "lora": _noisy(
            lora.init(
                model.params, lora.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"]), key
            ),
            7,
            1.0,
        ),
    }
    dirs = {}
    for name, adapter in made.items():
        adapter_io.save_adapter(adapter, root / name, model=model, base_model_name_or_path=str(base))
        dirs[name] = str(root / name)
    return root, base, model, dirs


def _merged_generation(model, adapter_dir: str, prompt: str, tokenizer, max_new: int) -> list[int]:
    adapter = adapter_io.load_adapter(adapter_dir, model=model)
    params = merge_lib.merge(model.params, adapter)[0]
    ids = np.asarray([tokenizer(prompt)["input_ids"]])
    out = np.asarray(generate(model, ids, max_new_tokens=max_new, params=params))[0, ids.shape[1] :]
    eos = model.config.eos_token_id
    tokens = []
    for t in out:
        tokens.append(int(t))
        if int(t) == eos:
            break
    return tokens


def test_generate_rows_equal_each_adapter_merged_alone(causal, tmp_path, capsys):
    _, base, model, dirs = causal
    names = ["shira", "shira_few", "lora"]
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[1]}\n\n")  # a blank line is skipped
    argv = [
        "generate",
        "--json",
        "--max-new-tokens",
        "6",
        "--prompt",
        PROMPTS[0],
        "--input",
        str(prompts_file),
    ]
    for name in names:
        argv += ["--adapter", dirs[name]]
    assert main(argv) == 0
    rows = _json_rows(capsys)
    assert [(r["adapter"], r["prompt"]) for r in rows] == [(dirs[n], p) for p in PROMPTS for n in names]
    tokenizer = models.load_tokenizer(base)
    distinct = set()
    for row in rows:
        want = _merged_generation(model, row["adapter"], row["prompt"], tokenizer, 6)
        assert row["tokens"] == want, row
        assert row["completion"] == tokenizer.decode(want, skip_special_tokens=True)
        distinct.add(tuple(want))
    assert len(distinct) > 2  # the adapters change the continuation, so a misrouted row would fail

    # one adapter (merged once) gives the same rows as that adapter among others
    assert (
        main(
            ["generate", "--json", "--max-new-tokens", "6", "--adapter", dirs["lora"], "--prompt", PROMPTS[0]]
        )
        == 0
    )
    (alone,) = _json_rows(capsys)
    assert alone["tokens"] == rows[2]["tokens"]


def test_generate_batches_of_a_given_size_give_the_same_rows(causal, capsys):
    _, _, _, dirs = causal
    argv = ["generate", "--json", "--max-new-tokens", "4", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    argv += ["--adapter", dirs["shira"], "--adapter", dirs["lora"]]
    assert main(argv) == 0
    full = _json_rows(capsys)
    assert main([*argv, "--batch-size", "3"]) == 0  # 4 rows: a call of 3 and a padded call of 1
    assert _json_rows(capsys) == full


def test_generate_text_output(causal, capsys):
    _, _, _, dirs = causal
    assert (
        main(
            [
                "generate",
                "--max-new-tokens",
                "3",
                "--adapter",
                dirs["shira"],
                "--adapter",
                dirs["lora"],
                "--prompt",
                "the cat",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert [line.split("\t")[:2] for line in lines] == [[dirs["shira"], "the cat"], [dirs["lora"], "the cat"]]


def test_generate_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in ("--adapter", "--prompt", "--input", "--max-new-tokens", "--json"):
        assert option in out


def test_generate_errors_are_one_line(causal, classifiers, tmp_path, capsys):
    root, base, _, dirs = causal
    ok = ["--adapter", dirs["shira"]]

    def refused(argv, *phrases):
        assert main(["generate", *argv]) == 2
        err = _one_line(capsys, "generate")
        for phrase in phrases:
            assert phrase in err, err

    refused([*ok, "--prompt", "the", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1")
    refused([*ok, "--prompt", "  "], "prompt 1 of 1 is empty")
    refused(ok, "no prompts")
    refused([*ok, "--input", str(tmp_path / "missing.txt")], "missing.txt")
    refused(["--adapter", str(tmp_path / "nope"), "--prompt", "the"], "adapter directory not found")
    refused(
        [*ok, "--adapter", classifiers[2]["shira"], "--prompt", "the"], "task_type 'SEQ_CLS'", "causal-LM"
    )
    refused([*ok, "--adapter", classifiers[2]["sparta"], "--prompt", "the"], "SpaRTA classification adapter")
    refused(
        [*ok, "--prompt", "the", "--max-new-tokens", "100"], "exceeds the model's max_position_embeddings 64"
    )
    # an adapter made for a different base model: different shapes
    other = root / "wide"
    if not other.exists():
        wide = models.init_params(
            __import__("transformers").LlamaConfig(
                vocab_size=64,
                hidden_size=16,
                intermediate_size=24,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=64,
            ),
            task="causal_lm",
        )
        adapter = shira.init(
            wide.params, shira.ShiraConfig(r=1, target_modules=["q_proj"]), jax.random.key(0)
        )
        adapter_io.save_adapter(adapter, other, params=wide.params, base_model_name_or_path=str(base))
    refused([*ok, "--adapter", str(other), "--prompt", "the"], str(other), "different base model")
