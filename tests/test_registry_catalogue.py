"""The shipped model catalogue (models/registry.txt): contents, parser errors, name look-up, where it is found."""

from __future__ import annotations

import hashlib

from pathlib import Path

import pytest

from mace_ase.io import catalogue, registry
from mace_ase.io.registry import CatalogueError, UnknownModelError, UnsupportedModelError, parse_catalogue

MP = "https://github.com/ACEsuit/mace-mp/releases/download"
MF = "https://github.com/ACEsuit/mace-foundations/releases/download"

# mace-torch 0.3.16: the names its functions know (foundations_models.py)
MACE_MP_NAMES = ["small", "medium", "large", "small-0b", "medium-0b", "small-0b2", "medium-0b2", "large-0b2",
                 "medium-0b3", "medium-mpa-0", "small-omat-0", "medium-omat-0", "mace-matpes-pbe-0",
                 "mace-matpes-r2scan-0", "mh-0", "mh-1"]
# the only checksums known: git blob SHA-1s of files committed to ACEsuit/mace and ACEsuit/mace-off
KNOWN_GIT_SHA1 = {
    "medium-mpa-0": "962c5918bb24895b4579e29b52d6f4f60673f70f",
    "anicc": "eee5bb699e0ad6d8dbf8ba6212fe2e0c572ab2e8",
    "off23-small": "6c1daa4a7aebf6a9ba059214ded4645774f0a1a0",
    "off23-medium": "51573784691d0bd80bc3b6278411d006db8f848a",
    "off23-large": "02a50e3cfad8d263e0501f7fe522062fde9874bd",
    "off23b-medium": "0b069d88375e9c7d720ac0bc239129c9eb9b510e",
    "off24-medium": "413df802546a6effe05b77b589ccb1d8a34b7225",
}


def test_every_mace_torch_name_is_in_the_catalogue():
    for name in MACE_MP_NAMES:
        assert registry.lookup(name, ["mp"]).family == "mp"
    for alias, name in [("small", "off23-small"), ("medium", "off23-medium"), ("large", "off23-large")]:
        assert registry.lookup(alias, ["off"]).name == name
    assert registry.lookup("extra_large", ["omol"]).head == "omol"
    assert registry.lookup("anicc", ["anicc"]).licence == "MIT"


def test_urls_are_the_upstream_ones():
    urls = {name: entry.source for name, entry in registry.catalogue().items()}
    assert urls["small"] == f"{MP}/mace_mp_0/2023-12-10-mace-128-L0_energy_epoch-249.model"
    assert urls["large"] == f"{MP}/mace_mp_0/MACE_MPtrj_2022.9.model"
    assert urls["medium-0b3"] == f"{MP}/mace_mp_0b3/mace-mp-0b3-medium.model"
    assert urls["mace-matpes-r2scan-0"] == f"{MF}/mace_matpes_0/MACE-matpes-r2scan-omat-ft.model"
    assert urls["mh-1"] == f"{MF}/mace_mh_1/mace-mh-1.model"
    assert urls["omol-0-extra-large"] == f"{MF}/mace_omol_0/MACE-omol-0-extra-large-1024.model"
    assert urls["off23-medium"] == ("https://raw.githubusercontent.com/ACEsuit/mace-off/main/mace_off23/"
                                    "MACE-OFF23_medium.model")
    # the default is fetched from the committed file whose git blob SHA-1 is known (see registry.txt)
    assert urls["medium-mpa-0"].endswith("/ACEsuit/mace/main/mace/calculators/foundations_models/"
                                         "mace-mpa-0-medium.model")
    assert registry.lookup("medium-mpa-0").file_name == "mace-mpa-0-medium.model"  # as the release asset


def test_licences_and_dtypes():
    entries = registry.catalogue()
    asl = {name for name, entry in entries.items() if entry.licence == "ASL"}
    assert asl == {"small-omat-0", "medium-omat-0", "mace-matpes-pbe-0", "mace-matpes-r2scan-0", "mh-0", "mh-1",
                   "off23-small", "off23-medium", "off23-large", "off23b-medium", "off24-medium", "omol-0-extra-large"}
    assert {entry.dtype for entry in entries.values() if entry.family == "mp"} == {"float32"}
    assert {entry.dtype for entry in entries.values() if entry.family in ("off", "omol", "anicc")} == {"float64"}


def test_checksums_are_only_the_known_ones():
    pinned = {name: entry.checksum for name, entry in registry.catalogue().items() if entry.checksum}
    assert pinned.pop("emt-demo").startswith("sha256:")  # our own file: checked below against its bytes
    assert pinned == {name: f"gitsha1:{sha1}" for name, sha1 in KNOWN_GIT_SHA1.items()}


def test_emt_demo_is_a_shipped_file():
    entry = registry.lookup("emt-demo")
    assert entry.is_local and entry.family == "demo" and entry.licence == "MIT"
    assert registry.lookup("emt-demo", ["mp", "demo"]) is entry
    path = registry.models_dir() / entry.source
    assert entry.checksum == f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"
    assert registry.fetch("emt-demo") == path  # never the network


LINE = "m  mp MIT float32 -  https://example.org/a/m.model"


@pytest.mark.parametrize("text, problem", [
    ("m mp MIT float32 -", "at least 6 columns"),
    (LINE.replace("MIT", "GPL"), "unknown licence 'GPL'"),
    (LINE.replace("float32", "half"), "unknown dtype"),
    (LINE.replace(" - ", " sha256:abc "), "bad checksum"),
    (LINE.replace(" mp ", " xx "), "unknown family"),
    (LINE.replace("https", "http"), "https://"),
    (LINE + " colour=red", "unknown option"),
    (LINE + " unsupported=why", "go together"),
    (LINE + " instead=that", "go together"),
    (LINE + "\n" + LINE, "duplicate name 'm'"),
    (LINE + "\n" + LINE.replace("m ", "n ", 1), "file name 'm.model' is also used by 'm'"),
    ("m mp MIT float32 - 'unclosed", "No closing quotation"),
])
def test_parser_names_file_line_and_problem(text, problem):
    with pytest.raises(CatalogueError) as info:
        parse_catalogue("# header\n\n" + text, origin="cat.txt")
    message = str(info.value)
    assert problem in message and message.startswith("cat.txt, line ")


def test_parser_options_and_placeholders():
    entries = parse_catalogue(
        "a mp  MIT float32 -        local.model   # trailing comment\n"
        f"b off ASL float64 gitsha1:{'a' * 40} https://x.org/b.model alias=bee head=h\n"
    )
    assert entries["a"].checksum is None and entries["a"].is_local and entries["a"].file_name == "local.model"
    assert entries["b"].alias == "bee" and entries["b"].head == "h" and entries["b"].checksum == f"gitsha1:{'a' * 40}"
    assert entries["a"].supported and entries["b"].supported


def test_unsupported_option_gives_the_reason_and_the_alternative():
    entries = parse_catalogue('u mp MIT float32 - https://x.org/u.model unsupported="its gizmo blocks are not '
                              'implemented" instead="the model v"\n')
    entry = entries["u"]
    assert not entry.supported
    with pytest.raises(UnsupportedModelError, match="'u'.*its gizmo blocks are not implemented.*use the model v"):
        entry.check_supported()


def test_models_mace_ase_cannot_run_are_marked_and_say_what_to_use():
    unsupported = {name: entry for name, entry in registry.catalogue().items() if not entry.supported}
    assert set(unsupported) == {"mh-0", "mh-1", "omol-0-extra-large"}
    for name in ("mh-0", "mh-1"):
        assert "non-linear interaction" in unsupported[name].unsupported
        assert "medium-omat-0" in unsupported[name].instead
    omol = unsupported["omol-0-extra-large"]
    assert "charge/spin" in omol.unsupported and "mace_off" in omol.instead and "mace_omol" in omol.instead


def test_lookup_errors_list_choices_and_point_to_the_right_function():
    with pytest.raises(UnknownModelError, match="Available: .*medium-mpa-0"):
        registry.lookup("medium-mpa-1")
    with pytest.raises(UnknownModelError, match="It is a model of family 'mp'") as info:
        registry.lookup("small-0b", ["off"])
    assert info.value.entry is registry.lookup("small-0b")  # so that foundations can name the right function
    with pytest.raises(UnknownModelError):
        registry.lookup("extra_large")  # aliases only count within their family's function


def test_catalogue_found_in_a_wheel_layout(tmp_path, monkeypatch):
    package = tmp_path / "site-packages" / "mace_ase"
    (package / "io").mkdir(parents=True)
    (package / "_models").mkdir()
    (package / "_models" / "registry.txt").write_text(LINE + "\n")
    monkeypatch.setattr(catalogue, "__file__", str(package / "io" / "catalogue.py"))
    assert registry.models_dir() == package / "_models"
    (package / "_models" / "registry.txt").unlink()
    with pytest.raises(FileNotFoundError, match="reinstall"):
        registry.models_dir()


def test_catalogue_is_the_one_in_the_source_tree():
    """From a source checkout or an installed wheel (mace_ase/_models), the catalogue read is models/registry.txt."""
    source = Path(__file__).resolve().parents[1] / "models"
    assert (registry.models_dir() / "registry.txt").read_text() == (source / "registry.txt").read_text()
    assert (registry.models_dir() / "emt-demo.model").read_bytes() == (source / "emt-demo.model").read_bytes()
