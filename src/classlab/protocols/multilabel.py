"""Multi-label class-incremental learning (MLCIL) on scenes built from a single-label dataset.

The protocol of Kim et al. (ECCV 2020, "Imbalanced continual learning with partitioning
reservoir sampling"), Dong et al. (ICCV 2023, KRT, "Knowledge restore and transfer for
multi-label class-incremental learning") and MULTI-LANE (De Min et al., CoLLAs 2024):

- the class order and the classes of each task come from a single-label class-incremental
  scenario manifest (``classlab.data.scenarios.class_incremental``: B0IncK or BxIncK);
- task t trains on every train scene that contains at least one of task t's classes, and
  only task t's classes are annotated (label absence: objects of past and future classes in
  the scene are present but unlabelled);
- after task t the learner scores every test scene that contains at least one class seen so
  far, and is measured by the mean average precision (mAP) over the seen classes, each
  seen class's labels kept (AP from ``sklearn.metrics.average_precision_score``).

Metrics (``summarize_multilabel``): final mAP, average incremental mAP (the mean over tasks of
the mAP after each task), the per-task mAP curve, the matrix M[t, j] of the mAP over task j's
classes after task t, forgetting on that matrix, and the final CF1/OF1 at a sigmoid threshold.

The learners are ``IncrementalLearner`` subclasses with ``"multilabel"`` in ``scenario_kinds``;
setup, the loop, checkpoints, resume and outputs are the shared runner's
(``classlab.protocols.runner``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from classlab.data.prepare import load_prepared
from classlab.data.scenarios import ClassIncrementalScenario, ScenarioError
from classlab.data.scenes import scenes_from_prepared
from classlab.engine.fingerprint import file_digest
from classlab.io import read_json, write_json
from classlab.methods.learner import TaskContext
from classlab.metrics.incremental import forgetting
from classlab.models import build_classifier
from classlab.protocols.runner import ProtocolRun, describe_init

KIND = "multilabel"
F1_THRESHOLD = 0.8  # sigmoid threshold of CF1/OF1, as in the MULTI-LANE and KRT evaluations


# --- metrics ------------------------------------------------------------------------------

def mean_average_precision(targets: np.ndarray, scores: np.ndarray, classes=None) -> float:
    """mAP = (1/|C'|) sum_{c in C'} AP_c, over the ``classes`` (default: all columns) that have at
    least one positive; AP_c = sum_n (R_n - R_{n-1}) P_n from sklearn's ``average_precision_score``."""
    from sklearn.metrics import average_precision_score

    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    cols = np.arange(targets.shape[1]) if classes is None else np.asarray(classes, dtype=np.int64)
    if len(cols) == 0:
        return float("nan")
    t, s = targets[:, cols], scores[:, cols]
    keep = t.sum(0) > 0
    if not keep.any():
        return float("nan")
    return float(average_precision_score(t[:, keep], s[:, keep], average="macro"))


def per_class_average_precision(targets: np.ndarray, scores: np.ndarray, classes) -> dict[int, float | None]:
    from sklearn.metrics import average_precision_score

    out: dict[int, float | None] = {}
    for c in classes:
        t = np.asarray(targets)[:, c]
        out[int(c)] = float(average_precision_score(t, np.asarray(scores, dtype=np.float64)[:, c])) if t.any() else None
    return out


def f1_scores(targets: np.ndarray, logits: np.ndarray, classes, threshold: float = F1_THRESHOLD) -> dict:
    """CF1 (macro over classes) and OF1 (micro, overall) of sigmoid(logit) > threshold."""
    from sklearn.metrics import f1_score

    cols = np.asarray(classes, dtype=np.int64)
    t = np.asarray(targets)[:, cols].astype(int)
    pred = (1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)[:, cols])) > threshold).astype(int)
    return {"cf1": float(f1_score(t, pred, average="macro", zero_division=0)),
            "of1": float(f1_score(t, pred, average="micro", zero_division=0))}


def summarize_multilabel(steps: list[tuple[np.ndarray, np.ndarray]], task_classes: list[list[int]],
                         indices: list[np.ndarray] | None = None) -> dict:
    """``steps[t]`` = (targets, logits) of the test scenes evaluated after task t (targets of the
    seen classes); ``indices[t]`` = which test scenes those are.

    ``map_per_task[t]`` is the protocol's mAP over the seen classes on all of step t's scenes.
    ``map_matrix[t][j]`` is the mAP over task j's classes after task t on the scenes evaluated
    after task j (a subset of step t's: the set of seen classes only grows), so that a column
    changes only when scores change, not because later tasks add scenes (more negatives).
    ``map_forgetting`` is the max-based forgetting of that matrix.
    """
    T = len(steps)
    seen: list[int] = []
    curve, matrix = [], np.full((T, T), np.nan)
    for t, (targets, logits) in enumerate(steps):
        seen = seen + list(task_classes[t])
        curve.append(mean_average_precision(targets, logits, seen))
        for j in range(t + 1):
            rows = np.isin(indices[t], indices[j]) if indices is not None else slice(None)
            matrix[t, j] = mean_average_precision(targets[rows], logits[rows], task_classes[j])
    targets, logits = steps[-1]
    out = {
        "final_map": float(curve[-1]),
        "average_incremental_map": float(np.nanmean(curve)),
        "map_per_task": [float(v) for v in curve],
        "map_matrix": [[None if np.isnan(v) else float(v) for v in row] for row in matrix],
        "map_forgetting": forgetting(matrix),
        "final_ap_per_class": {str(k): v for k, v in per_class_average_precision(targets, logits, seen).items()},
    }
    out.update({f"final_{k}": v for k, v in f1_scores(targets, logits, seen).items()})
    return out


# --- tasks --------------------------------------------------------------------------------

def task_annotations(y: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the scenes with at least one of ``classes``, labels with only ``classes`` kept)."""
    mask = torch.zeros(y.shape[1], dtype=torch.bool)
    mask[torch.tensor(classes, dtype=torch.long)] = True
    yb = y.bool()
    idx = torch.nonzero(yb[:, mask].any(1)).flatten()
    return idx, (yb & mask).float()


def _init_backbone(model, init: Path) -> dict:
    """Copy a ``train``-written backbone; a ViT's position grid is resampled (bicubic, timm)
    when the scene canvas differs from the image size it was trained on."""
    from classlab.train import load_model

    source, meta = load_model(init)
    state = source.backbone.state_dict()
    target = model.backbone
    if "pos_embed" in state and getattr(target, "pos_embed", None) is not None \
            and state["pos_embed"].shape != target.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed

        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=list(target.patch_embed.grid_size),
            old_size=list(source.backbone.patch_embed.grid_size), num_prefix_tokens=target.num_prefix_tokens)
    model.backbone.load_state_dict(state)
    return meta


class MultilabelRun(ProtocolRun):
    kind = KIND

    def __init__(self, method, data_dir, scenario_path, scenes, backbone, seed, ckpt_dir, eval_dir, **kwargs):
        super().__init__(method, data_dir, backbone, seed, ckpt_dir, eval_dir, **kwargs)
        self.scenario_path, self.scenes = Path(scenario_path), dict(scenes or {})
        self.scenario = ClassIncrementalScenario.load(self.scenario_path)
        if self.scenario.test_indices is not None:
            # the scene recipe (n_test) sizes the multi-label test set; the scenario's single-label
            # evaluation subset does not apply to scenes
            print("note: scenario.test_samples_per_class is not used by the multi-label protocol "
                  "(the scenes recipe's n_test sizes its test set)", flush=True)
        if self.scenario.kind != "class_incremental":
            raise ScenarioError(f"scenario.kind: the multi-label protocol takes its class order and tasks from a "
                                f"class_incremental scenario, not {self.scenario.kind!r}")

    @property
    def num_tasks(self) -> int:
        return self.scenario.num_tasks

    def fingerprint_parts(self) -> dict:
        return {"scenario": file_digest(self.scenario_path), "scenes": self.scenes}

    def setup(self) -> None:
        data = load_prepared(self.data_dir)
        self.manifest = data.manifest
        self.train, self.test, self.scene_manifest = scenes_from_prepared(data, self.scenes)
        self.mean, self.std = self.scene_manifest["channel_mean"], self.scene_manifest["channel_std"]
        model = build_classifier(self.backbone, int(self.train.x.shape[1]), self.scenario.num_classes,
                                 img_size=int(self.train.x.shape[2]), backbone_kwargs=self.backbone_kwargs)
        self.init_meta = _init_backbone(model, self.init) if self.init is not None else {}
        self.learner = self.learner_cls(model, self.hparams, self.scenario.num_classes).to(self.device)

    def begin_task(self, t: int) -> None:
        task = self.scenario.tasks[t]
        self.learner.begin_task(t, task.classes, task.test_classes)

    def train_loader(self, t: int, trainer):
        # in task t only task t's classes are annotated; a scene belongs to the task if it has one
        self.task_idx, self.task_y = task_annotations(self.train.y, self.scenario.tasks[t].classes)
        self.task_train_samples = len(self.task_idx)
        if not len(self.task_idx):
            return None
        return trainer.make_loader(self.train.x, self.task_y, self.mean, self.std, self.task_idx)

    def context(self, t: int) -> TaskContext:
        task = self.scenario.tasks[t]
        idx, y_task = task_annotations(self.train.y, task.classes)
        x = self.train.x
        return TaskContext(t, task.classes, task.test_classes, x, y_task, idx, None,
                           self.embed_fn(x, self.mean, self.std, self.learner.features),
                           self.embed_fn(x, self.mean, self.std, self.learner.predict), self.device,
                           self.mean, self.std)

    def evaluate_task(self, t: int) -> dict:
        # the test scenes with at least one seen class, labels of the seen classes
        task = self.scenario.tasks[t]
        test_idx, y_seen = task_annotations(self.test.y, task.test_classes)
        logits = self.predict_masked(self.test.x[test_idx], self.mean, self.std)
        targets = y_seen[test_idx].to(torch.uint8)
        self.outputs[f"logits_task{t}"] = logits.numpy().astype(np.float32)
        self.outputs[f"targets_task{t}"] = targets.numpy()
        self.outputs[f"index_task{t}"] = test_idx.numpy()
        task_map = mean_average_precision(targets.numpy(), logits.numpy(), task.test_classes)
        print(f"task {t}: mAP over {len(task.test_classes)} seen classes {task_map:.4f}", flush=True)
        return {"classes": task.classes, "test_samples": int(len(test_idx)), "map": task_map}

    def meta(self) -> dict:
        s = self.scenario
        return {"method": self.method, "family": "incremental", "seed": self.seed, "backbone": self.backbone,
                "dataset": s.dataset, "scenario": f"ML-{s.params.get('name', s.kind)}",
                "scenario_kind": KIND, "hparams": json.dumps(self.hparams, sort_keys=True),
                "init": str(self.init) if self.init else "", "init_kind": describe_init(self.init_meta),
                "init_classes": self.init_meta.get("hparams", "") if self.init_meta else "",
                "class_order": s.class_order, "class_order_seed": s.class_order_seed,
                "task_classes": [t.classes for t in s.tasks], "scenes": self.scene_manifest["recipe"],
                "canvas": self.scene_manifest["canvas"]}

    def finish(self, meta: dict) -> None:
        write_json(self.eval_dir / "scenes.json", self.scene_manifest)


def run_multilabel(method: str, data_dir: Path, scenario_path: Path, scenes: dict | None, backbone: str, seed: int,
                   ckpt_dir: Path, eval_dir: Path, overrides: dict | None = None, init: Path | None = None,
                   backbone_kwargs: dict | None = None, threads: int | None = None, device: str | None = None,
                   progress: bool = True) -> dict:
    """Train ``method`` through the scenario's tasks on multi-label scenes of ``data_dir``.

    ``scenes`` is the scene recipe (``classlab.data.scenes.DEFAULT_RECIPE`` keys). Writes
    ``ckpt_dir/task<t>.pt`` after each task (resume points, removed at the end),
    ``ckpt_dir/model.pt`` and ``ckpt_dir/history.json`` (per task: mAP over the seen classes),
    and ``eval_dir/predictions.npz`` (per task: ``logits_task<t>`` over all classes, unseen
    ones -inf; ``targets_task<t>`` multi-hot over the seen classes; ``index_task<t>``, the test
    scenes evaluated) plus ``eval_dir/scenes.json`` (the scene manifest with its recipe).
    """
    return MultilabelRun(method, data_dir, scenario_path, scenes, backbone, seed, ckpt_dir, eval_dir,
                         overrides=overrides, init=init, backbone_kwargs=backbone_kwargs, threads=threads,
                         device=device, progress=progress).run()


def evaluate_multilabel(predictions: Path, history: Path, out: Path) -> dict:
    """``metrics.json`` from ``predictions.npz`` and ``history.json`` of ``run_multilabel``."""
    meta = read_json(history)["meta"]
    task_classes = meta["task_classes"]
    with np.load(predictions) as z:
        steps = [(z[f"targets_task{t}"], z[f"logits_task{t}"]) for t in range(len(task_classes))]
        indices = [z[f"index_task{t}"] for t in range(len(task_classes))]
    metrics = summarize_multilabel(steps, task_classes, indices)
    metrics.update({k: meta[k] for k in ("dataset", "method", "seed", "backbone", "scenario", "scenario_kind",
                                         "init", "scenes", "task_classes")})
    metrics.update({k: meta[k] for k in ("provenance", "train_steps", "batch_size") if k in meta})
    metrics["init_kind"] = meta.get("init_kind", "scratch")
    write_json(out, metrics)
    return metrics
