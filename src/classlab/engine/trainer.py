"""The training loop shared by every family.

One loop, many hooks: the Trainer iterates epochs and batches, applies the schedule,
runs the method's ``training_step`` under autocast, lets the method take the optimizer
step, and writes an atomic checkpoint at the end of every epoch. A run started again with
the same ``checkpoint`` path resumes after the last completed epoch; because each epoch's
batch order, augmentation and global RNG are seeded from (seed, epoch), the resumed run
ends bit-identical (on CPU) to one that was never interrupted.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from classlab.data.loader import AugmentSpec, TensorLoader
from classlab.engine.checkpoint import load_checkpoint, save_checkpoint
from classlab.engine.device import autocast, place
from classlab.engine.faults import maybe_kill
from classlab.engine.predict import predict_outputs
from classlab.engine.fingerprint import check_resume
from classlab.engine.schedule import lr_factor

log = logging.getLogger("classlab.engine")

TRAIN_KEYS = ("epochs", "batch_size", "schedule", "warmup_frac", "augment_pad", "augment_hflip", "online_iter",
              "milestones", "step_gamma")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    schedule: str = "onecycle"
    warmup_frac: float = 0.15
    augment_pad: int = 0
    augment_hflip: bool = False
    online_iter: int = 1          # optimizer steps per incoming batch (online protocols)
    milestones: tuple = ()        # step schedule: fractions of the run where the rate is multiplied by step_gamma
    step_gamma: float = 0.1

    @classmethod
    def from_hparams(cls, hparams: dict) -> "TrainConfig":
        return cls(**{k: hparams[k] for k in TRAIN_KEYS if k in hparams})


class Trainer:
    """Runs ``method`` over a loader for ``config.epochs`` epochs.

    ``fingerprint`` identifies the computation (``classlab.engine.fingerprint``); a resume
    checkpoint written by another computation is discarded, never resumed. Besides the
    checkpoint at every epoch end, ``checkpoint_every_steps`` / ``checkpoint_every_minutes``
    (execution options, default from $CLASSLAB_CHECKPOINT_EVERY_STEPS / _MINUTES) add mid-epoch
    checkpoints: the loader resumes at the saved batch offset with the saved global RNG state,
    so a resumed run is bit-identical (on CPU) to an uninterrupted one.
    """

    def __init__(self, method, config: TrainConfig, device: torch.device, seed: int,
                 checkpoint: str | Path | None = None, progress: bool = True, fingerprint: dict | None = None,
                 checkpoint_every_steps: int | None = None, checkpoint_every_minutes: float | None = None):
        self.method = place(method, device)
        self.config = config
        self.device = device
        self.seed = seed
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self.fingerprint = fingerprint
        env = os.environ
        self.every_steps = int(checkpoint_every_steps if checkpoint_every_steps is not None
                               else env.get("CLASSLAB_CHECKPOINT_EVERY_STEPS", 0) or 0)
        self.every_minutes = float(checkpoint_every_minutes if checkpoint_every_minutes is not None
                                   else env.get("CLASSLAB_CHECKPOINT_EVERY_MINUTES", 0) or 0)
        self.history: list[dict] = []
        self.step_log: list = []  # what an ``on_step`` callback records (anytime accuracy), checkpointed
        self.steps_done = 0       # optimizer steps taken by the last ``fit``

    def make_loader(self, x: torch.Tensor, y: torch.Tensor, mean, std, indices=None, shuffle: bool = True,
                    drop_last: bool | None = None) -> TensorLoader:
        cfg = self.config
        n = len(indices) if indices is not None else len(y)
        if drop_last is None:
            drop_last = n > cfg.batch_size  # a ragged last batch would skew BatchNorm statistics
        augment = AugmentSpec(cfg.augment_pad, cfg.augment_hflip) if self.method.augment else AugmentSpec()
        return TensorLoader(x, y, cfg.batch_size, device=self.device, mean=mean, std=std, shuffle=shuffle,
                            seed=self.seed, augment=augment, drop_last=drop_last,
                            views=self.method.num_views, indices=indices)

    def make_mixed_loader(self, x: torch.Tensor, y: torch.Tensor, mean, std, sources: dict,
                          batch_sizes: dict | None = None):
        """Several sources per step (labelled + unlabelled, forget + retain): ``sources`` maps a
        name to train indices, in order (the first defines the epoch); each step concatenates one
        batch of every source and ``batch["source"]`` holds each sample's source id."""
        from classlab.data.loader import MixedLoader

        cfg, parts = self.config, []
        augment = AugmentSpec(cfg.augment_pad, cfg.augment_hflip) if self.method.augment else AugmentSpec()
        for k, (name, indices) in enumerate(sources.items()):
            size = int((batch_sizes or {}).get(name, cfg.batch_size))
            parts.append(TensorLoader(x, y, size, device=self.device, mean=mean, std=std, shuffle=True,
                                      seed=self.seed * 31 + k, augment=augment, drop_last=len(indices) > size,
                                      views=self.method.num_views, indices=torch.as_tensor(indices)))
        return MixedLoader(parts, list(sources))

    def _resume_state(self) -> dict | None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return None
        state = load_checkpoint(self.checkpoint, map_location=self.device)
        if not check_resume(state, self.fingerprint, self.checkpoint):
            self.checkpoint.unlink(missing_ok=True)
            return None
        return state

    def _save(self, optimizer, epoch: int, batch: int, sums: tuple, epoch_seconds: float) -> None:
        state = {"method": self.method.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                 "batch": batch, "history": self.history, "step_log": self.step_log,
                 "config": asdict(self.config), "fingerprint": self.fingerprint or {},
                 "sums": [t.detach().cpu() for t in sums], "epoch_seconds": epoch_seconds,
                 "rng": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(state, self.checkpoint)

    def fit(self, loader, optimizer: torch.optim.Optimizer | None = None, *, step_offset: int = 0,
            total_steps: int | None = None, on_step=None) -> list[dict]:
        """Train for ``config.epochs`` over ``loader``.

        An ``optimizer`` passed in is kept (an online stream trains its tasks with one optimizer).
        ``step_offset`` and ``total_steps`` place these steps inside a longer schedule (the whole
        stream), so the learning rate runs once over it instead of restarting. ``on_step(steps,
        samples)`` runs after each optimizer step with the steps and samples done in this ``fit``;
        what it appends to ``self.step_log`` is checkpointed with the run.
        """
        method, cfg = self.method, self.config
        optimizer = optimizer or method.configure_optimizer()
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        repeat = max(int(cfg.online_iter), 1)
        batches_per_epoch = len(loader)
        steps_per_epoch = batches_per_epoch * repeat
        total = total_steps if total_steps is not None else step_offset + cfg.epochs * steps_per_epoch
        start_epoch, start_batch, resumed = 0, 0, None
        self.optimizer = optimizer
        self.step_log = []
        method.on_train_start(loader)
        state = self._resume_state()
        if state is not None:
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            self.history = list(state["history"])
            self.step_log = list(state.get("step_log", []))
            start_epoch, start_batch = int(state["epoch"]), int(state.get("batch", 0))
            resumed = state
            where = f"epoch {start_epoch}" + (f", batch {start_batch}" if start_batch else "")
            log.info("resuming from %s after %s", self.checkpoint, where)
            print(f"resuming from {self.checkpoint} after {where}", file=sys.stderr, flush=True)

        last_save = time.monotonic()
        for epoch in range(start_epoch, cfg.epochs):
            # the global RNG (dropout, method-side sampling) restarts from (seed, epoch)
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            loader.set_epoch(epoch)
            method.train()
            method.on_epoch_start(epoch)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device)
            seen = torch.zeros((), dtype=torch.long)
            labelled = torch.zeros((), dtype=torch.long)  # rows with a label (discovery hides some: y = -1)
            first = 0
            if resumed is not None and epoch == start_epoch and start_batch:
                # mid-epoch resume: the RNG and the running sums continue where they were saved
                sums = list(resumed["sums"])
                if len(sums) == 3:  # saved before unlabelled rows were counted apart: every row had a label
                    sums.append(sums[2].clone())
                loss_sum, correct, seen, labelled = (t.to(d) for t, d in zip(sums, (self.device, self.device, "cpu", "cpu")))
                torch.set_rng_state(resumed["rng"])
                if "cuda_rng" in resumed and self.device.type == "cuda":
                    torch.cuda.set_rng_state(resumed["cuda_rng"], self.device)
                t0 -= float(resumed.get("epoch_seconds", 0.0))
                first = start_batch
            batches = loader.iter_from(first) if hasattr(loader, "iter_from") else _skip(loader, first)
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, mininterval=5.0,
                       disable=not self.progress, leave=True, total=batches_per_epoch, initial=first)
            for i, batch in enumerate(bar, start=first):
                for r in range(repeat):  # online_iter: the same incoming batch for `repeat` steps
                    step = epoch * steps_per_epoch + i * repeat + r
                    factor = _lr_factor(cfg, step_offset + step, total)
                    for group in optimizer.param_groups:
                        group["lr"] = group["base_lr"] * factor
                    method.global_step = step_offset + step
                    method.on_before_step(batch)

                    def closure():
                        with autocast(self.device):
                            return method.training_step(batch)[0]

                    with autocast(self.device):
                        loss, logs = method.training_step(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {i}")
                    method.optimizer_step(loss, optimizer, closure)
                    method.on_after_step(batch, logs)  # state changes once per step, however often closure ran
                n = batch["y"].shape[0]
                loss_sum += loss.detach().float() * n
                if "logits" in logs and logs["logits"].shape[:1] == batch["y"].shape[:1] and batch["y"].dim() == 1:
                    known = batch["y"] >= 0  # an unlabelled row (y = -1) is neither right nor wrong
                    correct += (logs["logits"].argmax(1) == batch["y"])[known].sum()
                    labelled += int(known.sum())
                seen += n
                if on_step is not None:
                    on_step(step + 1, int(seen))
                maybe_kill("step")
                due = (self.every_steps and (i + 1) % self.every_steps == 0) or \
                      (self.every_minutes and time.monotonic() - last_save >= 60 * self.every_minutes)
                if self.checkpoint is not None and due and i + 1 < batches_per_epoch:
                    self._save(optimizer, epoch, i + 1, (loss_sum, correct, seen, labelled), time.perf_counter() - t0)
                    last_save = time.monotonic()
            method.on_epoch_end(epoch)
            maybe_kill("epoch")
            seconds = time.perf_counter() - t0
            count = max(int(seen), 1)
            # accuracy over the labelled rows; None where no step reported logits for a labelled row
            train_acc = float(correct) / int(labelled) if int(labelled) else None
            row = {"epoch": epoch + 1, "loss": float(loss_sum) / count, "train_acc": train_acc,
                   "seconds": seconds, "images_per_s": int(seen) / max(seconds, 1e-9)}
            self.history.append(row)
            acc_text = "n/a" if train_acc is None else f"{train_acc:.4f}"
            print(f"epoch {epoch + 1}: loss {row['loss']:.4f} train_acc {acc_text} "
                  f"{row['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
            if self.checkpoint is not None:
                self._save(optimizer, epoch + 1, 0, (loss_sum, correct, seen, labelled), 0.0)
                last_save = time.monotonic()
        self.steps_done = cfg.epochs * steps_per_epoch
        return self.history


def _lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    extra = {"milestones": tuple(cfg.milestones), "gamma": cfg.step_gamma} if cfg.schedule == "step" else {}
    return lr_factor(step, total, cfg.schedule, cfg.warmup_frac, **extra)


def _skip(loader, first: int):
    """Batches from index ``first`` on, drawing (and dropping) the ones before so that every
    random draw of the epoch happens in the same order as in an uninterrupted epoch."""
    for i, batch in enumerate(loader):
        if i >= first:
            yield batch


def predict_logits(model: torch.nn.Module, x: torch.Tensor, mean, std, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` on ``x`` (no augmentation), on the CPU as float32: the ``logits`` output
    of ``classlab.engine.predict.predict_outputs``."""
    return predict_outputs(model, x, mean, std, device, batch_size=batch_size)["logits"]
