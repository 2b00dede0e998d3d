"""Tabulated radial weights: ``radial="spline"`` (always) and the default ``radial="auto"`` (on the CPU kernel,
with the exact MLP for Hessians and past the table budget): close to mace-torch, conservative.

Parity of the default with mace-torch on every fixture, at the exact mode's float64 bar, is asserted in
tests/test_parity.py (each case in both ``"auto"`` and ``"exact"``)."""

from __future__ import annotations

import copy
import logging
import pickle
import threading

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from conftest import fixture_model
from mace_ase import evaluate
from mace_ase.calculator import MACECalculator
from mace_ase.model import fused, radial_spline
from mace_ase.model.build import load_model

def _pair(dtype: str = "float64", name: str = "mpa0_density", radial: str = "spline") -> MACECalculator:
    return MACECalculator(model_paths=str(fixture_model(name)), device="cpu", default_dtype=dtype, radial=radial)


def _rattled_cell():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.numbers[::3] = 8
    atoms.rattle(0.1, seed=3)
    return atoms


def test_spline_differs_from_exact_but_only_slightly() -> None:
    """The mode really changes the computation (a test of the switch), by far less than the stated accuracy."""
    atoms = _rattled_cell()
    exact, spline = _pair(radial="exact"), _pair()
    e_exact = exact.get_potential_energy(atoms)
    e_spline = spline.get_potential_energy(atoms)
    assert e_spline != e_exact
    assert abs(e_spline - e_exact) / len(atoms) < 1e-8
    assert np.abs(spline.get_forces(atoms) - exact.get_forces(atoms)).max() < 1e-6


def test_forces_and_stress_are_derivatives_of_the_splined_energy() -> None:
    """Central differences of the spline-mode energy (the interpolant is C1, so they converge)."""
    atoms = _rattled_cell()
    calc = _pair()
    atoms.calc = calc
    forces, stress = atoms.get_forces(), atoms.get_stress(voigt=False)
    step = 1e-4
    for atom, axis in ((0, 0), (5, 2), (11, 1)):
        energies = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[atom, axis] += sign * step
            energies.append(calc.get_potential_energy(moved))
        assert abs(-(energies[0] - energies[1]) / (2 * step) - forces[atom, axis]) < 1e-7
    strained = []
    for sign in (1, -1):
        moved = atoms.copy()
        deformation = np.eye(3)
        deformation[0, 1] += sign * step
        moved.set_cell(atoms.cell @ deformation, scale_atoms=True)
        strained.append(calc.get_potential_energy(moved))
    numeric = (strained[0] - strained[1]) / (2 * step) / atoms.get_volume()
    assert abs(numeric - stress[0, 1]) < 1e-9  # dE = V sigma : grad(u), grad(u) with one (0, 1) entry


@pytest.mark.parametrize("degree", [3, 5])
def test_kernel_and_torch_evaluation_of_the_tables_agree(degree: int, monkeypatch) -> None:
    """The compiled kernel evaluates the spline on the fly; CUDA and compiler-less machines use torch ops."""
    monkeypatch.setattr(radial_spline, "DEGREE", degree)
    model = load_model(fixture_model("mpa0_density_l1"), device="cpu", dtype="float64", radial="spline")
    atoms = _rattled_cell()
    calc = MACECalculator(model_paths=model, device="cpu", default_dtype="float64", radial="spline")
    assert calc.models[0] is model and model.radial_spline.tables[0].shape[1] == degree + 1
    graph = calc._graph(atoms)
    kernel = model(**graph, head=0, compute_stress=True)
    monkeypatch.setattr(fused, "CHUNK_EDGES", 64)
    fused._set(model, True, False)  # chunked torch path, same tables
    torch_path = model(**graph, head=0, compute_stress=True)
    for key in ("energy", "forces", "stress"):
        assert torch.allclose(kernel[key], torch_path[key], rtol=0, atol=1e-12), key
    assert kernel["forces"].abs().max() > 1e-3


def test_tables_are_made_per_element_pair_when_first_met() -> None:
    """Agnesi models depend on the pair's covalent radii: one table per unordered pair, built lazily."""
    calc = _pair()
    spline = calc.models[0].radial_spline
    assert spline.per_pair and not spline.slots
    calc.get_potential_energy(bulk("Cu", "fcc", a=3.6))
    assert set(spline.slots) == {(29, 29)}
    calc.get_potential_energy(_rattled_cell())
    assert set(spline.slots) == {(29, 29), (8, 29), (8, 8)}
    assert all(error <= spline.tolerance for error in spline.errors)
    plain = _pair(name="mp0a_medium")  # no Agnesi: one table for all pairs
    plain.get_potential_energy(_rattled_cell())
    assert list(plain.models[0].radial_spline.slots) == [(0, 0)]


def test_the_default_tolerance_follows_the_model_dtype() -> None:
    """float64 tables are fine enough for the exact mode's parity bar; float32 ones are not made finer than float32
    arithmetic resolves (a larger table is only slower)."""
    for dtype, tolerance in (("float64", 3e-11), ("float32", 1e-9)):
        spline = _pair(dtype).models[0].radial_spline
        assert spline.tolerance == tolerance == radial_spline.default_tolerance(getattr(torch, dtype))


def test_a_tighter_tolerance_gives_a_finer_grid_and_a_smaller_error() -> None:
    atoms = _rattled_cell()
    exact = _pair(radial="exact").get_potential_energy(atoms)
    results = []
    for tolerance in (1e-4, 1e-8):
        model = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64")
        spline = radial_spline.enable_spline(model, tolerance=tolerance)
        calc = MACECalculator(model_paths=model, device="cpu", default_dtype="float64", radial="spline")
        error = abs(calc.get_potential_energy(atoms) - exact)
        results.append((max(spline.intervals), max(spline.errors), error))
    (coarse_n, coarse_fit, coarse_error), (fine_n, fine_fit, fine_error) = results
    assert fine_n > coarse_n and fine_fit < coarse_fit <= 1e-4 and fine_fit <= 1e-8
    assert fine_error < coarse_error


def test_bad_radial_option_is_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(ValueError, match="radial must be one of 'auto', 'exact', 'spline'"):
        MACECalculator(model_paths=str(fixture_model("mp0a_small")), radial="cubic")
    with pytest.raises(ValueError, match="radial must be one of"):  # not FileNotFoundError: checked first
        load_model(tmp_path / "missing.model", radial="Spline")
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        radial_spline.enable_spline(load_model(fixture_model("mp0a_small")), tolerance=0.0)


def test_a_module_passed_in_is_not_switched_in_place() -> None:
    module = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float64", radial="exact")
    calc = MACECalculator(model_paths=module, device="cpu", default_dtype="float64", radial="spline")
    assert not module.use_radial_spline and calc.models[0].use_radial_spline
    back = MACECalculator(model_paths=calc.models[0], device="cpu", default_dtype="float64", radial="exact")
    assert not back.models[0].use_radial_spline and calc.models[0].use_radial_spline
    auto = MACECalculator(model_paths=calc.models[0], device="cpu", default_dtype="float64")  # the default
    assert radial_spline.current_radial(auto.models[0]) == "auto" and auto.models[0] is not calc.models[0]
    assert radial_spline.current_radial(calc.models[0]) == "spline"
    atoms = _rattled_cell()
    assert back.get_potential_energy(atoms) == MACECalculator(model_paths=module, device="cpu",
                                                              radial="exact").get_potential_energy(atoms)


def test_pickle_and_deepcopy_keep_the_mode() -> None:
    calc = _pair(name="mp0a_small")
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    energy = calc.get_potential_energy(atoms)
    for clone in (pickle.loads(pickle.dumps(calc)), copy.deepcopy(calc)):
        assert clone.radial == "spline" and clone.models[0].use_radial_spline
        assert clone.get_potential_energy(atoms) == pytest.approx(energy, abs=1e-12)


def test_batched_evaluation_in_spline_mode_matches_the_calculator() -> None:
    structures = [_rattled_cell(), molecule("H2O"), bulk("Cu", "fcc", a=3.6).repeat(2)]
    batched = evaluate(structures, model=str(fixture_model("mpa0_density")), dtype="float64", radial="spline",
                       device="cpu")
    calc = _pair()
    for index, atoms in enumerate(structures):
        assert batched.energies[index] == pytest.approx(calc.get_potential_energy(atoms), abs=1e-10)
        assert np.abs(batched.forces[index] - calc.get_forces(atoms)).max() < 1e-10


def test_torchscript_export_of_a_spline_model_is_exact(tmp_path) -> None:
    """Scripted code cannot call the tables: an exported file always computes the exact MLP (documented)."""
    from mace_ase.model.build import export_torchscript

    model = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float64", radial="spline")
    exact = load_model(fixture_model("mp0a_medium"), device="cpu", dtype="float64", radial="exact")
    export_torchscript(model, tmp_path / "m.pt")
    scripted = torch.jit.load(str(tmp_path / "m.pt"))
    graph = MACECalculator(model_paths=exact, device="cpu")._graph(_rattled_cell())
    assert torch.allclose(scripted(**graph)["energy"], exact(**graph)["energy"], rtol=0, atol=1e-12)


def test_hessian_in_spline_mode_is_close_to_exact() -> None:
    """Second derivatives of a cubic interpolant are only O(h^2) accurate: ~1e-4 relative (documented: use the
    exact mode for phonons and Hessians that need more)."""
    atoms = molecule("H2O")
    spline = _pair(name="off_like").get_hessian(atoms)
    exact = _pair(name="off_like", radial="exact").get_hessian(atoms)
    assert np.allclose(spline, spline.T, atol=1e-8)
    assert np.abs(spline - exact).max() < 5e-4 * (1 + np.abs(exact).max())


# -- the default, radial="auto" ----------------------------------------------------------------------------------


def test_auto_is_the_default_and_tabulates_only_on_the_cpu_kernel() -> None:
    calc = MACECalculator(model_paths=str(fixture_model("mpa0_density")), device="cpu", default_dtype="float64")
    model = calc.models[0]
    assert calc.parameters["radial"] == "auto" and radial_spline.current_radial(model) == "auto"
    calc.get_potential_energy(_rattled_cell())
    assert set(model.radial_spline.slots) == {(29, 29), (8, 29), (8, 8)}
    # without the compiled kernel the tables would be evaluated per edge by torch ops: "auto" is the MLP there
    plain = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64", fused=False)
    assert not plain.use_radial_spline and radial_spline.effective_radial(plain, "auto") == "exact"


def test_auto_hessian_comes_from_the_exact_mlp() -> None:
    atoms = molecule("H2O")
    exact_calc = _pair(name="off_like", radial="exact")
    exact, exact_energy = exact_calc.get_hessian(atoms), exact_calc.get_potential_energy(atoms)
    auto = _pair(name="off_like", radial="auto")
    assert np.abs(auto.get_hessian(atoms) - exact).max() < 1e-10 * (1 + np.abs(exact).max())
    assert np.abs(_pair(name="off_like").get_hessian(atoms) - exact).max() > 1e-8  # the tables' own Hessian
    energy = auto.get_potential_energy(atoms)  # and the calculator is back on its tables
    assert energy != exact_energy and energy == pytest.approx(exact_energy, abs=1e-9)


def test_radial_mlp_block_is_per_thread() -> None:
    atoms = _rattled_cell()
    exact = _pair(radial="exact").get_potential_energy(atoms)
    auto = _pair(radial="auto")
    tabulated = auto.get_potential_energy(atoms)
    assert tabulated != exact
    other: list = []

    def elsewhere() -> None:
        clone = copy.deepcopy(auto)
        clone.reset()
        other.append(clone.get_potential_energy(atoms))

    with radial_spline.radial_mlp():
        auto.reset()
        inside = auto.get_potential_energy(atoms)
        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join()
    auto.reset()
    assert inside == pytest.approx(exact, abs=1e-12) and other == [tabulated]
    assert auto.get_potential_energy(atoms) == tabulated


def test_auto_keeps_its_tables_within_the_budget(monkeypatch, caplog) -> None:
    calc = _pair(radial="auto")
    spline = calc.models[0].radial_spline
    calc.get_potential_energy(bulk("Cu", "fcc", a=3.6))  # the first pair is always tabulated
    assert set(spline.slots) == {(29, 29)}
    monkeypatch.setattr(radial_spline, "AUTO_TABLE_BYTES", int(spline.table_bytes() * 2.5))  # room for one more
    atoms = _rattled_cell()  # needs two more: (8, 29) and (8, 8)
    with caplog.at_level(logging.INFO, logger="mace_ase.model.radial_spline"):
        energy, forces = calc.get_potential_energy(atoms), calc.get_forces(atoms)
    assert set(spline.slots) == {(29, 29)} and "would pass" in caplog.text
    exact = _pair(radial="exact")
    assert energy == pytest.approx(exact.get_potential_energy(atoms), abs=1e-12)
    assert np.abs(forces - exact.get_forces(atoms)).max() < 1e-12


@pytest.mark.parametrize("envelope_in_features", [True, False])
@pytest.mark.parametrize("name", ["mpa0_density", "mp0a_medium"])  # with and without the Agnesi transform
def test_table_knots_hold_the_exact_function_and_its_derivatives(name: str, envelope_in_features: bool) -> None:
    """The closed-form jets the tables are built from, against autograd of the model's own radial code."""
    model = load_model(fixture_model(name), device="cpu", dtype="float64", radial="exact")
    model.radial.apply_cutoff = envelope_in_features
    for interaction in model.interactions:
        interaction.apply_cutoff = envelope_in_features
    spline = radial_spline.RadialSpline(model)
    z_a, z_b = (int(z) for z in model.atomic_numbers[:2])
    r = torch.linspace(0.3, 0.97 * model.r_max_value, 9, dtype=torch.float64)
    jets = spline._jets(r, z_a, z_b, 2)
    z_s, z_r = torch.full((9,), z_a), torch.full((9,), z_b)
    for interaction, jet in zip(model.interactions, jets):
        x = r.clone().requires_grad_(True)
        feats, envelope = model.radial(x.unsqueeze(-1), z_s, z_r)
        weights = interaction.radial_mlp(feats)
        weights = weights if envelope_in_features else weights * envelope
        for column in (0, weights.shape[1] // 2, weights.shape[1] - 1):
            (slope,) = torch.autograd.grad(weights[:, column].sum(), x, create_graph=True, retain_graph=True)
            (curvature,) = torch.autograd.grad(slope.sum(), x, retain_graph=True)
            for got, want in zip(jet[:, :, column].T, (weights[:, column], slope, curvature)):
                assert torch.allclose(got, want.detach(), rtol=1e-11, atol=1e-12 * float(want.detach().abs().max()))


@pytest.mark.parametrize("envelope_in_features", [True, False])
def test_density_tables_hold_the_exact_density_and_its_derivatives(envelope_in_features: bool) -> None:
    """Density interactions' edge terms tanh((R(r) . w)^2) [* envelope] are tabulated with the radial weights (no
    call then needs the Bessel features): their jets against autograd of the model's own code, and the table's
    values against it between the knots, exactly zero for inactive edges."""
    model = load_model(fixture_model("mpa0_density"), device="cpu", dtype="float64", radial="exact")
    model.radial.apply_cutoff = envelope_in_features
    for interaction in model.interactions:
        interaction.apply_cutoff = envelope_in_features
    spline = radial_spline.RadialSpline(model)
    assert spline.density_layers == [i for i, t in enumerate(model.interactions) if t.use_density]
    assert spline.density_layers  # the fixture has density interactions
    z_a, z_b = (int(z) for z in model.atomic_numbers[:2])
    r = torch.linspace(0.3, 0.97 * model.r_max_value, 9, dtype=torch.float64)
    jet = spline._jets(r, z_a, z_b, 2)[-1]  # [9, 3, n_density]
    z_s, z_r = torch.full((9,), z_a), torch.full((9,), z_b)
    x = r.clone().requires_grad_(True)
    feats, envelope = model.radial(x.unsqueeze(-1), z_s, z_r)
    for column, layer in enumerate(spline.density_layers):
        density = torch.tanh((feats @ model.interactions[layer].density_weight) ** 2).view(-1)
        density = density if envelope_in_features else density * envelope.view(-1)
        (slope,) = torch.autograd.grad(density.sum(), x, create_graph=True, retain_graph=True)
        (curvature,) = torch.autograd.grad(slope.sum(), x, retain_graph=True)
        for got, want in zip(jet[:, :, column].T, (density, slope, curvature)):
            assert torch.allclose(got, want.detach(), rtol=1e-11, atol=1e-12 * float(want.detach().abs().max()))
    # the tables between the knots, through the model's own lookup (padding rows: beyond r_max)
    lengths = torch.cat([0.5 + torch.rand(200, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) *
                         (model.r_max_value - 0.5), torch.tensor([2 * model.r_max_value + 10.0], dtype=torch.float64)])
    z_s, z_r = torch.full_like(lengths, z_a, dtype=torch.int64), torch.full_like(lengths, z_b, dtype=torch.int64)
    u, interval = spline.coordinates(lengths, z_s, z_r)
    feats, envelope = model.radial(lengths.unsqueeze(-1), z_s, z_r)
    model.radial_spline = spline
    tabulated = model.spline_densities(u, interval, envelope)
    for column, layer in enumerate(spline.density_layers):
        exact = torch.tanh((feats @ model.interactions[layer].density_weight) ** 2)
        exact = exact if envelope_in_features else exact * envelope
        assert torch.allclose(tabulated[:, column:column + 1], exact, rtol=0, atol=1e-9)
        assert float(exact.abs().max()) > 1e-3 and float(tabulated[-1, column]) == 0.0
