"""The generative family's protocols: train the shared DDPM, sample it, classify with it, personalise it.

Data: a pairs dataset (``classlab.data.pairs``: ``fashion_mnist_pairs``, ``digits_pairs``): each label a
(colour, garment) pair of an A x O grid, a quarter of the pairs held out of the train and val splits
(unseen), the test split holding every pair. Images are scaled to [-1, 1] (the loader's normalisation
with mean = std = 0.5), the range of the diffusion model.

- ``train_diffusion``: trains ``generative/ddpm`` with the engine on the train split (seen pairs only);
  writes ``model.pt`` (the EMA denoiser's state dict, its spec, the pairs metadata; loads with
  ``torch.load(weights_only=True)``) and ``history.json`` (per-epoch loss, times, the validation loss at
  fixed (t, eps) draws), written last.
- ``generate_samples``: ``samples_per_pair`` DDIM samples of every pair of the grid, held-out pairs
  included, into ``samples.npz`` (and a PNG grid, rows = pairs, held-out rows framed).
- ``classify_compositions``: the diffusion classifier (``generative/diffusion_classifier``) among *all*
  A x O pair conditions, on a fixed per-pair subset of the test split (more images of the held-out pairs,
  which the claim is about, than of the seen ones); accuracy on unseen and seen pairs,
  attribute-only and object-only accuracy, chance levels, per timestep weighting (uniform: Li et al.;
  learned: Jeong et al., fitted on the val split's seen pairs; elbo: the variational bound's weights).
  Writes ``errors.npz`` and ``metrics.json`` (last).
- ``personalize``: ``generative/classdiffusion`` (SPL) or ``generative/personalize`` (``spl_weight: 0``)
  fine-tunes the trained DDPM on k images of one instance (one garment in one colour, from the train
  split, drawn with the seed among the garments the base model composes: ``screen_garments``), then
  generates "<other colour> V* <garment>" for every other colour and scores the samples with a fixed
  evaluator: the colour from pixel statistics, the garment and the instance's identity from a small
  garment classifier trained on the train split in grayscale. Writes
  ``samples.npz`` and ``metrics.json`` (last).

Every function checks its inputs first (hyperparameter types and ranges, every diffusion timestep count
>= 1, the model file, the dataset) and raises ``ConfigError`` naming the field before anything is
written; every output is written atomically. Nothing is chosen on the test split.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.methods.generative.ddpm import (FAMILY, check_step_counts, from_uint8, split_labels, to_uint8)

PROTOCOL = "generative"
# every hyperparameter that counts diffusion timesteps or sampling steps, per method
STEP_KEYS = ("num_train_timesteps", "sample_steps", "timestep_samples", "noise_per_timestep")
SAMPLE_KEYS = ("sample_steps", "guidance_scale", "sample_eta", "samples_per_pair")
EVAL_STREAM = 0x6E4_D1F      # the fixed generator of evaluation subsets (independent of seed and method)
VAL_STREAM = 0x6E4_0A1       # the validation loss's (t, eps) draws
SAMPLE_STREAM = 0x6E4_5A3    # the sampling noise of generate_samples
CLASSIFY_STREAM = 0x6E4_C1A  # the classifier's (t, eps) draws
PERSONAL_STREAM = 0x6E4_9E5  # the instance, the personalised samples, the evaluator


# --- shared checks and helpers ---------------------------------------------------------------------

def _hparams(method: str, overrides: dict | None) -> dict:
    hp = resolve_checked_hparams(FAMILY, method, overrides)  # types and ranges, the key named
    check_step_counts(hp, STEP_KEYS)  # and again in code: a count below 1 stops here, naming the key
    return hp


def _require_pairs(manifest: dict, data_dir) -> dict:
    pairs = manifest.get("pairs")
    if not pairs or not pairs.get("seen") or not pairs.get("unseen"):
        raise ConfigError(f"data_dir: {data_dir} ({manifest.get('dataset')}) has no `pairs` in its manifest; the "
                          f"generative protocols need a pairs dataset (fashion_mnist_pairs, digits_pairs)")
    return pairs


def _norm(channels: int) -> tuple[list[float], list[float]]:
    """The loader's mean/std that map uint8 images to [-1, 1]."""
    return [0.5] * channels, [0.5] * channels


def _generator(*key: int) -> torch.Generator:
    from classlab.data.loader import mix_seed

    return torch.Generator().manual_seed(mix_seed(*key))


def per_pair_subset(labels: torch.Tensor, pairs: list[int], per_pair: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted positions of at most ``per_pair`` samples of each pair in ``pairs`` (0: all), drawn by ``generator``."""
    picked = []
    for c in pairs:
        idx = torch.nonzero(labels == c).flatten()
        if per_pair > 0 and len(idx) > per_pair:
            idx = idx[torch.randperm(len(idx), generator=generator)[:per_pair]]
        picked.append(idx)
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.long)


def _load_model_for(model_path, manifest: dict | None = None):
    """(denoiser, meta) of a trained ddpm, checked against the dataset where one is given."""
    from classlab.engine.fingerprint import dataset_digest
    from classlab.methods.generative.ddpm import load_denoiser

    if not Path(model_path).exists():
        raise ConfigError(f"model_path: {model_path} does not exist (train it with train_diffusion first)")
    denoiser, meta = load_denoiser(Path(model_path))
    if manifest is not None and meta.get("data") != dataset_digest(manifest):
        raise ConfigError(f"model_path: {model_path} was trained on {meta.get('dataset')!r}, not on this data "
                          f"({manifest.get('dataset')!r}, or another preparation of it)")
    return denoiser, meta


def _save_npz(path: Path, **arrays) -> None:
    from classlab.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


@torch.no_grad()
def validation_loss(denoiser, scheduler, images: torch.Tensor, labels: torch.Tensor, num_objects: int,
                    generator: torch.Generator, batch_size: int = 256) -> float:
    """L_simple on held-out images at (t, eps) drawn once by ``generator``: the same draws for every run of
    a dataset, so budgets compare on it."""
    if len(labels) == 0:
        return float("nan")
    total, count = 0.0, 0
    for start in range(0, len(labels), batch_size):
        x0 = from_uint8(images[start:start + batch_size])
        attribute, obj = split_labels(labels[start:start + batch_size], num_objects)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        eps_hat = denoiser(scheduler.add_noise(x0, noise, t), t, denoiser.condition(attribute, obj))
        total += float(((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)).sum())
        count += len(x0)
    return total / count


# --- the shared DDPM -------------------------------------------------------------------------------

def train_diffusion(data_dir: Path, seed: int, out_dir: Path, overrides: dict | None = None,
                    threads: int | None = None, device: str | None = None, progress: bool = False) -> dict:
    """Train ``generative/ddpm`` on the train split (seen pairs only); write ``out_dir/model.pt`` and
    ``out_dir/history.json`` (last) and return the history record."""
    from classlab.data.prepare import load_prepared
    from classlab.engine import Trainer, TrainConfig
    from classlab.engine.device import pick_device, seed_everything, set_threads
    from classlab.engine.fingerprint import dataset_digest, make_fingerprint
    from classlab.io import write_json
    from classlab.methods.generative.ddpm import DDPM, build_denoiser, denoiser_spec, save_denoiser
    from classlab.provenance import run_provenance
    from classlab.train import training_subset

    # --- every check before anything is read, trained or written --------------------------------
    hp = _hparams("ddpm", overrides)
    data = load_prepared(Path(data_dir))
    manifest = data.manifest
    pairs = _require_pairs(manifest, data_dir)
    spec = denoiser_spec(hp, pairs["attributes"], pairs["objects"], manifest["shape"])
    if hp["sample_steps"] > hp["num_train_timesteps"]:
        raise ConfigError(f"sample_steps: {hp['sample_steps']} exceeds num_train_timesteps {hp['num_train_timesteps']}")
    seen, unseen = list(pairs["seen"]), list(pairs["unseen"])
    leaked = sorted(set(data.train.y.unique().tolist()) & set(unseen))
    if leaked:
        raise ConfigError(f"data_dir: the train split of {data_dir} holds held-out pairs {leaked}")
    train_idx = training_subset(data.train.y, seen, int(hp["train_per_pair"]), int(seed))
    if train_idx is None or len(train_idx) == 0:
        raise ConfigError(f"data_dir: the train split of {data_dir} holds no image of the seen pairs")

    # --- training ---------------------------------------------------------------------------------
    set_threads(threads)
    dev = pick_device(device)
    seed_everything(int(seed))
    denoiser = build_denoiser(spec)
    method = DDPM(denoiser, hp, int(manifest["num_classes"]))
    fingerprint = make_fingerprint(protocol=PROTOCOL, method="ddpm", hparams=hp, seed=int(seed),
                                   data=dataset_digest(manifest), spec=spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = _norm(int(manifest["shape"][0]))
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(method, TrainConfig.from_hparams(hp), dev, int(seed), out_dir / "last.pt", progress,
                      fingerprint=fingerprint)
    history = []
    if int(hp["epochs"]) > 0:
        history = trainer.fit(trainer.make_loader(data.train.x, data.train.y, mean, std, indices=train_idx))
    # wall time and this process's CPU time (they differ where other jobs share the cores)
    train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    # --- validation loss (seen pairs, fixed draws) and the checkpoint --------------------------------
    trained = method.trained_denoiser().cpu().eval()
    val_idx = per_pair_subset(data.val.y, seen, 0, _generator(EVAL_STREAM))
    if int(hp["val_images"]) > 0 and len(val_idx) > int(hp["val_images"]):
        keep = torch.randperm(len(val_idx), generator=_generator(EVAL_STREAM, 1))[:int(hp["val_images"])]
        val_idx = torch.sort(val_idx[keep]).values
    elif int(hp["val_images"]) == 0:
        val_idx = val_idx[:0]
    t1 = time.perf_counter()
    val_loss = validation_loss(trained, method.scheduler, data.val.x[val_idx], data.val.y[val_idx],
                               len(pairs["objects"]), _generator(VAL_STREAM))
    val_seconds = time.perf_counter() - t1
    meta = {"dataset": manifest.get("dataset", ""), "data": dataset_digest(manifest), "seed": int(seed),
            "attributes": list(pairs["attributes"]), "objects": list(pairs["objects"]), "seen": seen,
            "unseen": unseen, "class_names": list(manifest.get("class_names") or []), "hparams": hp,
            "weights": "ema" if method.ema_model is not None else "trained"}
    save_denoiser(out_dir / "model.pt", trained, meta)
    record = {"protocol": PROTOCOL, "family": FAMILY, "method": "ddpm", "seed": int(seed),
              "dataset": manifest.get("dataset", ""), "history": history, "train_steps": int(trainer.steps_done),
              "n_train_images": int(len(train_idx)), "train_seconds": train_seconds,
              "train_cpu_seconds": train_cpu_seconds, "threads": torch.get_num_threads(),
              "val_loss": val_loss, "n_val_images": int(len(val_idx)), "val_seconds": val_seconds,
              "n_parameters": int(sum(p.numel() for p in trained.parameters())),
              "hparams": hp, "spec": spec, "fingerprint": fingerprint, "provenance": run_provenance()}
    write_json(out_dir / "history.json", record)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return record


def generate_samples(model_path: Path, out_path: Path, seed: int, overrides: dict | None = None,
                     png_path: Path | None = None, threads: int | None = None, device: str | None = None) -> dict:
    """``samples_per_pair`` samples of every pair of the grid (held-out pairs included) from the trained
    DDPM into ``out_path`` (.npz: ``images`` uint8 (P, n, C, H, W), ``labels``, ``unseen`` flags, ``names``),
    and a PNG grid at ``png_path`` where given. ``overrides`` may set the sampling keys only
    (sample_steps, guidance_scale, sample_eta, samples_per_pair); the rest sample as the model was
    trained to (its recorded hyperparameters), else as generative/ddpm's YAML says."""
    from classlab.engine.device import pick_device, set_threads
    from classlab.methods.generative.ddpm import sample_images

    extra = sorted(set(overrides or {}) - set(SAMPLE_KEYS))
    if extra:
        raise ConfigError(f"overrides: {extra} are not sampling keys; generate_samples takes {list(SAMPLE_KEYS)}")
    denoiser, meta = _load_model_for(model_path)
    trained_with = {k: v for k, v in (meta.get("hparams") or {}).items() if k in SAMPLE_KEYS}
    hp = _hparams("ddpm", {**trained_with, **(overrides or {})})
    if hp["sample_steps"] > int(denoiser.spec["num_train_timesteps"]):
        raise ConfigError(f"sample_steps: {hp['sample_steps']} exceeds the model's "
                          f"{denoiser.spec['num_train_timesteps']} training timesteps")
    set_threads(threads)
    denoiser = denoiser.to(pick_device(device))
    n_per, n_obj = int(hp["samples_per_pair"]), denoiser.num_objects
    labels = torch.arange(denoiser.num_attributes * n_obj)
    attribute, obj = split_labels(labels.repeat_interleave(n_per), n_obj)
    t0, c0 = time.perf_counter(), time.process_time()
    images = sample_images(denoiser, denoiser.encoder.features(attribute, obj), int(hp["sample_steps"]),
                           float(hp["guidance_scale"]), _generator(SAMPLE_STREAM, int(seed)),
                           eta=float(hp["sample_eta"]))
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    images = to_uint8(images).cpu().view(len(labels), n_per, *denoiser.spec["image_shape"])
    unseen = torch.isin(labels, torch.tensor(meta.get("unseen", []), dtype=torch.long))
    names = [f"{denoiser.spec['attributes'][a]} {denoiser.spec['objects'][o]}"
             for a, o in zip(*[t.tolist() for t in split_labels(labels, n_obj)])]
    _save_npz(Path(out_path), images=images.numpy(), labels=labels.numpy(), unseen=unseen.numpy(),
              names=np.array(names))
    if png_path is not None:
        save_grid_png(Path(png_path), images, unseen)
    return {"n_pairs": len(labels), "samples_per_pair": n_per, "seconds": seconds, "cpu_seconds": cpu_seconds}


def save_grid_png(path: Path, images: torch.Tensor, framed: torch.Tensor | None = None, scale: int = 2) -> None:
    """A PNG of ``images`` (rows, cols, C, H, W) uint8: one row per pair; rows in ``framed`` get a white
    frame (the held-out pairs)."""
    from PIL import Image

    from classlab.io import atomic_path

    rows, cols, c, h, w = images.shape
    pad = 2
    canvas = np.zeros((rows * (h + 2 * pad), cols * (w + 2 * pad), 3), dtype=np.uint8)
    for r in range(rows):
        for k in range(cols):
            img = images[r, k].numpy()
            img = np.repeat(img, 3, axis=0) if c == 1 else img[:3]
            y0, x0 = r * (h + 2 * pad), k * (w + 2 * pad)
            if framed is not None and bool(framed[r]):
                canvas[y0:y0 + h + 2 * pad, x0:x0 + w + 2 * pad] = 255
            canvas[y0 + pad:y0 + pad + h, x0 + pad:x0 + pad + w] = img.transpose(1, 2, 0)
    picture = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


# --- the diffusion classifier on held-out compositions ---------------------------------------------------

def _accuracies(pred: torch.Tensor, labels: torch.Tensor, num_objects: int, unseen: list[int]) -> dict:
    """Pair, attribute-only and object-only accuracy, over all images, the unseen pairs' and the seen pairs'."""
    is_unseen = torch.isin(labels, torch.tensor(unseen, dtype=torch.long))
    pa, po = split_labels(pred, num_objects)
    ya, yo = split_labels(labels, num_objects)
    out = {}
    for part, mask in (("", torch.ones_like(is_unseen)), ("_unseen", is_unseen), ("_seen", ~is_unseen)):
        n = int(mask.sum())
        mean = (lambda hit: float(hit[mask].float().mean()) if n else float("nan"))
        out[f"accuracy{part}"] = mean(pred == labels)
        out[f"attribute_accuracy{part}"] = mean(pa == ya)
        out[f"object_accuracy{part}"] = mean(po == yo)
        out[f"correct{part}"] = int((pred == labels)[mask].sum())
        out[f"n{part}"] = n
    return out


def _above_chance_p(correct: int, n: int, chance: float) -> float:
    """One-sided binomial test of ``correct`` of ``n`` against ``chance``."""
    if n == 0:
        return float("nan")
    from scipy.stats import binomtest

    return float(binomtest(int(correct), int(n), float(chance), alternative="greater").pvalue)


def _mcnemar_p(right_a: torch.Tensor, right_b: torch.Tensor) -> float:
    """Exact two-sided McNemar test on paired predictions: the images one rule gets right and the other
    wrong, against an even split."""
    from scipy.stats import binomtest

    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def classify_compositions(model_path: Path, data_dir: Path, seed: int, out_dir: Path, overrides: dict | None = None,
                          method: str = "diffusion_classifier", threads: int | None = None,
                          device: str | None = None) -> dict:
    """Classify a fixed per-pair subset of the test split (``eval_per_unseen_pair`` images of each held-out
    pair, ``eval_per_seen_pair`` of each seen one) among all A x O pair conditions with the
    diffusion classifier; write ``out_dir/errors.npz`` and ``out_dir/metrics.json`` (last).

    Metrics per weighting w (``uniform``, ``learned``, ``elbo``): ``accuracy_unseen_<w>``,
    ``accuracy_seen_<w>``, ``accuracy_<w>``, ``attribute_accuracy[_unseen|_seen]_<w>``,
    ``object_accuracy[_unseen|_seen]_<w>``, ``val_accuracy_<w>`` (the val fit images),
    ``p_unseen_above_chance_<w>`` (one-sided binomial); ``chance_pair``, ``chance_attribute``,
    ``chance_object``; ``disagreement_<w>_vs_uniform`` (share of test images whose prediction the weighting
    changes) and ``mcnemar_p_<w>_vs_uniform`` (exact McNemar test of the paired right/wrong outcomes)."""
    from classlab.data.prepare import load_prepared
    from classlab.engine.device import pick_device, set_threads
    from classlab.engine.fingerprint import dataset_digest, make_fingerprint
    from classlab.io import write_json
    from classlab.methods.generative.diffusion_classifier import DiffusionClassifier, predict
    from classlab.methods.registry import get_method
    from classlab.provenance import run_provenance

    # --- every check before anything is computed or written ----------------------------------------
    hp = _hparams(method, overrides)
    cls = get_method(FAMILY, method)
    if not issubclass(cls, DiffusionClassifier):
        raise ConfigError(f"method: generative/{method} is not a diffusion classifier")
    data = load_prepared(Path(data_dir))
    manifest = data.manifest
    pairs = _require_pairs(manifest, data_dir)
    denoiser, meta = _load_model_for(model_path, manifest)
    num_pairs, n_obj = len(pairs["attributes"]) * len(pairs["objects"]), len(pairs["objects"])
    seen, unseen = list(pairs["seen"]), list(pairs["unseen"])
    test_idx = torch.sort(torch.cat([
        per_pair_subset(data.test.y, unseen, int(hp["eval_per_unseen_pair"]), _generator(EVAL_STREAM, 2)),
        per_pair_subset(data.test.y, seen, int(hp["eval_per_seen_pair"]), _generator(EVAL_STREAM, 4))])).values
    if not bool(torch.isin(data.test.y[test_idx], torch.tensor(unseen)).any()):
        raise ConfigError(f"data_dir: the test split of {data_dir} holds no image of a held-out pair")
    weightings = list(hp["weightings"])
    fit_idx = per_pair_subset(data.val.y, seen, int(hp["fit_per_pair"]), _generator(EVAL_STREAM, 3))
    if "learned" in weightings and (int(hp["fit_per_pair"]) == 0 or len(fit_idx) == 0):
        raise ConfigError(f"fit_per_pair: the learned weighting needs val images of the seen pairs to fit on; "
                          f"{len(fit_idx)} chosen (fit_per_pair {hp['fit_per_pair']})")
    classifier = cls(denoiser, hp, num_pairs)  # raises ConfigError if timestep_samples exceeds the model's T
    classifier.seed = int(seed)

    # --- errors with shared (t, eps) draws -------------------------------------------------------------
    set_threads(threads)
    classifier = classifier.to(pick_device(device))
    t0, c0 = time.perf_counter(), time.process_time()
    fit_errors = (classifier.errors(from_uint8(data.val.x[fit_idx]), fit_idx.tolist(), int(seed), stream=1)
                  if "learned" in weightings else torch.zeros(0, num_pairs, len(classifier.timesteps)))
    fit_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    test_errors = classifier.errors(from_uint8(data.test.x[test_idx]), test_idx.tolist(), int(seed), stream=2)
    test_seconds = time.perf_counter() - t1
    cpu_seconds = time.process_time() - c0
    test_labels, fit_labels = data.test.y[test_idx], data.val.y[fit_idx] if len(fit_errors) else data.val.y[:0]

    chance = {"chance_pair": 1.0 / num_pairs, "chance_attribute": 1.0 / len(pairs["attributes"]),
              "chance_object": 1.0 / n_obj}
    results, weights_out, details, predictions = {}, {}, {}, {}
    for name in weightings:
        weights, info = classifier.weighting(name, fit_errors, fit_labels)
        weights_out[name], details[name] = weights, info
        pred = predict(test_errors, weights)
        predictions[name] = pred
        scores = _accuracies(pred, test_labels, n_obj, unseen)
        for key, value in scores.items():
            results[f"{key}_{name}"] = value
        results[f"p_unseen_above_chance_{name}"] = _above_chance_p(scores["correct_unseen"], scores["n_unseen"],
                                                                   chance["chance_pair"])
        if len(fit_errors):
            results[f"val_accuracy_{name}"] = float((predict(fit_errors, weights) == fit_labels).float().mean())
    if "uniform" in predictions:
        for name in weightings:
            if name != "uniform":
                results[f"disagreement_{name}_vs_uniform"] = float((predictions[name] != predictions["uniform"])
                                                                   .float().mean())
                results[f"mcnemar_p_{name}_vs_uniform"] = _mcnemar_p(predictions[name] == test_labels,
                                                                     predictions["uniform"] == test_labels)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_npz(out_dir / "errors.npz", test_errors=test_errors.numpy(), test_labels=test_labels.numpy(),
              test_index=test_idx.numpy(), fit_errors=fit_errors.numpy(), fit_labels=fit_labels.numpy(),
              fit_index=fit_idx.numpy() if len(fit_errors) else np.zeros(0, dtype=np.int64),
              timesteps=classifier.timesteps.cpu().numpy(), weightings=np.array(weightings),
              weights=torch.stack([weights_out[w] for w in weightings]).numpy(),
              predictions=torch.stack([predictions[w] for w in weightings]).numpy())
    fingerprint = make_fingerprint(protocol=PROTOCOL, method=method, hparams=hp, seed=int(seed),
                                   data=dataset_digest(manifest), model=str(meta.get("seed")))
    metrics = {"protocol": PROTOCOL, "family": FAMILY, "method": method, "seed": int(seed),
               "dataset": manifest.get("dataset", ""), "model_seed": meta.get("seed"), "eval_split": "test",
               "fit_split": "val", "candidates": num_pairs, "seen_pairs": seen, "unseen_pairs": unseen,
               **chance, **results, "weightings": weightings,
               "timestep_weights": {w: weights_out[w].tolist() for w in weightings},
               "learned_coefficients": details.get("learned", {}).get("coefficients"),
               "learned_fit_images": details.get("learned", {}).get("n_fit"),
               "learned_select_images": details.get("learned", {}).get("n_select"),
               "timesteps": classifier.timesteps.tolist(), "n_test_images": int(len(test_idx)),
               "n_fit_images": int(len(fit_labels)), "fit_seconds": fit_seconds, "eval_seconds": test_seconds,
               "seconds_per_image": (fit_seconds + test_seconds) / max(len(test_idx) + len(fit_labels), 1),
               "cpu_seconds": cpu_seconds, "threads": torch.get_num_threads(),
               "hparams": hp, "fingerprint": fingerprint, "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    return metrics


# --- personalisation and its composition test ---------------------------------------------------------

def choose_instance(x: torch.Tensor, y: torch.Tensor, seen: list[int], k: int, generator: torch.Generator
                    ) -> tuple[int, torch.Tensor]:
    """(pair, positions of k train images): a seen pair and an image of it drawn by ``generator``, with its
    k - 1 nearest neighbours in pixel space within the pair, so that the k images look like one item
    (the pairs datasets hold no repeated photos of one object)."""
    pair = int(seen[int(torch.randint(len(seen), (1,), generator=generator))])
    members = torch.nonzero(y == pair).flatten()
    if len(members) < k:
        raise ConfigError(f"instance_images: {k} exceeds the {len(members)} train images of pair {pair}")
    anchor = members[int(torch.randint(len(members), (1,), generator=generator))]
    distance = ((x[members].float() - x[anchor].float()) ** 2).flatten(1).sum(1)
    order = torch.argsort(distance, stable=True)[:k]  # the anchor itself first (distance 0)
    return pair, members[order]


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) uint8: the maximum over channels, which undoes the pairs' tint (rgb = gray * colour / 255
    with every palette colour holding a full channel)."""
    return images.max(dim=1, keepdim=True).values


def colour_of(images: torch.Tensor, palette: torch.Tensor, bright_share: float = 0.3) -> torch.Tensor:
    """(N,) index of the palette colour (A, 3) of each image: a fixed, training-free colour evaluator.

    The garment is the brightest part of an image: the mean RGB of its ``bright_share`` brightest pixels
    (brightness = the largest channel) loses its grey part (the smallest channel is subtracted) and is
    scaled to a largest channel of 1; the palette colour nearest to it (the same transform of each palette
    colour) in Euclidean distance is the answer: a hue decision. Generated images have tinted, not black,
    backgrounds and desaturated colours (a red garment near (0.9, 0.5, 0.35)); the brightest pixels and the
    grey removal keep such a garment red instead of yellow (a cosine on the whole image's mean did not)."""
    def chroma(rgb: torch.Tensor) -> torch.Tensor:
        c = rgb - rgb.min(dim=1, keepdim=True).values
        return c / c.max(dim=1, keepdim=True).values.clamp_min(1e-6)

    rgb = images.float().flatten(2) / 255.0                        # (N, 3, HW)
    brightness = rgb.max(dim=1).values                              # (N, HW)
    keep = max(1, int(round(bright_share * brightness.shape[1])))
    top = brightness.topk(keep, dim=1).indices                      # (N, keep)
    mean_rgb = torch.gather(rgb, 2, top.unsqueeze(1).expand(-1, rgb.shape[1], -1)).mean(2)
    return torch.cdist(chroma(mean_rgb), chroma(palette.float())).argmin(dim=1)


class GarmentEvaluator:
    """A ConvNet trained (ERM, the engine) on grayscale train images to name the garment; its pooled features
    measure identity (cosine to the instance). Fixed: the same data, seed and budget in every run."""

    def __init__(self, data, num_objects: int, per_object: int, epochs: int, device):
        from classlab.engine import Trainer, TrainConfig
        from classlab.engine.device import seed_everything
        from classlab.methods.registry import get_method
        from classlab.models import build_classifier

        self.num_objects, self.device = num_objects, device
        self.mean, self.std = _norm(1)
        _, objects = split_labels(data.train.y, num_objects)
        gen = _generator(PERSONAL_STREAM, 7)
        idx = per_pair_subset(objects, list(range(num_objects)), per_object, gen)
        seed_everything(PERSONAL_STREAM % 10_000)
        self.model = build_classifier("convnet", 1, num_objects, img_size=int(data.train.x.shape[-1]))
        hp = {"lr": 0.05, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4}
        learner = get_method("supervised", "erm")(self.model, hp, num_objects)
        trainer = Trainer(learner, TrainConfig(epochs=int(epochs), batch_size=128, schedule="onecycle",
                                               augment_pad=1, augment_hflip=True), device, PERSONAL_STREAM % 10_000,
                          None, False)
        trainer.fit(trainer.make_loader(grayscale(data.train.x), objects, self.mean, self.std, indices=idx))
        self.model.eval()
        # the mean feature of its training images: identity is a cosine of centred features (ReLU features
        # share a large common part that makes every raw cosine high)
        self.feature_mean = torch.cat([self.features_and_logits(data.train.x[chunk], centred=False)[0]
                                       for chunk in idx.split(1024)]).mean(0, keepdim=True)

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor, centred: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features, centred on the training images' mean where ``centred``; logits)."""
        x = grayscale(images).float() / 255.0
        x = (x - self.mean[0]) / self.std[0]
        feats = self.model.features(x.to(self.device)).cpu()
        logits = self.model.head(feats.to(self.device)).cpu()
        return (feats - self.feature_mean if centred else feats), logits

    def garment_of(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[1].argmax(dim=1)

    def identity(self, images: torch.Tensor, instance: torch.Tensor) -> float:
        """Mean cosine between each image's centred features and the instance images' mean centred feature
        (DINO-I-like): 1 = the instance's look, 0 = an average garment's."""
        feats = self.features_and_logits(images)[0]
        reference = self.features_and_logits(instance)[0].mean(0, keepdim=True)
        return float(torch.nn.functional.cosine_similarity(feats, reference, dim=1).mean())


def _score(evaluator: GarmentEvaluator, images: torch.Tensor, colour: int, obj: int, palette: torch.Tensor,
           instance: torch.Tensor) -> dict:
    colour_hit = colour_of(images, palette) == colour
    garment_hit = evaluator.garment_of(images) == obj
    return {"composition": float((colour_hit & garment_hit).float().mean()),
            "colour": float(colour_hit.float().mean()), "garment": float(garment_hit.float().mean()),
            "identity": evaluator.identity(images, instance)}


def screen_garments(base, evaluator: GarmentEvaluator, palette: torch.Tensor, per_pair: int, steps: int,
                    guidance_scale: float, eta: float, generator: torch.Generator) -> list[float]:
    """Per garment, the share of the base model's "<colour> <garment>" samples (``per_pair`` of every colour,
    held-out pairs included) that the evaluator reads as that colour and that garment: what the base model
    can compose before any fine-tuning. Personalising a garment it cannot compose measures nothing (both
    arms sit at zero), so the instance is drawn among the garments at or above
    ``instance_min_base_composition``. Depends on the base model and the seed only: both arms get the
    same instance. ``per_pair`` 0: no screen (every garment is eligible)."""
    from classlab.methods.generative.ddpm import sample_images

    n_attr, n_obj = base.num_attributes, base.num_objects
    if per_pair <= 0:
        return [1.0] * n_obj
    labels = torch.arange(n_attr * n_obj).repeat_interleave(per_pair)
    attribute, obj = split_labels(labels, n_obj)
    with torch.no_grad():
        images = torch.cat([to_uint8(sample_images(base, base.encoder.features(a, o), steps, guidance_scale,
                                                   generator, eta=eta)).cpu()
                            for a, o in zip(attribute.split(200), obj.split(200))])
    hit = (colour_of(images, palette) == attribute) & (evaluator.garment_of(images) == obj)
    return [float(hit[obj == o].float().mean()) for o in range(n_obj)]


def personalize(model_path: Path, data_dir: Path, seed: int, out_dir: Path, overrides: dict | None = None,
                method: str = "classdiffusion", threads: int | None = None, device: str | None = None) -> dict:
    """Personalise the trained DDPM on one instance with ``method`` (``classdiffusion``, or ``personalize``:
    no SPL) and test how the personalised "V* <garment>" composes with every other colour; write
    ``out_dir/samples.npz`` and ``out_dir/metrics.json`` (last).

    Metrics: ``composition_accuracy`` (samples of "<other colour> V* <garment>" whose colour is that colour
    AND whose garment is the instance's), ``colour_accuracy``, ``garment_accuracy``, ``identity`` (cosine
    of evaluator features to the instance); ``instance_*`` for "V* <garment>" (the instance's own colour);
    ``base_*`` for the base model's "<other colour> <garment>" before fine-tuning and ``class_after_*``
    for the same phrase after it (drift of the class itself); ``spl_final`` (1 - cos of the two phrases)."""
    import copy

    from classlab.data.pairs import PALETTE
    from classlab.data.prepare import load_prepared
    from classlab.engine import Trainer, TrainConfig
    from classlab.engine.device import pick_device, seed_everything, set_threads
    from classlab.engine.fingerprint import dataset_digest, make_fingerprint
    from classlab.io import write_json
    from classlab.methods.generative.classdiffusion import ClassDiffusion
    from classlab.methods.generative.ddpm import sample_images
    from classlab.methods.registry import get_method
    from classlab.provenance import run_provenance

    # --- every check before anything is computed or written ----------------------------------------
    hp = _hparams(method, overrides)
    cls = get_method(FAMILY, method)
    if not issubclass(cls, ClassDiffusion):
        raise ConfigError(f"method: generative/{method} is not a personalisation method (classdiffusion, personalize)")
    data = load_prepared(Path(data_dir))
    manifest = data.manifest
    pairs = _require_pairs(manifest, data_dir)
    base, meta = _load_model_for(model_path, manifest)
    if hp["sample_steps"] > int(base.spec["num_train_timesteps"]):
        raise ConfigError(f"sample_steps: {hp['sample_steps']} exceeds the model's "
                          f"{base.spec['num_train_timesteps']} training timesteps")
    n_attr, n_obj = len(pairs["attributes"]), len(pairs["objects"])
    palette = torch.tensor([PALETTE[c] for c in pairs["attributes"]])
    k = int(hp["instance_images"])
    steps_s, scale, eta = int(hp["sample_steps"]), float(hp["guidance_scale"]), float(hp["sample_eta"])

    # --- the fixed evaluator --------------------------------------------------------------------------
    set_threads(threads)
    dev = pick_device(device)
    t0 = time.perf_counter()
    evaluator = GarmentEvaluator(data, n_obj, int(hp["evaluator_per_object"]), int(hp["evaluator_epochs"]), dev)
    val_objects = split_labels(data.val.y, n_obj)
    evaluator_seconds = time.perf_counter() - t0
    evaluator_checks = {"evaluator_garment_val_accuracy": float((evaluator.garment_of(data.val.x) == val_objects[1])
                                                                .float().mean()),
                        "evaluator_colour_val_accuracy": float((colour_of(data.val.x, palette) == val_objects[0])
                                                               .float().mean())}

    # --- the instance: a seen pair whose garment the base model composes, its k train images -----------
    base = base.to(dev).eval()
    t3 = time.perf_counter()
    screen = screen_garments(base, evaluator, palette, int(hp["instance_screen_samples"]), steps_s, scale, eta,
                             _generator(PERSONAL_STREAM, int(seed), 0x5C))
    eligible = [o for o, rate in enumerate(screen) if rate >= float(hp["instance_min_base_composition"])]
    candidates = [p for p in pairs["seen"] if int(p) % n_obj in eligible] or list(pairs["seen"])
    screen_seconds = time.perf_counter() - t3
    pair, instance_idx = choose_instance(data.train.x, data.train.y, candidates, k,
                                         _generator(PERSONAL_STREAM, int(seed)))
    colour, obj = (int(v) for v in split_labels(torch.tensor(pair), n_obj))
    instance = data.train.x[instance_idx]

    # --- fine-tuning ----------------------------------------------------------------------------------
    seed_everything(int(seed))
    learner = cls(copy.deepcopy(base), hp, n_attr * n_obj)
    learner.set_instance(obj)
    steps, batch = int(hp["finetune_steps"]), int(hp["batch_size"])
    repeats = -(-steps * batch // k)
    order = instance_idx.repeat(repeats)[:steps * batch]
    mean, std = _norm(int(manifest["shape"][0]))
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, int(seed), None, False)
    t1, c1 = time.perf_counter(), time.process_time()
    history = trainer.fit(trainer.make_loader(data.train.x, data.train.y, mean, std, indices=order))
    finetune_seconds, finetune_cpu_seconds = time.perf_counter() - t1, time.process_time() - c1
    learner.eval()
    tuned = learner.model
    with torch.no_grad():
        personal, class_condition = learner.personal_and_class_conditions()
        spl_final = float(1 - torch.nn.functional.cosine_similarity(personal, class_condition, dim=-1).mean())

    # --- the composition test: same sampling noise for every method of a seed --------------------------
    n = int(hp["samples_per_colour"])
    others = [a for a in range(n_attr) if a != colour]
    t2, c2 = time.perf_counter(), time.process_time()
    composed, base_images, class_after = {}, {}, {}
    rows = {"composition": [], "colour": [], "garment": [], "identity": []}
    base_rows = {key: [] for key in rows}
    after_rows = {key: [] for key in rows}
    with torch.no_grad():
        for a in others:
            a_idx, o_idx = torch.full((n,), a), torch.full((n,), obj)
            features = learner.identifier_features(a_idx, o_idx).detach()
            composed[a] = to_uint8(sample_images(tuned, features, steps_s, scale, _generator(PERSONAL_STREAM, seed, a),
                                                eta=eta))
            base_images[a] = to_uint8(sample_images(base, base.encoder.features(a_idx, o_idx), steps_s, scale,
                                                    _generator(PERSONAL_STREAM, seed, a), eta=eta))
            class_after[a] = to_uint8(sample_images(tuned, tuned.encoder.features(a_idx, o_idx), steps_s, scale,
                                                    _generator(PERSONAL_STREAM, seed, a), eta=eta))
            for table, images in ((rows, composed[a]), (base_rows, base_images[a]), (after_rows, class_after[a])):
                for key, value in _score(evaluator, images, a, obj, palette, instance).items():
                    table[key].append(value)
        plain = to_uint8(sample_images(tuned, learner.identifier_features(torch.full((n,), -1), torch.full((n,), obj))
                                       .detach(), steps_s, scale, _generator(PERSONAL_STREAM, seed, n_attr),
                                       eta=eta))
    sample_seconds, sample_cpu_seconds = time.perf_counter() - t2, time.process_time() - c2
    instance_scores = _score(evaluator, plain, colour, obj, palette, instance)

    def mean_of(table: dict, prefix: str) -> dict:
        names = {"composition": "composition_accuracy", "colour": "colour_accuracy",
                 "garment": "garment_accuracy", "identity": "identity"}
        return {f"{prefix}{names[key]}": float(np.mean(values)) for key, values in table.items()}

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_npz(out_dir / "samples.npz", instance=instance.numpy(), instance_index=instance_idx.numpy(),
              colours=np.array(others), composed=torch.stack([composed[a] for a in others]).numpy(),
              base=torch.stack([base_images[a] for a in others]).numpy(),
              class_after=torch.stack([class_after[a] for a in others]).numpy(), instance_prompt=plain.numpy())
    fingerprint = make_fingerprint(protocol=PROTOCOL, method=method, hparams=hp, seed=int(seed),
                                   data=dataset_digest(manifest), model=str(meta.get("seed")))
    metrics = {"protocol": PROTOCOL, "family": FAMILY, "method": method, "seed": int(seed),
               "dataset": manifest.get("dataset", ""), "model_seed": meta.get("seed"),
               "instance_pair": pair, "instance_name": f"{pairs['attributes'][colour]} {pairs['objects'][obj]}",
               "instance_index": instance_idx.tolist(), "instance_split": "train",
               "composed_colours": [pairs["attributes"][a] for a in others], "samples_per_colour": n,
               **mean_of(rows, ""), **mean_of(base_rows, "base_"), **mean_of(after_rows, "class_after_"),
               **{f"instance_{key}": value for key, value in instance_scores.items()},
               "per_colour_composition_accuracy": {pairs["attributes"][a]: v
                                                   for a, v in zip(others, rows["composition"])},
               "spl_final": spl_final, "spl_weight": float(hp["spl_weight"]), **evaluator_checks,
               "instance_screen": {pairs["objects"][o]: rate for o, rate in enumerate(screen)},
               "eligible_garments": [pairs["objects"][o] for o in eligible],
               "instance_screen_fallback": not eligible, "screen_seconds": screen_seconds,
               "history": history, "finetune_seconds": finetune_seconds, "sample_seconds": sample_seconds,
               "finetune_cpu_seconds": finetune_cpu_seconds, "sample_cpu_seconds": sample_cpu_seconds,
               "threads": torch.get_num_threads(),
               "evaluator_seconds": evaluator_seconds, "hparams": hp, "fingerprint": fingerprint,
               "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    return metrics
