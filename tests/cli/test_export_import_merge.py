"""`jaxsparse import / export / merge` end to end on tiny models saved as Hugging Face directories.

Every check compares against PyTorch: PEFT's forward, or transformers loading the merged checkpoint.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from jaxsparse import delta as delta_lib  # noqa: E402
from jaxsparse.adapter_io import load_adapter, save_adapter  # noqa: E402
from jaxsparse.cli import main  # noqa: E402
from jaxsparse.methods import shira  # noqa: E402
from jaxsparse.models import from_pretrained  # noqa: E402

TOKENS = np.array([[1, 5, 9, 3, 7, 2], [4, 8, 6, 11, 2, 1]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK)).logits.numpy()


def _close(a, b):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def _llama(hidden=16):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert_cls():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return transformers.BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in [("llama", _llama()), ("llama_wide", _llama(24)), ("bert", _bert_cls())]:
        model.save_pretrained(root / name)
        out[name] = root / name
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        )
    ).eval()
    gpt2.save_pretrained(root / "gpt2")
    out["gpt2"] = root / "gpt2"
    return out


def _cli(*argv) -> int:
    return main([str(a) for a in argv])


def _peft_save(base, config, out):
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(str(out))
    return _logits(model)


def test_import_then_merge_peft_lora_classifier(dirs, tmp_path):
    base = transformers.AutoModelForSequenceClassification.from_pretrained(dirs["bert"])
    cfg = peft.LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False
    )
    want = _peft_save(base, cfg, tmp_path / "peft")
    assert (
        _cli("import", "--adapter", tmp_path / "peft", "--model", dirs["bert"], "--output", tmp_path / "imp")
        == 0
    )
    ours = from_pretrained(dirs["bert"])
    adapter = load_adapter(tmp_path / "imp", model=ours)
    _close(
        np.asarray(
            ours.apply_fn(delta_lib.apply(ours.params, adapter), jnp.asarray(TOKENS), jnp.asarray(MASK))
        ),
        want,
    )

    assert (
        _cli("merge", "--model", dirs["bert"], "--adapter", tmp_path / "imp", "--output", tmp_path / "merged")
        == 0
    )
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    _close(_logits(merged), want)


def test_export_sparta_and_back_to_peft_then_merge(dirs, tmp_path):
    ours = from_pretrained(dirs["llama"])
    adapter = shira.init(
        ours.params, shira.ShiraConfig(r=1, target_modules=["v_proj", "o_proj"], init_weights=False)
    )
    want = np.asarray(
        ours.apply_fn(delta_lib.apply(ours.params, adapter), jnp.asarray(TOKENS), jnp.asarray(MASK))
    )
    save_adapter(adapter, tmp_path / "native", model=ours)

    assert (
        _cli("export", "--adapter", tmp_path / "native", "--format", "sparta", "--output", tmp_path / "sp")
        == 0
    )
    assert (tmp_path / "sp" / "sparse_deltas.safetensors").is_file()
    args = (
        "export",
        "--adapter",
        tmp_path / "sp",
        "--format",
        "peft",
        "--model",
        dirs["llama"],
        "--output",
        tmp_path / "pf",
    )
    assert _cli(*args) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()
    _close(_logits(peft.PeftModel.from_pretrained(base, str(tmp_path / "pf")).eval()), want)

    assert (
        _cli("merge", "--model", dirs["llama"], "--adapter", tmp_path / "sp", "--output", tmp_path / "merged")
        == 0
    )
    _close(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()), want)


def test_merge_gpt2_lora_fan_in_fan_out(dirs, tmp_path):
    base = transformers.GPT2LMHeadModel.from_pretrained(dirs["gpt2"]).eval()
    cfg = peft.LoraConfig(
        r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    want = _peft_save(base, cfg, tmp_path / "peft")
    assert (
        _cli(
            "merge", "--model", dirs["gpt2"], "--adapter", tmp_path / "peft", "--output", tmp_path / "merged"
        )
        == 0
    )
    _close(_logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()), want)

    # the same merge, sharded: transformers follows the index and gives the same logits
    sharded = tmp_path / "sharded"
    args = ["merge", "--model", dirs["gpt2"], "--adapter", tmp_path / "peft", "--output", sharded]
    assert _cli(*args, "--max-shard-size", "2KB") == 0
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 1
    assert (sharded / "model.safetensors.index.json").exists() and not (
        sharded / "model.safetensors"
    ).exists()
    _close(_logits(transformers.GPT2LMHeadModel.from_pretrained(sharded).eval()), want)


def test_merge_refuses_a_bad_shard_size_before_loading(dirs, tmp_path, capsys):
    args = ["merge", "--model", dirs["gpt2"], "--adapter", tmp_path / "none", "--output", tmp_path / "m"]
    assert _cli(*args, "--max-shard-size", "5 parsecs") == 2
    assert "shard size '5 parsecs'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def llama_shira(dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("shira") / "peft"
    base = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"])
    _peft_save(base, peft.ShiraConfig(r=1, target_modules=["q_proj", "v_proj"], init_weights=False), out)
    return out


def _broken(src, tmp_path, edit_tensors=None, edit_config=None):
    import shutil

    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = dict(load_file(dst / "adapter_model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _rename_layer(t):
    t[Q.replace("layers.0", "layers.7") + ".shira_weight"] = t.pop(Q + ".shira_weight")
    t[Q.replace("layers.0", "layers.7") + ".shira_indices"] = t.pop(Q + ".shira_indices")


def _out_of_range(t):
    t[Q + ".shira_indices"] = t[Q + ".shira_indices"].copy()
    t[Q + ".shira_indices"][1, 0] = 999


def _truncate(path):
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) - 7])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("peft_type", "unsupported peft_type 'IA3'"),
        ("absent_target", "names no parameter"),
        ("out_of_range", "out of range"),
        ("truncated", "corrupt or truncated"),
        ("other_size", r"on a \(24, 24\) weight"),
        ("other_architecture", "'llama' model.*'bert'"),
    ],
)
@pytest.mark.parametrize("verb", ["import", "merge"])
def test_bad_input_is_a_clear_error_and_writes_nothing(
    dirs, llama_shira, tmp_path, capsys, case, message, verb
):
    model = dirs["llama"]
    adapter = llama_shira
    if case == "peft_type":
        adapter = _broken(llama_shira, tmp_path, edit_config=lambda c: c.update(peft_type="IA3"))
    elif case == "absent_target":
        adapter = _broken(llama_shira, tmp_path, edit_tensors=_rename_layer)
    elif case == "out_of_range":
        adapter = _broken(llama_shira, tmp_path, edit_tensors=_out_of_range)
    elif case == "truncated":
        adapter = _broken(llama_shira, tmp_path)
        _truncate(adapter)
    elif case == "other_size":
        model = dirs["llama_wide"]
    else:
        model = dirs["bert"]
    output = tmp_path / "out"
    code = _cli(verb, "--adapter", adapter, "--model", model, "--output", output)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"jaxsparse {verb}: error:") and err.count("\n") == 1
    import re

    assert re.search(message, err), err
    assert not output.exists()  # nothing written (what --output held before: tests/cli/test_output_safety.py)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []  # no temp left


def test_lora_cannot_be_exported_as_sparta(dirs, tmp_path, capsys):
    base = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"])
    _peft_save(base, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora")
    code = _cli(
        "export",
        "--adapter",
        tmp_path / "lora",
        "--format",
        "sparta",
        "--model",
        dirs["llama"],
        "--output",
        tmp_path / "o",
    )
    assert code == 2 and "not sparse" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["llama_causal_lm", "bert_seq_cls_with_head", "gpt2_conv1d"])
def test_export_of_a_peft_lora_needs_no_base_model(dirs, tmp_path, monkeypatch, case):
    # A PEFT LoRA file gives every shape: exported with no --model, even when the base it records is
    # a hub name that cannot be opened offline, and no model is loaded at all.
    if case == "llama_causal_lm":
        base = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()
        cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    elif case == "bert_seq_cls_with_head":
        base = transformers.AutoModelForSequenceClassification.from_pretrained(dirs["bert"]).eval()
        cfg = peft.LoraConfig(
            task_type="SEQ_CLS",
            r=2,
            target_modules=["query", "value"],
            bias="lora_only",
            init_lora_weights=False,
        )
    else:
        base = transformers.GPT2LMHeadModel.from_pretrained(dirs["gpt2"]).eval()
        cfg = peft.LoraConfig(
            r=2,
            target_modules=["c_attn"],
            fan_in_fan_out=True,
            modules_to_save=["ln_f"],
            init_lora_weights=False,
        )
    want = _peft_save(base, cfg, tmp_path / "lora")
    hub = _broken(
        tmp_path / "lora", tmp_path, edit_config=lambda c: c.update(base_model_name_or_path="org/not-here")
    )
    from jaxsparse import models

    monkeypatch.setattr(models, "from_pretrained", lambda *a, **k: pytest.fail("no model may be loaded"))
    assert _cli("export", "--adapter", hub, "--format", "peft", "--output", tmp_path / "o") == 0
    # the same tensors, the same config (base name, auto_mapping), and PEFT gives the same logits
    assert {k: v.tolist() for k, v in load_file(tmp_path / "o" / "adapter_model.safetensors").items()} == {
        k: v.tolist() for k, v in load_file(hub / "adapter_model.safetensors").items()
    }
    written = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    original = json.loads((hub / "adapter_config.json").read_text())
    assert written["base_model_name_or_path"] == "org/not-here"
    assert written["auto_mapping"] == original["auto_mapping"]
    _close(_logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "o")).eval()), want)
    # --format sparta is refused for the right reason, still without a base model
    assert _cli("export", "--adapter", hub, "--format", "sparta", "--output", tmp_path / "s") == 2
    assert not (tmp_path / "s").exists()


def test_import_records_the_base_so_export_needs_no_model(dirs, llama_shira, tmp_path, monkeypatch):
    # --model given as a relative path: the adapter records the absolute one.
    monkeypatch.chdir(dirs["llama"].parent)
    assert _cli("import", "--adapter", llama_shira, "--model", "llama", "--output", tmp_path / "imp") == 0
    config = json.loads((tmp_path / "imp" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(dirs["llama"].absolute())
    # a path transformers can open
    transformers.AutoConfig.from_pretrained(config["base_model_name_or_path"])
    monkeypatch.chdir(tmp_path)
    assert (
        _cli("export", "--adapter", tmp_path / "imp", "--format", "sparta", "--output", tmp_path / "sp") == 0
    )
    # the base was found from the record: the SpaRTA config carries it, with the model's config
    sparta_config = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert sparta_config["sparta_pretrained_model"] == str(dirs["llama"].absolute())
    assert sparta_config["model_type"] == "llama"
    base = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"]).eval()
    want = _logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), str(llama_shira)).eval())
    assert (
        _cli("merge", "--model", dirs["llama"], "--adapter", tmp_path / "sp", "--output", tmp_path / "m") == 0
    )
    _close(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()), want)


@pytest.mark.parametrize("kind", ["lora", "sparta"])
def test_import_records_the_base_in_every_format(dirs, tmp_path, kind):
    ours = from_pretrained(dirs["llama"])
    if kind == "lora":
        base = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"])
        _peft_save(base, peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "in")
        key, name = "base_model_name_or_path", "adapter_config.json"
    else:
        adapter = shira.init(
            ours.params, shira.ShiraConfig(r=1, target_modules=["v_proj"]), jax.random.key(1)
        )
        save_adapter(
            adapter, tmp_path / "in", model=ours, format="sparta", base_model_name_or_path="hub/name"
        )
        key, name = "sparta_pretrained_model", "config.json"
    assert (
        _cli("import", "--adapter", tmp_path / "in", "--model", dirs["llama"], "--output", tmp_path / "o")
        == 0
    )
    assert json.loads((tmp_path / "o" / name).read_text())[key] == str(dirs["llama"].absolute())


def test_conv1d_sparse_export_to_peft_is_refused(dirs, tmp_path, capsys):
    ours = from_pretrained(dirs["gpt2"])
    adapter = shira.init(ours.params, shira.ShiraConfig(r=1, target_modules=["c_attn"]), jax.random.key(0))
    # SHiRA's native format is PEFT SHiRA, which cannot hold Conv1D deltas: refused, nothing written
    with pytest.raises(ValueError, match="Conv1D"):
        save_adapter(adapter, tmp_path / "refused", model=ours)
    assert not (tmp_path / "refused").exists()
    save_adapter(adapter, tmp_path / "native", model=ours, format="sparta")
    assert (
        _cli("export", "--adapter", tmp_path / "native", "--format", "peft", "--output", tmp_path / "o") == 2
    )
    assert "Conv1D" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_merge_from_a_gguf_base(tmp_path):
    gguf = pytest.importorskip("gguf")
    from tests.models.test_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf", quant=gguf.GGMLQuantizationType.F32)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf").eval()
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    want = _peft_save(base, cfg, tmp_path / "peft")
    code = _cli(
        "merge", "--model", tmp_path / "tiny.gguf", "--adapter", tmp_path / "peft", "--output", tmp_path / "m"
    )
    assert code == 0
    _close(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()), want)
