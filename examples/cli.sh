#!/usr/bin/env bash
# The command-line tools on a small copper cell. Replace "--model emt" by a MACE model name
# (mace-ase models list) or a .model file path.
set -euo pipefail
python - <<'PY'
from ase.build import bulk
bulk("Cu", "fcc", a=3.7, cubic=True).repeat((2, 2, 2)).write("cu.xyz")
PY
mace-ase eval cu.xyz --model emt
mace-ase relax cu.xyz --model emt --cell -o cu-relaxed.xyz
mace-ase md cu-relaxed.xyz --model emt --ensemble nvt-langevin --temperature 300 --timestep 2 \
    --steps 200 --seed 1 --traj md.traj --log md.log
