"""The `explain` protocol: saliency maps of a trained model on scenes with known boxes.

One job explains one checkpoint with one saliency method at the layers it is given, on a fixed,
seeded set of test scenes (the same images for every method, layer and seed, drawn by
``image_seed``). Everything a metric needs is saved, so every number of ``metrics/saliency.py``
can be recomputed from ``maps.npz`` alone:

- ``target``: the map of the scene's target class (pointing game, energy-based pointing);
- ``top`` / ``bottom``: the maps of the most and the least probable class (class sensitivity;
  ``top`` is also the order of the deletion and insertion curves);
- ``deletion`` / ``insertion``: the probability of the originally predicted class as pixels are
  set to the baseline (raw 0: the canvas background) or restored from it, in the ``top`` map's
  order;
- ``randomised``: target-class maps of the first ``randomisation_images`` scenes after cascading
  randomisation from the top (head first, then the backbone's stages downwards), one row per step
  of the cascade (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

``maps.npz`` follows the ``predictions.npz`` contract (``logits`` and ``labels`` of the explained
scenes, every other array named): ``{layer}__{kind}`` for the maps and curves, plus the scenes
(``images`` uint8, ``boxes``), their test indices and the cascade's names. The model may be one
trained on the scenes (its classes are the scene labels) or one trained on the scenes' base
dataset, e.g. the supervised family's ``erm`` on Fashion-MNIST (its classes are the base classes;
the target's base class is explained). Nothing is written until every map is computed.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from classlab.data.prepare import load_prepared
from classlab.engine.device import seed_everything, set_threads
from classlab.engine.predict import save_predictions
from classlab.io import write_json
from classlab.provenance import run_provenance

INPUT_LAYER = "input"


class ExplainError(ValueError):
    """An explain job that cannot run as asked; the message names the problem."""


def scene_subset(n_test: int, n_images: int, image_seed: int) -> np.ndarray:
    """The explained scenes: ``n_images`` test positions drawn without replacement by ``image_seed``,
    ascending (the same set for every method, layer and model seed)."""
    if n_images < 1:
        raise ExplainError(f"explain.images: must be at least 1, got {n_images}")
    n = min(int(n_images), int(n_test))
    return np.sort(np.random.default_rng(image_seed).choice(n_test, size=n, replace=False))


def explained_classes(model_meta: dict, manifest: dict, labels: torch.Tensor) -> torch.Tensor:
    """The head index of each scene's target: the scene label when the model was trained on the
    scenes, the target's base class when it was trained on the scenes' base dataset."""
    scenes = manifest.get("dataset")
    info = manifest.get("scenes") or {}
    base = info.get("base_dataset")
    trained_on = model_meta.get("dataset")
    if trained_on == scenes:
        return labels.clone()
    if base and trained_on == base:
        targets = (info.get("recipe") or {}).get("target_classes")
        if targets is None:
            raise ExplainError(f"{scenes}: the manifest names no target_classes to map onto {base}'s classes")
        return torch.as_tensor(targets, dtype=torch.long)[labels]
    raise ExplainError(f"the model was trained on {trained_on!r}; it can explain scenes of {scenes!r} only if "
                       f"trained on them or on their base dataset {base!r}")


def _normalise(model_meta: dict, x_uint8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(model_meta["channel_mean"], dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(model_meta["channel_std"], dtype=torch.float32).view(1, -1, 1, 1)
    if mean.numel() != x_uint8.shape[1]:
        raise ExplainError(f"the model takes {mean.numel()} channels; the scenes have {x_uint8.shape[1]}")
    return (x_uint8.float() / 255.0 - mean) / std


def _batched(fn, n: int, batch: int):
    return [fn(slice(i, min(i + batch, n))) for i in range(0, n, batch)]


def run_explain(checkpoint: Path, data_dir: Path, method: str, layers: list[str], out_dir: Path, *,
                overrides: dict | None = None, n_images: int = 200, image_seed: int = 0,
                randomisation_images: int = 50, perturbation_steps: int = 20, batch_size: int = 50,
                threads: int | None = None, seed: int = 0) -> dict:
    """Explain ``checkpoint`` with ``method`` at ``layers``; write ``maps.npz`` and ``explain.json``."""
    from classlab.config import resolve_hparams
    from classlab.methods.base import Method
    from classlab.methods.registry import get_method
    from classlab.methods.saliency_method import randomisation_cascade, randomise_
    from classlab.metrics.saliency import perturbation_curve
    from classlab.train import load_predictor

    set_threads(threads)
    seed_everything(seed)
    started = time.time()
    out_dir = Path(out_dir)
    cls = get_method("explain", method)
    hparams = resolve_hparams("explain", method, overrides)
    model, meta = load_predictor(checkpoint)
    if issubclass(cls, Method):
        # a trained explainer (Prompt-CAM): the checkpoint must be one of its own runs
        if meta.get("family") != "explain" or meta.get("method") != method:
            raise ExplainError(f"{method} explains its own trained checkpoints; {checkpoint} is a "
                               f"{meta.get('family')}/{meta.get('method')} run")
        explainer = model
    else:
        explainer = cls(hparams)
    layered = bool(getattr(explainer, "layered", True))
    layers = list(layers) if layered else [INPUT_LAYER]
    if not layers:
        raise ExplainError(f"{method} needs at least one layer")
    data = load_prepared(data_dir)
    manifest = data.manifest
    if data.test.boxes is None:
        raise ExplainError(f"{data_dir} holds no boxes: explain needs a scenes dataset (e.g. fashion_mnist_scenes)")
    picked = scene_subset(len(data.test.y), n_images, image_seed)
    index = torch.from_numpy(picked)
    images = data.test.x[index]
    boxes = data.test.boxes[index]
    scene_labels = data.test.y[index]
    classes = explained_classes(meta, manifest, scene_labels)
    x = _normalise(meta, images)
    n = len(x)
    model.eval()
    with torch.no_grad():
        logits = torch.cat(_batched(lambda s: model(x[s]), n, batch_size))
    num_classes = logits.shape[1]
    probs = logits.softmax(1)
    top, bottom = probs.argmax(1), probs.argmin(1)
    baseline = _normalise(meta, torch.zeros_like(images[:1]))[0]

    # integrated gradients integrates from the same black image the perturbation curves use
    extra = {"baseline": baseline} if getattr(explainer, "needs_baseline", False) else {}

    def maps_of(net, inputs, wanted, layer):
        return torch.cat(_batched(lambda s: explainer.explain(net, inputs[s], wanted[s], layer, **extra).detach().float(),
                                  len(inputs), batch_size))

    def score(inputs):
        with torch.no_grad():
            return model(inputs).softmax(1)

    arrays = {"logits": logits, "labels": classes, "scene_labels": scene_labels, "top": top, "bottom": bottom,
              "images": images, "boxes": boxes, "test_index": index}
    cascade = randomisation_cascade(model)
    arrays["cascade"] = np.array([name for name, _ in cascade])
    r = min(int(randomisation_images), n)
    for layer in layers:
        target_maps = maps_of(model, x, classes, layer)
        same = top == classes
        top_maps = target_maps.clone()
        if (~same).any():
            top_maps[~same] = maps_of(model, x[~same], top[~same], layer)
        bottom_maps = maps_of(model, x, bottom, layer)
        deletion = perturbation_curve(score, x, top_maps, top, mode="deletion", steps=perturbation_steps,
                                      baseline=baseline, batch_size=batch_size)
        insertion = perturbation_curve(score, x, top_maps, top, mode="insertion", steps=perturbation_steps,
                                       baseline=baseline, batch_size=batch_size)
        randomised = []
        net = copy.deepcopy(model)
        for level, (_name, modules) in enumerate(cascade):
            randomise_(modules_of(net, model, modules), seed=1000 * seed + level)
            net.eval()
            randomised.append(maps_of(net, x[:r], classes[:r], layer))
        key = layer.replace(".", "_")
        arrays.update({f"{key}__target": target_maps, f"{key}__top": top_maps, f"{key}__bottom": bottom_maps,
                       f"{key}__deletion": torch.as_tensor(np.asarray(deletion)),
                       f"{key}__insertion": torch.as_tensor(np.asarray(insertion)),
                       f"{key}__randomised": torch.stack(randomised) if randomised else torch.zeros(0)})
    info = {"method": method, "hparams": hparams, "layers": layers, "checkpoint": str(checkpoint),
            "model": {k: meta.get(k) for k in ("family", "method", "backbone", "dataset", "seed", "num_classes")},
            "scenes": manifest.get("dataset"), "n_images": n, "image_seed": int(image_seed),
            "randomisation_images": r, "perturbation_steps": int(perturbation_steps),
            "perturbation_baseline": "raw 0 (black, the canvas background), in the model's normalisation",
            "num_classes": int(num_classes), "seconds": round(time.time() - started, 2),
            "maps_per_second": None}
    maps_made = n * len(layers) * 3 + r * len(layers) * len(cascade)
    info["maps_per_second"] = round(maps_made / max(info["seconds"], 1e-9), 2)
    info.update(run_provenance())
    save_predictions(out_dir / "maps.npz", arrays)
    write_json(out_dir / "explain.json", info)
    return info


def modules_of(copied: torch.nn.Module, original: torch.nn.Module, modules) -> list[torch.nn.Module]:
    """The submodules of ``copied`` that correspond to ``modules`` of ``original`` (by name)."""
    names = {id(m): name for name, m in original.named_modules()}
    copied_modules = dict(copied.named_modules())
    return [copied_modules[names[id(m)]] for m in modules]


def check_layers(checkpoint: Path, layers: list[str]) -> None:
    """Refuse a layer the model does not have, listing the valid names (before any work)."""
    from classlab.models.backbones import layer_names
    from classlab.train import load_model

    model, _ = load_model(checkpoint)
    valid = layer_names(model)
    modules = dict(model.named_modules())
    unknown = [name for name in layers if name not in valid and name not in modules and name != INPUT_LAYER]
    if unknown:
        raise ExplainError(f"unknown layers {unknown}; this model's layers: {valid} (or any submodule name)")


def parse_layers(text: str) -> list[str]:
    return [name for name in (part.strip() for part in text.split(",")) if name]


def describe(info: dict) -> str:
    return json.dumps({k: info[k] for k in ("method", "layers", "n_images", "seconds", "maps_per_second")})
