"""Model export: TorchScript without deprecation noise, and torch.export programs that match the eager model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from conftest import fixture_model

from mace_ase import export_program, export_torchscript, load_model
from mace_ase.model.export import METADATA, load_program
from mace_ase.neighbours import neighbour_list


def graph(model, atoms):
    """The inputs of MACE.forward for ``atoms`` (species as the model's element index)."""
    edge_index, shifts = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, model.r_max_value)
    index = {int(z): i for i, z in enumerate(model.atomic_numbers)}
    dtype = model.r_max.dtype
    return (torch.tensor(atoms.positions, dtype=dtype), torch.tensor(atoms.cell.array, dtype=dtype),
            torch.tensor([index[int(z)] for z in atoms.numbers]), torch.as_tensor(edge_index),
            torch.as_tensor(shifts, dtype=dtype))


def test_torchscript_export_raises_no_deprecation_warning(tmp_path):
    model = load_model(fixture_model("mp0a_small"), device="cpu", fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        export_torchscript(model, tmp_path / "model.pt")
    assert warnings.filters is not None and not any(  # nothing left changed process-wide
        f[0] == "ignore" and f[2] is DeprecationWarning and "jit" in str(f[1]) for f in warnings.filters)
    assert (tmp_path / "model.pt").stat().st_size > 0


@pytest.mark.slow
def test_exported_program_matches_the_eager_model(tmp_path):
    model = load_model(fixture_model("mp0b_agnesi_zbl"), device="cpu", dtype="float64", radial="exact")  # as exported
    path = tmp_path / "model.pt2"
    elements = [int(z) for z in model.atomic_numbers][1:6]  # a subset, as LAMMPS's pair_coeff names them
    export_program(model, path, elements=[6, 8, 11, 13, 17])  # C, O, Na, Al, Cl
    program = torch.export.load(str(path), extra_files={METADATA: ""})  # torch alone reads it
    assert isinstance(program, torch.export.ExportedProgram)
    loaded = load_program(path)
    assert loaded.metadata["r_max"] == model.r_max_value and loaded.metadata["head"] == model.heads[0]
    assert [int(model.atomic_numbers[i]) for i in loaded.metadata["exported"]] == elements == [6, 8, 11, 13, 17]

    rng = np.random.default_rng(0)
    cases = []
    for n_atoms, pbc in ((5, False), (14, True)):  # different atom and neighbour counts; some elements absent
        numbers = rng.choice(elements[1:], size=n_atoms)
        grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_atoms] * 1.6
        cases.append(Atoms(numbers=numbers, positions=grid + rng.uniform(-0.2, 0.2, (n_atoms, 3)),
                           cell=np.eye(3) * 4.8, pbc=pbc))
    for atoms in cases:
        inputs = graph(model, atoms)
        eager = model(*inputs)
        exported = loaded(*inputs, compute_stress=bool(atoms.pbc.all()))
        assert abs(float(exported["energy"]) - float(eager["energy"])) < 1e-10 * max(1.0, abs(float(eager["energy"])))
        torch.testing.assert_close(exported["node_energy"], eager["node_energy"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(exported["forces"], eager["forces"], rtol=1e-9, atol=1e-10)
        if atoms.pbc.all():
            torch.testing.assert_close(exported["stress"], eager["stress"], rtol=1e-9, atol=1e-12)
    hydrogen = Atoms("CH", positions=[[0, 0, 0], [1.1, 0, 0]])
    with pytest.raises(ValueError, match=r"atomic numbers \[1\] were not exported"):
        loaded(*graph(model, hydrogen), compute_stress=False)


def test_export_program_refuses_an_unknown_head(tmp_path):
    model = load_model(fixture_model("mp0a_small"), device="cpu")
    with pytest.raises(ValueError, match="not one of the model's heads"):
        export_program(model, tmp_path / "x.pt2", head="nope")
    with pytest.raises(ValueError, match=r"atomic numbers \[92\] are not in the model"):
        export_program(model, tmp_path / "x.pt2", elements=[1, 92])
    assert not list(tmp_path.iterdir())
