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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from classlab.data.loader import AugmentSpec, TensorLoader
from classlab.engine.checkpoint import load_checkpoint, save_checkpoint
from classlab.engine.device import autocast, place
from classlab.engine.schedule import lr_factor

log = logging.getLogger("classlab.engine")

TRAIN_KEYS = ("epochs", "batch_size", "schedule", "warmup_frac", "augment_pad", "augment_hflip")


@dataclass
class TrainConfig:
    epochs: int = 1
    batch_size: int = 128
    schedule: str = "onecycle"
    warmup_frac: float = 0.15
    augment_pad: int = 0
    augment_hflip: bool = False

    @classmethod
    def from_hparams(cls, hparams: dict) -> "TrainConfig":
        return cls(**{k: hparams[k] for k in TRAIN_KEYS if k in hparams})


class Trainer:
    def __init__(self, method, config: TrainConfig, device: torch.device, seed: int,
                 checkpoint: str | Path | None = None, progress: bool = True):
        self.method = place(method, device)
        self.config = config
        self.device = device
        self.seed = seed
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress
        self.history: list[dict] = []

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

    def fit(self, loader: TensorLoader, optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
        """Train for ``config.epochs`` over ``loader``. An ``optimizer`` passed in is kept
        (online protocols call fit once per chunk of a stream with one optimizer)."""
        method, cfg = self.method, self.config
        optimizer = optimizer or method.configure_optimizer()
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        steps_per_epoch = len(loader)
        total_steps = cfg.epochs * steps_per_epoch
        start_epoch = 0
        self.optimizer = optimizer
        method.on_train_start(loader)
        if self.checkpoint is not None and self.checkpoint.exists():
            state = load_checkpoint(self.checkpoint, map_location=self.device)
            method.load_state_dict(state["method"])
            optimizer.load_state_dict(state["optimizer"])
            self.history = list(state["history"])
            start_epoch = int(state["epoch"])
            log.info("resuming from %s after epoch %d", self.checkpoint, start_epoch)
            print(f"resuming from {self.checkpoint} after epoch {start_epoch}", file=sys.stderr, flush=True)

        for epoch in range(start_epoch, cfg.epochs):
            # the global RNG (dropout, method-side sampling) restarts from (seed, epoch)
            torch.manual_seed(self.seed * 1_000_003 + epoch)
            loader.set_epoch(epoch)
            method.train()
            method.on_epoch_start(epoch)
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device)
            seen = 0
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", file=sys.stderr, mininterval=5.0,
                       disable=not self.progress, leave=True)
            for i, batch in enumerate(bar):
                factor = lr_factor(epoch * steps_per_epoch + i, total_steps, cfg.schedule, cfg.warmup_frac)
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor

                method.global_step = epoch * steps_per_epoch + i

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
                if "logits" in logs:
                    correct += (logs["logits"].argmax(1) == batch["y"]).sum()
                seen += n
            method.on_epoch_end(epoch)
            row = {"epoch": epoch + 1, "loss": float(loss_sum) / max(seen, 1),
                   "train_acc": float(correct) / max(seen, 1), "seconds": time.perf_counter() - t0,
                   "images_per_s": seen / max(time.perf_counter() - t0, 1e-9)}
            self.history.append(row)
            print(f"epoch {epoch + 1}: loss {row['loss']:.4f} train_acc {row['train_acc']:.4f} "
                  f"{row['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
            if self.checkpoint is not None:
                save_checkpoint({"method": method.state_dict(), "optimizer": optimizer.state_dict(),
                                 "epoch": epoch + 1, "history": self.history,
                                 "config": asdict(cfg)}, self.checkpoint)
        return self.history


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, mean, std, device: torch.device,
                   batch_size: int = 512) -> torch.Tensor:
    """Logits of ``model`` on uint8 images ``x`` (no augmentation), gathered on the CPU as float32."""
    place(model.eval(), device)
    loader = TensorLoader(x, torch.zeros(len(x), dtype=torch.long), batch_size, device=device, mean=mean, std=std)
    out = []
    for batch in loader:
        with autocast(device):
            out.append(model(batch["x"]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)
