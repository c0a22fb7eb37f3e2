"""What a method is: the part of training that differs from the shared loop.

The engine (``classlab.engine.trainer``) owns batching, augmentation, device, precision,
schedule, checkpoints and logging. A method is an ``nn.Module`` that holds the model and
any state of its own (a teacher, a memory of past predictions, prototypes) as submodules
or buffers, so that one ``state_dict`` checkpoints all of it. It overrides only the hooks
it needs:

- ``training_step(batch)`` -> ``(loss, logs)``: the loss of one batch. It is a pure function of
  the batch and the parameters: a two-step optimizer (SAM) calls it twice through ``closure``,
  so it must not change any buffer, memory or counter.
- ``on_before_step(batch)``: runs once before each step (an online learner exposes the
  incoming batch's classes before it trains on them).
- ``on_after_step(batch, logs)``: runs exactly once after each optimizer step. Whatever a method
  keeps (memories, EMA teachers, prototypes, usage counts, queues) changes here, from the
  detached tensors that ``training_step`` put in ``logs``.
- ``global_step``: the index of the current optimizer step, counted over the whole run (every
  epoch, and every chunk of an online stream); set by the engine before ``training_step``.
- ``param_groups()`` / ``configure_optimizer()``: what is trained, with which optimizer.
- ``optimizer_step(loss, optimizer, closure)``: default backward + step; SAM-style
  two-step updates re-evaluate ``closure()``.
- ``on_train_start`` / ``on_epoch_start`` / ``on_epoch_end``: per-run and per-epoch work
  (fill a memory, recluster, refresh targets).
- ``forward(x)``: logits for evaluation.
- ``num_views``: how many augmented views of each image the loader should produce.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Method(nn.Module):
    name: str = "method"
    family: str = ""
    num_views: int = 1
    augment: bool = True  # set False for methods that train on fixed features

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__()
        self.model = model
        self.hparams = dict(hparams)
        self.num_classes = num_classes
        self.global_step = 0  # set by the engine before each training_step

    # --- what is trained --------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """timm's optimizer factory. ``optimizer`` names it (sgd, adamw, lion, ...); ``lr``,
        ``weight_decay``, ``momentum`` (SGD family), ``betas`` and ``eps`` pass through, and so does
        every key of ``optimizer_kwargs`` (any other option of the timm optimizer)."""
        from timm.optim import create_optimizer_v2

        hp = self.hparams
        name = hp.get("optimizer", "sgd")
        kwargs = dict(hp.get("optimizer_kwargs") or {})
        if name in ("sgd", "nesterov", "momentum"):
            kwargs.setdefault("momentum", hp.get("momentum", 0.9))
        for key in ("betas", "eps"):
            if hp.get(key) is not None:
                kwargs.setdefault(key, tuple(hp[key]) if key == "betas" else float(hp[key]))
        return create_optimizer_v2(self.param_groups(), opt=name, lr=hp["lr"],
                                   weight_decay=hp.get("weight_decay", 0.0), **kwargs)

    # --- one batch --------------------------------------------------------------------
    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       closure: Callable[[], torch.Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.hparams.get("grad_clip", 0) > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.hparams["grad_clip"])
        optimizer.step()

    # --- run and epoch boundaries -----------------------------------------------------
    def on_before_step(self, batch: dict) -> None:
        """Runs once before each optimizer step, before ``training_step``: state that the step must
        already see (an online learner exposes the classes of the incoming batch)."""

    def on_after_step(self, batch: dict, logs: dict) -> None:
        pass

    def on_train_start(self, loader) -> None:
        pass

    def on_epoch_start(self, epoch: int) -> None:
        pass

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
