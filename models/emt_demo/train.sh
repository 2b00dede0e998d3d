#!/usr/bin/env bash
# Train the emt-demo MACE model with mace-torch's own training command (mace_run_train), on the CPU.
#
# Requires a virtualenv with torch==2.13.0 and mace-torch==0.3.16 (here /work/venvs/oracle) and the data written by
#     python models/emt_demo/make_dataset.py --out /work/emt_data
# Usage:  models/emt_demo/train.sh [DATA_DIR] [WORK_DIR] [EPOCHS]
# The trained model is WORK_DIR/emt-demo_stagetwo.model (official whole-module pickle, float64); it is copied to
# models/emt-demo.model by hand after evaluation (see models/README.md).
set -euo pipefail

DATA_DIR=${1:-/work/emt_data}
WORK_DIR=${2:-/work/emt_train}
EPOCHS=${3:-24}
START_STAGE_TWO=$(( EPOCHS * 3 / 4 ))
MACE_VENV=${MACE_VENV:-/work/venvs/oracle}

mkdir -p "$WORK_DIR"
cd "$WORK_DIR"

# One thread: the training machine had two cores shared with other jobs; one thread was faster than two there.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

"$MACE_VENV/bin/mace_run_train" \
    --name=emt-demo \
    --seed=7 \
    --device=cpu \
    --default_dtype=float64 \
    --train_file="$DATA_DIR/train.xyz" \
    --valid_file="$DATA_DIR/valid.xyz" \
    --test_file="$DATA_DIR/test.xyz" \
    --energy_key=REF_energy \
    --forces_key=REF_forces \
    --stress_key=REF_stress \
    --E0s=average \
    --model=ScaleShiftMACE \
    --hidden_irreps='32x0e+32x1o' \
    --r_max=5.5 \
    --num_radial_basis=8 \
    --num_cutoff_basis=5 \
    --max_ell=2 \
    --correlation=3 \
    --num_interactions=2 \
    --radial_MLP='[64, 64, 64]' \
    --MLP_irreps='16x0e' \
    --loss=stress \
    --energy_weight=10 \
    --forces_weight=10 \
    --stress_weight=1000 \
    --swa \
    --start_swa="$START_STAGE_TWO" \
    --swa_energy_weight=1000 \
    --swa_forces_weight=10 \
    --swa_stress_weight=1000 \
    --ema \
    --ema_decay=0.99 \
    --batch_size=5 \
    --valid_batch_size=16 \
    --lr=0.01 \
    --scheduler_patience=5 \
    --max_num_epochs="$EPOCHS" \
    --patience=1000 \
    --eval_interval=1 \
    --error_table=PerAtomRMSEstressvirials \
    --num_workers=0 \
    --save_cpu \
    --enable_cueq=False
