"""``mace-ase eval | relax | md`` on small files, with --model emt and with a fixture model."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from ase.build import bulk
from ase.io import read, write
from conftest import fixture_model

from mace_ase.cli import simulate

def run_cli(*argv: str) -> int:
    """Parse with only our sub-commands registered (independent of the other CLI modules)."""
    parser = argparse.ArgumentParser(prog="mace-ase")
    simulate.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


@pytest.fixture
def cu_file(tmp_path) -> Path:
    path = tmp_path / "cu.xyz"
    atoms = bulk("Cu", "fcc", a=3.70, cubic=True) * (2, 1, 1)
    atoms.rattle(0.01, seed=0)
    write(path, atoms)
    return path


def test_eval_prints_and_writes_results(cu_file, tmp_path, capsys):
    out = tmp_path / "evaluated.xyz"
    assert run_cli("eval", cu_file, "--model", "emt", "-o", out) == 0
    printed = capsys.readouterr().out
    assert "energy/eV" in printed and "wrote 1 frame" in printed
    frame = read(out)
    assert frame.get_forces().shape == (8, 3) and np.isfinite(frame.get_potential_energy())


def test_relax_cell_writes_relaxed_structure(cu_file, tmp_path, capsys):
    out = tmp_path / "relaxed.cif"
    code = run_cli("relax", cu_file, "--model", "emt", "--cell", "--optimizer", "BFGS", "--fmax", "0.005", "-o", out)
    assert code == 0
    relaxed = read(out)
    np.testing.assert_allclose(relaxed.cell.lengths() / [2, 1, 1], 3.5898, atol=0.005)
    assert "converged" in capsys.readouterr().out


def test_md_writes_trajectory_and_log(cu_file, tmp_path, capsys):
    traj, log, final = tmp_path / "md.traj", tmp_path / "md.log", tmp_path / "final.xyz"
    code = run_cli("md", cu_file, "--model", "emt", "--ensemble", "npt-mtk", "--steps", "20", "--temperature",
                   "200", "--timestep", "2", "--pressure", "0", "--loginterval", "5", "--seed", "1", "--traj", traj,
                   "--log", log, "--no-progress", "-o", final)
    assert code == 0
    assert len(read(traj, ":")) == 5
    assert np.loadtxt(log).shape == (5, 6)
    assert read(final).get_volume() != pytest.approx(read(cu_file).get_volume(), rel=1e-9)
    assert "MDResult(npt-mtk, 20 steps" in capsys.readouterr().out


def test_md_watchdog_exit_code(cu_file, capsys):
    code = run_cli("md", cu_file, "--model", "emt", "--ensemble", "nve", "--steps", "200", "--temperature",
                   "1000", "--timestep", "40", "--seed", "0", "--no-progress")
    assert code == 3 and "Watchdog stopped" in capsys.readouterr().out


def test_unknown_ensemble_is_an_argparse_error(cu_file):
    with pytest.raises(SystemExit):
        run_cli("md", cu_file, "--model", "emt", "--ensemble", "npt", "--steps", "1")


def test_commands_with_a_mace_model_file(tmp_path, capsys):
    model = fixture_model("mp0a_small")
    path = tmp_path / "nacl.xyz"
    write(path, bulk("NaCl", "rocksalt", a=5.64))
    assert run_cli("eval", path, "--model", model, "--device", "cpu") == 0
    assert run_cli("md", path, "--model", model, "--device", "cpu", "--ensemble", "nve", "--steps", "3",
                   "--temperature", "50", "--loginterval", "1", "--no-progress", "--seed", "0") == 0
    printed = capsys.readouterr().out
    assert "energy/eV" in printed and "MDResult(nve, 3 steps" in printed


def test_registered_in_main_parser():
    from mace_ase import cli

    parser = cli.build_parser()
    args = parser.parse_args(["relax", "x.xyz", "-o", "y.xyz"])
    assert args.func is simulate._relax


def test_radial_spline_flag_reaches_the_calculator(tmp_path, capsys):
    model = fixture_model("mp0a_small")
    path = tmp_path / "nacl.xyz"
    out = {}
    write(path, bulk("NaCl", "rocksalt", a=5.64))
    for radial in ("exact", "spline"):
        assert run_cli("eval", path, "--model", model, "--device", "cpu", "--radial", radial, "-o",
                       tmp_path / f"{radial}.extxyz") == 0
        out[radial] = read(tmp_path / f"{radial}.extxyz").get_potential_energy()
    assert out["spline"] != out["exact"] and out["spline"] == pytest.approx(out["exact"], abs=1e-6)
    calc = simulate.load_calculator(str(model), "cpu", "float64", radial="spline")
    assert calc.parameters["radial"] == "spline" and calc.models[0].use_radial_spline
