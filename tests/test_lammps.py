"""The same model inside LAMMPS, on 1, 2 and 4 MPI ranks, and through the pair_style mace TorchScript interface.

The LAMMPS tests need LAMMPS built with ML-IAP's Python support in this virtualenv (``bash scripts/build_lammps.sh``,
run by ``.ci/run``); without it they fail (not skip) and say how to build it. MPI runs use ``mpirun`` on this machine
only (shared memory / loopback).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms, units
from ase.build import bulk

from mace_ase import MACECalculator, export_torchscript, load_model
from mace_ase.lammps import export_lammps, lammps_input_lines, load_lammps_model
from mace_ase.neighbours import neighbour_list

ROOT = Path(__file__).resolve().parents[1]
EMT_DEMO = ROOT / "models" / "emt-demo.model"
BUILD_HINT = ("LAMMPS with ML-IAP Python support is not installed in this Python ({python}): run "
              "`bash scripts/build_lammps.sh` (about 15 minutes the first time, cached afterwards; see README, "
              "'LAMMPS'). {detail}")
TYPE_ELEMENTS = ["Cu", "Au", "Ni"]
LAMMPS_METAL_NKTV2P = 1.6021765e6  # LAMMPS src/update.cpp, units metal: pressure (bar) per energy/volume (eV/A^3)


def alloy(repeat: int = 4, seed: int = 0) -> Atoms:
    """A rattled fcc Cu-Au-Ni alloy in an orthorhombic cell (LAMMPS and ASE then share axes): 4 * repeat^3 atoms."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.65, cubic=True).repeat(repeat)
    atoms.numbers = rng.choice([29, 79, 28], len(atoms), p=[0.5, 0.3, 0.2])
    atoms.rattle(0.1, seed=seed)
    atoms.wrap()
    return atoms


# ----------------------------------------------------------------------------------------------------------------
# LAMMPS runs
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lammps_ready() -> None:
    """Fail with the build instructions unless LAMMPS (with ML-IAP Python) and mpirun are usable."""
    if importlib.util.find_spec("lammps") is None:
        pytest.fail(BUILD_HINT.format(python=sys.executable, detail="(no `lammps` module)"))
    probe = subprocess.run(
        [sys.executable, "-c",
         "import lammps; l = lammps.lammps(cmdargs=['-nocite', '-log', 'none', '-screen', 'none']); "
         "print(l.has_package('ML-IAP'), l.has_package('PYTHON'), l.has_mpi_support); l.close()"],
        capture_output=True, text=True, timeout=120)
    if probe.returncode != 0 or probe.stdout.split() != ["True", "True", "True"]:
        pytest.fail(BUILD_HINT.format(python=sys.executable,
                                      detail=f"(probe: {probe.stdout.strip()} {probe.stderr.strip()[-500:]})"))
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: install OpenMPI (`apt-get install openmpi-bin libopenmpi-dev`; "
                    "scripts/build_lammps.sh does this)")


def write_data(atoms: Atoms, path: Path) -> None:
    """A LAMMPS data file (atom_style atomic) for an orthorhombic cell, types in TYPE_ELEMENTS order."""
    cell = atoms.cell.array
    assert np.allclose(cell, np.diag(np.diag(cell))), "these tests use orthorhombic cells"
    masses = {"Cu": 63.546, "Au": 196.97, "Ni": 58.693}
    symbols = atoms.get_chemical_symbols()
    lines = ["mace-ase test", "", f"{len(atoms)} atoms", f"{len(TYPE_ELEMENTS)} atom types", ""]
    for k, axis in enumerate("xyz"):
        lines.append(f"0.0 {float(cell[k, k])!r} {axis}lo {axis}hi")
    lines += ["", "Masses", ""] + [f"{t + 1} {masses[e]}" for t, e in enumerate(TYPE_ELEMENTS)]
    lines += ["", "Atoms # atomic", ""]
    for index, (symbol, position) in enumerate(zip(symbols, atoms.positions)):
        x, y, z = (repr(float(v)) for v in position)
        lines.append(f"{index + 1} {TYPE_ELEMENTS.index(symbol) + 1} {x} {y} {z}")
    path.write_text("\n".join(lines) + "\n")


def run_lammps(tmp_path: Path, model_file: Path, body: str, ranks: int | list[int], tag: str,
               data: str = "structure.data") -> Path | list[Path]:
    """Run an input (header + ``body``) on ``ranks`` MPI ranks (a list: one run per entry, all at once, so that the
    machine's cores are used); returns the run folder(s)."""
    unified = load_lammps_model(model_file)
    header = "\n".join(lammps_input_lines(unified, model_file, TYPE_ELEMENTS)[:1] + [
        "atom_style   atomic",
        "boundary     p p p",
        "atom_modify  map yes",
        f"read_data    {tmp_path / data}",
    ] + lammps_input_lines(unified, model_file, TYPE_ELEMENTS)[1:] + [
        "neighbor     2.0 bin",
        "neigh_modify delay 0 every 1 check yes",
        "thermo_modify format float %.17g",
    ])
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl="self,vader", OMPI_MCA_btl_tcp_if_include="lo", OMPI_MCA_oob_tcp_if_include="lo",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=str(ROOT))
    runs = []
    for count in ranks if isinstance(ranks, list) else [ranks]:
        folder = tmp_path / f"{tag}-np{count}"
        folder.mkdir()
        (folder / "in.lammps").write_text(header + "\n" + body)
        command = ["mpirun", "--oversubscribe", "-np", str(count), sys.executable, "-m", "mace_ase.lammps.run",
                   "in.lammps", "-log", "log.lammps", "-screen", "none"]
        runs.append((count, folder, subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE,
                                                     stderr=subprocess.PIPE, text=True)))
    for count, folder, process in runs:
        try:
            stdout, stderr = process.communicate(timeout=1800)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        log = (folder / "log.lammps").read_text() if (folder / "log.lammps").exists() else ""
        assert process.returncode == 0, f"LAMMPS failed on {count} ranks:\n{stdout[-3000:]}\n{stderr[-3000:]}\n" \
                                        f"{log[-3000:]}"
    folders = [folder for _, folder, _ in runs]
    return folders if isinstance(ranks, list) else folders[0]


def read_dump(path: Path, columns: int) -> np.ndarray:
    """Rows of a ``write_dump custom ... modify sort id`` file, without the id column."""
    lines = path.read_text().splitlines()
    start = next(k for k, line in enumerate(lines) if line.startswith("ITEM: ATOMS")) + 1
    table = np.array([[float(v) for v in line.split()] for line in lines[start:]])
    assert table.shape[1] == columns + 1
    return table[np.argsort(table[:, 0]), 1:]


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lammps")
    atoms = alloy()
    write_data(atoms, folder / "structure.data")
    model_file = folder / "emt-demo.mliap.pkl"
    export_lammps(EMT_DEMO, model_file)
    calc = MACECalculator(EMT_DEMO, device="cpu")
    atoms.calc = calc
    reference = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces(),
                 "pressure_gpa": -atoms.get_stress()[:3].mean() / units.GPa}
    return folder, model_file, atoms, reference


SINGLE_POINT = """
variable     pe equal pe
variable     press equal press
compute      peatom all pe/atom
compute      pesum all reduce sum c_peatom
variable     pesum equal c_pesum
run          0
print        "RESULT ${pe} ${press} ${pesum}" file result.txt
write_dump   all custom forces.dump id fx fy fz modify sort id format float %.17g
"""


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_run0_equals_ase_calculator(lammps_ready, system, ranks) -> None:
    folder, model_file, atoms, reference = system
    out = run_lammps(folder, model_file, SINGLE_POINT, ranks, "run0")
    pe, press_bar, pe_atoms = (float(v) for v in (out / "result.txt").read_text().split()[1:4])
    forces = read_dump(out / "forces.dump", 3)
    assert pe == pytest.approx(reference["energy"], abs=1e-9)
    assert pe_atoms == pytest.approx(reference["energy"], abs=1e-9)  # per-atom energies (compute pe/atom) add up
    np.testing.assert_allclose(forces, reference["forces"], rtol=0, atol=1e-8)
    # metal units: bar, converted with LAMMPS's own factor (nktv2p = 1.6021765e6 bar per eV/A^3, rounded: it differs
    # from ASE's CODATA value by 8e-8 relative, 1.3e-6 GPa here)
    pressure_ev_a3 = press_bar / LAMMPS_METAL_NKTV2P
    assert pressure_ev_a3 / units.GPa == pytest.approx(reference["pressure_gpa"], abs=1e-6)


NVE = """
velocity     all create 600.0 4928459 loop geom
fix          md all nve
timestep     0.002
run          100
write_dump   all custom final.dump id xu yu zu modify sort id format float %.17g
"""


@pytest.mark.slow
def test_nve_trajectory_independent_of_rank_count(lammps_ready, system) -> None:
    """100 steps of NVE; 32 atoms keep it affordable (~1-2 s per step on a 2-core machine: each rank evaluates ~500
    graph nodes with edges, the ghost shell of 2 x 5.5 A around a 7.3 A box). Both runs go at once."""
    folder, model_file, _, _ = system
    atoms = alloy(repeat=2, seed=1)
    write_data(atoms, folder / "small.data")
    one, two = (read_dump(out / "final.dump", 3) for out in run_lammps(folder, model_file, NVE, [1, 2], "nve",
                                                                           "small.data"))
    assert np.abs(one - atoms.positions).max() > 1e-3  # the atoms moved
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# the ML-IAP model object, without LAMMPS
# ----------------------------------------------------------------------------------------------------------------


def test_export_writes_a_plain_pickle_of_our_class(tmp_path) -> None:
    path = tmp_path / "m.mliap.pkl"
    unified = export_lammps(EMT_DEMO, path)
    back = load_lammps_model(path)
    assert type(back).__module__ == "mace_ase.lammps.unified"
    assert back.element_types == ["Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"]
    assert back.rcutfac == pytest.approx(0.5 * 5.5) and back.ghost_cutoff == pytest.approx(11.0)
    assert back.model_sha256 == unified.model_sha256 and back.interface is None
    assert b"mace." not in path.read_bytes().split(b"model_bytes")[0]  # no mace-torch class is referenced
    lines = lammps_input_lines(back, path, ["Cu", "Au"])
    assert f"pair_style   mliap unified {path} 1" in lines and "pair_coeff   * * Cu Au" in lines
    assert any(line.startswith("comm_modify  cutoff 13.0") for line in lines)
    with pytest.raises(ValueError, match="not in the model"):
        lammps_input_lines(back, path, ["Cu", "H"])


def test_export_keeps_the_radial_mode(tmp_path) -> None:
    unified = export_lammps(EMT_DEMO, tmp_path / "s.mliap.pkl", radial="spline")
    back = load_lammps_model(tmp_path / "s.mliap.pkl")
    assert back.radial == "spline" and back.model().use_radial_spline
    assert export_lammps(EMT_DEMO, tmp_path / "a.mliap.pkl").radial == "auto"  # the default: tables on the CPU
    assert load_lammps_model(tmp_path / "a.mliap.pkl").model().use_radial_spline
    assert not export_lammps(EMT_DEMO, tmp_path / "e.mliap.pkl", radial="exact").model().use_radial_spline
    with pytest.raises(ValueError, match="radial must be one of"):
        export_lammps(EMT_DEMO, tmp_path / "x.mliap.pkl", radial="linear")
    assert unified.radial == "spline"


def test_rank_graph_with_ghosts_equals_calculator(tmp_path) -> None:
    """Feed MACEUnified.evaluate what one rank gets from LAMMPS: local atoms, ghosts to T*r_max, a ghost-inclusive
    full pair list (rij = x_j - x_i); local energies and the pair forces folded onto owners give ASE's answers."""
    atoms = alloy(repeat=2, seed=4)
    unified = export_lammps(EMT_DEMO, tmp_path / "m.mliap.pkl")
    model = unified.model()
    positions, numbers, owner = ghost_images(atoms, unified.ghost_cutoff + 1.0)
    species_of = {z: k for k, z in enumerate(model.atomic_numbers.tolist())}
    elems = np.array([species_of[z] for z in numbers])
    # the ghost-inclusive list: every node's neighbours within r_max among the nodes present
    edge_index, _ = neighbour_list(positions, np.eye(3) * 100, np.array([False] * 3), unified.r_max)
    pair_i, pair_j = edge_index[0], edge_index[1]
    rij = positions[pair_j] - positions[pair_i]
    energies, fij = unified.evaluate(model, elems, len(atoms), len(positions), len(rij), pair_i, pair_j, rij)
    forces = np.zeros_like(positions)
    np.add.at(forces, pair_i, fij)
    np.add.at(forces, pair_j, -fij)
    folded = np.zeros((len(atoms), 3))
    np.add.at(folded, owner, forces)
    atoms.calc = MACECalculator(EMT_DEMO, device="cpu")
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(energies, atoms.get_potential_energies(), rtol=0, atol=1e-10)
    np.testing.assert_allclose(folded, atoms.get_forces(), rtol=0, atol=1e-10)
    virial = -(rij.T @ fij)  # LAMMPS's tally of -rij (x) fij over pairs
    np.testing.assert_allclose(virial, -atoms.get_stress(voigt=False) * atoms.get_volume(), rtol=0, atol=1e-9)


def ghost_images(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local atoms followed by every periodic image closer than ``cutoff`` to a local atom (LAMMPS's ghosts)."""
    edge_index, shifts = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, cutoff)
    images = {(int(j), *map(int, s)) for j, s in zip(edge_index[1], shifts) if np.any(s)}
    images = sorted(images)
    owner = np.array([k for k in range(len(atoms))] + [j for j, *_ in images])
    shift = np.array([[0, 0, 0]] * len(atoms) + [s for _, *s in images], dtype=float)
    positions = atoms.positions[owner] + shift @ atoms.cell.array
    return positions, atoms.numbers[owner], owner


# ----------------------------------------------------------------------------------------------------------------
# pair_style mace (TorchScript), called as the pair style calls it
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    path = tmp_path_factory.mktemp("ts") / "emt-demo-lammps.pt"
    export_torchscript(load_model(EMT_DEMO, device="cpu"), path, lammps=True)
    return torch.jit.load(str(path))


def pair_mace_input(model, positions, numbers, edge_index, shifts, unit_shifts, cell) -> dict:
    z = model.atomic_numbers.tolist()
    n = len(positions)
    node_attrs = torch.zeros(n, len(z), dtype=torch.float64)
    node_attrs[torch.arange(n), torch.tensor([z.index(int(v)) for v in numbers])] = 1.0
    return {"batch": torch.zeros(n, dtype=torch.long), "cell": torch.tensor(cell),
            "edge_index": torch.tensor(edge_index), "energy": torch.empty(1, dtype=torch.float64),
            "forces": torch.empty(n, 3, dtype=torch.float64), "node_attrs": node_attrs,
            "positions": torch.tensor(positions), "ptr": torch.tensor([0, n]),
            "shifts": torch.tensor(shifts), "unit_shifts": torch.tensor(unit_shifts, dtype=torch.float64),
            "weight": torch.ones(1, dtype=torch.float64)}


def test_pair_mace_attributes(scripted) -> None:
    assert scripted.r_max.item() == 5.5 and int(scripted.num_interactions) == 2
    assert scripted.atomic_numbers.tolist() == [13, 28, 29, 46, 47, 78, 79]
    buffers = dict(scripted.named_buffers())
    assert buffers["model.node_embedding.linear.weight"].dtype == torch.float64  # the pair style's dtype probe


def test_pair_mace_no_domain_decomposition(scripted) -> None:
    atoms = alloy(repeat=2, seed=2)
    edge_index, unit_shifts = neighbour_list(atoms.positions, atoms.cell.array, atoms.pbc, 5.5)
    data = pair_mace_input(scripted, atoms.positions, atoms.numbers, edge_index, unit_shifts @ atoms.cell.array,
                           unit_shifts, atoms.cell.array)
    out = scripted(data, torch.ones(len(atoms), dtype=torch.bool), True)
    atoms.calc = MACECalculator(EMT_DEMO, device="cpu", radial="exact")  # TorchScript: the radial MLP
    assert out["total_energy_local"].shape == (1,)
    assert out["total_energy_local"].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(out["node_energy"].numpy(), atoms.get_potential_energies(), atol=1e-10)
    np.testing.assert_allclose(out["forces"].numpy(), atoms.get_forces(), rtol=0, atol=1e-10)
    virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
    np.testing.assert_allclose(out["virials"][0].numpy(), virial, rtol=0, atol=1e-9)
    assert not out["virials"].any() or scripted(data, torch.ones(len(atoms), dtype=torch.bool), False)[
        "virials"].abs().max() == 0


def test_pair_mace_domain_decomposition(scripted) -> None:
    """Ghosts as nodes (no shifts), energy masked to the local atoms, ghost forces summed onto their owners."""
    atoms = alloy(repeat=2, seed=3)
    positions, numbers, owner = ghost_images(atoms, 2 * 5.5 + 1.0)
    edge_index, _ = neighbour_list(positions, np.eye(3) * 100, np.array([False] * 3), 5.5)
    zeros = np.zeros((edge_index.shape[1], 3))
    data = pair_mace_input(scripted, positions, numbers, edge_index, zeros, zeros, atoms.cell.array)
    local = torch.zeros(len(positions), dtype=torch.bool)
    local[: len(atoms)] = True
    out = scripted(data, local, True)
    folded = np.zeros((len(atoms), 3))
    np.add.at(folded, owner, out["forces"].numpy())
    atoms.calc = MACECalculator(EMT_DEMO, device="cpu", radial="exact")  # TorchScript: the radial MLP
    assert out["total_energy_local"].item() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(out["node_energy"][: len(atoms)].numpy(), atoms.get_potential_energies(), atol=1e-10)
    np.testing.assert_allclose(folded, atoms.get_forces(), rtol=0, atol=1e-10)
    virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
    np.testing.assert_allclose(out["virials"][0].numpy(), virial, rtol=0, atol=1e-9)


def test_cli_export_lammps(tmp_path, capsys) -> None:
    from mace_ase.cli import main

    out = tmp_path / "cli.mliap.pkl"
    assert main(["export-lammps", str(EMT_DEMO), "-o", str(out), "--elements", "Cu", "Au"]) == 0
    printed = capsys.readouterr().out
    assert f"pair_style   mliap unified {out} 1" in printed and "pair_coeff   * * Cu Au" in printed
    assert load_lammps_model(out).element_types[2] == "Cu"
    script = tmp_path / "cli-lammps.pt"
    assert main(["export-lammps", str(EMT_DEMO), "-o", str(script), "--format", "pair-mace"]) == 0
    assert torch.jit.load(str(script)).r_max.item() == 5.5
