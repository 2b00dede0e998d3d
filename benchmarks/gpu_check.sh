#!/usr/bin/env bash
# One prepared GPU session: CUDA-vs-CPU correctness tests, then GPU timings of mace-ase (float32 and float64).
# Run from the repository root on a machine with a CUDA build of torch and this package installed:
#     MODEL=/path/to/full-size.model bash benchmarks/gpu_check.sh
# mace-torch's side (for ratios) needs `pip install mace-torch==0.3.16` in another venv: ORACLE_PY=... adds it.
set -euo pipefail
MODEL=${MODEL:?set MODEL to a .model file (e.g. tests/fixtures/make_fixtures.py --full-size output)}
ATOMS=${ATOMS:-"216 1000 1728"}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -m pytest -q tests/test_cuda.py tests/test_fused.py tests/test_radial_spline.py
# fused (chunked) convolution vs the reference path on the GPU, A/B in one process, and the largest cell's memory
python benchmarks/profile_model.py --device cuda --model "$MODEL" --dtype float32 --atoms 4096 --compare --repeat 3
for dtype in float32 float64; do
  python benchmarks/time_calculator.py --impl ours --device cuda --model "$MODEL" --dtype "$dtype" --atoms $ATOMS --repeat 5
  python benchmarks/time_calculator.py --impl ours-spline --device cuda --model "$MODEL" --dtype "$dtype" \
    --atoms $ATOMS --repeat 5
  if [ -n "${ORACLE_PY:-}" ]; then
    "$ORACLE_PY" benchmarks/time_calculator.py --impl mace-torch --device cuda --model "$MODEL" --dtype "$dtype" \
      --atoms $ATOMS --repeat 5
  fi
done
