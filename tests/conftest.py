"""Shared test helpers: fixture locations and small structure builders."""

from __future__ import annotations

import os

# Small matrices dominate these tests: one BLAS/OpenMP thread is faster and reproducible on a shared 2-core machine.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import json
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms

torch.set_num_threads(1)

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCES = FIXTURES / "references.json"


@cache
def references() -> dict:
    """mace-torch 0.3.16's answers for the random-weight fixture models (tests/fixtures/make_fixtures.py)."""
    if not REFERENCES.is_file():  # committed: missing means a broken checkout, a failure (never a skip)
        raise FileNotFoundError(f"{REFERENCES} is missing; regenerate it with tests/fixtures/make_fixtures.py")
    with open(REFERENCES) as handle:
        return json.load(handle)


def fixture_model(name: str) -> Path:
    """A committed fixture model; a missing one fails the test (a skip would hide a broken checkout)."""
    path = FIXTURES / "models" / f"{name}.model"
    if not path.is_file():
        pytest.fail(f"fixture model {path} is missing; regenerate with tests/fixtures/make_fixtures.py")
    return path


def structure(name: str) -> Atoms:
    data = references()["structures"][name]
    return Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=data["pbc"])


def random_triclinic(numbers: list[int], seed: int = 0, n: int = 8) -> Atoms:
    """A small rattled triclinic periodic cell with atoms of the given elements."""
    rng = np.random.default_rng(seed)
    cell = np.array([[4.1, 0.0, 0.0], [0.9, 3.8, 0.0], [0.6, -0.7, 4.3]])
    frac = rng.random((n, 3))
    atoms = Atoms(numbers=rng.choice(numbers, n), scaled_positions=frac, cell=cell, pbc=True)
    # push atoms apart so that no pair is unphysically close
    for _ in range(50):
        d = atoms.get_all_distances(mic=True)
        np.fill_diagonal(d, 10.0)
        if d.min() > 1.6:
            break
        i, j = np.unravel_index(np.argmin(d), d.shape)
        atoms.positions[i] += rng.normal(0, 0.5, 3)
    return atoms


@pytest.fixture
def model_file() -> Path:
    """A small real model file (random weights), for tests that need any readable .model file."""
    return fixture_model("mp0a_small")


def threaded_matches_sequential(run, jobs: list[tuple], tolerance: float = 0.0) -> None:
    """``run(*job, out)`` appends (energy, forces) to ``out``: each job run in its own thread at once gives what it
    gives run alone, one after the other (to ``tolerance``; 0: bit for bit)."""
    import threading

    sequential = [[] for _ in jobs]
    for job, out in zip(jobs, sequential):
        run(*job, out)
    threaded = [[] for _ in jobs]
    threads = [threading.Thread(target=run, args=(*job, out)) for job, out in zip(jobs, threaded)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for seq, par in zip(sequential, threaded):
        assert len(par) == len(seq) > 0
        for (e1, f1), (e2, f2) in zip(seq, par):
            assert abs(e1 - e2) <= tolerance and np.abs(f1 - f2).max() <= tolerance


def place_as_cached(folder: Path, name: str, source: Path) -> Path:
    """Copy ``source`` into ``folder`` under the file name the catalogue uses for model ``name``."""
    from mace_ase.io import registry

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / registry.lookup(name).file_name
    target.write_bytes(source.read_bytes())
    return target


# ---------------------------------------------------------------------------------------------------------------
# No test may be skipped, except those marked `cuda` where no CUDA device is present: a skip that hides a missing
# dependency, fixture or feature would let the suite pass while testing nothing. Any other skip makes the run fail
# (exit status 1) after the summary names it; this is how CI, which runs plain `pytest`, catches them.
# ---------------------------------------------------------------------------------------------------------------

_unexpected_skips: list[str] = []


def pytest_collection_modifyitems(config, items) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _record_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and "cuda" not in getattr(report, "keywords", {}):
        _unexpected_skips.append(report.nodeid or str(report.fspath))


def pytest_runtest_logreport(report) -> None:
    _record_skip(report)


def pytest_collectreport(report) -> None:
    _record_skip(report)  # a module skipped at import (pytest.skip(allow_module_level=True), importorskip)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if _unexpected_skips:
        terminalreporter.section("skipped tests (not allowed)", red=True)
        for nodeid in _unexpected_skips:
            terminalreporter.write_line(f"{nodeid}: skipped; only `cuda`-marked tests may skip (no GPU)")


def pytest_sessionfinish(session, exitstatus) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
