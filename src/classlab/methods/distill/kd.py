"""KD: knowledge distillation from a frozen teacher's softened outputs.

Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS Deep Learning
Workshop 2015 (arXiv:1503.02531). The student's logits s are trained on the hard labels and on the
teacher's logits t softened by a temperature T:

    L = w_ce CE(s, y) + w_kd T^2 KL(softmax(t / T) || softmax(s / T)).

The T^2 factor keeps the soft term's gradient at the same scale as the hard term's when T changes
(the paper's section 2). With w_ce = 1 - w and w_kd = w this is the paper's weighted average of the
two objectives; ``kd.yaml`` uses w = 0.9 and T = 4 (the usual CIFAR setting, e.g. mdistiller's).
``kd_warmup_frac`` ramps w_kd linearly from 0 over that fraction of the run's steps (KD++'s
recipe; 0 for plain KD).

The teacher arrives through ``set_teacher`` (``--teacher model.pt``): a ``Classifier`` whose head
must predict the student's classes. It becomes a frozen submodule kept in eval mode whatever mode
the method is put in, so its BatchNorm statistics never move; it is not among the trained
parameters. This class is also the base of the family's other students (``nd_kd``,
``multi_aspect_kd``): ``teacher_outputs``, ``kd_term`` and the run-time-sized buffers live here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method


def kd_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), summed over classes, averaged over the batch."""
    T = float(temperature)
    # KL(p_t || p_s) = sum_c p_t,c (log p_t,c - log p_s,c), p = softmax(z / T); times T^2 (Hinton, sec. 2)
    kl = F.kl_div(F.log_softmax(student_logits.float() / T, dim=1), F.log_softmax(teacher_logits.float() / T, dim=1),
                  reduction="batchmean", log_target=True)
    return kl * (T * T)


def head_width(model: nn.Module) -> int:
    """The number of classes a ``Classifier`` predicts (its linear head's output width)."""
    width = getattr(getattr(model, "head", None), "out_features", None)
    if width is None:
        raise ValueError(f"teacher {type(model).__name__} has no linear head `head`: a classlab Classifier expected")
    return int(width)


@register_method("distill", "kd")
class KD(Method):
    requires_teacher = True          # ``kd`` and ``nd_kd`` cannot run without one
    resizable_buffers: tuple[str, ...] = ()  # buffers sized at run time (loaded at the saved size)

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        self.register_module("teacher", None)
        self.teacher_meta: dict = {}
        self.total_steps: int | None = None  # known from the loader in ``on_train_start``

    # --- the teacher ------------------------------------------------------------------
    def set_teacher(self, teacher: nn.Module, meta: dict) -> None:
        width = head_width(teacher)
        if width != self.num_classes:
            raise ValueError(f"method {self.family}/{self.name}: the teacher's head predicts {width} classes, the "
                             f"student {self.num_classes}: the teacher's classes differ from the student's")
        teacher.requires_grad_(False)
        device = next(self.model.parameters()).device
        self.teacher = teacher.to(device).eval()
        self.teacher_meta = dict(meta or {})

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: dropout off, BatchNorm statistics fixed
        return self

    def needs_teacher(self) -> bool:
        return self.requires_teacher or float(self.hparams.get("kd_weight", 0.0)) > 0

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's penultimate features and logits for ``x``."""
        features = self.teacher.features(x)
        return features, self.teacher.head(features)

    # --- the run ----------------------------------------------------------------------
    def on_train_start(self, loader) -> None:
        if self.teacher is None and self.needs_teacher():
            raise ValueError(f"method {self.family}/{self.name} needs a teacher: train it with --teacher model.pt")
        self.total_steps = int(self.hparams.get("epochs", 1)) * len(loader)

    def kd_factor(self) -> float:
        """The KD weight's warm-up: min(1, step / (kd_warmup_frac * total steps)); 1 without warm-up."""
        frac = float(self.hparams.get("kd_warmup_frac", 0.0))
        if frac <= 0 or not self.total_steps:
            return 1.0
        return min(1.0, self.global_step / (frac * self.total_steps))

    def ce_and_kd(self, logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                  logs: dict) -> torch.Tensor:
        """w_ce CE(s, y) + w_kd * warm-up * T^2 KL(p_t || p_s) (the KD term only where a teacher is given)."""
        hp = self.hparams
        loss = float(hp.get("ce_weight", 1.0)) * F.cross_entropy(logits, y, label_smoothing=hp.get("label_smoothing", 0.0))
        kd_weight = float(hp.get("kd_weight", 0.0))
        if teacher_logits is not None and kd_weight > 0:
            kd = kd_term(logits, teacher_logits, float(hp.get("temperature", 4.0)))
            loss = loss + kd_weight * self.kd_factor() * kd
            logs["kd"] = kd.detach()
        return loss

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        logits = self.model(x)
        logs = {"logits": logits.detach()}
        teacher_logits = self.teacher_outputs(x)[1] if self.teacher is not None else None
        # L = w_ce CE(s, y) + w_kd T^2 KL(softmax(t/T) || softmax(s/T))
        return self.ce_and_kd(logits, y, teacher_logits, logs), logs

    # --- checkpoints ------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a buffer sized at run time (class centres, aspect scores) takes the saved size before loading
        for name in self.resizable_buffers:
            key = prefix + name
            if key in state_dict and getattr(self, name).shape != state_dict[key].shape:
                current = getattr(self, name)
                setattr(self, name, torch.zeros_like(state_dict[key], dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
