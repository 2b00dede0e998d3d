"""CUDA gives the CPU's answers (skipped where no GPU is present)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_model, random_triclinic
from mace_ase.calculator import MACECalculator

pytestmark = pytest.mark.cuda  # skipped where no CUDA device is present (tests/conftest.py); nothing else may skip


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-10), ("float32", 1e-4)])
@pytest.mark.parametrize("model", ["mpa0_density", "multihead", "mp0a_l2"])
@pytest.mark.parametrize("radial", ["exact", "spline"])
def test_cuda_matches_cpu(model: str, dtype: str, atol: float, radial: str) -> None:
    """Also in the spline mode: the same tables, evaluated with torch ops on the GPU, by the kernel on the CPU."""
    path = str(fixture_model(model))
    cpu = MACECalculator(model_paths=path, device="cpu", default_dtype=dtype, radial=radial)
    cuda = MACECalculator(model_paths=path, device="cuda", default_dtype=dtype, radial=radial)
    atoms = random_triclinic([int(z) for z in cpu.atomic_numbers], seed=11).repeat((2, 2, 2))
    atoms.calc = cpu
    e_cpu, f_cpu, s_cpu = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = cuda
    assert atoms.get_potential_energy() == pytest.approx(e_cpu, abs=atol * len(atoms))
    assert np.abs(atoms.get_forces() - f_cpu).max() < atol * (1 + np.abs(f_cpu).max())
    assert np.abs(atoms.get_stress() - s_cpu).max() < atol


def test_the_default_radial_mode_is_the_mlp_on_cuda_and_agrees_with_the_cpu_default() -> None:
    """radial="auto": tables on the CPU kernel, the MLP on the GPU; both inside the float64 parity bar."""
    path = str(fixture_model("mpa0_density"))
    cpu = MACECalculator(model_paths=path, device="cpu")
    cuda = MACECalculator(model_paths=path, device="cuda")
    assert cpu.models[0].use_radial_spline and not cuda.models[0].use_radial_spline
    atoms = random_triclinic([int(z) for z in cpu.atomic_numbers], seed=12).repeat((2, 2, 2))
    atoms.calc = cpu
    e_cpu, f_cpu = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = cuda
    assert atoms.get_potential_energy() == pytest.approx(e_cpu, abs=1e-9 * len(atoms))
    assert np.abs(atoms.get_forces() - f_cpu).max() < 1e-8


def test_a_cpu_loaded_module_given_to_a_cuda_calculator() -> None:
    """The copy moved to the GPU keeps the CPU kernels' switches; each kernel checks the device at run time."""
    from mace_ase.model.build import load_model

    path = fixture_model("mp0a_l2")
    module = load_model(path, device="cpu", dtype="float64")
    cuda = MACECalculator(model_paths=module, device="cuda")
    cpu = MACECalculator(model_paths=str(path), device="cpu", radial="exact")
    atoms = random_triclinic([int(z) for z in cpu.atomic_numbers], seed=13).repeat((2, 2, 2))
    atoms.calc = cpu
    e_cpu, f_cpu = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = cuda
    assert atoms.get_potential_energy() == pytest.approx(e_cpu, abs=1e-10 * len(atoms))
    assert np.abs(atoms.get_forces() - f_cpu).max() < 1e-10 * (1 + np.abs(f_cpu).max())
