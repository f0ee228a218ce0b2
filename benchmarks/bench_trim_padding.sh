#!/usr/bin/env bash
# `jaxsparse train` (the embedded default: SHiRA r=8, MiniLM, Rotten Tomatoes, 120 steps) with
# data.trim_padding on and off at data.max_length 64 and 128: wall time and final held-out metrics
# (BENCHMARKS.md 2e). Runs in a scratch directory; OUT=DIR keeps the runs elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${OUT:-$(mktemp -d)}
for L in 64 128; do for trim in true false; do
  o="$runs/L${L}_$trim"
  s=$(date +%s.%N)
  jaxsparse train --output "$o" --set data.max_length=$L --set data.trim_padding=$trim --set train.progress=false > "$o.log" 2>&1
  e=$(date +%s.%N)
  echo "L=$L trim=$trim wall=$(python3 -c "print(round($e - $s, 1))") s; $(grep trained "$o.log"); $(grep '"split": "eval"' "$o/metrics.jsonl" | tail -1)"
done; done
