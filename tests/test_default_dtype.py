"""Results do not depend on torch's global default dtype (issue 8).

A Python float times an integer tensor, or ``torch.tensor(...)`` without a dtype, is computed in torch's *global*
default dtype, not the model's: mace-ase must never let that leak into a float64 (or float32) model. Every parity
case is evaluated in two fresh processes, one with torch's stock default (float32) and one where the caller has done
``torch.set_default_dtype(torch.float64)``; both must give the same answers to the bit, and match mace-torch.

Run directly (``python tests/test_default_dtype.py float64 OUT.json``) this file is the worker of that test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PROPERTIES = ("energy", "forces", "energies", "node_energy", "stress")


def case_key(file_name: str, model: str, case: dict) -> str:
    return f"{file_name}|{model}|{case['structure']}|{case['dtype']}|{case['head']}"


def evaluate_all(output: Path) -> None:
    """Worker: every parity case with this process's default dtype; exact floats (hex) to ``output``."""
    from test_parity import _calculator, all_cases, reference_atoms

    results = {}
    for file_name, model, case in all_cases():
        atoms = reference_atoms(file_name, case["structure"])
        atoms.calc = _calculator(file_name, model, case["dtype"], case["head"])
        values = {
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "energies": atoms.calc.results["energies"],
            "node_energy": atoms.calc.results["node_energy"],
            "stress": atoms.get_stress() if atoms.pbc.all() else None,
        }
        results[case_key(file_name, model, case)] = {
            name: None if value is None else [float(x).hex() for x in np.ravel(np.asarray(value, dtype=np.float64))]
            for name, value in values.items()
        }
    output.write_text(json.dumps(results))


def _decoded(values: dict) -> dict:
    out = {name: None if v is None else np.array([float.fromhex(x) for x in v]) for name, v in values.items()}
    out["energy"] = float(out["energy"][0])
    out["forces"] = out["forces"].reshape(-1, 3)
    return out


@pytest.mark.slow
def test_results_do_not_depend_on_torch_default_dtype(tmp_path: Path) -> None:
    import torch

    from test_parity import all_cases, check_case, reference_atoms

    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {}
    for default in ("float32", "float64"):
        output = tmp_path / f"{default}.json"
        runs[default] = (output, subprocess.Popen([sys.executable, __file__, default, str(output)], env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    results = {}
    for default, (output, process) in runs.items():
        log, _ = process.communicate(timeout=900)
        assert process.returncode == 0, f"worker with default dtype {default} failed:\n{log[-4000:]}"
        results[default] = json.loads(output.read_text())
    assert torch.get_default_dtype() == torch.float32  # this process was left alone

    cases = all_cases()
    keys = {case_key(f, m, c) for f, m, c in cases}
    assert set(results["float32"]) == set(results["float64"]) == keys
    differing = sorted(k for k in keys if results["float32"][k] != results["float64"][k])
    assert not differing, f"{len(differing)} cases depend on torch's default dtype, e.g. {differing[:5]}"
    for file_name, model, case in cases:
        atoms = reference_atoms(file_name, case["structure"])
        check_case(_decoded(results["float64"][case_key(file_name, model, case)]), case, len(atoms),
                   bool(atoms.pbc.all()))


if __name__ == "__main__":
    import torch

    default_dtype, output_path = sys.argv[1], Path(sys.argv[2])
    torch.set_default_dtype(getattr(torch, default_dtype))  # the caller's global switch: what the test is about
    assert torch.get_default_dtype() == getattr(torch, default_dtype)
    evaluate_all(output_path)
