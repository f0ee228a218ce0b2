"""Parity with PyTorch PEFT 0.22, both directions, on tiny Llama, BERT-classifier and GPT-2 models.

PEFT -> jaxsparse: PEFT adapters with non-zero weights, saved by PEFT, loaded by us: logits and merged
weights match PEFT's forward and ``merge_and_unload()`` at fp32 atol 1e-5.
jaxsparse -> PEFT: adapters trained a few steps in JAX, exported, loaded by ``PeftModel.from_pretrained``:
same logits (classifier head included).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from jaxsparse import delta as delta_lib  # noqa: E402
from jaxsparse import merge as merge_lib  # noqa: E402
from jaxsparse.adapter_io import load_adapter  # noqa: E402
from jaxsparse.convert.peft import save_peft  # noqa: E402
from jaxsparse.methods import lora, shira  # noqa: E402
from jaxsparse.models import Model, from_torch, to_state_dict  # noqa: E402

ATOL = 1e-5
TOKENS = np.array([[1, 5, 9, 3, 7, 2], [4, 8, 6, 11, 2, 1]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def _torch_model(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
        )
        return transformers.LlamaForCausalLM(cfg).eval()
    if arch == "bert":
        cfg = transformers.BertConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_labels=3,
        )
        return transformers.BertForSequenceClassification(cfg).eval()
    cfg = transformers.GPT2Config(
        vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


# Per architecture: LoRA targets, SHiRA targets, PEFT task type.
TARGETS = {
    "llama": (["q_proj", "v_proj", "down_proj"], ["q_proj", "o_proj", "up_proj"], None),
    "bert": (["query", "value", "dense"], ["key", "output.dense"], "SEQ_CLS"),
    "gpt2": (["c_attn", "c_proj"], None, None),
}


def _torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(TOKENS), attention_mask=torch.tensor(MASK))
    return out.logits.float().numpy()


def _jax_logits(model: Model, params) -> np.ndarray:
    return np.asarray(model.apply_fn(params, jnp.asarray(TOKENS), jnp.asarray(MASK)))


def _close(a, b):
    np.testing.assert_allclose(a, b, atol=ATOL, rtol=0)


def _peft_config(arch: str, method: str):
    lora_targets, shira_targets, task = TARGETS[arch]
    if method == "lora":
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=lora_targets,
            init_lora_weights=False,
            task_type=task,
            fan_in_fan_out=arch == "gpt2",
            rank_pattern={"v_proj": 2} if arch == "llama" else {},
            alpha_pattern={"down_proj": 3} if arch == "llama" else {},
        )
    return peft.ShiraConfig(r=1, target_modules=shira_targets, init_weights=False, task_type=task)


CASES = [("llama", "lora"), ("llama", "shira"), ("bert", "lora"), ("bert", "shira"), ("gpt2", "lora")]


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_peft_adapter_imports_with_same_logits_and_merged_weights(tmp_path, arch, method):
    base = _torch_model(arch)
    ours = from_torch(base)  # before PEFT wraps (and mutates) the torch model
    peft_model = peft.get_peft_model(base, _peft_config(arch, method)).eval()
    if arch == "bert":  # a trained-looking head, saved in full through modules_to_save
        with torch.no_grad():
            peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    want = _torch_logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")

    adapter = load_adapter(tmp_path / "adapter", model=ours)
    assert (arch != "bert") or any(p.startswith("classifier") for p in adapter.dense)
    got = _jax_logits(ours, delta_lib.apply(ours.params, adapter))
    assert np.abs(want - _jax_logits(ours, ours.params)).max() > 1e-3  # the adapter changes the output
    _close(got, want)
    # The factored path (deltas beside the frozen weight, as the trainer runs) agrees with PEFT too.
    _close(
        _jax_logits(ours, delta_lib.apply(ours.params, adapter, factored=True, sampled_max_density=1.0)), want
    )

    merged_params, _ = merge_lib.merge(ours.params, adapter)
    ours_sd = to_state_dict(Model(ours.config, merged_params, ours.apply_fn, ours.task))
    theirs_sd = peft_model.merge_and_unload().state_dict()
    for key, value in ours_sd.items():
        _close(value, theirs_sd[key].numpy())


def _train(model: Model, adapter, steps: int = 3):
    """A few Adam steps on a fixed random target, in JAX, over the adapter's trainable leaves only."""
    params = model.params
    target = jax.random.normal(jax.random.key(1), _jax_logits(model, params).shape)

    def loss(trainable):
        eff = delta_lib.apply(params, delta_lib.with_trainable(adapter, trainable))
        return jnp.mean((model.apply_fn(eff, jnp.asarray(TOKENS), jnp.asarray(MASK)) - target) ** 2)

    opt = optax.adam(0.05)
    leaves = delta_lib.trainable(adapter)
    state = opt.init(leaves)
    grad = jax.jit(jax.grad(loss))
    for _ in range(steps):
        updates, state = opt.update(grad(leaves), state, leaves)
        leaves = optax.apply_updates(leaves, updates)
    return delta_lib.with_trainable(adapter, leaves)


def _jax_adapter(arch: str, method: str, params):
    lora_targets, shira_targets, task = TARGETS[arch]
    key = jax.random.key(0)
    if method == "lora":
        cfg = lora.LoraConfig(
            r=4, lora_alpha=8, target_modules=lora_targets, task_type=task, fan_in_fan_out=arch == "gpt2"
        )
        return lora.init(params, cfg, key)
    head = ["classifier"] if arch == "bert" else None
    return shira.init(
        params,
        shira.ShiraConfig(r=1, target_modules=shira_targets, modules_to_save=head, task_type=task),
        key,
    )


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_jax_trained_adapter_loads_in_peft_with_same_logits(tmp_path, arch, method):
    base = _torch_model(arch)
    ours = from_torch(base)
    adapter = _train(ours, _jax_adapter(arch, method, ours.params))
    want = _jax_logits(ours, delta_lib.apply(ours.params, adapter))
    assert np.abs(want - _jax_logits(ours, ours.params)).max() > 1e-3  # training moved the adapter
    fmt = save_peft(adapter, tmp_path / "adapter", model=ours)
    assert fmt == f"peft_{method}"

    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    _close(_torch_logits(loaded), want)


def test_sparta_adapter_exports_to_peft_shira_exactly(tmp_path):
    from jaxsparse.methods import sparta

    base = _torch_model("llama")
    ours = from_torch(base)
    adapter = sparta.init(
        ours.params, sparta.SpartaConfig(density=0.2, target_modules=["v_proj", "o_proj"]), jax.random.key(0)
    )
    adapter = _train(ours, adapter)
    want = _jax_logits(ours, delta_lib.apply(ours.params, adapter))
    assert save_peft(adapter, tmp_path / "adapter", model=ours) == "peft_shira"  # padded to r * (m + n)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    _close(_torch_logits(loaded), want)


def test_gpt2_conv1d_shira_is_refused_like_peft(tmp_path):
    base = _torch_model("gpt2")
    ours = from_torch(base)
    with pytest.raises(TypeError, match="Conv1D"):
        peft.get_peft_model(_torch_model("gpt2"), peft.ShiraConfig(r=1, target_modules=["c_attn"]))
    adapter = shira.init(ours.params, shira.ShiraConfig(r=1, target_modules=["c_attn"]), jax.random.key(0))
    with pytest.raises(ValueError, match=r"Conv1D.*only torch\.nn\.Linear"):
        save_peft(adapter, tmp_path / "adapter", model=ours)
    assert not (tmp_path / "adapter").exists()
