#!/usr/bin/env bash
# Side-by-side CPU timing of mace-torch 0.3.16 and mace-ase on the same model files and structures, interleaved
# (mace-torch, ours, mace-torch, ours) so that both see the same machine load. Writes JSON lines to $OUT.
#   ORACLE_PY=/path/to/venv-with-mace-torch/bin/python OURS_PY=/path/to/venv/bin/python \
#   bash benchmarks/compare_cpu.sh MODEL_FILE [MODEL_FILE...]
set -euo pipefail
ORACLE_PY=${ORACLE_PY:-/work/venvs/oracle/bin/python}
OURS_PY=${OURS_PY:-python}
OUT=${OUT:-benchmarks/cpu_results.jsonl}
THREADS=${THREADS:-1}
ATOMS=${ATOMS:-"64 216"}
here="$(dirname "$0")"
for model in "$@"; do
  for dtype in float32 float64; do
    for round in 1 2; do
      "$ORACLE_PY" "$here/time_calculator.py" --impl mace-torch --model "$model" --dtype "$dtype" --threads "$THREADS" \
        --atoms $ATOMS --repeat 2 2>/dev/null | grep "^{" | sed "s|^{|{\"model\": \"$(basename "$model")\", \"round\": $round, |" >> "$OUT"
      "$OURS_PY" "$here/time_calculator.py" --impl ours --model "$model" --dtype "$dtype" --threads "$THREADS" \
        --atoms $ATOMS --repeat 2 2>/dev/null | grep "^{" | sed "s|^{|{\"model\": \"$(basename "$model")\", \"round\": $round, |" >> "$OUT"
    done
  done
done
