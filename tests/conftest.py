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
    with open(REFERENCES) as handle:
        return json.load(handle)


def fixture_model(name: str) -> Path:
    path = FIXTURES / "models" / f"{name}.model"
    if not path.exists():
        pytest.skip(f"fixture model {path} is missing; regenerate with tests/fixtures/make_fixtures.py")
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


def place_as_cached(folder: Path, name: str, source: Path) -> Path:
    """Copy ``source`` into ``folder`` under the file name the catalogue uses for model ``name``."""
    from mace_ase.io import registry

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / registry.lookup(name).file_name
    target.write_bytes(source.read_bytes())
    return target
