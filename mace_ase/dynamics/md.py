"""``run_md``: molecular dynamics with sane defaults, progress, logging and a watchdog.

A thin driver over ASE's integrators (see :mod:`mace_ase.dynamics.ensembles` for the
ensemble -> class table and the default damping times). Units at this boundary: K, fs, GPa;
results in ps, K, eV, Å³ and GPa. The atoms advance in place, as with ASE's integrators.

The pressure we log is the instantaneous one, with the kinetic (ideal-gas) term:
``P = -trace(sigma_virial + sigma_kinetic) / 3``, which is what the NPT barostats control.
It is ``nan`` when the cell is not fully periodic or the calculator has no stress.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator, PropertyNotImplementedError
from ase.md.velocitydistribution import Stationary

from mace_ase.dynamics.ensembles import (
    DEFAULT_BULK_MODULUS_GPA,
    DEFAULT_PDAMP_FS,
    DEFAULT_TDAMP_FS,
    MDSettings,
    check_constraints,
    get_ensemble,
)
from mace_ase.dynamics.trajectory import TrajectoryWriter, last_good_path
from mace_ase.dynamics.watchdog import Watchdog, WatchdogStop

log = logging.getLogger(__name__)

DEFAULT_WATCHDOG = Watchdog()  # frozen, so sharing one default instance is safe
DEFAULT_MD_SKIN_A = 1.0  # Verlet skin (Å) run_md gives a MACE calculator that has none: rebuilds every ~10-50 steps
SERIES_HEADER = "time_ps temperature_K potential_energy_eV total_energy_eV volume_A3 pressure_GPa"


@dataclass(repr=False)
class MDResult:
    """What :func:`run_md` logged, every ``loginterval`` steps (first row: the start).

    Arrays have shape ``(n_log,)``: ``times_ps`` (ps), ``temperatures`` (K),
    ``potential_energies`` and ``total_energies`` (eV, whole system), ``volumes`` (Å³) and
    ``pressures_gpa`` (GPa, kinetic term included; ``nan`` without stress).
    """

    atoms: Atoms
    ensemble: str
    timestep_fs: float
    steps: int  # MD steps actually taken
    times_ps: np.ndarray
    temperatures: np.ndarray
    potential_energies: np.ndarray
    total_energies: np.ndarray
    volumes: np.ndarray
    pressures_gpa: np.ndarray
    wall_time_s: float
    stopped_reason: str | None = None  # set when the watchdog stopped the run

    @property
    def ns_per_day(self) -> float:
        """Simulated nanoseconds per day of wall time."""
        if self.wall_time_s <= 0:
            return float("nan")
        return self.steps * self.timestep_fs / self.wall_time_s * 86400.0 * 1e-6

    def __repr__(self) -> str:
        status = f"stopped: {self.stopped_reason}" if self.stopped_reason else "completed"
        mean_t = float(np.mean(self.temperatures)) if len(self.temperatures) else float("nan")
        return (
            f"MDResult({self.ensemble}, {self.steps} steps of {self.timestep_fs:g} fs, "
            f"<T> = {mean_t:.1f} K, {self.ns_per_day:.3g} ns/day, {status})"
        )


@dataclass
class _Series:
    """Accumulates the logged series and mirrors them into a text log file."""

    logfile: TextIO | None = None
    rows: list[tuple[float, ...]] = field(default_factory=list)
    _stress_ok: bool = True

    def record(self, atoms: Atoms, time_ps: float) -> tuple[float, ...]:
        epot = atoms.get_potential_energy()
        ekin = atoms.get_kinetic_energy()
        volume = atoms.get_volume() if atoms.cell.rank == 3 else float("nan")
        row = (time_ps, atoms.get_temperature(), epot, epot + ekin, volume, self._pressure_gpa(atoms))
        self.rows.append(row)
        if self.logfile is not None:
            self.logfile.write(" ".join(f"{x:.6f}" if i == 0 else f"{x:.8g}" for i, x in enumerate(row)) + "\n")
            self.logfile.flush()
        return row

    def _pressure_gpa(self, atoms: Atoms) -> float:
        if not (self._stress_ok and atoms.pbc.all() and atoms.cell.rank == 3):
            return float("nan")
        try:
            stress = atoms.get_stress(voigt=False, include_ideal_gas=True)  # eV/Å³
        except PropertyNotImplementedError:
            log.info("The calculator has no stress; pressures are logged as nan.")
            self._stress_ok = False
            return float("nan")
        return float(-np.trace(stress) / 3.0 / units.GPa)

    def arrays(self) -> list[np.ndarray]:
        table = np.array(self.rows, dtype=float).reshape(-1, 6)
        return [table[:, i].copy() for i in range(6)]


def run_md(
    atoms: Atoms,
    calc: BaseCalculator | None = None,
    ensemble: str = "nvt-langevin",
    temperature_k: float = 300.0,
    timestep_fs: float = 1.0,
    steps: int = 1000,
    pressure_gpa: float | None = None,
    trajectory: str | Path | None = None,
    loginterval: int = 10,
    seed: int | np.random.Generator | None = None,
    progress: bool | None = None,
    *,
    logfile: str | Path | None = None,
    tdamp_fs: float = DEFAULT_TDAMP_FS,
    pdamp_fs: float = DEFAULT_PDAMP_FS,
    bulk_modulus_gpa: float = DEFAULT_BULK_MODULUS_GPA,
    init_velocities: bool | None = None,
    watchdog: Watchdog | None = DEFAULT_WATCHDOG,
    callback: Callable[[MDResult], None] | None = None,
    progress_every: int | None = None,
    neighbour_skin_a: float | None = DEFAULT_MD_SKIN_A,
) -> MDResult:
    """Run molecular dynamics on ``atoms`` (in place) and return the logged series.

    Args:
        atoms: the system; it advances in place.
        calc: calculator to attach; ``None`` uses ``atoms.calc``.
        ensemble: one of ``nve``, ``nvt-langevin``, ``nvt-bussi``, ``nvt-nose-hoover``,
            ``npt-mtk``, ``npt-mtk-aniso``, ``npt-langevin``, ``npt-berendsen``
            (see :mod:`mace_ase.dynamics.ensembles`).
        temperature_k: target temperature, K (for ``nve``: the initial one).
        timestep_fs: time step, fs.
        steps: number of MD steps.
        pressure_gpa: target pressure, GPa (``npt-*`` only; ``None`` there means 0 GPa).
        trajectory: ``*.traj`` (ASE) or ``*.xyz``/``*.extxyz`` file, written every
            ``loginterval`` steps; ``None`` writes none.
        loginterval: steps between logged rows, trajectory frames and progress updates.
        seed: seeds the initial velocities and the stochastic thermostats (an int or a
            ``numpy.random.Generator``); ``None`` draws fresh entropy.
        progress: ``True``: a tqdm bar (steps/s, ns/day, T); ``False``: no progress report;
            ``None`` (default): the bar on a terminal or in a Jupyter notebook, otherwise (output
            piped to a file, batch jobs) one INFO log line every ``progress_every`` steps.
        logfile: text file with one row per log step (columns as ``SERIES_HEADER``).
        tdamp_fs: thermostat time constant, fs (Langevin friction is ``1/tdamp_fs``).
        pdamp_fs: barostat time constant, fs.
        bulk_modulus_gpa: rough bulk modulus, GPa; only ``npt-berendsen`` uses it.
        init_velocities: draw Maxwell-Boltzmann velocities at ``temperature_k`` (zero total
            momentum). ``None`` draws them only when the atoms have no momenta yet, so a
            second call continues the first.
        watchdog: bounds that stop the run (:class:`Watchdog`); ``None`` switches it off.
        callback: called with the result so far at every log step (e.g. for live plots).
        progress_every: steps between progress log lines when not on a terminal; ``None`` picks
            about 20 lines per run (a multiple of ``loginterval``, at least ``loginterval``).
        neighbour_skin_a: Verlet skin (Å) given for this run to MACE calculators (also inside a
            D3 sum) whose ``skin`` is 0; their skin is restored afterwards. The trajectory is
            bit-identical with and without it (see :class:`mace_ase.neighbours.VerletNeighbourList`);
            ``None`` leaves the calculator as it is.

    Returns:
        :class:`MDResult` with ``times_ps``, ``temperatures``, ``potential_energies``,
        ``total_energies``, ``volumes`` and ``pressures_gpa``.

    Raises:
        WatchdogStop: a bound was crossed. The atoms are reset to the last good frame, which
            is also written next to the trajectory (``name.last_good.traj``), and the
            exception carries the partial result.
        ValueError: unknown ensemble, constraints the integrator cannot honour, a pressure
            given to a constant-volume ensemble, or a negative (or non-finite) temperature.
    """
    spec = get_ensemble(ensemble)
    if calc is not None:
        atoms.calc = calc
    if atoms.calc is None:
        raise ValueError("The atoms have no calculator: pass calc=... or set atoms.calc first.")
    if steps < 0 or loginterval < 1:
        raise ValueError(f"Need steps >= 0 and loginterval >= 1, got steps={steps}, loginterval={loginterval}.")
    if not (np.isfinite(temperature_k) and temperature_k >= 0):  # also refuses nan
        raise ValueError(f"temperature_k={temperature_k} K: a temperature must be finite and >= 0 K (kelvin, "
                         "not degrees Celsius).")
    if progress_every is not None and progress_every < 1:
        raise ValueError(f"progress_every must be >= 1, got {progress_every}.")
    if pressure_gpa is not None and not spec.barostat:
        raise ValueError(
            f"pressure_gpa={pressure_gpa} has no effect in {ensemble!r} (constant volume); "
            "use an npt-* ensemble or leave pressure_gpa=None."
        )
    if spec.barostat and pressure_gpa is None:
        pressure_gpa = 0.0
    if spec.barostat and not (atoms.pbc.all() and atoms.cell.rank == 3):
        raise ValueError(f"{ensemble!r} changes the cell, so it needs a fully periodic 3-D cell.")
    check_constraints(atoms, spec)

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if init_velocities or (init_velocities is None and not np.any(atoms.get_momenta())):
        _thermalize(atoms, temperature_k, rng)
        Stationary(atoms)  # zero total momentum, temperature preserved

    settings = MDSettings(timestep_fs, temperature_k, pressure_gpa, tdamp_fs, pdamp_fs, bulk_modulus_gpa, rng)
    dyn = spec.build(atoms, settings)
    if watchdog is not None:
        watchdog = watchdog.resolved(temperature_k, loginterval)
    log.info(
        "MD %s (%s): %d steps of %g fs, T = %g K%s, %d atoms",
        ensemble, spec.ase_class, steps, timestep_fs, temperature_k,
        f", P = {pressure_gpa:g} GPa" if spec.barostat else "", len(atoms),
    )

    with contextlib.ExitStack() as files:  # log file, trajectory and progress bar close on any exit
        log_handle = files.enter_context(open(logfile, "w")) if logfile is not None else None
        if log_handle is not None:
            log_handle.write(f"# mace-ase run_md {ensemble} dt={timestep_fs} fs\n# {SERIES_HEADER}\n")
        writer = TrajectoryWriter(trajectory) if trajectory is not None else None
        if writer is not None:
            files.callback(writer.close)
        bar = _progress_bar(steps, progress)
        if bar is not None:
            files.callback(bar.close)
        line_every = _progress_line_interval(steps, loginterval, progress_every) if (
            progress is None and bar is None) else None
        series = _Series(logfile=log_handle)
        if neighbour_skin_a is not None:
            files.callback(_give_skin(atoms.calc, neighbour_skin_a))
        last_good = atoms.copy()
        start = time.perf_counter()
        done = 0

        def result(reason: str | None = None) -> MDResult:
            return MDResult(atoms, ensemble, timestep_fs, done, *series.arrays(),
                            wall_time_s=time.perf_counter() - start, stopped_reason=reason)

        for _ in dyn.irun(steps):
            done = dyn.nsteps
            if watchdog is not None and done % watchdog.interval == 0:
                reason = watchdog.check(atoms)
                if reason is not None:
                    raise _stop(atoms, last_good, reason, result(reason), done, trajectory)
                last_good = atoms.copy()
            if done % loginterval == 0 or done == steps:
                row = series.record(atoms, done * timestep_fs * 1e-3)
                if writer is not None:
                    writer.write(atoms)
                if bar is not None:
                    bar.set_postfix_str(_rates(bar, timestep_fs) + f", T={row[1]:.0f} K", refresh=False)
                if callback is not None:
                    callback(result())
            if line_every is not None and done > 0 and (done % line_every == 0 or done == steps):
                _log_progress(done, steps, timestep_fs, atoms, time.perf_counter() - start)
            if bar is not None and done > 0:
                bar.update(1)
    final = result()
    log.info("MD finished: %r", final)
    return final


def _stop(atoms: Atoms, last_good: Atoms, reason: str, partial: MDResult, step: int, trajectory) -> WatchdogStop:
    """Reset the atoms to the last good frame, save it, and build the exception."""
    atoms.set_cell(last_good.cell, scale_atoms=False)
    atoms.set_positions(last_good.positions, apply_constraint=False)
    atoms.set_momenta(last_good.get_momenta(), apply_constraint=False)
    path = last_good_path(trajectory) if trajectory is not None else None
    if path is not None:
        last_good.write(path)
    message = (
        f"Watchdog stopped the MD at step {step}: {reason}. The atoms were reset to the last good frame"
        + (f", saved to {path}" if path else "")
        + ". Usual causes: a time step too large for the lightest atoms, an unphysical starting "
        "structure, or the model leaving its training domain."
    )
    log.info(message)
    return WatchdogStop(message, partial, last_good, path)


def _give_skin(calc: BaseCalculator, skin_a: float) -> Callable[[], None]:
    """Set a Verlet skin on the MACE calculators in ``calc`` that have none; returns the undo."""
    from mace_ase.calculator import MACECalculator

    mixer = getattr(calc, "mixer", None)  # ASE's SumCalculator (D3 on top of MACE)
    members = list(getattr(mixer, "calcs", None) or [calc])
    changed = [member for member in members if isinstance(member, MACECalculator) and member.skin == 0.0]
    for member in changed:
        member.skin = skin_a

    def undo() -> None:
        for member in changed:
            member.skin = 0.0

    return undo


def _thermalize(atoms: Atoms, temperature_k: float, rng: np.random.Generator) -> None:
    """Maxwell-Boltzmann momenta (``thermalize_momenta`` since ASE 3.29, the older name before)."""
    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
        return
    thermalize_momenta(atoms, temperature_k, rng=rng)


def _progress_bar(steps: int, progress: bool | None):
    if progress is None:
        progress = _interactive()
    if not progress:
        return None
    from tqdm.auto import tqdm  # imported here so that Jupyter is detected at run time

    return tqdm(total=steps, unit="step", desc="MD", dynamic_ncols=True)


def _progress_line_interval(steps: int, loginterval: int, progress_every: int | None) -> int:
    if progress_every is not None:
        return progress_every
    return max(loginterval, -(-steps // 20 // loginterval) * loginterval)  # ~20 lines, multiple of loginterval


def _log_progress(done: int, steps: int, timestep_fs: float, atoms: Atoms, elapsed_s: float) -> None:
    """One progress line for logs (the bar's content when no terminal shows the bar)."""
    rate = done / elapsed_s if elapsed_s > 0 else float("nan")  # steps per second
    remaining = (steps - done) / rate if rate > 0 else float("nan")
    log.info(
        "MD step %d/%d (%.0f%%): t = %.4g ps, T = %.1f K, Epot = %.6g eV, %.3g ns/day, %.3g steps/s, %s left",
        done, steps, 100.0 * done / max(steps, 1), done * timestep_fs * 1e-3, atoms.get_temperature(),
        atoms.get_potential_energy(), rate * timestep_fs * 86400 * 1e-6, rate, _duration(remaining),
    )


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _rates(bar, timestep_fs: float) -> str:
    rate = bar.format_dict.get("rate") or 0.0  # steps per second
    return f"{rate * timestep_fs * 86400 * 1e-6:.3g} ns/day"


def _interactive() -> bool:
    """True on a terminal or inside a Jupyter kernel."""
    if "ipykernel" in sys.modules:
        return True
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())
