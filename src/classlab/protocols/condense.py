"""The condense family's protocol: learn (or select) N images per class, then train fresh networks on them.

Zhao, Mopuri and Bilen, "Dataset Condensation with Gradient Matching" (ICLR 2021) and its successors
evaluate a synthetic set S of ``images_per_class`` (ipc: 1, 10, 50) images per class by training a
randomly initialised ConvNet (DC's: 3 blocks of 128-channel conv, instance norm, ReLU, average pooling,
``convnet_dc``) on S alone and reporting its test accuracy, mean and std over several networks. One job
is one (dataset, method, ipc, seed):

- the method builds its initial set from the real training split (real images of each class, a herding
  selection, NRR-DD's critical crops) and, if it learns, runs its bi-level loop through the engine:
  one engine step is one outer (image) update, an engine epoch ``iterations_per_epoch`` networks, so
  the engine's checkpoint (``condense_last.pt``, fingerprinted) makes a killed job resume where it
  stopped;
- ``out_dir/images.pt`` holds the set (normalised float images, labels, the real indices it started
  from, the normalisation; NRR-DD adds its teacher), ``out_dir/manifest.json`` what made it and how
  fast, ``out_dir/grid.png`` a figure of it (a row per class);
- evaluation (``classlab.methods.condense_learner.evaluate_condensed``) trains ``eval_runs`` fresh
  ConvNets on S and tests them on the test split; each finished run is recorded at once
  (``out_dir/.eval_runs.json``), and ``out_dir/metrics.json``, written last, holds the accuracies, their
  mean and std and the evaluation settings. A rerun with the same fingerprint redoes nothing that is
  finished.

``pattern`` builds the "class-irrelevant information dominates" variant of the data (the setting where
DCC reports DC falling below random selection): ``add_dominant_pattern`` blends a strong random texture,
drawn independently of the label, into every train AND test image.

Bad input stops the job before anything is written: ``images_per_class`` above a class's number of
training samples, a learning rate <= 0 (``lr_img``; also the YAML schema's), an undeclared or
mistyped hyperparameter, a malformed ``pattern``.
"""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.loader import mix_seed
from classlab.engine import Trainer, TrainConfig
from classlab.engine.checkpoint import load_checkpoint, save_checkpoint
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import dataset_digest, make_fingerprint
from classlab.io import atomic_path, read_json, write_json
from classlab.methods.condense_augment import DSA_STRATEGY
from classlab.methods.condense_learner import RealData, StepLoader, evaluate_condensed, resolve_loops
from classlab.methods.registry import get_method
from classlab.models import build_classifier
from classlab.provenance import run_provenance

FAMILY = "condense"
BACKBONE = "convnet_dc"
FILES = ("images.pt", "manifest.json", "grid.png", "metrics.json")


# --- the dominant-pattern variant ----------------------------------------------------------------

def add_dominant_pattern(x_uint8: torch.Tensor, strength: float, seed: int, cells: int = 7) -> torch.Tensor:
    """``x`` with a random, class-irrelevant texture blended into every image:

        x' = round((1 - strength) * x + strength * 255 * P_i),

    P_i a smooth random texture per image (standard normal values on a ``cells`` x ``cells`` grid,
    bilinearly upsampled to the image, each image's texture rescaled to [0, 1]; one texture shared by
    the channels), drawn from a generator seeded by ``seed`` independently of the label. At
    ``strength`` >= 0.5 the texture carries more of each image's variance than the object: the
    class-irrelevant information dominates. ``strength`` 0 returns ``x`` unchanged (a copy)."""
    if x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4:
        raise ValueError(f"add_dominant_pattern expects uint8 images (N, C, H, W), got {x_uint8.dtype} "
                         f"{tuple(x_uint8.shape)}")
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"pattern.strength: {strength} is outside [0, 1]")
    if strength == 0.0:
        return x_uint8.clone()
    n, _, h, w = x_uint8.shape
    gen = torch.Generator()
    gen.manual_seed(mix_seed(int(seed), 0x9A77E2))
    coarse = torch.randn(n, 1, int(cells), int(cells), generator=gen)  # every draw first: chunking changes nothing
    out = torch.empty_like(x_uint8)
    for start in range(0, n, 8192):
        part = slice(start, start + 8192)
        texture = F.interpolate(coarse[part], size=(h, w), mode="bilinear", align_corners=False)
        lo = texture.flatten(1).amin(1).view(-1, 1, 1, 1)
        hi = texture.flatten(1).amax(1).view(-1, 1, 1, 1)
        texture = (texture - lo) / (hi - lo).clamp_min(1e-12)
        blended = (1.0 - strength) * x_uint8[part].float() + strength * 255.0 * texture
        out[part] = blended.round().clamp(0, 255).to(torch.uint8)
    return out


def _check_pattern(pattern) -> dict | None:
    if pattern is None:
        return None
    if not isinstance(pattern, dict) or set(pattern) - {"strength", "seed"} or "strength" not in pattern:
        raise ConfigError(f"pattern: {pattern!r}; give {{strength: number in [0, 1], seed: integer}}")
    strength = pattern["strength"]
    if not isinstance(strength, (int, float)) or isinstance(strength, bool) or not 0 <= strength <= 1:
        raise ConfigError(f"pattern.strength: {strength!r} must be a number in [0, 1]")
    seed = pattern.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"pattern.seed: {seed!r} must be an integer")
    return {"strength": float(strength), "seed": int(seed)}


# --- checks before anything is written ------------------------------------------------------------

def _resolve(method: str, overrides: dict | None) -> dict:
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    for key in ("lr_img", "lr_net", "eval_lr"):
        if key in hp and not (isinstance(hp[key], (int, float)) and hp[key] > 0):
            raise ConfigError(f"{key}: {hp[key]!r}; a learning rate must be > 0")
    return hp


def _check_ipc(ipc, counts: list[int], names: list[str]) -> int:
    if not isinstance(ipc, int) or isinstance(ipc, bool) or ipc < 1:
        raise ConfigError(f"images_per_class: {ipc!r} must be a positive integer")
    short = [(names[c], n) for c, n in enumerate(counts) if n < ipc]
    if short:
        listed = ", ".join(f"{name!r} ({n})" for name, n in short)
        raise ConfigError(f"images_per_class: {ipc} exceeds the training samples of class {listed}")
    return ipc


def _evaluation_key(key: str) -> bool:
    """Hyperparameters of the evaluation only (they do not change the condensed set)."""
    return key.startswith("eval_") or key == "dbr_weight"


def _fingerprint_matches(path: Path, fingerprint: dict) -> bool:
    if not path.exists():
        return False
    try:
        saved = read_json(path) if path.suffix == ".json" else load_checkpoint(path)
    except Exception:
        return False
    return saved.get("fingerprint") == fingerprint


# --- the job --------------------------------------------------------------------------------------

def run_condensation(method: str, data_dir: Path, ipc: int, seed: int, out_dir: Path, overrides: dict | None = None,
                     backbone_kwargs: dict | None = None, threads: int | None = None, device: str | None = None,
                     pattern: dict | None = None, progress: bool = False) -> dict:
    """Condense ``data_dir``'s training split into ``ipc`` images per class with ``method`` and evaluate
    it; writes ``out_dir/{images.pt, manifest.json, grid.png, metrics.json}`` and returns the metrics."""
    from classlab.data.prepare import load_prepared

    set_threads(threads)
    hp = _resolve(method, overrides)
    pattern = _check_pattern(pattern)
    cls = get_method(FAMILY, method)
    data = load_prepared(Path(data_dir))
    k = data.num_classes
    names = list(data.manifest.get("class_names") or [str(c) for c in range(k)])
    counts = [int((data.train.y == c).sum()) for c in range(k)]
    ipc = _check_ipc(ipc, counts, names)
    if cls.optimises and int(hp.get("iterations", 0)) > 0:
        resolve_loops(hp, ipc)  # raises ConfigError naming `loops` where the ipc has no schedule
        networks, per_epoch = int(hp["iterations"]), int(hp.get("iterations_per_epoch", hp["iterations"]))
        if networks % min(per_epoch, networks):
            raise ConfigError(f"iterations_per_epoch: {per_epoch} does not divide iterations ({networks})")
    # the set's identity leaves the evaluation settings out (changing them re-evaluates, never re-condenses);
    # the metrics' identity is the whole computation
    common = dict(protocol=FAMILY, method=method, data=dataset_digest(data.manifest), images_per_class=ipc,
                  seed=int(seed), backbone=BACKBONE, backbone_kwargs=backbone_kwargs or {}, pattern=pattern or {})
    set_fingerprint = make_fingerprint(hparams={k: v for k, v in hp.items() if not _evaluation_key(k)}, **common)
    fingerprint = make_fingerprint(hparams=hp, **common)
    out_dir = Path(out_dir)
    metrics_path = out_dir / "metrics.json"
    if all((out_dir / f).exists() for f in FILES) and _fingerprint_matches(metrics_path, fingerprint):
        return read_json(metrics_path)  # finished before: nothing to redo

    if metrics_path.exists() and not _fingerprint_matches(metrics_path, fingerprint):
        metrics_path.unlink()  # another computation's result: never left beside this one's outputs
    dev = pick_device(device)
    mean, std = data.manifest["channel_mean"], data.manifest["channel_std"]
    train_x, test_x = data.train.x, data.test.x
    if pattern is not None:
        train_x = add_dominant_pattern(train_x, pattern["strength"], mix_seed(pattern["seed"], 0))
        test_x = add_dominant_pattern(test_x, pattern["strength"], mix_seed(pattern["seed"], 1))
    real = RealData(train_x, data.train.y, mean, std, k)
    c_in, h = int(train_x.shape[1]), int(train_x.shape[2])

    seed_everything(int(seed))
    model = build_classifier(BACKBONE, c_in, k, img_size=h, backbone_kwargs=backbone_kwargs)
    learner = cls(model, hp, k)
    learner.seed = int(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    images_path, manifest_path = out_dir / "images.pt", out_dir / "manifest.json"
    if _fingerprint_matches(images_path, set_fingerprint) and _fingerprint_matches(manifest_path, set_fingerprint):
        blob = load_checkpoint(images_path)
        images, labels = blob["images"], blob["labels"]
        if "teacher" in blob and hasattr(learner, "teacher"):
            learner.teacher.load_state_dict(blob["teacher"])
        manifest = read_json(manifest_path)
    else:
        images, labels, manifest = condense_images(learner, method, hp, real, ipc, int(seed), dev, out_dir,
                                             set_fingerprint, progress, data, pattern)
    if not (out_dir / "grid.png").exists() or not _fingerprint_matches(metrics_path, fingerprint):
        save_grid(images, labels, mean, std, out_dir / "grid.png", names)

    teacher, dbr_weight = learner.evaluation_teacher()
    settings = {"runs": int(hp["eval_runs"]), "epochs": int(hp["eval_epochs"]), "lr": float(hp["eval_lr"]),
                "batch_size": int(hp["eval_batch"]), "momentum": float(hp["eval_momentum"]),
                "weight_decay": float(hp["eval_weight_decay"]), "augment": str(hp["eval_augment"]),
                "dsa_strategy": str(hp.get("eval_dsa_strategy") or DSA_STRATEGY), "network": BACKBONE,
                "lr_schedule": "lr for epochs 0..E//2, lr/10 after", "dbr_weight": float(dbr_weight),
                "dbr_teacher": teacher is not None and dbr_weight > 0, "test_split": "test",
                "test_samples": int(len(data.test.y))}
    runs_path = out_dir / ".eval_runs.json"
    done = read_json(runs_path)["accuracies"] if _fingerprint_matches(runs_path, fingerprint) else []

    def record(run: int, acc: float) -> None:
        done.append(acc)
        write_json(runs_path, {"fingerprint": fingerprint, "accuracies": list(done)})

    t0 = time.perf_counter()
    test = SimpleNamespace(x=test_x, y=data.test.y)
    result = evaluate_condensed(images, labels, SimpleNamespace(test=test, manifest=data.manifest, num_classes=k),
                                int(seed), runs=settings["runs"], epochs=settings["epochs"], lr=settings["lr"],
                                batch_size=settings["batch_size"], momentum=settings["momentum"],
                                weight_decay=settings["weight_decay"], augment=settings["augment"],
                                dsa_strategy=settings["dsa_strategy"], device=dev, backbone_kwargs=backbone_kwargs,
                                teacher=teacher if dbr_weight > 0 else None, dbr_weight=dbr_weight,
                                done=list(done), on_run=record)
    metrics = {"method": method, "images_per_class": ipc, "seed": int(seed), "dataset": data.manifest.get("dataset"),
               "accuracies": result["accuracies"], "mean": result["mean"], "std": result["std"],
               "evaluation": settings, "evaluation_seconds": time.perf_counter() - t0,
               "pattern": pattern, "condensation": {key: manifest.get(key) for key in
                                                    ("outer_iterations", "networks", "seconds",
                                                     "outer_iterations_per_s")},
               "fingerprint": fingerprint, "provenance": run_provenance()}
    write_json(metrics_path, metrics)
    runs_path.unlink(missing_ok=True)
    return metrics


def condense_images(learner, method: str, hp: dict, real: RealData, ipc: int, seed: int, dev, out_dir: Path,
              fingerprint: dict, progress: bool, data, pattern) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Initialise and (for a learning method) run the bi-level loop; write images.pt and manifest.json.
    The manifest's ``outer_iterations_per_s`` (image updates per second of the loop) is what
    ``make bench``'s ``condensation`` line reports."""
    k = real.num_classes
    t0 = time.perf_counter()
    init_images, init_indices = learner.initialise(real, ipc, dev)
    labels = torch.arange(k).repeat_interleave(ipc)
    learner.set_synthetic(init_images, labels, init_indices)
    prepare_seconds = time.perf_counter() - t0
    steps, networks, fit_seconds, history, loops = 0, 0, 0.0, [], None
    checkpoint = out_dir / "condense_last.pt"
    if learner.optimises and int(hp.get("iterations", 0)) > 0:
        outer, inner = learner.loops()
        loops = {"outer_loop": outer, "inner_loop": inner}
        networks = int(hp["iterations"])
        per_epoch = min(int(hp.get("iterations_per_epoch", networks)), networks)
        if networks % per_epoch:
            raise ConfigError(f"iterations_per_epoch: {per_epoch} does not divide iterations ({networks})")
        batch_real = int(hp["batch_real"])
        config = TrainConfig.from_hparams({"epochs": networks // per_epoch, "batch_size": batch_real,
                                           "schedule": "constant", "warmup_frac": 0.0, "augment_pad": 0,
                                           "augment_hflip": False})
        trainer = Trainer(learner, config, dev, seed, checkpoint, progress, fingerprint=fingerprint)
        sources = {f"class{c}": real.class_indices(c) for c in range(k)}
        mixed = trainer.make_mixed_loader(real.x, real.y, real.mean, real.std, sources)
        history = trainer.fit(StepLoader(mixed, per_epoch * outer))
        steps = int(trainer.steps_done)
        fit_seconds = float(sum(row["seconds"] for row in history))
    images, labels = learner.condensed()
    blob = {"images": images, "labels": labels, "init_indices": learner.init_indices.cpu(),
            "mean": torch.tensor(real.mean, dtype=torch.float32), "std": torch.tensor(real.std, dtype=torch.float32),
            "fingerprint": fingerprint}
    if hasattr(learner, "teacher"):
        blob["teacher"] = {key: v.detach().cpu() for key, v in learner.teacher.state_dict().items()}
    save_checkpoint(blob, out_dir / "images.pt")
    manifest = {"method": method, "images_per_class": ipc, "seed": seed, "hparams": hp, "backbone": BACKBONE,
                "dataset": data.manifest.get("dataset"), "pattern": pattern,
                "init_indices": [int(i) for i in learner.init_indices.cpu()],
                "init_indices_split": "train", "loops": loops, "networks": networks,
                "outer_iterations": steps, "prepare_seconds": prepare_seconds, "fit_seconds": fit_seconds,
                "seconds": prepare_seconds + fit_seconds,
                "outer_iterations_per_s": steps / fit_seconds if fit_seconds > 0 else None,
                "history": history, "image_shape": list(images.shape[1:]), "count": int(len(labels)),
                "normalisation": {"mean": list(real.mean), "std": list(real.std),
                                  "images": "normalised: pixel = (value / 255 - mean) / std"},
                "fingerprint": fingerprint, "provenance": run_provenance()}
    write_json(out_dir / "manifest.json", manifest)
    checkpoint.unlink(missing_ok=True)
    return images, labels, manifest


# --- the figure -----------------------------------------------------------------------------------

def save_grid(images: torch.Tensor, labels: torch.Tensor, mean, std, path: Path, class_names=None) -> None:
    """A grid of the synthetic set, a row per class, denormalised and clipped to [0, 1]; PNG, atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = int(labels.max()) + 1 if len(labels) else 0
    per_class = [images[labels == c] for c in range(k)]
    cols = max((len(p) for p in per_class), default=1)
    shape = (1, -1, 1, 1)
    pixels = (images.float() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)).clamp(0, 1)
    fig, axes = plt.subplots(k, cols, figsize=(max(1.0, 0.6 * cols) + 1.2, 0.6 * k + 0.2), squeeze=False)
    for c in range(k):
        rows = pixels[labels == c]
        for j in range(cols):
            ax = axes[c][j]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if j < len(rows):
                img = rows[j]
                if img.shape[0] == 1:
                    ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
                else:
                    ax.imshow(img.permute(1, 2, 0).numpy())
        name = class_names[c] if class_names and c < len(class_names) else str(c)
        axes[c][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout(pad=0.2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
