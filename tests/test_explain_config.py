"""The explain section of a config is checked when the Snakefile is parsed, each problem naming its key."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from classlab.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config():
    return yaml.safe_load((ROOT / "config" / "explain_cpu.yaml").read_text())


def problems(config) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(copy.deepcopy(config))
    return str(info.value)


def test_the_shipped_explain_configs_validate(config):
    validate_config(config)
    assert config["families"]["explain"]["tolerance"] == 4
    validate_config(yaml.safe_load((ROOT / "config" / "explain.yaml").read_text()))


def test_a_misspelt_layer_lists_the_backbones_layers(config):
    config["families"]["explain"]["models"]["convnet"]["layers"] = ["block0", "blok4"]
    text = problems(config)
    assert "families.explain.models.convnet.layers[1]" in text and "block4" in text


def test_a_layer_beyond_the_depth_is_refused(config):
    config["families"]["explain"]["models"]["vit"]["layers"] = ["block7"]
    assert "families.explain.models.vit.layers[0]" in problems(config)


def test_promptcam_needs_a_vit_readout(config):
    config["families"]["explain"]["models"]["vit"]["readouts"] = ["linear_probe"]
    assert "families.explain.methods: promptcam" in problems(config)
    config["families"]["explain"]["models"]["convnet"]["readouts"] = ["promptcam"]
    assert "families.explain.models.convnet.readouts" in problems(config)


def test_a_dataset_without_boxes_and_a_checkpoint_without_seed_are_refused(config):
    config["families"]["explain"]["datasets"] = ["fashion_mnist"]
    config["families"]["explain"]["models"]["erm"] = {"backbone": "convnet", "layers": ["block0"],
                                                      "checkpoint": "results/checkpoints/supervised/x/model.pt"}
    text = problems(config)
    assert "families.explain.datasets[0]" in text and "has no boxes" in text
    assert "families.explain.models.erm.checkpoint" in text


def test_an_unknown_saliency_method_and_a_bad_override_are_named(config):
    config["families"]["explain"]["methods"].append("gradcam_pp")
    config["families"]["explain"]["overrides"]["integrated_gradients"] = {"n_steps": 0}
    text = problems(config)
    assert "families.explain.methods[9]" in text and "gradcam_pp" in text
    assert "families.explain.overrides.integrated_gradients.n_steps" in text
