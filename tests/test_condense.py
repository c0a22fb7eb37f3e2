"""The condense protocol: files, resume, refusals, the dominant-pattern variant, the DC ConvNet."""
import json

import pytest
import torch

from classlab.config import ConfigError
from classlab.engine.checkpoint import load_checkpoint

# a tiny DC run on digits: 8x8 images, one image per class, 2 networks of 1 update each
TINY = {"iterations": 2, "iterations_per_epoch": 1, "batch_real": 8, "eval_runs": 1, "eval_epochs": 2}
NET = {"width": 8}


def _run(data_dir, out, method="dc", ipc=1, overrides=None, **kw):
    from classlab.protocols.condense import run_condensation

    return run_condensation(method, data_dir, ipc, 0, out, overrides={**TINY, **(overrides or {})},
                            backbone_kwargs=NET, threads=1, **kw)


def test_dc_writes_its_outputs_and_a_rerun_redoes_nothing(digits_prepared, tmp_path, monkeypatch, one_thread):
    import classlab.protocols.condense as protocol

    out = tmp_path / "dc"
    metrics = _run(digits_prepared, out)
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "images.pt", "manifest.json", "metrics.json"]
    blob = load_checkpoint(out / "images.pt")
    assert blob["images"].shape == (10, 1, 8, 8) and torch.equal(blob["labels"], torch.arange(10))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outer_iterations"] == 2 and manifest["networks"] == 2 and manifest["outer_iterations_per_s"] > 0
    assert len(manifest["init_indices"]) == 10 and manifest["image_shape"] == [1, 8, 8]
    assert manifest["normalisation"]["mean"] and manifest["hparams"]["lr_img"] == 0.1
    assert len(metrics["accuracies"]) == 1 and 0.0 <= metrics["mean"] <= 1.0
    assert metrics["evaluation"]["epochs"] == 2 and metrics["evaluation"]["network"] == "convnet_dc"
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"

    def forbidden(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(protocol, "Trainer", forbidden)
    monkeypatch.setattr(protocol, "evaluate_condensed", forbidden)
    assert _run(digits_prepared, out)["accuracies"] == metrics["accuracies"]
    # the set is kept when only the evaluation is missing: it is evaluated again, not condensed again
    (out / "metrics.json").unlink()
    monkeypatch.setattr(protocol, "evaluate_condensed", lambda *a, **k: {"accuracies": [0.5], "mean": 0.5, "std": 0.0})
    assert _run(digits_prepared, out)["accuracies"] == [0.5]
    # other evaluation settings: the same set, evaluated again
    again = _run(digits_prepared, out, overrides={"eval_epochs": 1})
    assert again["accuracies"] == [0.5] and again["evaluation"]["epochs"] == 1
    assert torch.equal(load_checkpoint(out / "images.pt")["images"], blob["images"])


def test_an_interrupted_condensation_resumes_to_the_same_images(digits_prepared, tmp_path, monkeypatch, one_thread):
    from classlab.methods.condense_learner import CondensationMethod

    overrides = {"iterations": 3, "eval_epochs": 1}
    whole = _run(digits_prepared, tmp_path / "whole", overrides=overrides)
    original = CondensationMethod.on_after_step

    def killed(self, batch, logs):
        if self.global_step == 2:
            raise KeyboardInterrupt("killed")
        original(self, batch, logs)

    monkeypatch.setattr(CondensationMethod, "on_after_step", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(digits_prepared, tmp_path / "resumed", overrides=overrides)
    assert (tmp_path / "resumed" / "condense_last.pt").exists() and not (tmp_path / "resumed" / "images.pt").exists()
    monkeypatch.setattr(CondensationMethod, "on_after_step", original)
    resumed = _run(digits_prepared, tmp_path / "resumed", overrides=overrides)
    a = load_checkpoint(tmp_path / "whole" / "images.pt")["images"]
    b = load_checkpoint(tmp_path / "resumed" / "images.pt")["images"]
    assert torch.equal(a, b) and resumed["accuracies"] == whole["accuracies"]
    assert not (tmp_path / "resumed" / "condense_last.pt").exists()


@pytest.mark.parametrize("ipc,overrides,field", [
    (10_000, {}, "images_per_class"),
    (0, {}, "images_per_class"),
    (1, {"lr_img": 0.0}, "lr_img"),
    (1, {"lr_img": -0.1}, "lr_img"),
    (2, {}, "loops"),  # DC defines no schedule at 2 images per class
])
def test_bad_input_is_refused_naming_the_field_and_nothing_is_written(digits_prepared, tmp_path, ipc, overrides, field):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match=field):
        _run(digits_prepared, out, ipc=ipc, overrides=overrides)
    assert not out.exists()


def test_a_malformed_pattern_is_refused(digits_prepared, tmp_path):
    with pytest.raises(ConfigError, match="pattern.strength"):
        _run(digits_prepared, tmp_path / "p", pattern={"strength": 3})
    assert not (tmp_path / "p").exists()


def test_the_dominant_pattern_is_label_free_seeded_and_dominant():
    from classlab.protocols.condense import add_dominant_pattern

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=g)
    a = add_dominant_pattern(x, 0.7, seed=3)
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, add_dominant_pattern(x, 0.7, seed=3))
    assert not torch.equal(a, add_dominant_pattern(x, 0.7, seed=4))
    assert torch.equal(add_dominant_pattern(x, 0.0, seed=3), x)
    # the texture is independent of the image: the same for two different images at the same position
    blank = torch.zeros_like(x)
    texture = add_dominant_pattern(blank, 1.0, seed=3).float()
    assert torch.allclose(a.float(), (0.3 * x.float() + 0.7 * texture), atol=1.01)
    assert texture.flatten(1).std(1).mean() > 40  # a strong pattern: most of the pixel range


def test_convnet_dc_is_dcs_convnet():
    from classlab.backbone_specs import stage_names
    from classlab.models import build_classifier
    from classlab.models.backbones import layer_names

    model = build_classifier("convnet_dc", 1, 10, img_size=28)
    assert model.num_features == 128 * 4 * 4  # 28x28 padded to 32x32 by the first conv, 3 average pools
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert [c.out_channels for c in convs] == [128] * 3 and all(n.num_groups == 128 for n in norms)
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in model.modules()) == 3
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert layer_names(model) == stage_names("convnet_dc")
    assert build_classifier("convnet_dc", 3, 10, img_size=32).num_features == 2048


def test_step_loader_resumes_mid_epoch_with_the_same_batches():
    from classlab.data.loader import MixedLoader, TensorLoader
    from classlab.methods.condense_learner import StepLoader

    x = torch.randint(0, 256, (30, 1, 4, 4), dtype=torch.uint8)
    y = torch.arange(3).repeat(10)
    parts = [TensorLoader(x, y, 4, device="cpu", shuffle=True, seed=k, indices=torch.nonzero(y == k).flatten())
             for k in range(3)]
    loader = StepLoader(MixedLoader(parts, ["a", "b", "c"]), 5)  # 5 steps an epoch over parts of 2 batches
    loader.set_epoch(3)
    full = list(loader)
    loader.set_epoch(3)
    tail = list(loader.iter_from(2))
    assert len(full) == 5 and all(torch.equal(f["x"], t["x"]) for f, t in zip(full[2:], tail))
    assert all((b["y"] == b["source"]).all() for b in full)


def test_the_grid_config_names_each_bad_field_and_restricts_methods_per_ipc():
    import copy

    import yaml

    from classlab.config import ROOT, ConfigError, validate_config

    base = yaml.safe_load((ROOT / "config" / "condense_cpu.yaml").read_text())
    base["families"]["condense"].update(images_per_class=[1, 10], ipc_methods={10: ["random", "herding"]})
    checked = validate_config(copy.deepcopy(base))
    assert checked["families"]["condense"]["ipc_methods"] == {"10": ["random", "herding"]}  # YAML's int key read
    for mutate, needle in [
        (lambda c: c["ipc_methods"].update({"50": ["random"]}), "families.condense.ipc_methods.50: not in"),
        (lambda c: c["ipc_methods"].update({"10": ["random", "mtt"]}), "ipc_methods.10[1]: 'mtt' is not in"),
        (lambda c: c["variant_methods"].update(blur=["dc"]), "variant_methods.blur: no such variant"),
        (lambda c: c["variants"].update(plain={"strength": 0.5}), "variants.plain"),
        (lambda c: c.update(images_per_class=[0]), "images_per_class"),
    ]:
        bad = copy.deepcopy(base)
        mutate(bad["families"]["condense"])
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            validate_config(bad)


def test_the_tables_put_the_papers_numbers_beside_the_measured_ones_and_claims_pair_seeds(tmp_path):
    from classlab.report.condense import condense_claims, write_condense_tables

    laid = []  # the DAG's layout: <variant>/<method>/ipc<N>/seed<k>/metrics.json (the variant is read from it)
    for variant, method, accs in (("plain", "dc", [0.70, 0.68, 0.69]), ("plain", "random", [0.50, 0.55, 0.52]),
                                  ("pattern", "dc", [0.40, 0.41, 0.42]), ("pattern", "dcc", [0.45, 0.44, 0.46])):
        for seed, acc in enumerate(accs):
            path = tmp_path / "results" / variant / method / "ipc1" / f"seed{seed}" / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"method": method, "images_per_class": 1, "seed": seed,
                                        "dataset": "fashion_mnist", "accuracies": [acc], "mean": acc, "std": 0.0}))
            laid.append(path)
    runs = write_condense_tables(laid, tmp_path / "runs.csv", tmp_path / "summary.csv", tmp_path / "summary.md")
    md = (tmp_path / "summary.md").read_text()
    assert "| dc | 69.0 ± 1.0 [70.5] |" in md and "| random | 52.3 ± 2.5 |" in md
    assert "data variant `pattern`" in md and "93.5" in md
    claims = condense_claims(runs)
    row = claims[(claims.treatment == "dc") & (claims.baseline == "random")].iloc[0]
    assert row.setting == "plain/ipc1" and row.verdict == "holds" and row.n_seeds == 3
    assert abs(row.effect - (0.69 - 0.5233333)) < 1e-6
    row = claims[(claims.treatment == "dcc") & (claims.setting == "pattern/ipc1")].iloc[0]
    assert row.verdict == "holds"
