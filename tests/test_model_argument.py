"""What users pass as the model that is not a model file: a directory; and licence notices only for loaded models."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mace_ase import foundations
from mace_ase.calculator import MACECalculator
from mace_ase.io import registry
from mace_ase.io.model_file import ModelFileError, read_model_file


@pytest.fixture()
def model_dir(tmp_path: Path, model_file: Path) -> Path:
    folder = tmp_path / "adir"
    folder.mkdir()
    (folder / "mine.model").write_bytes(model_file.read_bytes())
    return folder


def test_directory_as_model_says_directory_and_what_to_pass(model_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("MACE_ASE_OFFLINE", "1")
    monkeypatch.chdir(model_dir.parent)
    for call in (lambda: read_model_file(model_dir), lambda: MACECalculator(model_paths=str(model_dir)),
                 lambda: foundations.mace_mp("adir"), lambda: foundations.mace_mp(model_dir),
                 lambda: foundations.mace_mp(str(model_dir))):
        with pytest.raises(ModelFileError, match="is a directory") as info:
            call()
        assert "mine.model" in str(info.value)  # names the file the user probably meant
    with pytest.raises(ModelFileError, match="holds no .model file"):
        read_model_file(model_dir.parent / "adir" / "..")


def test_licence_notice_only_after_a_successful_load(tmp_path: Path, model_file: Path, monkeypatch, caplog) -> None:
    entry = registry.ModelEntry("asl-model", "mp", "ASL", "float64", None, "https://example.invalid/asl.model")
    broken = tmp_path / "broken.model"
    broken.write_bytes(model_file.read_bytes()[:5000])
    monkeypatch.setattr(registry, "_notified", set())
    monkeypatch.setattr(foundations, "lookup", lambda name, families=None: entry)
    served = {"path": broken}
    monkeypatch.setattr(foundations, "fetch_entry", lambda entry, notify=True: served["path"])
    caplog.set_level(logging.INFO)
    with pytest.raises(ModelFileError):
        foundations.mace_mp("asl-model", device="cpu", default_dtype="float64")
    assert not [r for r in caplog.records if "Academic Software License" in r.getMessage()]
    served["path"] = model_file
    foundations.mace_mp("asl-model", device="cpu", default_dtype="float64")
    notices = [r for r in caplog.records if "Academic Software License" in r.getMessage()]
    assert len(notices) == 1 and notices[0].levelname == "WARNING"
