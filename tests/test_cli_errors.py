"""`mace-ase eval|relax|md`: ordinary mistakes give one `error: ...` line and exit status 2, never a traceback
(unless --debug or -vv); --model of any catalogue family; -v/-vv levels. No network: a cache folder filled by hand,
MACE_ASE_OFFLINE, and a DNS lookup that fails on purpose."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ase.build import bulk, molecule
from ase.io import write
from conftest import fixture_model

from mace_ase import foundations
from mace_ase.cli import log_level, main
from mace_ase.io import catalogue, download, registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("MACE_ASE_CACHE_DIR", str(cache))
    monkeypatch.setenv("MACE_ASE_OFFLINE", "1")  # nothing here may reach a network
    for name in ("MACE_ASE_MIRROR", "MACE_ASE_CACHE_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(registry, "_verified", set())
    return cache


@pytest.fixture
def water(tmp_path) -> Path:
    path = tmp_path / "water.xyz"
    write(path, molecule("H2O"))
    return path


def error_line(capsys) -> str:
    """The whole of stderr, which must be exactly one line starting with `error: `."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_missing_structure_file(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.xyz"), "--model", "emt"]) == 2
    assert "no structure file" in error_line(capsys)


@pytest.mark.parametrize("command", [["eval"], ["relax", "-o", "out.xyz"], ["md", "--steps", "1"]])
def test_directory_as_structure_file(tmp_path, capsys, command):
    assert main([command[0], str(tmp_path), "--model", "emt", *command[1:]]) == 2
    assert "is a directory" in error_line(capsys)


def test_unreadable_structure_file(tmp_path, capsys):
    path = tmp_path / "bad.xyz"
    path.write_text("not a structure\n")
    assert main(["eval", str(path), "--model", "emt"]) == 2
    assert "cannot read" in error_line(capsys)


def test_element_the_model_lacks(tmp_path, capsys):
    path = tmp_path / "xe.xyz"
    write(path, bulk("Xe", "fcc", a=6.2))
    assert main(["eval", str(path), "--model", str(fixture_model("mp0a_small")), "--device", "cpu"]) == 2
    line = error_line(capsys)
    assert "Xe" in line and "models list" in line


def test_directory_as_model(water, tmp_path, capsys):
    assert main(["eval", str(water), "--model", str(tmp_path)]) == 2
    assert "directory" in error_line(capsys)


def test_unknown_model_name(water, capsys):
    assert main(["relax", str(water), "--model", "medium-mpa-9", "-o", "x.xyz"]) == 2
    line = error_line(capsys)
    assert "medium-mpa-9" in line and "off23-medium" in line  # every family is offered: the CLI takes them all


def test_device_this_machine_lacks(water, capsys):
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    assert main(["eval", str(water), "--model", "emt-demo", "--device", device]) == 2
    line = error_line(capsys)
    assert "--device" in line and "cpu" in line


def test_bad_device_name(water, capsys):
    assert main(["eval", str(water), "--model", "emt-demo", "--device", "gpu"]) == 2
    assert "not a device name" in error_line(capsys)


def test_offline_without_a_cached_default_model(water, capsys):
    assert main(["eval", str(water)]) == 2
    line = error_line(capsys)
    assert "MACE_ASE_OFFLINE" in line and "--model emt-demo" in line


def test_no_network_fails_fast_naming_the_ways_out(water, monkeypatch, capsys):
    monkeypatch.delenv("MACE_ASE_OFFLINE")
    sleeps = []

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    start = time.perf_counter()
    assert main(["md", str(water), "--steps", "1"]) == 2
    assert time.perf_counter() - start < 10 and sleeps == []  # was: ~14 s of retries, then a traceback
    line = error_line(capsys)
    assert "could not be resolved" in line and "--model emt-demo" in line and "MACE_ASE_OFFLINE" in line


@pytest.mark.parametrize("flag", ["--debug", "-vv"])
def test_debug_and_vv_show_the_traceback(tmp_path, capsys, flag):
    assert main([flag, "eval", str(tmp_path / "nope.xyz"), "--model", "emt"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: ")


def test_options_after_the_command(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope.xyz"), "--model", "emt", "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_verbosity_levels():
    assert [log_level(n) for n in range(4)] == [logging.WARNING, logging.INFO, logging.DEBUG, logging.DEBUG]


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH",
                                                                                                        "")]))
    return subprocess.run([sys.executable, "-m", "mace_ase.cli", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, check=False)  # a first model load may wait for a kernel build


def test_verbose_flag_changes_what_is_logged(tmp_path):
    """A real process: without -v only warnings, with -v INFO (the model that was loaded), with -vv DEBUG."""
    cu = tmp_path / "cu.xyz"
    write(cu, bulk("Cu", "fcc", a=3.6))
    quiet = _cli("eval", str(cu), "--model", "emt-demo", "--device", "cpu", cwd=tmp_path)
    verbose = _cli("-v", "eval", str(cu), "--model", "emt-demo", "--device", "cpu", cwd=tmp_path)
    assert quiet.returncode == verbose.returncode == 0, quiet.stderr + verbose.stderr
    assert "INFO" not in quiet.stderr and "INFO mace_ase.foundations" in verbose.stderr
    assert "DEBUG" not in verbose.stderr


def test_real_process_prints_one_line(tmp_path):
    done = _cli("eval", str(tmp_path / "missing.cif"), "--model", "emt", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no structure file {tmp_path / 'missing.cif'}; give the path of a file ASE can read (extxyz, cif, "
        "POSCAR)"
    ]


def test_non_mp_catalogue_model_is_loaded_by_its_family_function(water, isolated, monkeypatch, capsys):
    """`--model off23-medium` (any non-mp family) goes to mace_off, not to mace_mp and its advice for Python users.

    The off entry here is a stand-in (a catalogue entry without checksum, its file placed in the cache by hand):
    the real MACE-OFF files are hundreds of MB and pinned to their own checksums."""
    text = "fake-off  off  MIT  float64  -  https://example.invalid/fake-off.model\n"
    monkeypatch.setattr(catalogue, "catalogue", lambda: catalogue.parse_catalogue(text))
    isolated.mkdir()
    (isolated / "fake-off.model").write_bytes(fixture_model("mp0a_small").read_bytes())
    calls = []
    real_mace_off = foundations.mace_off

    def spy(*args, **kwargs):
        calls.append(kwargs.get("model"))
        return real_mace_off(*args, **kwargs)

    monkeypatch.setattr(foundations, "mace_off", spy)
    assert main(["eval", str(water), "--model", "fake-off", "--device", "cpu"]) == 0
    assert calls == ["fake-off"]
    assert "energy/eV" in capsys.readouterr().out
