"""`mace-ase models list|download|verify|path|clear`, without network (cache and shared folders filled by hand)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import place_as_cached

from mace_ase.cli import models as models_cli
from mace_ase.io import registry


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mace-ase")
    models_cli.register(parser.add_subparsers())
    args = parser.parse_args(["models", *argv])
    return args.func(args)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("MACE_ASE_CACHE_DIR", str(folder))
    monkeypatch.setenv("MACE_ASE_OFFLINE", "1")  # these tests must never reach a network
    for name in ("MACE_ASE_MIRROR", "MACE_ASE_CACHE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(registry, "_verified", set())
    return folder




def test_list_shows_every_model_and_cache_state(cache, model_file, capsys):
    place_as_cached(cache, "small", model_file)
    assert run("list") == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and not line.startswith(("NAME", "*"))}
    assert set(registry.catalogue()) <= set(rows)
    assert rows["small"].split()[1:3] == ["mp", "MIT"] and rows["small"].rstrip().endswith("yes")
    assert "MiB" in rows["small"] or "KiB" in rows["small"] or " B " in rows["small"]
    assert rows["medium-mpa-0"].split()[1] == "*" and rows["medium-mpa-0"].rstrip().endswith("no")
    assert "ASL" in rows["medium-omat-0"] and str(cache) in out and "Offline mode" in out
    for name in ("mh-0", "mh-1", "omol-0-extra-large"):  # mace-ase cannot run them: marked, and the mark explained
        assert rows[name].split()[1:3] in (["!", registry.lookup(name).family], ["*", "!"])
    assert "! mace-ase cannot run it" in out and rows["small"].split()[1] == "mp"


def test_download_path_verify_clear(cache, model_file, capsys):
    place_as_cached(cache, "small", model_file)
    assert run("download", "small", "medium") == 1  # offline: 'medium' is not cached, 'small' is
    captured = capsys.readouterr()
    assert captured.err.count("error:") == 1 and "MACE_ASE_OFFLINE" in captured.err
    assert captured.out.startswith("small: ")
    assert (cache / (registry.lookup("small").file_name + ".sha256")).is_file()  # recorded on first use

    assert run("path", "small") == 0
    assert capsys.readouterr().out.strip() == str(cache / registry.lookup("small").file_name)
    assert run("path", "medium") == 1
    assert "not cached" in capsys.readouterr().err

    assert run("verify") == 0
    assert "small: OK" in capsys.readouterr().out
    target = cache / registry.lookup("small").file_name
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    assert run("verify", "small") == 1
    out = capsys.readouterr().out
    assert "small: BAD" in out and target.is_file()  # verify reports, never deletes

    assert run("clear", "small") == 0
    assert not target.exists() and not list(cache.glob("*small*")) and "deleted" in capsys.readouterr().out


def test_shared_folder_and_clear_all(cache, tmp_path, model_file, monkeypatch, capsys):
    shared = tmp_path / "shared"
    shared_copy = place_as_cached(shared, "medium", model_file)
    monkeypatch.setenv("MACE_ASE_CACHE_PATH", str(shared))
    assert run("download", "medium") == 0 and str(shared_copy) in capsys.readouterr().out
    assert run("verify") == 0
    assert "medium: UNPINNED" in capsys.readouterr().out  # no hash known, nothing written in a shared folder
    place_as_cached(cache, "large", model_file)
    assert run("clear") == 0
    assert not any(cache.iterdir()) and shared_copy.is_file()


def test_unknown_names(capsys):
    assert run("path", "nope") == 1 and "Unknown model 'nope'" in capsys.readouterr().err
    assert run("verify", "nope") == 1
    assert run("clear", "nope") == 1


def test_info_describes_a_model_without_running_it(model_file, capsys):
    assert run("info", str(model_file)) == 0
    out = capsys.readouterr().out
    assert "RealAgnosticResidualInteractionBlock" in out and "r_max" in out and "16x0e" in out
    assert run("info", "emt-demo") == 0  # shipped: found without the network
    assert "32x0e+32x1o" in capsys.readouterr().out
