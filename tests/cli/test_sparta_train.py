"""`jaxsparse train` with SpaRTA in its authors' terms on a tiny Llama classifier: `adapter.sparsity`,
two tokens added with `model.new_tokens` and trained whole (`adapter.trainable_tokens`), delta
dropout; their classifier loader reads the run's adapter (and its `jaxsparse export`) and gives our
logits; `jaxsparse info` reports their sparsity; bad input is one line on stderr, exit 2."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.cli import main
from tests.convert.test_sparta import BF16_LOGIT_TOL, TINY_VOCAB, _tiny_llama_dir

torch = pytest.importorskip("torch")
peft_sparta = pytest.importorskip("peft_sparta")

NEW = ["<q>", "<ans>"]


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparta-cli")
    base = _tiny_llama_dir(root / "base", tie=True)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer.pad_token = "t0"  # classification batches are padded
    tokenizer.save_pretrained(base)
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for i in range(40):
        words = " ".join(f"t{w}" for w in rng.integers(2, TINY_VOCAB, size=6))
        label = "pos" if i % 2 else "neg"
        rows.append(f"<q> {words} <ans> {'t5' if label == 'pos' else 't6'},{label}")
    data = root / "data.csv"
    data.write_text("\n".join(rows) + "\n")
    return base, data


def _argv(base, data, out, *sets):
    argv = [
        "train",
        "--set", "method=sparta",
        "--set", "task=seq_cls",
        "--set", f"model.path={base}",
        "--set", "data.source=csv",
        "--set", f"data.path={data}",
        "--set", "data.max_length=12",
        "--set", "data.eval_size=0.25",
        "--set", "train.steps=4",
        "--set", "train.batch_size=4",
        "--set", "train.eval_batch_size=10",
        "--set", "train.warmup_steps=0",
        "--set", "train.eval_every=4",
        "--set", "train.log_every=2",
        "--set", "train.checkpoint_every=4",
        "--set", "train.progress=false",
        "--output", str(out),
    ]  # fmt: skip
    for item in sets:
        argv += ["--set", item]
    return argv


def test_train_with_the_authors_terms_then_their_loader(base_and_data, tmp_path, capsys):
    from jaxsparse import models
    from jaxsparse.adapter_io import load_adapter
    from jaxsparse.convert.sparta import grow_for_adapter
    from jaxsparse.delta import apply

    base, data = base_and_data
    run = tmp_path / "run"
    sets = [
        "adapter.sparsity=0.95",
        f"model.new_tokens=[{','.join(NEW)}]",
        f"adapter.trainable_tokens=[{','.join(NEW)}]",
        "adapter.dropout=0.1",
    ]
    assert main(_argv(base, data, run, *sets)) == 0, capsys.readouterr().err
    capsys.readouterr()
    adapter_dir = run / "adapter"
    saved = json.loads((adapter_dir / "config.json").read_text())["jaxsparse_sparta_config"]
    assert saved["sparsity"] == 0.95 and saved["trainable_tokens"] == [TINY_VOCAB, TINY_VOCAB + 1]
    assert saved["density"] is None and saved["dropout"] == 0.1

    theirs = peft_sparta.SpaRTAforSequenceClassification(str(adapter_dir))
    assert theirs.tokenizer.convert_tokens_to_ids(NEW) == [TINY_VOCAB, TINY_VOCAB + 1]
    id2label = {int(k): v for k, v in theirs.id2label.items()}
    model = grow_for_adapter(models.from_pretrained(base, task="seq_cls", id2label=id2label), adapter_dir)
    adapter = load_adapter(adapter_dir, model=model)
    emb = adapter.deltas["model.embed_tokens.embedding"]
    rows = np.asarray(emb.indices) // 32
    assert set(rows.tolist()) == {TINY_VOCAB, TINY_VOCAB + 1} and emb.k == 64  # the two rows, whole
    assert np.abs(np.asarray(emb.values)).max() > 0  # and they trained

    texts = ["<q> t3 t9 t4 <ans> t5", "<q> t7 t8 t2 <ans> t6"]
    ids = theirs.tokenizer(texts, return_tensors="np")["input_ids"]
    assert (ids == TINY_VOCAB).any() and (ids == TINY_VOCAB + 1).any()
    ours = np.asarray(model.apply_fn(apply(model.params, adapter), jnp.asarray(ids)))
    their_logits = theirs(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(their_logits, ours, atol=BF16_LOGIT_TOL * np.abs(ours).max(), rtol=0)

    assert main(["info", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    total = json.loads((adapter_dir / "config.json").read_text())["jaxsparse_num_parameters"]
    theirs_sparsity = 1 - adapter.num_trainable() / total  # their num_trainable_parameters over all
    assert f"sparsity:     {theirs_sparsity:.4%} of all {total:,} parameters frozen" in out
    assert abs(theirs_sparsity - 0.95) < 0.005  # the budget, up to per-tensor rounding

    # jaxsparse classify grows the base from new_embeddings_init too: our prediction, their label
    assert main(["classify", "--adapter", str(adapter_dir), texts[0]]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.split()[0] == id2label[int(np.argmax(ours[0]))]

    exported = tmp_path / "exported"
    cmd = ["export", "--adapter", str(adapter_dir), "--format", "sparta", "--output", str(exported)]
    assert main(cmd) == 0, capsys.readouterr().err
    again = peft_sparta.SpaRTAforSequenceClassification(str(exported))
    np.testing.assert_array_equal(again(torch.from_numpy(ids)).numpy(), their_logits)


@pytest.mark.parametrize(
    ("sets", "words"),
    [
        (["adapter.sparsity=1.5"], r"'adapter.sparsity' must be in (0, 1)"),
        (
            ["adapter.sparsity=0.9", "adapter.density=0.1"],
            "'adapter.density' = 0.1 and 'adapter.sparsity' = 0.9",
        ),
        (
            ["adapter.sparsity=0.9999"],
            "'adapter.sparsity': sparsity=0.9999 is too high: choose sparsity < 0.99",
        ),
        (["adapter.sparsity=0.2"], "'adapter.sparsity': sparsity=0.2 is too low"),
        (["adapter.sparsity=0.9", "adapter.trainable_tokens=[70]"], "[70] are beyond the vocabulary"),
        (["adapter.sparsity=0.9", "adapter.trainable_tokens=[<nope>]"], "['<nope>'] are not tokens"),
        (["adapter.density=0.1", "adapter.frozen_modules=[mlp]"], "'adapter.frozen_modules' goes with"),
        (["model.new_tokens=[t3]"], "'model.new_tokens': new tokens ['t3'] are already"),
        (["adapter.sparsity=0.9", "adapter.dropout=1.0"], "'adapter.dropout' must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line(base_and_data, tmp_path, capsys, sets, words):
    base, data = base_and_data
    run = tmp_path / "run"
    assert main(_argv(base, data, run, *sets)) == 2
    err = capsys.readouterr().err.strip()
    # checks that need the model come after the progress line "loading data ... and model ..."
    *before, last = err.splitlines()
    assert last.startswith("jaxsparse train: error:") and "Traceback" not in err, err
    assert all(line.startswith("loading data") for line in before), err
    assert words in last, err
    assert not (run / "adapter").exists()
