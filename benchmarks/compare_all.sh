#!/usr/bin/env bash
# mace-torch 0.3.16, Symmetrix-XL 0.1.1 and mace-ase timed side by side on the same full-size model files and
# structures, interleaved (for each case: mace-torch, mace-ase radial='exact', mace-ase as installed (default
# radial='auto': tabulated radial weights on the CPU), Symmetrix, then again), each in its own virtualenv.
# Installs what is missing, writes JSON lines to $OUT and the table to benchmarks/RESULTS.md (benchmarks/summarize.py).
#
#   bash benchmarks/compare_all.sh                    # defaults below; environment variables override them
#   THREADS="1 2" ATOMS="216 512" ROUNDS=3 bash benchmarks/compare_all.sh
#
# Symmetrix's extractor refuses residual-first models (MP-0a), so it runs on the MPA-0-medium architecture only.
# Its CPU backend compiles model-specific code at the first call (~3 minutes, cached per user); the warm-up call of
# the first run pays for it, timed calls never do.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS=${VENVS:-/work/venvs}
FULLSIZE=${FULLSIZE:-/work/fullsize}
OURS_PY=${OURS_PY:-$VENVS/dev/bin/python}
ORACLE_PY=$VENVS/oracle/bin/python
SYMMETRIX_PY=$VENVS/symmetrix/bin/python
THREADS=${THREADS:-1}
ATOMS=${ATOMS:-"216 512"}
DTYPES=${DTYPES:-"float32 float64"}
SYMMETRIX_DTYPES=${SYMMETRIX_DTYPES:-float32}
ROUNDS=${ROUNDS:-2}
REPEAT=${REPEAT:-2}
RUN=${RUN:-$(date -u +%Y%m%dT%H%M%SZ)}
OUT=${OUT:-benchmarks/compare_all.jsonl}

if [ ! -x "$ORACLE_PY" ]; then
  python3 -m venv "$VENVS/oracle" && "$VENVS/oracle/bin/pip" install torch==2.13.0 mace-torch==0.3.16
fi
if [ ! -x "$SYMMETRIX_PY" ]; then
  python3 -m venv "$VENVS/symmetrix" && "$VENVS/symmetrix/bin/pip" install torch==2.13.0 mace-torch==0.3.16 symmetrix-xl==0.1.1
fi
if [ ! -f "$FULLSIZE/mpa0_medium_fullsize.model" ]; then
  "$ORACLE_PY" tests/fixtures/make_fixtures.py --full-size "$FULLSIZE"
fi
if [ ! -f "$FULLSIZE/mpa0_medium_fullsize.json" ]; then
  (cd "$FULLSIZE" && "$VENVS/symmetrix/bin/symmetrix_extract_mace" --model mpa0_medium_fullsize.model \
     --output mpa0_medium_fullsize.json)
fi

run() {  # run IMPL PYTHON MODEL_FILE DTYPE THREADS ROUND
  local label
  label=$(basename "$3" | sed 's/\.json$/.model/')
  OMP_NUM_THREADS=$5 "$2" benchmarks/time_calculator.py --impl "$1" --model "$3" --dtype "$4" --threads "$5" \
    --atoms $ATOMS --repeat "$REPEAT" 2>/dev/null | grep "^{" |
    sed "s|^{|{\"run\": \"$RUN\", \"model\": \"$label\", \"round\": $6, |" >> "$OUT" || echo "failed: $*" >&2
}

for threads in $THREADS; do
  for dtype in $DTYPES; do
    for round in $(seq 1 "$ROUNDS"); do
      for name in mp0_medium_fullsize mpa0_medium_fullsize; do
        model="$FULLSIZE/$name.model"
        run mace-torch "$ORACLE_PY" "$model" "$dtype" "$threads" "$round"
        run ours "$OURS_PY" "$model" "$dtype" "$threads" "$round"
        run ours-default "$OURS_PY" "$model" "$dtype" "$threads" "$round"
        if [ "$name" = mpa0_medium_fullsize ] && [[ " $SYMMETRIX_DTYPES " == *" $dtype "* ]]; then
          run symmetrix "$SYMMETRIX_PY" "$FULLSIZE/$name.json" "$dtype" "$threads" "$round"
        fi
      done
    done
  done
done
"$OURS_PY" benchmarks/summarize.py --results "$OUT" --run "$RUN" --write benchmarks/RESULTS.md
