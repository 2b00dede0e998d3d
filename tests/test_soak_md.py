"""Long run: 20,000 NVE steps of an 8-atom Cu/Au cell with the emt-demo model in float64.

What a user leaving MD running for days relies on, measured on one run:

* memory stays flat: the resident set size after warm-up never grows by more than 5 %;
* NVE conserves energy: the fitted drift of the total energy is below 1e-5 eV/atom/ps;
* the Verlet skin (0.4 Å: rebuilt often at 600 K) never misses a pair: at 100 random steps the energy and forces are
  bit-identical to a calculator that searches its neighbour list afresh, and the list equals a fresh list.

Measured (2026-12-02, shared 2-core machine at a load of about 10): 17.5 min wall, about 5 min of CPU time on one
core (~14 ms per call); 524 list builds, RSS growth 0.37 %, drift -5e-8 eV/atom/ps, largest deviation 1.4e-5
eV/atom. ``MACE_ASE_SOAK_STEPS`` shortens it for local runs.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import pytest
from ase import units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet
from ase.md.velocitydistribution import Stationary

from mace_ase.calculator import MACECalculator
from mace_ase.neighbours import neighbour_list

EMT_DEMO = Path(__file__).resolve().parents[1] / "models" / "emt-demo.model"
STEPS = int(os.environ.get("MACE_ASE_SOAK_STEPS", "20000"))
TIMESTEP_FS = 1.0
SKIN_A = 0.4  # small enough that thermal motion alone triggers rebuilds every few hundred steps
WARM_UP = STEPS // 10


def resident_bytes() -> int:
    """This process's resident set size (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


@pytest.mark.slow
def test_long_nve_run_is_flat_in_memory_conserves_energy_and_never_misses_a_pair() -> None:
    atoms = bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    atoms.numbers[[1, 4, 6]] = 79
    rng = np.random.default_rng(11)
    atoms.rattle(0.05, rng=rng)
    masses = atoms.get_masses()[:, None]
    atoms.set_momenta(rng.normal(size=(len(atoms), 3)) * np.sqrt(units.kB * 600.0 * masses))
    Stationary(atoms)
    atoms.calc = MACECalculator(model_paths=EMT_DEMO, device="cpu", default_dtype="float64", skin=SKIN_A)
    fresh = MACECalculator(model_paths=EMT_DEMO, device="cpu", default_dtype="float64", skin=0.0)
    checks = set(rng.choice(np.arange(1, STEPS + 1), size=min(100, STEPS), replace=False).tolist())
    dyn = VelocityVerlet(atoms, timestep=TIMESTEP_FS * units.fs)

    totals, rss, checked = [], [], 0
    for _ in dyn.irun(STEPS):
        step = dyn.nsteps
        totals.append(atoms.get_potential_energy() + atoms.get_kinetic_energy())
        if step in checks:
            probe = atoms.copy()
            probe.calc = fresh
            assert probe.get_potential_energy() == atoms.get_potential_energy(), f"energy differs at step {step}"
            assert np.array_equal(probe.get_forces(), atoms.get_forces()), f"forces differ at step {step}"
            used = atoms.calc._neighbours.update(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers)
            rebuilt = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, atoms.calc.r_max)
            assert np.array_equal(used[0], rebuilt[0]) and np.array_equal(used[1], rebuilt[1]), step
            checked += 1
        if step >= WARM_UP and step % 500 == 0:
            gc.collect()
            rss.append(resident_bytes())

    assert checked == len(checks)
    builds = atoms.calc._neighbours.builds
    assert 1 < builds < STEPS / 5, f"{builds} list builds in {STEPS} steps"  # the skin was used, and rebuilt
    growth = max(rss) / rss[0] - 1.0
    assert growth < 0.05, f"RSS grew by {growth:.1%} after warm-up ({rss[0] / 2**20:.0f} -> {max(rss) / 2**20:.0f} MiB)"
    times_ps = np.arange(1, len(totals) + 1) * TIMESTEP_FS * 1e-3
    per_atom = (np.array(totals) - totals[0]) / len(atoms)
    drift = np.polyfit(times_ps, per_atom, 1)[0]  # eV/atom/ps
    assert abs(drift) < 1e-5, f"NVE drift {drift:.2e} eV/atom/ps"
    assert np.max(np.abs(per_atom)) < 1e-3, f"largest deviation {np.max(np.abs(per_atom)):.2e} eV/atom"
    print(f"soak: {STEPS} steps, {builds} list builds, RSS growth {growth:.2%}, drift {drift:.2e} eV/atom/ps, "
          f"largest deviation {np.max(np.abs(per_atom)):.2e} eV/atom")
