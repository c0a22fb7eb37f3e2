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
- ``training_stages()`` / ``end_stage(name, loader)``: a run made of stages (USEFUL: train
  briefly, resample, retrain from scratch). Each stage is a full ``fit`` with its own schedule and
  checkpoint; ``end_stage`` may return the next stage's training set (train-split positions,
  duplicates allowed), which the engine writes to the run's outputs. ``stage`` names the current one.
- ``set_teacher(teacher, meta)``: a frozen teacher model (distillation), checked by the engine to
  share the student's dataset and classes.
- ``evaluate_with_method``: True when prediction is not ``self.model(x)`` (NoProp's chain, a
  kernel classifier): the saved model then carries the method's state and evaluation calls
  ``method(x)``. ``head_trained``: False where a pretraining leaves the head untrained (SimCLR),
  so fine-tuning starts a fresh one. ``class_names``: the dataset's, set before training.

How the unusual methods fit through these hooks (sketches the interface was checked against;
the families that implement them follow them):

- **SAM** (two-step): ``optimizer_step`` does ``loss.backward()``, perturbs the weights by
  rho g/|g|, calls ``closure()`` for the loss at the perturbed point, backpropagates it, restores
  the weights and steps. ``closure`` re-runs ``training_step``, which is pure, so nothing is
  counted twice; BatchNorm statistics should be frozen for the second pass (the method's
  ``optimizer_step`` sets the BN momentum to 0 around it).
- **PS-KD** (memory of last epoch's predictions): a buffer ``[N, K]`` indexed by
  ``batch["index"]``; ``training_step`` reads the previous epoch's row for its target,
  ``on_after_step`` writes this epoch's softmax into a second buffer, ``on_epoch_end`` swaps them.
  Both are buffers, so the epoch (and mid-epoch) checkpoint restores them.
- **GCD / SimCLR** (two views, two sources): ``num_views = 2`` gives ``batch["views"]``; a
  ``MixedLoader`` over a labelled and an unlabelled source gives ``batch["source"]``.
- **KD / LwF / iCaRL** (frozen teacher, replay): the teacher is a submodule with
  ``requires_grad_(False)`` kept in eval mode by ``train()``; a replay memory is the protocol's
  (``training_indices`` adds its indices to the task's).
- **NoProp** (blocks trained independently, each with its own optimizer and schedule):
  ``param_groups()`` returns one group per block, each with its own ``lr``/``base_lr`` (the
  engine scales every group by the schedule factor), and ``training_step`` returns the sum of the
  per-block losses, each computed on a detached input, so one backward gives each block only
  its own gradient. Where blocks need separate optimizer types, ``configure_optimizer`` returns a
  wrapper whose ``step``/``zero_grad``/``state_dict`` fan out to one optimizer per block.
- **Dataset condensation** (bi-level inner loop): the trained parameters are the synthetic
  images (a parameter of the method; the loader yields real batches, possibly a ``MixedLoader``
  of one source per class). ``training_step`` builds a fresh network from a seed derived from
  ``global_step``, runs its inner loop functionally (``torch.func.functional_call`` on
  ``create_graph`` inner updates, or gradient matching without unrolling), and returns the outer
  loss on the synthetic images; it changes no state, so it stays pure. ``param_groups`` returns
  the synthetic images (and learnable learning rates where the method has them).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def build_optimizer(params, hparams: dict, default: str = "sgd") -> torch.optim.Optimizer:
    """timm's optimizer factory over ``params`` (tensors or param groups). ``optimizer`` names it
    (sgd, adamw, lion, ...; ``default`` where unset); ``lr``, ``weight_decay``, ``momentum`` (SGD
    family), ``betas`` and ``eps`` pass through, and so does every key of ``optimizer_kwargs`` (any
    other option of the timm optimizer)."""
    from timm.optim import create_optimizer_v2

    name = hparams.get("optimizer", default)
    kwargs = dict(hparams.get("optimizer_kwargs") or {})
    if name in ("sgd", "nesterov", "momentum"):
        kwargs.setdefault("momentum", hparams.get("momentum", 0.9))
    for key in ("betas", "eps"):
        if hparams.get(key) is not None:
            kwargs.setdefault(key, tuple(hparams[key]) if key == "betas" else float(hparams[key]))
    return create_optimizer_v2(params, opt=name, lr=float(hparams["lr"]),
                               weight_decay=float(hparams.get("weight_decay", 0.0)), **kwargs)


class Method(nn.Module):
    name: str = "method"
    family: str = ""
    num_views: int = 1
    augment: bool = True  # set False for methods that train on fixed features
    evaluate_with_method: bool = False  # predictions come from ``method(x)``, not ``model(x)``
    head_trained: bool = True  # False: the model's classification head is left untrained

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__()
        self.model = model
        self.hparams = dict(hparams)
        self.num_classes = num_classes
        self.global_step = 0  # set by the engine before each training_step
        self.stage = "train"  # the current stage's name (see ``training_stages``)
        self.class_names: list[str] = [f"class {k}" for k in range(num_classes)]  # set by the engine

    # --- what is trained --------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.param_groups(), self.hparams)

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

    # --- stages and teachers ---------------------------------------------------------
    def training_stages(self) -> list[dict]:
        """The stages of one run, in order. Each is ``{"name": ...}`` plus optionally ``"epochs"``
        (else the ``epochs`` hyperparameter) and ``"reinit": True`` (the model starts again from the
        run's initial weights, with a new optimizer)."""
        return [{"name": "train"}]

    def end_stage(self, name: str, loader) -> torch.Tensor | None:
        """After stage ``name`` (not the last): ``loader`` runs over the stage's training samples in
        order, unaugmented. Return train-split positions to make them the next stage's training
        set (duplicates upsample), or None to keep it."""
        return None

    def set_teacher(self, teacher: nn.Module, meta: dict) -> None:
        raise ValueError(f"method {self.family}/{self.name} takes no teacher")

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
