"""GPTQ on real SmolLM2-135M layers: jaxsparse (one jitted XLA program per layer) vs a straightforward
PyTorch implementation of the same algorithm (AutoGPTQ's ``fasterquant`` loop: Python loop over the
columns of each block of 128, lazy batch updates, the same grid rules as ours), side by side.

``gptqmodel`` / ``llmcompressor`` / ``auto-gptq`` do not install on this CPU-only machine (CUDA
extensions), so the PyTorch reference lives here (:func:`torch_gptq`). Both get the same kernel and
the same Hessian ``2 X^T X / n`` (captured by :func:`jaxsparse.calibration.sequential_capture` on
BBC News calibration windows), float32, 4 bits, group size 64 (SmolLM2's width 576 is not a multiple of 128), asymmetric, 2 threads for torch.
Timed interleaved per layer; the first jaxsparse call per shape (XLA compile) is reported apart.
Sanity: both results' Hessian-weighted error ``tr(dW^T H dW)`` and the fraction of equal codes.

    python benchmarks/bench_quant.py                 # the 7 linears of blocks 0 and 15, 3 rounds
    python benchmarks/bench_quant.py --blocks 0 --repeats 2

Writes benchmarks/results/quant.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def torch_grid(x, bits: int, sym: bool):
    """Per output row (scale, zero) of a group ``x`` (out, cols): jaxsparse.quant.grid's rules in torch."""
    import torch

    maxq = 2**bits - 1
    xmin = torch.clamp(x.min(1).values, max=0.0)
    xmax = torch.clamp(x.max(1).values, min=0.0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1.0, 1.0

    def ceil16(v):
        v = torch.clamp(v, min=float(torch.finfo(torch.float16).smallest_normal) * 2**-10)
        h = v.half()
        up = torch.nextafter(h, torch.tensor(float("inf"), dtype=torch.float16))
        return torch.where(h.float() < v, up, h).float()

    scale = ceil16((xmax - xmin) / maxq)
    if sym:
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    zero = torch.round(-xmin / scale)
    low = zero < 1
    scale = torch.where(low, ceil16(xmax / (maxq - 1)), scale)
    zero = torch.where(low, torch.ones_like(zero), zero)
    return scale, zero


def torch_gptq(w, h, *, bits=4, group_size=128, sym=False, damp=0.01, blocksize=128):
    """AutoGPTQ-style GPTQ on a PyTorch (out, in) weight; returns (dequantized weight, codes)."""
    import torch

    W = w.clone().float()
    H = h.clone().float()
    n = W.shape[1]
    mask = W != 0
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    C = torch.zeros_like(W)
    maxq = 2**bits - 1
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1, M1 = W[:, i1:i2].clone(), mask[:, i1:i2]
        Q1, C1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % group_size == 0:
                g = (
                    W1[:, i : i + group_size]
                    if i + group_size <= i2 - i1
                    else W[:, i1 + i : i1 + i + group_size]
                )
                gm = (
                    M1[:, i : i + group_size]
                    if i + group_size <= i2 - i1
                    else mask[:, i1 + i : i1 + i + group_size]
                )
                scale, zero = torch_grid(torch.where(gm, g, torch.zeros_like(g)), bits, sym)
            w_col, d = W1[:, i], Hinv1[i, i]
            c = torch.clamp(torch.round(w_col / scale) + zero, 0, maxq)
            c = torch.where(M1[:, i], c, zero)
            q = scale * (c - zero)
            Q1[:, i], C1[:, i] = q, c
            err = (w_col - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2], C[:, i1:i2] = Q1, C1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q, C


def capture_hessians(model, blocks: list[int], samples: int, seq_len: int) -> dict[str, tuple]:
    """{module path: (kernel (in, out), H)} for the linears of ``blocks`` (float model, sequential capture)."""
    import numpy as np

    from jaxsparse import calibration
    from jaxsparse.models import load_tokenizer

    tok = load_tokenizer(common.smollm_gguf())
    cal = calibration.load_calibration(
        "bbc_news", tok, samples=samples, seq_len=seq_len, seed=0, progress=False
    )
    out = {}

    def update(block):
        if block.index in blocks:
            for p, k in block.kernels.items():
                out[p] = (np.asarray(k), np.asarray(block.stats[p].hessian()))
        return {}

    calibration.sequential_capture(
        model, cal.input_ids, cal.attention_mask, update=update, statistics=("xtx",),
        max_blocks=max(blocks) + 1, progress=True,
    )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 15])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64, help="64: SmolLM2's 576 is not a multiple of 128")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from jaxsparse.models import from_pretrained
    from jaxsparse.quant.gptq import gptq_quantize
    from jaxsparse.quant.grid import dequantize

    torch.set_num_threads(2)
    model = from_pretrained(common.smollm_gguf())
    layers = capture_hessians(model, args.blocks, args.samples, args.seq_len)
    rows, compile_s = [], {}
    for path, (kernel, h) in layers.items():
        w_t, h_t = torch.tensor(kernel.T.copy()), torch.tensor(h)
        k_j, h_j = jax.numpy.asarray(kernel), jax.numpy.asarray(h)
        shape = kernel.shape
        if shape not in compile_s:
            t0 = time.perf_counter()
            jax.block_until_ready(gptq_quantize(k_j, h_j, bits=4, group_size=args.group_size).codes)
            compile_s[shape] = time.perf_counter() - t0
        ours = gptq_quantize(k_j, h_j, bits=4, group_size=args.group_size)
        ref_q, ref_c = torch_gptq(w_t, h_t, group_size=args.group_size)

        def err(dw, h=h):
            return float(np.trace(dw.T @ h @ dw))

        e_ours = err(kernel - np.asarray(dequantize(ours)))
        e_ref = err(kernel - ref_q.numpy().T)
        same = float(np.mean(np.asarray(ours.codes).astype(np.int64) == ref_c.numpy().T.astype(np.int64)))
        stats = common.interleaved(
            {
                "jaxsparse": lambda k=k_j, h=h_j: jax.block_until_ready(
                    gptq_quantize(k, h, bits=4, group_size=args.group_size).codes
                ),
                "torch": lambda w=w_t, h=h_t: torch_gptq(w, h, group_size=args.group_size),
            },
            repeats=args.repeats,
            warmup=0,
        )
        row = {
            "layer": path,
            "shape_in_out": list(shape),
            "jaxsparse_ms": stats["jaxsparse"],
            "torch_ms": stats["torch"],
            "ratio_torch_over_jaxsparse": stats["torch"]["median_ms"] / stats["jaxsparse"]["median_ms"],
            "hessian_error_jaxsparse": e_ours,
            "hessian_error_torch": e_ref,
            "equal_codes": same,
        }
        rows.append(row)
        print(
            f"{path:40s} {shape!s:12s} jaxsparse {stats['jaxsparse']['median_ms']:8.1f} ms  "
            f"torch {stats['torch']['median_ms']:8.1f} ms  x{row['ratio_torch_over_jaxsparse']:.1f}  "
            f"err {e_ours:.4g} vs {e_ref:.4g}  codes equal {same:.4f}",
            flush=True,
        )
    total_j = sum(r["jaxsparse_ms"]["median_ms"] for r in rows)
    total_t = sum(r["torch_ms"]["median_ms"] for r in rows)
    print(
        f"total: jaxsparse {total_j:.0f} ms, torch {total_t:.0f} ms, torch / jaxsparse = {total_t / total_j:.2f}x"
    )
    print("first-call compile per shape (s):", {str(k): round(v, 2) for k, v in compile_s.items()})
    common.write_json(
        common.RESULTS_DIR / "quant.json",
        {
            "machine": common.machine(),
            "settings": vars(args) | {"bits": 4, "sym": False, "damp_percent": 0.01},
            "layers": rows,
            "total_ms": {"jaxsparse": total_j, "torch": total_t, "ratio": total_t / total_j},
            "compile_s": {str(k): v for k, v in compile_s.items()},
        },
    )


if __name__ == "__main__":
    main()
