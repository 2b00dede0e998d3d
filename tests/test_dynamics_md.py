"""run_md with ASE's EMT (physical and fast): thermostats, barostats, NVE drift, watchdog.

Step counts are chosen to keep this file around a minute on two cores; seeds are fixed, so
the statistical checks are deterministic (their margins were measured across seeds).
"""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import read
from conftest import fixture_model

from mace_ase.dynamics import MDResult, Watchdog, WatchdogStop, relax, run_md
from mace_ase.dynamics.ensembles import ENSEMBLES


def copper(n: int, a: float = 3.59):
    return bulk("Cu", "fcc", a=a, cubic=True) * (n, n, n)


@pytest.fixture(scope="module")
def relaxed_cu_cell():
    """Conventional 4-atom Cu cell relaxed (cell too) with EMT at 0 GPa."""
    atoms = copper(1)
    assert relax(atoms, EMT(), cell=True, fmax=1e-4).converged
    return atoms


@pytest.mark.parametrize("ensemble", ["nvt-langevin", "nvt-bussi", "nvt-nose-hoover"])
def test_nvt_mean_temperature_108_cu(ensemble):
    atoms = copper(3)  # 108 atoms
    result = run_md(atoms, EMT(), ensemble=ensemble, temperature_k=300, timestep_fs=4, steps=500,
                    loginterval=5, seed=0, progress=False)
    equilibrated = result.temperatures[result.times_ps >= 0.5]
    assert abs(equilibrated.mean() / 300 - 1) < 0.05, equilibrated.mean()


@pytest.mark.parametrize("ensemble", ["npt-mtk", "npt-mtk-aniso", "npt-langevin", "npt-berendsen"])
def test_npt_zero_pressure_keeps_relaxed_volume(ensemble, relaxed_cu_cell):
    # 150 K: classical EMT copper expands by ~1.8 % in volume at 300 K, too close to the 2 % bound.
    atoms = relaxed_cu_cell * (2, 2, 2)
    v_relaxed = atoms.get_volume()
    result = run_md(atoms, EMT(), ensemble=ensemble, temperature_k=150, timestep_fs=4, steps=300,
                    pressure_gpa=0.0, pdamp_fs=400, loginterval=5, seed=0, progress=False)
    late = result.times_ps >= 0.6
    assert abs(result.volumes[late].mean() / v_relaxed - 1) < 0.02
    assert abs(result.pressures_gpa[late].mean()) < 0.5  # GPa; a unit slip would be off by 1e4
    assert result.volumes[late].std() > 0  # the cell did move


def test_npt_high_pressure_compresses(relaxed_cu_cell):
    atoms = relaxed_cu_cell * (2, 2, 2)
    v_relaxed = atoms.get_volume()
    result = run_md(atoms, EMT(), ensemble="npt-berendsen", temperature_k=100, timestep_fs=4, steps=150,
                    pressure_gpa=10.0, pdamp_fs=100, bulk_modulus_gpa=134, loginterval=10, seed=0, progress=False)
    # EMT Cu: B ~ 134 GPa, so 10 GPa compresses by several percent
    assert result.volumes[-1] / v_relaxed < 0.96


def test_nve_float64_energy_drift(relaxed_cu_cell):
    atoms = relaxed_cu_cell * (2, 2, 2)
    result = run_md(atoms, EMT(), ensemble="nve", temperature_k=300, timestep_fs=2, steps=1000,
                    loginterval=10, seed=0, progress=False)
    assert result.times_ps[-1] == pytest.approx(2.0)
    per_atom = result.total_energies / len(atoms)
    drift = np.polyfit(result.times_ps, per_atom, 1)[0] * 2.0  # eV/atom over 2 ps
    assert abs(drift) < 1e-4
    assert per_atom.max() - per_atom.min() < 1e-4


def test_result_series_log_and_trajectory(tmp_path):
    atoms = copper(2)
    start = atoms.get_positions().copy()
    log_path, traj_path = tmp_path / "md.log", tmp_path / "md.traj"
    result = run_md(atoms, EMT(), ensemble="nvt-langevin", steps=25, loginterval=10, seed=3,
                    trajectory=traj_path, logfile=log_path, progress=False)
    assert isinstance(result, MDResult) and result.steps == 25
    # rows at steps 0, 10, 20 and the last step 25
    np.testing.assert_allclose(result.times_ps, [0.0, 0.01, 0.02, 0.025])
    for series in (result.temperatures, result.potential_energies, result.total_energies, result.volumes,
                   result.pressures_gpa):
        assert series.shape == (4,) and np.isfinite(series).all()
    assert not np.allclose(atoms.get_positions(), start)  # atoms advanced in place
    frames = read(traj_path, ":")
    assert len(frames) == 4
    np.testing.assert_allclose(frames[-1].get_positions(), atoms.get_positions())
    table = np.loadtxt(log_path)
    np.testing.assert_allclose(table[:, 1], result.temperatures, rtol=1e-6)
    assert "25 steps" in repr(result)


def test_extxyz_trajectory(tmp_path):
    atoms = copper(2)
    run_md(atoms, EMT(), ensemble="nve", steps=20, loginterval=10, seed=0, trajectory=tmp_path / "md.xyz",
           progress=False)
    assert len(read(tmp_path / "md.xyz", ":")) == 3


def test_seed_reproducible_and_continuation():
    a, b = copper(2), copper(2)
    ra = run_md(a, EMT(), steps=20, seed=7, progress=False)
    rb = run_md(b, EMT(), steps=20, seed=7, progress=False)
    np.testing.assert_array_equal(ra.temperatures, rb.temperatures)
    # a second call keeps the velocities (no redraw) and continues smoothly
    momenta = a.get_momenta().copy()
    rc = run_md(a, EMT(), ensemble="nve", steps=1, loginterval=1, seed=1, progress=False)
    assert rc.temperatures[0] == pytest.approx(ra.temperatures[-1])
    assert not np.allclose(momenta, 0)


def test_velocities_are_maxwell_boltzmann_with_zero_momentum():
    atoms = copper(3)
    run_md(atoms, EMT(), ensemble="nve", temperature_k=500, steps=0, seed=0, progress=False)
    assert np.allclose(atoms.get_momenta().sum(axis=0), 0, atol=1e-10)
    assert 350 < atoms.get_temperature() < 650


def test_constraints_refused_with_advice():
    atoms = copper(2)
    atoms.set_constraint(FixAtoms(indices=[0]))
    for name, ensemble in ENSEMBLES.items():
        if ensemble.honours_constraints:
            continue
        with pytest.raises(ValueError, match="nvt-langevin") as info:
            run_md(atoms, EMT(), ensemble=name, steps=1, progress=False)
        assert "FixAtoms" in str(info.value)
    fixed = atoms.positions[0].copy()
    run_md(atoms, EMT(), ensemble="nvt-langevin", steps=5, seed=0, progress=False)
    np.testing.assert_allclose(atoms.positions[0], fixed)


def test_bad_arguments():
    atoms = copper(1)
    with pytest.raises(ValueError, match="available: nve"):
        run_md(atoms, EMT(), ensemble="npt", steps=1)
    with pytest.raises(ValueError, match="constant volume"):
        run_md(atoms, EMT(), ensemble="nvt-langevin", pressure_gpa=1.0, steps=1)
    with pytest.raises(ValueError, match="no calculator"):
        run_md(copper(1), steps=1)
    with pytest.raises(ValueError, match="suffix"):
        run_md(atoms, EMT(), steps=1, trajectory="x.pdb", progress=False)


def test_watchdog_stops_exploding_run(tmp_path):
    atoms = copper(2)
    traj = tmp_path / "boom.traj"
    with pytest.raises(WatchdogStop, match="temperature") as info:
        # a 40 fs time step for copper at 1000 K blows up within a few steps
        run_md(atoms, EMT(), ensemble="nve", temperature_k=1000, timestep_fs=40, steps=500,
               loginterval=5, seed=0, trajectory=traj, progress=False)
    stop = info.value
    assert stop.result.stopped_reason and stop.result.steps < 500
    assert stop.last_good_path == tmp_path / "boom.last_good.traj"
    saved = read(stop.last_good_path)
    np.testing.assert_allclose(saved.get_positions(), atoms.get_positions())  # atoms reset to it
    assert atoms.get_temperature() < 6000
    assert len(read(traj, ":")) >= 1  # the trajectory so far is kept


def test_watchdog_bounds():
    atoms = copper(1)
    atoms.calc = EMT()
    assert Watchdog().resolved(300, 10).check(atoms) is None
    atoms.positions[1] = atoms.positions[0] + [0.3, 0, 0]
    reason = Watchdog(max_force=None).resolved(300, 10).check(atoms)
    assert reason is not None and "apart" in reason
    assert "force" in Watchdog(max_force=1e-3, min_distance=None).resolved(300, 10).check(atoms)


def test_progress_bar_runs(capsys):
    run_md(copper(1), EMT(), steps=10, loginterval=5, seed=0, progress=True)
    assert "ns/day" in capsys.readouterr().err


@pytest.fixture(scope="module")
def mace_calc():
    from mace_ase.calculator import MACECalculator

    return MACECalculator(model_paths=str(fixture_model("mp0a_small")), device="cpu", default_dtype="float64")


def test_nve_with_fixture_mace_model_conserves_energy(mace_calc):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)  # random weights, but smooth
    result = run_md(atoms, mace_calc, ensemble="nve", temperature_k=100, timestep_fs=1.0, steps=100,
                    loginterval=10, seed=0, progress=False)
    per_atom = result.total_energies / len(atoms)
    assert per_atom.max() - per_atom.min() < 1e-4


def test_npt_runs_with_fixture_mace_model(mace_calc):
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    result = run_md(atoms, mace_calc, ensemble="npt-mtk", temperature_k=100, timestep_fs=1.0, steps=20,
                    pdamp_fs=100, loginterval=5, seed=0, progress=False)
    assert np.isfinite(result.pressures_gpa).all() and result.volumes.std() > 0


@pytest.mark.parametrize("temperature", [-10.0, float("nan"), float("inf")])
def test_negative_or_nonfinite_temperature_is_refused(temperature):
    atoms = copper(1)
    before = atoms.positions.copy()
    with pytest.raises(ValueError, match="temperature_k"):
        run_md(atoms, EMT(), ensemble="nvt-langevin", temperature_k=temperature, steps=5, progress=False)
    assert np.array_equal(atoms.positions, before) and not atoms.get_momenta().any()


def test_progress_lines_logged_when_not_on_a_terminal(caplog):
    """Output piped to a file: no tqdm bar, but an INFO line every progress_every steps (and at the end)."""
    caplog.set_level("INFO", logger="mace_ase.dynamics.md")
    run_md(copper(1), EMT(), steps=25, loginterval=5, seed=0, progress=None, progress_every=10)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MD step ")]
    assert [line.split()[2] for line in lines] == ["10/25", "20/25", "25/25"]
    assert "ns/day" in lines[0] and "T = " in lines[0]
    caplog.clear()
    run_md(copper(1), EMT(), steps=100, loginterval=5, seed=0, progress=None)  # default: about 20 lines
    assert len([r for r in caplog.records if r.getMessage().startswith("MD step ")]) == 20
    caplog.clear()
    run_md(copper(1), EMT(), steps=10, seed=0, progress=False)
    assert not [r for r in caplog.records if r.getMessage().startswith("MD step ")]


def test_watchdog_works_before_it_is_resolved():
    atoms = copper(1)
    atoms.calc = EMT()
    assert Watchdog().check(atoms) is None  # no temperature bound until a run resolves it
    atoms.set_momenta(np.full((len(atoms), 3), np.nan))
    reason = Watchdog().check(atoms)  # was: TypeError formatting the missing bound
    assert reason is not None and "not finite" in reason
    assert "not finite" in Watchdog().resolved(300, 10).check(atoms)
