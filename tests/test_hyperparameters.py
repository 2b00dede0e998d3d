"""hyperparameters() describes exactly the module build_model() builds (one reading of the records for both)."""

from __future__ import annotations

import pytest
import torch
from conftest import FIXTURES, fixture_model, references

from mace_ase.io.model_file import read_model_file
from mace_ase.model.build import UnsupportedModelError, build_model, hyperparameters

SUPPORTED = [name for name, entry in references()["models"].items() if not entry.get("unsupported")]


def test_fixtures_cover_the_architectures():
    assert {"multihead", "plain_mace", "mp0b_agnesi_zbl", "old_format"} <= set(SUPPORTED)


@pytest.mark.parametrize("name", SUPPORTED)
def test_summary_matches_the_built_module(name):
    model_file = read_model_file(FIXTURES / references()["models"][name]["file"])
    summary = hyperparameters(model_file)
    model = build_model(model_file)
    assert summary["atomic_numbers"] == model.atomic_numbers.tolist()
    assert summary["r_max"] == model.r_max_value and summary["max_ell"] == model.max_ell
    assert summary["heads"] == model.heads and summary["num_interactions"] == len(model.interactions)
    assert summary["pair_repulsion"] == model.use_zbl
    n_heads, n_elements = len(model.heads), len(model.atomic_numbers)
    e0 = torch.tensor(summary["atomic_energies"], dtype=torch.float64).reshape(-1, n_elements)
    assert torch.equal(e0.expand(n_heads, n_elements), model.atomic_energies)
    for key, built in (("scale", model.scale), ("shift", model.shift)):
        assert torch.equal(torch.tensor(summary[key], dtype=torch.float64).reshape(-1).expand(n_heads), built)
    assert summary["avg_num_neighbors"] == model.interactions[0].avg_num_neighbors


def test_unsupported_files_are_described_not_refused():
    path = fixture_model("unsupported_nonlinear")
    summary = hyperparameters(read_model_file(path))
    assert "NonLinear" in summary["interaction_cls"]
    with pytest.raises(UnsupportedModelError, match="NonLinear"):
        build_model(read_model_file(path))
