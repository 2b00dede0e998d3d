"""The example scripts and the notebook run (with ASE's EMT, or the shipped demo model)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
REPO = EXAMPLES.parent

SCRIPTS = {
    "relax_structure.py": [],
    "md_nvt.py": ["--steps", "20"],
    "md_npt.py": ["--steps", "20"],
    "eos_bulk_modulus.py": [],
    "phonons.py": [],
    "d3_dispersion.py": [],
    "hessian_vibrations.py": [],
}
NEEDS = {"phonons.py": ["phonopy", "matplotlib"], "d3_dispersion.py": ["dftd3"], "eos_bulk_modulus.py": ["matplotlib"]}


def _env() -> dict[str, str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


QUICKSTART = "quickstart.py"  # runs on the shipped emt-demo MACE model (tested below)


def test_every_example_is_tested():
    assert set(SCRIPTS) | {QUICKSTART} == {p.name for p in EXAMPLES.glob("*.py")}


def test_quickstart_runs_offline_on_the_demo_model(tmp_path):
    env = dict(_env(), MACE_ASE_OFFLINE="1", MACE_ASE_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, str(EXAMPLES / QUICKSTART), "--steps", "10"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mean T" in done.stdout and "drift" in done.stdout
    assert (tmp_path / "quickstart.traj").is_file()


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_script_runs_with_emt(script, tmp_path):
    for package in NEEDS.get(script, []):  # in the [test] extra: a missing one is a failure, not a skip
        importlib.import_module(package)
    done = subprocess.run([sys.executable, str(EXAMPLES / script), "--model", "emt", *SCRIPTS[script]],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()


@pytest.mark.parametrize("model", ["emt", "emt-demo"])
def test_notebook_runs_headless(model, tmp_path, monkeypatch):
    import nbclient  # nbclient, nbformat, ipykernel, phonopy, matplotlib: all in the [test] extra
    import nbformat

    assert (REPO / "models" / "emt-demo.model").is_file(), "the shipped demo model models/emt-demo.model is missing"
    for key, value in {**_env(), "MACE_ASE_MODEL": model, "MACE_ASE_STEPS": "100"}.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(EXAMPLES / "md_and_phonons.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 2  # the live MD plot and the phonon bands
    text = "".join(str(out.get("text", "")) + str(out.get("data", {}).get("text/plain", "")) for out in outputs)
    assert "mean T over the second half" in text and "PhononResult" in text
