"""A model file lacking what its architecture needs is refused, naming the attribute (no silent default)."""

from __future__ import annotations

import pytest
from conftest import fixture_model

from mace_ase.io.model_file import ModelFileError, read_model_file
from mace_ase.model.build import build_model


@pytest.fixture
def model_file():
    return read_model_file(fixture_model("mp0a_small"))


def test_the_unchanged_file_builds(model_file):
    assert build_model(model_file).r_max_value > 0


def test_missing_avg_num_neighbors_is_an_error(model_file):
    del model_file.root.module("interactions.1").state["avg_num_neighbors"]
    with pytest.raises(ModelFileError, match="avg_num_neighbors"):
        build_model(model_file)


def test_missing_activation_constant_is_an_error(model_file):
    del model_file.root.module("interactions.0.conv_tp_weights.layer0.act").state["cst"]
    with pytest.raises(ModelFileError, match="cst"):
        build_model(model_file)


def test_readout_count_must_match_the_layers(model_file):
    readouts = model_file.root.module("readouts").state["_modules"]
    readouts["2"] = readouts["1"]  # three readouts for two layers
    with pytest.raises(ModelFileError, match="3 readouts for 2 interaction layers"):
        build_model(model_file)


def test_single_readout_must_be_declared_when_the_file_says_every_layer_has_one(model_file):
    del model_file.root.module("readouts").state["_modules"]["1"]
    assert model_file.root.get("use_last_readout_only") is False
    with pytest.raises(ModelFileError, match="1 readouts for 2 interaction layers"):
        build_model(model_file)
