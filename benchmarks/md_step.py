"""ASE VelocityVerlet step time (neighbour list included) of the emt-demo model, float64, 1 thread.

    python benchmarks/md_step.py ours|ours-spline|ours-default|mace-torch 108|500|1000   (mace-torch: the oracle
    virtualenv; ours: radial="exact", ours-default: no radial argument, i.e. radial="auto")
"""
import sys
import time
from pathlib import Path
import numpy as np
from ase.build import bulk
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase import units
import torch  # noqa: E402
torch.set_num_threads(1)
impl, n = sys.argv[1], int(sys.argv[2])
model = str(Path(__file__).resolve().parents[1] / "models" / "emt-demo.model")
if impl == "mace-torch":
    from mace.calculators import MACECalculator
    calc = MACECalculator(model_paths=model, device="cpu", default_dtype="float64")
else:
    from mace_ase import MACECalculator
    radial = {"ours": {"radial": "exact"}, "ours-spline": {"radial": "spline"}}.get(impl, {})
    calc = MACECalculator(model_paths=model, device="cpu", default_dtype="float64", skin=1.0, **radial)
atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat({108: (3, 3, 3), 500: (5, 5, 5), 1000: (7, 6, 6)}[n])
atoms.calc = calc
MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(1))
dyn = VelocityVerlet(atoms, 2 * units.fs)
dyn.run(3)
steps = 10 if n < 1000 else 5
start = time.perf_counter()
dyn.run(steps)
dt = (time.perf_counter() - start) / steps
print(f"{impl} {len(atoms)} atoms: {dt*1000:.1f} ms/step")
