"""Fuzzing the adapter readers: whatever an adapter directory holds, loading it works or raises our
AdapterFormatError naming the directory -- never another exception type, a hang or a crash.

Each example starts from a valid adapter we wrote (PEFT SHiRA, PEFT LoRA, SpaRTA with a classifier
head, and SpaRTA's older torch-pickle form) and damages one file: truncation, bit flips, a wrong
header length, a non-JSON header, a header entry with a wrong dtype / offsets / shape, tensor
contents (NaN/inf, indices out of range, wrong dtypes and shapes, missing or extra keys), garbage
layout metadata, and config JSON (missing keys, wrong types, unknown ``peft_type``, not an object,
not UTF-8, nested past the recursion limit). It is loaded with the base model's params, and (our
own files record their shapes) without. ``jaxsparse info`` of the same directory must never raise,
and must exit 2 with one line when the damage is in what it reads and the loaders refuse the
adapter. docs/interop.md tabulates the inputs and the errors they give.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxsparse.adapter_io import load_adapter
from jaxsparse.convert import AdapterFormatError
from jaxsparse.delta import Adapter, LowRankDelta, SparseDelta

H, FF, L = 8, 12, 3
# Per layout and test; small and few enough that the module stays well under a minute on 2 cores.
SETTINGS = settings(
    max_examples=120,
    deadline=5000,  # ms: a reader that takes this long on a 1 KiB adapter is stuck
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same examples on every run: CI stays reproducible
    database=None,
)
TIME_LIMIT_S = 20  # a hard stop for a hang inside one example (SIGALRM; the deadline only measures)


def tiny_params(seed=0):
    rng = np.random.default_rng(seed)

    def w(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    layer = {
        "self_attn": {n: {"kernel": w(H, H)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
        "mlp": {"up_proj": {"kernel": w(H, FF)}, "down_proj": {"kernel": w(FF, H)}},
        "input_layernorm": {"scale": w(H)},
    }
    return {
        "model": {"embed_tokens": {"embedding": w(20, H)}, "layers": {"0": layer}, "norm": {"scale": w(H)}},
        "score": {"kernel": w(H, L)},
    }


PARAMS = tiny_params()
V_PROJ = "model.layers.0.self_attn.v_proj.kernel"
UP_PROJ = "model.layers.0.mlp.up_proj.kernel"


def _sparse(rng, shape, k):
    numel = int(np.prod(shape))
    idx = np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int32)
    return SparseDelta(jnp.asarray(idx), jnp.asarray(rng.normal(size=k), jnp.float32), shape)


def _write_sources(root):
    """One valid adapter directory per layout, as bytes per file name."""
    from jaxsparse.convert.peft_lora import save_peft_lora
    from jaxsparse.convert.peft_shira import save_peft_shira
    from jaxsparse.convert.sparta import save_sparta
    from jaxsparse.methods.lora import LoraConfig
    from jaxsparse.methods.shira import ShiraConfig
    from jaxsparse.methods.sparta import SpartaConfig

    rng = np.random.default_rng(0)
    head = {"score.kernel": jnp.asarray(rng.normal(size=(H, L)), jnp.float32)}
    shira = Adapter(
        {V_PROJ: _sparse(rng, (H, H), 16), UP_PROJ: _sparse(rng, (H, FF), 20)},
        head,
        config=ShiraConfig(r=1, target_modules=["v_proj", "up_proj"], modules_to_save=["score"]),
    )
    save_peft_shira(shira, os.path.join(root, "peft_shira"), base_model_name_or_path="tiny")
    lora_cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "up_proj"], modules_to_save=["score"])
    lora = Adapter(
        {
            p: LowRankDelta(
                a=jnp.asarray(rng.normal(size=(fan_in, 2)), jnp.float32),
                b=jnp.asarray(rng.normal(size=(2, fan_out)), jnp.float32),
                scale=2.0,
            )
            for p, (fan_in, fan_out) in ((V_PROJ, (H, H)), (UP_PROJ, (H, FF)))
        },
        head,
        config=lora_cfg,
    )
    save_peft_lora(lora, os.path.join(root, "peft_lora"))
    sparta = Adapter(
        {V_PROJ: _sparse(rng, (H, H), 6), "model.norm.scale": _sparse(rng, (H,), 3)},
        head,
        config=SpartaConfig(
            density=0.1, target_modules=["v_proj"], modules_to_save=["score"], task_type="SEQ_CLS"
        ),
    )
    save_sparta(sparta, os.path.join(root, "sparta"), base_model_name_or_path="tiny", params=PARAMS)
    out = {}
    for layout in ("peft_shira", "peft_lora", "sparta"):
        d = os.path.join(root, layout)
        out[layout] = {
            name: Path(d, name).read_bytes() for name in sorted(os.listdir(d)) if not name.startswith(".")
        }
    return out


def torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _pickle_form(files: dict[str, bytes]) -> dict[str, bytes]:
    """The SpaRTA adapter as the authors' older files: ``sparse_deltas.pt`` and ``head_init.pt``."""
    import torch
    from safetensors.numpy import load

    pt = {"indices": {}, "deltas": {}}
    for key, value in load(files["sparse_deltas.safetensors"]).items():
        kind, _, name = key.partition(".")
        pt[kind][name] = torch.from_numpy(value.copy())
    head = torch.from_numpy(load(files["head_init.safetensors"])["head"].copy())
    return {
        "config.json": files["config.json"],
        "sparse_deltas.pt": torch_bytes(pt),
        "head_init.pt": torch_bytes(head),
    }


with tempfile.TemporaryDirectory(prefix="jaxsparse-fuzz-") as _root:
    SOURCES = _write_sources(_root)
HAVE_TORCH = importlib.util.find_spec("torch") is not None
if HAVE_TORCH:
    SOURCES["sparta_pt"] = _pickle_form(SOURCES["sparta"])
CONFIG_FILE = {
    "peft_shira": "adapter_config.json",
    "peft_lora": "adapter_config.json",
    "sparta": "config.json",
    "sparta_pt": "config.json",
}
LAYOUTS = sorted(SOURCES)


# --------------------------------------------------------------------------- safetensors surgery


def split_safetensors(blob: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def join_safetensors(header: dict | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def tensors_of(blob: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors.numpy import load

    header, _ = split_safetensors(blob)
    return load(blob), dict(header.get("__metadata__") or {})


def save_tensors(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata or None)


# --------------------------------------------------------------------------- strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
DTYPES = [
    "F64",
    "F32",
    "F16",
    "BF16",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U64",
    "BOOL",
    "F8_E4M3",
    "XX",
    "",
    "f32",
]
ODD_INTS = st.sampled_from([-1, 0, 1, 2, 3, 7, 8, 63, 64, 2**31, 2**32 + 1, 2**63 - 1, 2**64 + 5, -(2**63)])


def _weights_file(layout: str) -> str:
    return "adapter_model.safetensors" if layout.startswith("peft") else "sparse_deltas.safetensors"


@st.composite
def byte_damage(draw, layout):
    """(kind, file, new bytes): truncation, bit flips, header length, non-JSON header."""
    files = SOURCES[layout]
    name = draw(st.sampled_from(sorted(n for n in files if n.endswith((".safetensors", ".pt")))))
    blob = files[name]
    kinds = ["truncated", "bit flips"] + (
        ["header length", "non-JSON header"] if name.endswith(".safetensors") else []
    )
    kind = draw(st.sampled_from(kinds))
    if kind == "truncated":
        return kind, name, blob[: draw(st.integers(0, len(blob) - 1))]
    if kind == "bit flips":
        out = bytearray(blob)
        for pos in draw(st.lists(st.integers(0, len(blob) * 8 - 1), min_size=1, max_size=6)):
            out[pos // 8] ^= 1 << (pos % 8)
        return kind, name, bytes(out)
    if kind == "header length":
        n = draw(ODD_INTS | st.integers(0, len(blob) + 16)) % 2**64
        return kind, name, n.to_bytes(8, "little") + blob[8:]
    header, data = split_safetensors(blob)
    size = len(json.dumps(header, separators=(",", ":")))
    garbage = draw(st.binary(min_size=1, max_size=size) | st.text(max_size=size).map(str.encode))
    return kind, name, join_safetensors(garbage, data)


@st.composite
def header_damage(draw, layout):
    """(kind, file, bytes): one entry of a valid header made wrong (dtype, offsets, shape, fields)."""
    files = SOURCES[layout]
    name = draw(st.sampled_from(sorted(n for n in files if n.endswith(".safetensors"))))
    header, data = split_safetensors(files[name])
    keys = sorted(k for k in header if k != "__metadata__")
    key = draw(st.sampled_from(keys))
    entry = dict(header[key])
    kind = draw(st.sampled_from(["wrong dtype", "offsets", "shape", "entry", "metadata"]))
    if kind == "wrong dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES) | json_values)
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            st.lists(ODD_INTS | st.integers(-8, len(data) + 8), max_size=3) | json_values
        )
    elif kind == "shape":
        entry["shape"] = draw(st.lists(ODD_INTS | st.integers(-2, 40), max_size=4) | json_values)
    elif kind == "entry":
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if draw(st.booleans()):
            entry.pop(field)
        else:
            entry = draw(json_values)
    else:
        header["__metadata__"] = draw(
            json_values | st.dictionaries(st.text(max_size=4), json_values, max_size=3)
        )
        return "header metadata", name, join_safetensors(header, data)
    header[key] = entry
    return f"header {kind}", name, join_safetensors(header, data)


@st.composite
def tensor_damage(draw, layout):
    """(kind, file, bytes): a well-formed safetensors file whose tensors are wrong for the format."""
    files = SOURCES[layout]
    name = draw(st.sampled_from(sorted(n for n in files if n.endswith(".safetensors"))))
    tensors, metadata = tensors_of(files[name])
    key = draw(st.sampled_from(sorted(tensors)))
    t = tensors[key]
    kind = draw(
        st.sampled_from(
            ["NaN/inf", "index values", "dtype", "shape", "drop key", "rename key", "extra key", "empty"]
        )
    )
    if kind == "NaN/inf" and t.size:
        t = t.astype(np.float32).copy()
        t.reshape(-1)[draw(st.integers(0, t.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf, 3e38])
        )
        tensors[key] = t
    elif kind == "index values" and t.size:
        t = t.astype(np.int64).copy()
        t.reshape(-1)[draw(st.integers(0, t.size - 1))] = (
            draw(ODD_INTS | st.integers(-3, 40)) % 2**63 * (-1 if draw(st.booleans()) else 1)
        )
        tensors[key] = t.astype(draw(st.sampled_from([np.int64, np.int32, np.uint8, np.float32])))
    elif kind == "dtype":
        tensors[key] = t.astype(
            draw(st.sampled_from([np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]))
        )
    elif kind == "shape":
        how = draw(st.sampled_from(["flatten", "transpose", "add axis", "drop last", "scalar"]))
        if how == "flatten":
            t = t.reshape(-1)
        elif how == "transpose":
            t = t.T
        elif how == "add axis":
            t = t[None]
        elif how == "drop last" and t.shape and t.shape[0]:
            t = t[:-1]
        elif how == "scalar":
            t = np.asarray(t.reshape(-1)[0] if t.size else 0, t.dtype)
        tensors[key] = t
    elif kind == "drop key":
        tensors.pop(key)
    elif kind == "rename key":
        tensors[
            draw(st.sampled_from(["", ".", "indices.", "deltas.x", "base_model.model.", "x.weight"]))
            + key[:5]
        ] = tensors.pop(key)
    elif kind == "extra key":
        tensors[draw(st.text(min_size=1, max_size=12))] = np.zeros(draw(st.integers(0, 3)), np.float32)
    elif kind == "empty":
        tensors[key] = np.zeros((0,) * max(t.ndim, 1), t.dtype)
    return f"tensor {kind}", name, save_tensors(tensors, metadata)


@st.composite
def layout_damage(draw, layout):
    """(kind, file, bytes): garbage in the shape layout we record in the safetensors metadata."""
    name = _weights_file(layout)
    tensors, metadata = tensors_of(SOURCES[layout][name])
    raw = metadata.get("jaxsparse_layout")
    if raw is None:  # PEFT LoRA files record none
        metadata["jaxsparse_layout"] = json.dumps(draw(json_values))
        return "layout metadata", name, save_tensors(tensors, metadata)
    layout_obj = json.loads(raw)
    if draw(st.booleans()):
        metadata["jaxsparse_layout"] = draw(st.text(max_size=20) | json_values.map(json.dumps))
    else:
        key = draw(st.sampled_from(sorted(layout_obj)))
        field = draw(st.sampled_from(["path", "shape", "transposed", None]))
        if field is None:
            layout_obj[key] = draw(json_values)
        else:
            layout_obj[key][field] = draw(json_values | st.lists(ODD_INTS, max_size=3))
        metadata["jaxsparse_layout"] = json.dumps(layout_obj)
    return "layout metadata", name, save_tensors(tensors, metadata)


@st.composite
def config_damage(draw, layout):
    """(kind, file, bytes): the JSON config damaged."""
    name = CONFIG_FILE[layout]
    cfg = json.loads(SOURCES[layout][name])
    kind = draw(
        st.sampled_from(
            [
                "missing keys",
                "wrong types",
                "peft_type",
                "not an object",
                "garbage bytes",
                "not UTF-8",
                "deep nesting",
            ]
        )
    )
    if kind == "missing keys":
        for key in draw(st.lists(st.sampled_from(sorted(cfg)), min_size=1, max_size=4)):
            cfg.pop(key, None)
    elif kind == "wrong types":
        interesting = [
            k for k in sorted(cfg) if not isinstance(cfg[k], (int, float)) or k in ("r", "lora_alpha")
        ]
        for key in draw(st.lists(st.sampled_from(interesting), min_size=1, max_size=3)):
            cfg[key] = draw(json_values)
    elif kind == "peft_type":
        cfg["peft_type"] = draw(st.sampled_from(["LOHA", "shira", "", "SHIRA", "LORA"]) | json_values)
    elif kind == "not an object":
        return kind, name, json.dumps(draw(json_values.filter(lambda v: not isinstance(v, dict)))).encode()
    elif kind == "garbage bytes":
        return kind, name, draw(st.binary(max_size=64))
    elif kind == "not UTF-8":
        return kind, name, b"\xff\xfe" + json.dumps(cfg).encode("utf-16-le")
    else:
        depth = draw(st.sampled_from([10, 3_000]))  # 3000: past the default recursion limit (1000)
        return kind, name, b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
    return f"config {kind}", name, json.dumps(cfg).encode()


@st.composite
def file_damage(draw, layout):
    """(kind, file, None): a file of the adapter removed."""
    return "file missing", draw(st.sampled_from(sorted(SOURCES[layout]))), None


torch_values = st.sampled_from(["int64", "float64", "bfloat16", "bool", "complex64", "uint8"])


@st.composite
def pickle_damage(draw, layout):
    """(kind, file, bytes): a ``torch.save`` file that ``torch.load(weights_only=True)`` accepts, holding
    the wrong structure (not a dict, missing parts, non-tensors, odd dtypes and shapes)."""
    import torch

    name = draw(st.sampled_from(["sparse_deltas.pt", "head_init.pt"]))
    obj = torch.load(io.BytesIO(SOURCES[layout][name]), weights_only=True)
    kind = draw(st.sampled_from(["not a dict", "part", "entry", "tensor dtype", "tensor shape"]))
    if name == "head_init.pt" or kind == "not a dict":
        if name == "head_init.pt" and kind in ("tensor dtype", "tensor shape"):
            obj = obj.to(getattr(torch, draw(torch_values))) if kind == "tensor dtype" else obj.reshape(-1)
        else:
            obj = draw(json_values.filter(lambda v: not isinstance(v, float) or v == v))
        return f"pickle {kind}", name, torch_bytes(obj)
    part = draw(st.sampled_from(["indices", "deltas"]))
    key = draw(st.sampled_from(sorted(obj[part])))
    if kind == "part":
        if draw(st.booleans()):
            obj.pop(part)
        else:
            obj[part] = draw(json_values)
    elif kind == "entry":
        obj[part][key] = draw(json_values)
    elif kind == "tensor dtype":
        obj[part][key] = obj[part][key].to(getattr(torch, draw(torch_values)))
    else:
        obj[part][key] = obj[part][key].reshape(-1) if draw(st.booleans()) else obj[part][key][None]
    return f"pickle {kind}", name, torch_bytes(obj)


def any_damage(layout):
    kinds = [byte_damage(layout), config_damage(layout), file_damage(layout)]
    if layout == "sparta_pt":
        kinds.append(pickle_damage(layout))
    else:
        kinds += [header_damage(layout), tensor_damage(layout), layout_damage(layout)]
    return st.one_of(kinds)


# --------------------------------------------------------------------------- the property


@contextlib.contextmanager
def time_limit(seconds: int):
    def on_alarm(signum, frame):
        raise TimeoutError(f"reader still running after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def damaged_dir(root: str, layout: str, name: str, blob: bytes | None) -> str:
    d = os.path.join(root, layout)
    os.mkdir(d)
    for fname, content in SOURCES[layout].items():
        if fname == name and blob is None:
            continue
        with open(os.path.join(d, fname), "wb") as f:
            f.write(blob if fname == name else content)
    return d


def assert_loads_or_clear_error(d: str, params) -> None:
    try:
        load_adapter(d, params)
    except AdapterFormatError as e:
        assert d in str(e), f"the error does not name the adapter: {e}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_valid_sources_load(layout):
    """The undamaged adapters load (so every damaged example starts from a file that worked)."""
    with tempfile.TemporaryDirectory() as root:
        d = damaged_dir(root, layout, "", b"")
        load_adapter(d, PARAMS)
        if layout in ("peft_shira", "sparta"):
            load_adapter(d)


def _fuzz(layout: str, damage) -> None:
    _, name, blob = damage
    with tempfile.TemporaryDirectory() as root:
        d = damaged_dir(root, layout, name, blob)
        with time_limit(TIME_LIMIT_S):
            assert_loads_or_clear_error(d, PARAMS)
            if layout in ("peft_shira", "sparta"):  # our safetensors files load without the base model too
                assert_loads_or_clear_error(d, None)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_damaged_adapters_give_clear_errors(layout):
    @SETTINGS
    @given(damage=any_damage(layout))
    def run(damage):
        _fuzz(layout, damage)

    run()


# Damage to what `jaxsparse info` itself reads (the config, the safetensors header and metadata).
INFO_READS = (
    "config",
    "not an object",
    "garbage bytes",
    "not UTF-8",
    "deep nesting",
    "header",
    "non-JSON",
    "layout",
)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_info_on_damaged_adapters_exits_2_with_one_line(layout):
    """`jaxsparse info` of a damaged adapter: never a traceback; one line and exit 2 whenever the damage
    is in what info reads (config, safetensors header) and the loaders refuse the adapter."""
    from jaxsparse.cli import main
    from jaxsparse.cli.info import check_readable

    @settings(SETTINGS, max_examples=60)
    @given(damage=any_damage(layout))
    def run(damage):
        kind, name, blob = damage
        with tempfile.TemporaryDirectory() as root:
            d = damaged_dir(root, layout, name, blob)
            out, err = io.StringIO(), io.StringIO()
            with time_limit(TIME_LIMIT_S), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(["info", d])
            assert rc in (0, 2), (rc, err.getvalue())
            if rc == 2:
                assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
            elif kind.startswith(INFO_READS):
                # info printed a table: what the loaders can check without the base model passes
                check_readable(d)

    run()
