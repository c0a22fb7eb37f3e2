"""The shift family's domain-generalisation protocol: domains built by code, DomainBed's split,
the seeded hyperparameter search, model selection, one job end to end with resume, and the
config checks that name the bad field."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from classlab.config import ConfigError, draw_hparams, method_search, resolve_hparams, validate_config
from classlab.data.domains import DomainError, build_domains, in_out_split, load_domains, save_domains
from classlab.protocols.shift import run_domain_generalization, select_draws


def _images(n=600, classes=4, size=8, seed=0):
    """Class-dependent blobs: class k lights the k-th quarter of the image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (torch.rand(n, 1, size, size, generator=g) * 60).to(torch.uint8)
    for k in range(classes):
        r, c = divmod(k, 2)
        h = size // 2
        x[y == k, :, r * h:(r + 1) * h, c * h:(c + 1) * h] += 150
    return x, y


def test_rotated_domains_deal_disjoint_images_and_rotate_each_share():
    x, y = _images(600)
    d = build_domains("rotated", x, y, 4, {"angles": [0, 90, 180]}, dataset="toy")
    assert d.names == ["rot0", "rot90", "rot180"]
    assert [e["size"] for e in d.manifest["domains"]] == [200, 200, 200]
    assert torch.bincount(d.domain).tolist() == [200, 200, 200]
    # angle 0 keeps the images; 180 degrees turns an image's first row into its last, reversed
    first = x[np.sort(np.random.default_rng(0).permutation(600)[0::3])]
    assert torch.equal(d.x[d.domain == 0], first)
    third = x[np.sort(np.random.default_rng(0).permutation(600)[2::3])]
    assert torch.allclose(d.x[d.domain == 2].float(), third.flip(-1).flip(-2).float(), atol=1)
    assert sum(d.manifest["domains"][0]["class_counts"]) == 200


def test_colored_domains_follow_the_colour_label_correlation_of_each_environment():
    x, y = _images(9000, classes=10, size=28)
    d = build_domains("colored", x, y, 10, {"flip_probs": [0.1, 0.2, 0.9]})
    assert d.num_classes == 2 and d.x.shape[1:] == (2, 14, 14)
    for k, e in enumerate([0.1, 0.2, 0.9]):
        info = d.manifest["domains"][k]
        assert abs(info["colour_label_agreement"] - (1 - e)) < 0.03
        assert abs(info["label_noise_measured"] - 0.25) < 0.03
        xs = d.x[d.domain == k]
        red_on = xs[:, 0].flatten(1).amax(1) > 0
        green_on = xs[:, 1].flatten(1).amax(1) > 0
        assert not (red_on & green_on).any()  # exactly one colour channel carries the image


def test_domain_recipes_are_checked_and_name_the_field():
    x, y = _images(60)
    with pytest.raises(DomainError, match="kind"):
        build_domains("sheared", x, y, 4)
    with pytest.raises(DomainError, match="angles"):
        build_domains("rotated", x, y, 4, {"angles": [0]})
    with pytest.raises(DomainError, match="per_domain"):
        build_domains("rotated", x, y, 4, {"angles": [0, 45], "per_domain": 1000})
    with pytest.raises(DomainError, match="test_domain: 'rot7'"):
        build_domains("rotated", x, y, 4, {"angles": [0, 45]}).index_of("rot7")


def test_in_out_split_holds_out_a_fifth_of_each_domain_by_trial():
    x, y = _images(600)
    d = build_domains("rotated", x, y, 4, {"angles": [0, 30, 60]})
    ins, outs = in_out_split(d, trial=0)
    for k in range(3):
        assert len(outs[k]) == 40 and len(ins[k]) == 160
        assert not set(ins[k]) & set(outs[k])
        assert set(ins[k]) | set(outs[k]) == set(torch.nonzero(d.domain == k).flatten().tolist())
    assert not np.array_equal(in_out_split(d, trial=1)[1][0], outs[0])
    assert np.array_equal(in_out_split(d, trial=0)[1][0], outs[0])


def test_draw_zero_is_the_defaults_and_later_draws_sample_the_search_space():
    defaults = resolve_hparams("shift", "irm", {})
    assert draw_hparams("shift", "irm", 0, 0) == defaults
    search = method_search("shift", "irm")
    assert "lr" in search
    draws = [draw_hparams("shift", "irm", k, 0) for k in range(1, 6)]
    lo, hi = search["lr"]["log10_uniform"]
    assert all(10 ** lo <= d["lr"] <= 10 ** hi for d in draws)
    assert len({d["lr"] for d in draws}) == 5
    assert draw_hparams("shift", "irm", 3, 0) == draws[2]            # reproducible
    assert draw_hparams("shift", "irm", 3, 1)["lr"] != draws[2]["lr"]  # each trial its own draws
    assert draw_hparams("shift", "irm", 3, 0, {"lr": 0.5})["lr"] == 0.5  # an override is never searched


def test_selection_by_training_domain_validation_and_by_oracle():
    result = {"test_domain": "c", "train_domains": ["a", "b"], "draws": [
        {"draw": 0, "train_steps": 10, "hparams": {}, "accuracy": {"a_out": .9, "b_out": .9, "c_out": .2, "c_in": .3}},
        {"draw": 1, "train_steps": 10, "hparams": {}, "accuracy": {"a_out": .7, "b_out": .8, "c_out": .6, "c_in": .55}},
    ]}
    chosen = select_draws(result)
    assert chosen["training_domain"]["draw"] == 0 and chosen["training_domain"]["test_acc"] == .3
    assert chosen["oracle"]["draw"] == 1 and chosen["oracle"]["test_acc"] == .55


@pytest.fixture()
def toy_domains(tmp_path):
    x, y = _images(480)
    save_domains(tmp_path / "domains", build_domains("rotated", x, y, 4, {"angles": [0, 90, 180]}, dataset="toy"))
    return tmp_path / "domains"


TINY = {"widths": [4, 8], "pool_after": [0]}


def test_one_job_trains_every_draw_records_every_domain_and_resumes(toy_domains, tmp_path):
    out, work = tmp_path / "records.json", tmp_path / "work"
    overrides = {"steps": 8, "batch_size": 16}
    result = run_domain_generalization("erm", toy_domains, "rot180", "convnet", 0, 2, out, work, overrides, TINY,
                                       threads=1)
    assert [r["draw"] for r in result["draws"]] == [0, 1]
    assert result["train_domains"] == ["rot0", "rot90"]
    acc = result["draws"][0]["accuracy"]
    assert set(acc) == {f"{d}_{p}" for d in ("rot0", "rot90", "rot180") for p in ("in", "out")}
    assert result["draws"][0]["train_steps"] == 128 // 16  # one epoch: the first domain's "in" part
    assert result["draws"][0]["epochs"] == 1
    assert json.loads(out.read_text())["n_draws"] == 2
    # a rerun finds every draw's record: nothing trains again, the records are the same
    first = (work / "draw1.json").read_text()
    again = run_domain_generalization("erm", toy_domains, "rot180", "convnet", 0, 2, out, work, overrides, TINY,
                                      threads=1)
    assert (work / "draw1.json").read_text() == first
    assert again["draws"][1]["accuracy"] == result["draws"][1]["accuracy"]
    # an edited override is another computation: the stale records are not reused
    third = run_domain_generalization("erm", toy_domains, "rot180", "convnet", 0, 1, out, work,
                                      {**overrides, "batch_size": 32}, TINY, threads=1)
    assert third["draws"][0]["train_steps"] == 2 * (128 // 32)  # whole epochs until at least 8 steps


def test_a_job_refuses_a_test_domain_not_among_the_domains_and_an_empty_sweep(toy_domains, tmp_path):
    with pytest.raises(DomainError, match="test_domain: 'rot45' is not among the domains"):
        run_domain_generalization("erm", toy_domains, "rot45", "convnet", 0, 1, tmp_path / "r.json", tmp_path / "w")
    with pytest.raises(ConfigError, match="n_draws: 0"):
        run_domain_generalization("erm", toy_domains, "rot0", "convnet", 0, 0, tmp_path / "r.json", tmp_path / "w")
    assert not (tmp_path / "r.json").exists()


BASE = {"datasets": ["fashion_mnist"], "seeds": [0, 1], "backbones": ["convnet"],
        "pretrain": {"method": "supervised"},
        "families": {"shift": {"dg": {"suites": {"colored": {"kind": "colored", "per_domain": 500}},
                                      "test_domains": {"colored": ["flip90"]}, "methods": ["erm", "irm"],
                                      "n_draws": 3}}}}


def test_the_config_accepts_a_dg_grid_and_names_each_bad_field():
    validate_config(copy.deepcopy(BASE))
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["dg"]["test_domains"]["colored"] = ["flip50"]
    with pytest.raises(ConfigError, match=r"families.shift.dg.test_domains.colored: test domain 'flip50'"):
        validate_config(bad)
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["dg"]["n_draws"] = 0
    with pytest.raises(ConfigError, match="n_draws"):
        validate_config(bad)
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["dg"]["suites"]["colored"]["flip_probs"] = [0.1]
    with pytest.raises(ConfigError, match="flip_probs"):
        validate_config(bad)
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["dg"]["methods"] = ["erm", "tent"]
    with pytest.raises(ConfigError, match=r"methods\[1\]: 'tent' runs on \['test_time'\]"):
        validate_config(bad)
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["overrides"] = {"irm": {"lr": -1.0}}
    with pytest.raises(ConfigError, match=r"families.shift.overrides.irm.lr"):
        validate_config(bad)


def test_saved_domains_round_trip(toy_domains):
    d = load_domains(toy_domains)
    assert d.names == ["rot0", "rot90", "rot180"] and d.x.dtype == torch.uint8 and len(d.y) == 480


def test_rotated_domains_can_be_subsampled_after_rotation():
    x, y = _images(300, size=8)
    full = build_domains("rotated", x, y, 4, {"angles": [0, 90]})
    half = build_domains("rotated", x, y, 4, {"angles": [0, 90], "downsample": 2})
    assert half.x.shape[2:] == (4, 4) and half.manifest["img_size"] == [4, 4]
    assert torch.equal(half.x, full.x[:, :, ::2, ::2])
