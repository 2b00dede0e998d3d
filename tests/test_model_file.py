"""The reader never executes anything from a model file, and refuses what it cannot read, clearly."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, fixture_model
from mace_ase.io.model_file import ModelFileError, read_model_file
from mace_ase.model.build import UnsupportedModelError, load_model


def _torch_zip(path: Path, payload: bytes) -> Path:
    """A file shaped like torch.save's output whose data.pkl is ``payload``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return path


class _SystemCall:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _torch_zip(tmp_path / "evil.model", pickle.dumps(_SystemCall(f"touch {marker}"), protocol=2))
    with pytest.raises(ModelFileError, match="refusing"):
        read_model_file(path)
    assert not marker.exists()
    with pytest.raises(ModelFileError):
        load_model(path)
    assert not marker.exists()


def test_payload_hidden_inside_a_model_record_is_refused(tmp_path: Path) -> None:
    """A payload nested in the state of an otherwise plausible mace module is still refused."""
    marker = tmp_path / "pwned"

    class Fake:  # pickled under a mace class name, its state carrying a call to builtins.eval
        def __reduce__(self):
            return (_mace_class, (), {"_modules": {"x": _SystemCall(f"touch {marker}")}})

    global _mace_class

    def _mace_class():  # pragma: no cover - never called
        raise AssertionError

    _mace_class.__module__ = "mace.modules.models"
    _mace_class.__qualname__ = _mace_class.__name__ = "ScaleShiftMACE"
    import sys
    import types

    fake_module = types.ModuleType("mace.modules.models")
    fake_module.ScaleShiftMACE = _mace_class
    saved = {name: sys.modules.get(name) for name in ("mace", "mace.modules", "mace.modules.models")}
    sys.modules.update({"mace": types.ModuleType("mace"), "mace.modules": types.ModuleType("mace.modules"),
                        "mace.modules.models": fake_module})
    try:
        payload = pickle.dumps(Fake(), protocol=2)
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    path = _torch_zip(tmp_path / "nested.model", payload)
    with pytest.raises(ModelFileError, match="posix.system|os.system|refusing"):
        read_model_file(path)
    assert not marker.exists()


def test_fx_graph_source_is_not_executed(tmp_path: Path) -> None:
    """torch.fx GraphModules carry Python source that normal unpickling exec()s; we keep it as data."""
    marker = tmp_path / "pwned"

    class GraphModuleLike:
        def __reduce__(self):
            body = {"_code": f"import os\nos.system('touch {marker}')\n", "_graph": None}
            return (_reduce_graph_module, (body, "import torch"))

    global _reduce_graph_module

    def _reduce_graph_module(body, import_block):  # pragma: no cover - never called
        raise AssertionError

    _reduce_graph_module.__module__ = "torch.fx.graph_module"
    _reduce_graph_module.__qualname__ = _reduce_graph_module.__name__ = "reduce_graph_module"
    import sys

    import torch.fx.graph_module as graph_module

    original = graph_module.reduce_graph_module
    graph_module.reduce_graph_module = _reduce_graph_module
    try:
        payload = pickle.dumps({"graph": GraphModuleLike()}, protocol=2)
    finally:
        graph_module.reduce_graph_module = original
    assert sys.modules["torch.fx.graph_module"].reduce_graph_module is original
    path = _torch_zip(tmp_path / "fx.model", payload)
    with pytest.raises(ModelFileError, match="not a pickled MACE model"):
        read_model_file(path)  # a dict at the top, but the fx record itself was built without exec
    assert not marker.exists()


def test_html_page_and_garbage_are_refused(tmp_path: Path) -> None:
    html = tmp_path / "page.model"
    html.write_text("<!DOCTYPE html><html><body>Rate limit exceeded</body></html>")
    with pytest.raises(ModelFileError, match="HTML"):
        read_model_file(html)
    with pytest.raises(ModelFileError, match="does not exist"):
        read_model_file(tmp_path / "missing.model")
    state_dict = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, state_dict)
    with pytest.raises(ModelFileError, match="not a pickled MACE model"):
        read_model_file(state_dict)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    data = fixture_model("mp0a_small").read_bytes()
    cut = tmp_path / "cut.model"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError):
        read_model_file(cut)


def test_reader_rebuilds_every_tensor(tmp_path: Path) -> None:
    """Tensors round-trip exactly: re-save our state_dict with torch and read it back with weights_only=True."""
    model_file = read_model_file(fixture_model("mp0a_medium"))
    state = model_file.state_dict()
    assert "products.0.symmetric_contractions.contractions.0.U_matrix_3" in state
    assert state["r_max"].dim() == 0 and float(state["r_max"]) > 0
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=True)
    assert all(torch.equal(again[key], value) for key, value in state.items())


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = fixture_model("unsupported_nonlinear")
    with pytest.raises(UnsupportedModelError, match="NonLinear"):
        load_model(path)


def test_hyperparameters_describe_the_file() -> None:
    from conftest import references
    from mace_ase import hyperparameters

    for name, entry in references()["models"].items():
        if entry.get("unsupported"):
            continue
        summary = hyperparameters(read_model_file(FIXTURES / entry["file"]))
        assert summary["r_max"] == entry["r_max"]
        assert summary["atomic_numbers"] == entry["atomic_numbers"]
        assert summary["heads"] == entry["heads"]
        assert summary["num_interactions"] == 2 and summary["correlation"] == [3, 3]
        assert summary["MLP_irreps"] == "16x0e"
    multihead = hyperparameters(read_model_file(fixture_model("multihead")))
    assert multihead["interaction_cls"] == "RealAgnosticDensityResidualInteractionBlock"
    assert multihead["pair_repulsion"] and multihead["distance_transform"] == "AgnesiTransform"
    assert len(multihead["scale"]) == 2
