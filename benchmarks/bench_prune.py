"""Wanda on SmolLM2-135M: jaxsparse (jitted block by block) vs a straightforward PyTorch Wanda.

Both prune the same weights (the GGUF dequantized to fp32, loaded once and copied into a
transformers ``LlamaForCausalLM``) on the same calibration tokens (``--samples`` windows of
``--seq-len`` tokens of BBC News), in micro-batches of ``--batch-size`` sequences, all 210 block
linears to 50% unstructured sparsity. The torch reference follows the Wanda authors' ``prune_wanda``
(locuslab/wanda): per decoder layer, forward hooks accumulate ``||X_j||^2`` of every linear's input,
``|W| * sqrt(.)`` is sorted per output row and the lowest half zeroed, then the layer's outputs are
recomputed with the pruned weights for the next layer. Rounds alternate (jaxsparse, torch, ...);
jaxsparse's first round includes compilation and is reported apart. The two results' masks are
compared (agreement should be ~100%; float summation order can flip near-ties, which then
propagate a little through later layers).

    python benchmarks/bench_prune.py                         # 32 x 256 tokens, 3 rounds
    python benchmarks/bench_prune.py --samples 8 --rounds 2  # quicker
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import common  # sys.path, offline env
import jax
import numpy as np
import torch
import transformers

from jaxsparse import calibration
from jaxsparse.models import from_pretrained, load_tokenizer, to_state_dict
from jaxsparse.prune import prune_model
from jaxsparse.tree import get_leaf


def torch_model_from(model) -> torch.nn.Module:
    config = transformers.LlamaConfig(**{**model.config.to_dict(), "architectures": None})
    tm = transformers.LlamaForCausalLM(config).eval()
    state = {k: torch.as_tensor(np.array(v)) for k, v in to_state_dict(model).items()}
    tm.load_state_dict(state, strict=False)  # the tied head is the embedding
    return tm


@torch.no_grad()
def torch_wanda(tm: torch.nn.Module, ids: np.ndarray, sparsity: float, batch_size: int) -> None:
    """Wanda in place on ``tm`` (the reference algorithm; unstructured, per output row)."""
    ids_t = torch.as_tensor(ids.astype(np.int64))
    n, t = ids_t.shape
    hidden = tm.model.embed_tokens(ids_t)
    positions = torch.arange(t)[None].expand(n, t)
    cos, sin = tm.model.rotary_emb(hidden, positions)
    batches = [slice(s, s + batch_size) for s in range(0, n, batch_size)]

    def run(layer, x):
        return torch.cat(
            [layer(x[b], attention_mask=None, position_embeddings=(cos[b], sin[b])) for b in batches]
        )

    for layer in tm.model.layers:
        linears = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sq = {name: torch.zeros(m.in_features, dtype=torch.float32) for name, m in linears.items()}

        def hook(name, sq=sq):
            def fn(module, args, out):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                sq[name] += (x * x).sum(0)

            return fn

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        run(layer, hidden)  # capture with the layer's dense weights
        for h in handles:
            h.remove()
        for name, m in linears.items():
            metric = m.weight.abs() * torch.sqrt(sq[name])[None, :]
            k = int(m.weight.shape[1] * sparsity)
            idx = torch.sort(metric, dim=-1, stable=True)[1][:, :k]
            m.weight.scatter_(1, idx, 0.0)
        hidden = run(layer, hidden)  # the next layer sees the pruned layer's output


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default: 2)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m0 = common.machine()

    path = common.smollm_gguf()
    model = from_pretrained(path)
    tokenizer = load_tokenizer(path)
    cal = calibration.load_calibration(
        "bbc_news", tokenizer, samples=args.samples, seq_len=args.seq_len, seed=0
    )
    base_torch = torch_model_from(model)
    ours_times, torch_times = [], []
    ours = tm = None
    for r in range(args.rounds):
        t0 = time.perf_counter()
        ours = prune_model(
            model,
            method="wanda",
            sparsity=args.sparsity,
            input_ids=cal.input_ids,
            batch_size=args.batch_size,
            progress=False,
        )
        jax.block_until_ready(ours.params)
        ours_times.append(time.perf_counter() - t0)
        tm = copy.deepcopy(base_torch)
        t0 = time.perf_counter()
        torch_wanda(tm, cal.input_ids, args.sparsity, args.batch_size)
        torch_times.append(time.perf_counter() - t0)
        print(f"round {r + 1}: jaxsparse {ours_times[-1]:.1f} s, torch {torch_times[-1]:.1f} s", flush=True)

    agree = total = 0
    torch_state = dict(tm.named_parameters())
    for name in calibration.linear_paths(ours):
        a = np.asarray(get_leaf(ours.params, name + ".kernel")).T == 0
        b = torch_state[name + ".weight"].detach().numpy() == 0
        agree += int((a == b).sum())
        total += a.size
    warm = ours_times[1:] or ours_times
    result = {
        "machine_start": m0,
        "machine_end": common.machine(),
        "args": vars(args),
        "tokens": int(cal.input_ids.size),
        "jaxsparse_s": ours_times,
        "torch_s": torch_times,
        "jaxsparse_cold_s": ours_times[0],
        "jaxsparse_warm_median_s": statistics.median(warm),
        "torch_median_s": statistics.median(torch_times),
        "mask_agreement": agree / total,
    }
    result["torch_over_jaxsparse_warm"] = result["torch_median_s"] / result["jaxsparse_warm_median_s"]
    common.write_json(common.RESULTS_DIR / "prune_wanda.json", result)
    print(common.load_line(m0))
    print(
        f"Wanda 50% on SmolLM2-135M, {args.samples} x {args.seq_len} tokens, micro-batch {args.batch_size}: "
        f"jaxsparse cold {ours_times[0]:.1f} s, warm median {result['jaxsparse_warm_median_s']:.1f} s; "
        f"torch median {result['torch_median_s']:.1f} s; torch / jaxsparse (warm) = "
        f"{result['torch_over_jaxsparse_warm']:.2f}x; mask agreement {agree / total:.5%}"
    )


if __name__ == "__main__":
    main()
