"""Calibration tokens and the sequential capture, against transformers' forward hooks."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxsparse import calibration
from jaxsparse.calibration import CalibrationError, load_calibration, load_calibration_texts
from jaxsparse.models import from_torch

TOL = 1e-5


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    return transformers.BertModel(cfg).eval()


def linear_modules(torch_model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    kinds = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
    return {
        name: m
        for name, m in torch_model.named_modules()
        if isinstance(m, kinds) and (".layers." in name or ".h." in name or "encoder.layer." in name)
    }


def hooked_inputs(torch_model, ids, mask, names) -> dict[str, np.ndarray]:
    """The input of each named linear in one forward pass, by transformers' forward hooks."""
    seen: dict[str, np.ndarray] = {}
    modules = dict(torch_model.named_modules())
    handles = [
        modules[n].register_forward_hook(
            lambda mod, args, out, n=n: seen.__setitem__(n, args[0].detach().numpy().copy())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            torch_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
    finally:
        for h in handles:
            h.remove()
    return seen


def capture_all(model, ids, mask, update=None, statistics=("inputs", "xtx")):
    captured = {}

    def record(block):
        captured.update({p: s for p, s in block.stats.items()})
        return update(block) if update else {}

    new = calibration.sequential_capture(
        model, ids, mask, update=record, statistics=statistics, batch_size=2, progress=False
    )
    return captured, new


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_captured_inputs_equal_transformers_hooks(make):
    torch_model = make()
    model = from_torch(torch_model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (4, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding in one sequence: excluded from the statistics
    names = linear_modules(torch_model)
    reference = hooked_inputs(torch_model, ids, mask, names)
    captured, _ = capture_all(model, ids, mask)
    assert sorted(captured) == sorted(names) == calibration.linear_paths(model)
    w = mask.reshape(-1).astype(np.float64)
    for name, x_ref in reference.items():
        stats = captured[name]
        valid = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(stats.inputs)[valid], x_ref[valid], atol=TOL, rtol=TOL)
        x2 = x_ref.reshape(-1, x_ref.shape[-1]).astype(np.float64)
        np.testing.assert_allclose(float(stats.count), w.sum())
        np.testing.assert_allclose(np.asarray(stats.sq_norm), (w[:, None] * x2**2).sum(0), rtol=TOL, atol=TOL)
        np.testing.assert_allclose(np.asarray(stats.xtx), (x2 * w[:, None]).T @ x2, rtol=TOL, atol=TOL)
        np.testing.assert_allclose(
            np.asarray(stats.hessian()), 2 * (x2 * w[:, None]).T @ x2 / w.sum(), rtol=TOL, atol=TOL
        )


def _prune_half_np(kernel: np.ndarray) -> np.ndarray:
    flat = np.sort(np.abs(kernel).ravel())
    return np.where(np.abs(kernel) >= flat[flat.size // 2], kernel, 0.0)


def _prune_half_torch(weight: torch.Tensor) -> torch.Tensor:
    flat = weight.abs().flatten().sort().values
    return torch.where(weight.abs() >= flat[flat.numel() // 2], weight, torch.zeros_like(weight))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_sequential_capture_sees_pruned_earlier_blocks(make):
    """Block i's inputs come from blocks < i with their NEW weights; the torch reference prunes the
    torch model in place block by block and re-runs the whole forward with hooks."""
    torch_model = make()
    # from_torch may share memory with the torch tensors it did not transpose: prune a copy
    model = from_torch(copy.deepcopy(torch_model))
    ids = np.random.default_rng(1).integers(0, 64, (4, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    names = linear_modules(torch_model)
    blocks = calibration.block_paths(model)

    reference: dict[str, np.ndarray] = {}
    for block in blocks:
        in_block = [n for n in names if n.startswith(block + ".")]
        reference.update(hooked_inputs(torch_model, ids, mask, in_block))
        with torch.no_grad():
            for n in in_block:
                names[n].weight.copy_(_prune_half_torch(names[n].weight))

    captured, new = capture_all(
        model,
        ids,
        mask,
        update=lambda b: {p: _prune_half_np(np.asarray(k)) for p, k in b.kernels.items()},
        statistics=("inputs",),
    )
    for name, x_ref in reference.items():
        np.testing.assert_allclose(np.asarray(captured[name].inputs), x_ref, atol=TOL, rtol=TOL)
    # the pruning really changed later blocks' inputs (the test can fail if the plumbing is wrong)
    dense, _ = capture_all(model, ids, mask, statistics=("inputs",))
    last = next(n for n in names if n.startswith(blocks[-1] + "."))
    assert np.abs(np.asarray(dense[last].inputs) - reference[last]).max() > 1e-3
    # and the returned model holds the new kernels, equal to the torch model's pruned weights
    torch_state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    ours = calibration.linear_paths(new)
    fan_in_fan_out = isinstance(next(iter(names.values())), transformers.pytorch_utils.Conv1D)
    for p in ours:
        kernel = np.asarray(calibration.get_leaf(new.params, p + ".kernel"))
        ref = torch_state[p + ".weight"]
        np.testing.assert_allclose(kernel, ref if fan_in_fan_out else ref.T, atol=0)


def test_max_blocks_and_update_validation():
    model = from_torch(tiny_llama())
    ids = np.zeros((2, 6), np.int64)
    calls = []
    calibration.sequential_capture(
        model, ids, update=lambda b: calls.append(b.index) or {}, max_blocks=2, progress=False
    )
    assert calls == [0, 1]
    with pytest.raises(KeyError, match="not a linear of block 0"):
        calibration.sequential_capture(model, ids, update=lambda b: {"nope": 0}, progress=False)
    with pytest.raises(ValueError, match="expected"):
        calibration.sequential_capture(
            model,
            ids,
            update=lambda b: {p: jnp.zeros((1, 1)) for p in b.kernels},
            progress=False,
        )
    with pytest.raises(ValueError, match="unknown statistics"):
        calibration.sequential_capture(model, ids, update=lambda b: {}, statistics=("bogus",))


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_calibration_windows_are_seeded_slices_of_the_stream(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"text": t}) for t in ["hello world", "second doc", "third"]) + "\n")
    a = load_calibration(f, CharTokenizer(), samples=5, seq_len=6, seed=3)
    b = load_calibration(f, CharTokenizer(), samples=5, seq_len=6, seed=3)
    c = load_calibration(f, CharTokenizer(), samples=5, seq_len=6, seed=4)
    stream = calibration.token_stream(["hello world", "second doc", "third"], CharTokenizer())
    assert a.stream_tokens == len(stream) == 11 + 1 + 10 + 1 + 5
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert not np.array_equal(a.input_ids, c.input_ids)
    windows = {tuple(stream[s : s + 6]) for s in range(len(stream) - 5)}
    assert all(tuple(row) in windows for row in a.input_ids)
    assert a.attention_mask.shape == (5, 6) and a.attention_mask.all()


def test_plain_text_file_is_one_document(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("line one\nline two\n")
    assert load_calibration_texts(f) == ["line one\nline two\n"]


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        ("", "empty.txt", "is empty"),
        ("   \n\n", "blank.txt", "is empty"),
        ("short", "short.txt", "has 5 tokens, fewer than one sequence of seq_len=16"),
        ('{"text": "ok"}\nnot json\n', "bad.jsonl", r"bad.jsonl:2: not valid JSON"),
        ('{"body": "x"}\n', "nofield.jsonl", r'nofield.jsonl:1: expected a JSON object with a "text" field'),
    ],
)
def test_bad_calibration_sources(tmp_path, content, name, match):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CalibrationError, match=match):
        load_calibration(f, CharTokenizer(), samples=2, seq_len=16)


def test_unknown_source_names_the_choices(tmp_path):
    with pytest.raises(CalibrationError, match=r"neither an existing file .* nor a corpus name"):
        load_calibration_texts(tmp_path / "missing.txt")
    with pytest.raises(CalibrationError, match="samples"):
        calibration.calibration_tokens(["abc"], CharTokenizer(), samples=0, seq_len=2)


@pytest.mark.real
def test_offline_corpus_by_name(rotten_tomatoes_file):
    texts = load_calibration_texts("rotten_tomatoes")
    assert len(texts) > 10_000 and all(t.strip() for t in texts[:100])
