"""One runner for every task-sequence protocol (FACIL's template method).

``ProtocolRun.run`` owns what every protocol shares, so that a fix lands once for all of them:

- setup: threads, seeds, the method's hyperparameters and class, the checks that a method runs
  on this protocol and that its pinned backbone is the one asked for;
- the fingerprint of the computation (hyperparameters, data checksum, scenario or task list,
  backbone and its kwargs, seed, the init checkpoint's bytes), carried by every checkpoint;
- the loop over tasks: the global RNG is reseeded from (seed, task) before ``begin_task`` (so
  fresh heads, adapters and prompts are drawn identically on resume), each task's phases run
  through the engine's ``Trainer`` with its own resume checkpoint, the task ends, it is
  evaluated, and a task checkpoint is written;
- resume: a rerun replays ``begin_task`` for the completed tasks, loads the last task (or
  phase) checkpoint and goes on; checkpoints written by another computation are discarded
  with a log line naming what differs;
- outputs: ``predictions.npz``, ``history.json`` (with the run's provenance and training
  budget) and ``model.pt``, each written atomically, and the resume files removed at the end.

A protocol subclass says only what differs: how the model and data are set up
(``setup``), what a task trains on (``train_loader``), what ``end_task`` sees (``context``),
how a task is evaluated (``evaluate_task``) and what the final outputs hold (``finish``).

Phases. A learner's task may be several phases (``learner.task_phases(t)``, default
``["train"]``): train, then align a classifier on sampled features, then calibrate. Each
phase after the first gets its loader from ``learner.phase_loader(phase, context, trainer)``
(None: nothing to train) and its hyperparameters from ``learner.phase_hparams(phase)``; the
learner's ``phase`` attribute tells ``training_step`` which loss to compute. A phase
checkpoint is written after each phase, so a job killed in the third phase resumes there.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from classlab.config import resolve_hparams
from classlab.data.scenarios import ScenarioError
from classlab.engine import Trainer, TrainConfig, load_checkpoint, predict_logits, save_checkpoint
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import check_resume, dataset_digest, file_digest, make_fingerprint
from classlab.io import atomic_path, write_json
from classlab.methods.learner import TaskContext
from classlab.methods.registry import get_method
from classlab.provenance import run_provenance


def resolve_learner(method: str, kind: str, backbone: str, overrides: dict | None, family: str = "incremental"):
    """Hyperparameters and class of ``family/method`` for a protocol of ``kind`` on ``backbone``;
    refuses a method that does not run on that protocol or that pins another backbone."""
    hparams = resolve_hparams(family, method, overrides)
    learner_cls = get_method(family, method)
    if kind not in learner_cls.scenario_kinds:
        raise ScenarioError(f"scenario.kind: {method} runs on {list(learner_cls.scenario_kinds)}, not {kind!r}")
    if hparams.get("backbone") and hparams["backbone"] != backbone:
        raise ScenarioError(f"backbone: {method} pins backbone {hparams['backbone']!r}, got {backbone!r}")
    return hparams, learner_cls


def task_hparams(hparams: dict, task_id: int) -> dict:
    """The first task may train longer (``first_task_epochs``); later ones at ``lr_incremental``."""
    hp = dict(hparams)
    if task_id == 0 and hp.get("first_task_epochs"):
        hp["epochs"] = hp["first_task_epochs"]
    if task_id > 0 and hp.get("lr_incremental"):
        hp["lr"] = hp["lr_incremental"]
    return hp


def describe_init(init_meta: dict, all_classes_expected: bool = False) -> str:
    """How the backbone was initialised, for the report: which labels it may have seen. The
    forgetting protocol starts from a model of all classes by design (``all_classes_expected``);
    elsewhere that means later tasks' labels were seen, and the report says so."""
    if not init_meta:
        return "scratch"
    if init_meta.get("head_trained") is False:  # a self-supervised pretraining (SimCLR): no label at all
        return f"{init_meta.get('family', '')}/{init_meta.get('method', '')} self-supervised pretraining (no labels)"
    classes = json.loads(init_meta.get("hparams", "{}")).get("classes") or []
    seen = f"classes {sorted(classes)} only" if classes else \
        "all classes" if all_classes_expected else "ALL classes (later tasks' labels seen)"
    return f"{init_meta.get('family', '')}/{init_meta.get('method', '')} pretraining on {seen}"


class FunctionModule(torch.nn.Module):
    """A bound method (``learner.predict``, ``learner.features``) as a module, for ``predict_logits``."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


class ProtocolRun:
    family: str = "incremental"  # the method family whose learners this protocol runs
    kind: str = ""             # the scenario kind a learner must list in ``scenario_kinds``
    task_seed_stride = 1000  # task t of seed s trains with seed s * stride + t

    def __init__(self, method: str, data_dir: Path, backbone: str, seed: int, ckpt_dir: Path, eval_dir: Path,
                 overrides: dict | None = None, init: Path | None = None, backbone_kwargs: dict | None = None,
                 threads: int | None = None, device: str | None = None, progress: bool = True):
        self.method, self.data_dir, self.backbone, self.seed = method, Path(data_dir), backbone, seed
        self.ckpt_dir, self.eval_dir = Path(ckpt_dir), Path(eval_dir)
        self.overrides, self.init = dict(overrides or {}), Path(init) if init else None
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.threads, self.progress = threads, progress
        self.device = pick_device(device)
        self.outputs: dict[str, np.ndarray] = {}
        self.history: list[dict] = []
        self.memory = None           # an ExemplarMemory where the protocol keeps one
        self.optimizer = None        # one optimizer for the whole run (online streams)
        self.train_steps = 0         # optimizer steps over the whole run, for the claims table
        self.task_train_samples = 0  # set by ``train_loader``
        self.init_meta: dict = {}

    # --- what a protocol says -------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        raise NotImplementedError

    def setup(self) -> None:
        """Load data, build the model and ``self.learner``; may raise before anything is written."""
        raise NotImplementedError

    def fingerprint_parts(self) -> dict:
        """What besides hyperparameters, data, backbone, seed and init determines the run."""
        return {}

    def begin_task(self, t: int) -> None:
        raise NotImplementedError

    def task_hparams(self, t: int) -> dict:
        return task_hparams(self.hparams, t)

    def train_loader(self, t: int, trainer: Trainer):
        """The loader of task ``t``'s training phase (None: nothing to train)."""
        raise NotImplementedError

    def fit_task(self, t: int, trainer: Trainer, loader) -> None:
        trainer.fit(loader)

    def context(self, t: int) -> TaskContext:
        raise NotImplementedError

    def before_end_task(self, t: int, context: TaskContext) -> None:
        """Protocol work between training and ``end_task`` (the exemplar memory)."""

    def evaluate_task(self, t: int) -> dict:
        """Store this task's evaluation in ``self.outputs``; return fields for the history row."""
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError

    def finish(self, meta: dict) -> None:
        """Write the protocol's own final outputs (metrics, scenes) next to predictions.npz."""

    def final_model(self) -> dict:
        return {"learner": self.learner.state_dict(), "meta": dict(self.meta_cache)}

    # --- shared helpers ---------------------------------------------------------------------
    def embed_fn(self, x_all: torch.Tensor, mean, std, fn) -> Callable[[torch.Tensor], torch.Tensor]:
        """train indices -> ``fn`` outputs (eval mode, no augmentation)."""
        def run(indices: torch.Tensor) -> torch.Tensor:
            self.learner.eval()
            return predict_logits(FunctionModule(fn), x_all[indices], mean, std, self.device).float()
        return run

    def predict_masked(self, x: torch.Tensor, mean, std) -> torch.Tensor:
        """Logits of ``learner.predict`` with the classes not seen yet at -inf."""
        self.learner.eval()
        logits = predict_logits(FunctionModule(self.learner.predict), x, mean, std, self.device)
        return logits.masked_fill(~self.learner.seen_mask.cpu(), float("-inf"))

    def trainer(self, t: int, hparams: dict, suffix: str = "") -> Trainer:
        self.learner.hparams = hparams
        return Trainer(self.learner, TrainConfig.from_hparams(hparams), self.device,
                       self.seed * self.task_seed_stride + t, self.ckpt_dir / f"task{t}{suffix}_last.pt",
                       self.progress, fingerprint={**self.fingerprint, "task": str(t), "phase": suffix or "train"})

    def reseed(self, t: int) -> None:
        # begin_task may draw fresh heads, adapters or prompts: the same draws on resume
        torch.manual_seed(self.seed * 7919 + t)

    # --- checkpoints ------------------------------------------------------------------------
    def _task_state(self, phase: int | None = None) -> dict:
        state = {"learner": self.learner.state_dict(), "history": self.history,
                 "outputs": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.outputs.items()},
                 "fingerprint": self.fingerprint, "train_steps": self.train_steps}
        if self.memory is not None:
            state["memory"] = self.memory.state_dict()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        if phase is not None:
            state["phase"] = phase
        return state

    def _load_task_state(self, state: dict) -> None:
        self.learner.load_state_dict(state["learner"])
        if self.memory is not None and state.get("memory"):
            self.memory.load_state_dict(state["memory"])
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        self.outputs = {k: v.numpy() for k, v in state["outputs"].items()}
        self.train_steps = int(state.get("train_steps", 0))

    def _resume_files(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("task*.pt"))

    def _discard_all(self) -> None:
        for path in self._resume_files():
            path.unlink(missing_ok=True)

    def _resume_point(self) -> tuple[int, dict | None]:
        """(first task to run, the state to load) after checking every task checkpoint's fingerprint."""
        done = 0
        while (self.ckpt_dir / f"task{done}.pt").exists():
            done += 1
        candidates = [(done, self.ckpt_dir / f"task{done}.phase.pt")] if done < self.num_tasks else []
        if done:
            candidates.append((done, self.ckpt_dir / f"task{done - 1}.pt"))
        for _, path in candidates:
            if not path.exists():
                continue
            state = load_checkpoint(path, map_location=self.device)
            if not check_resume(state, self.fingerprint, path):
                self._discard_all()
                return 0, None
            return done, state
        return 0, None

    # --- the template -----------------------------------------------------------------------
    def run(self) -> dict:
        set_threads(self.threads)
        seed_everything(self.seed)
        self.hparams, self.learner_cls = resolve_learner(self.method, self.kind, self.backbone, self.overrides,
                                                            self.family)
        self.setup()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = make_fingerprint(
            protocol=self.kind, method=self.method, hparams=self.hparams, data=dataset_digest(self.manifest),
            backbone=self.backbone, backbone_kwargs=self.backbone_kwargs, seed=self.seed,
            init=file_digest(self.init), **self.fingerprint_parts())
        self.learner.scenario_kind = self.kind
        start, state = self._resume_point()
        for t in range(start):  # replay the structure the checkpoint's tensors belong to
            self.reseed(t)
            self.begin_task(t)
        first_phase = 0
        if state is not None and "phase" in state:
            first_phase = int(state["phase"]) + 1  # loaded by _run_task, after begin_task(start)
        elif state is not None:
            self._load_task_state(state)
        for t in range(start, self.num_tasks):
            self._run_task(t, first_phase if t == start else 0)
        self.meta_cache = self.meta()
        self.meta_cache.update({"provenance": run_provenance(), "train_steps": int(self.train_steps),
                                "batch_size": int(self.hparams.get("batch_size", 0))})
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        save_npz(self.eval_dir / "predictions.npz", self.outputs)
        self.finish(self.meta_cache)
        write_json(self.ckpt_dir / "history.json", {"meta": self.meta_cache, "tasks": self.history})
        save_checkpoint(self.final_model(), self.ckpt_dir / "model.pt")
        self._discard_all()
        return {"history": self.history, "meta": self.meta_cache}

    def _run_task(self, t: int, first_phase: int) -> None:
        t0 = time.perf_counter()
        self.reseed(t)
        self.begin_task(t)
        if first_phase:  # a phase checkpoint of this task: its tensors belong after begin_task
            state = load_checkpoint(self.ckpt_dir / f"task{t}.phase.pt", map_location=self.device)
            self._load_task_state(state)
        phases = list(getattr(self.learner, "task_phases", lambda task: ["train"])(t))
        hp = self.task_hparams(t)
        trainers, context = [], None
        row: dict = {}
        for k, phase in enumerate(phases):
            if k < first_phase:
                continue
            self.learner.phase = phase
            if phase == "train":
                trainer = self.trainer(t, hp)
                loader = self.train_loader(t, trainer)
                if loader is not None and len(loader):
                    self.fit_task(t, trainer, loader)
                    self.train_steps += trainer.steps_done
                row["train_samples"] = int(self.task_train_samples)
            else:
                context = context or self.context(t)
                self.learner.hparams = hp  # the task's settings, also on a resume into this phase
                phase_hp = {**hp, **self.learner.phase_hparams(phase)}
                trainer = self.trainer(t, phase_hp, suffix=f".{phase}")
                loader = self.learner.phase_loader(phase, context, trainer)
                if loader is not None and len(loader):
                    trainer.fit(loader)
                    self.train_steps += trainer.steps_done
            trainers.append((phase, trainer))
            if k + 1 < len(phases):  # the phase is done: its epoch checkpoint gives way to a phase checkpoint
                save_checkpoint(self._task_state(phase=k), self.ckpt_dir / f"task{t}.phase.pt")
                trainer.checkpoint.unlink(missing_ok=True)
        self.learner.phase = "train"
        self.learner.hparams = hp  # end_task sees the task's settings, not the last phase's
        context = context or self.context(t)
        self.before_end_task(t, context)
        self.learner.end_task(t, context)
        row.update(self.evaluate_task(t))
        seconds = time.perf_counter() - t0
        main = dict(trainers).get("train")
        epochs = main.config.epochs if main is not None else 0
        row.update({"task": t, "seconds": seconds,
                    "images_per_s": float(row.get("train_samples", 0) * epochs / max(seconds, 1e-9)),
                    "epochs": main.history if main is not None else [],
                    "phases": {name: tr.history for name, tr in trainers if name != "train"}})
        self.history.append(row)
        save_checkpoint(self._task_state(), self.ckpt_dir / f"task{t}.pt")
        # kept until now, so that a job killed in end_task or evaluation does not train again
        for path in [self.ckpt_dir / f"task{t}.phase.pt", *self.ckpt_dir.glob(f"task{t}_last.pt"),
                     *self.ckpt_dir.glob(f"task{t}.*_last.pt")]:
            path.unlink(missing_ok=True)
