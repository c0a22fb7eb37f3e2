"""CRKD: UNO plus the distillation of each novel sample's relation to the known classes.

Gu, Zhang, Xu and He, "Class-relation Knowledge Distillation for Novel Class Discovery", ICCV 2023
(official code: kleinzcy/Cr-KD-NCD).

The teacher is the model trained on the known classes, frozen: the supervised-known init (its
backbone and its head, ``init: supervised_known``), handed over by the protocol through
``set_init_model``. Its head is indexed by dataset class, so the known-class logits are read in
label index order through ``DiscoveryTask.label_classes``. For an unlabelled (novel) sample x, with
T = ``kd_temperature``:

    r(x)   = softmax(t_known(x) / T)                       the class relation (teacher)
    p(x)   = softmax(l(x) / (tau T))                       the student's known head, same view
    w(x)   = sum_{k known} softmax(s(x) / (tau T))_k       s = [l, u]: the student's mass on known classes
    w(x)  <- w(x) / mean_batch w                           (normalised to mean 1 over the batch and heads)
    L_kd   = T^2 mean_x w(x) KL(r(x) || p(x))
    L      = L_UNO + alpha L_kd,   alpha = ``kd_weight``

The weight w is the paper's learnable weighting function: it is computed by the student and is not
detached, so the gradient both pulls p towards the relation and lowers w for samples that the
student finds unlike every known class, where the relation carries little information. It is
computed per unlabelled head (s uses that head's novel logits) and averaged over heads, as the
official code does. The student's logits are cosine scores divided by UNO's tau (0.1), then by T,
as in the official code; the teacher here is a linear head trained with cross-entropy, whose logits
are already on a softmax scale, so they are divided by T only.

The official code writes the term as a cross-entropy, -sum_k r_k log p_k; the paper's KL differs
from it by the teacher's entropy, which is constant for p but, through w, weighs samples
differently. This file uses the KL, as the paper states it.

The teacher is held outside the learner's module tree: it is a frozen copy of the init checkpoint,
whose digest is part of the run's fingerprint, rebuilt from that file on every start, so it is in
no ``state_dict``, no optimizer and no saved model; ``train()`` keeps it in eval mode (its
BatchNorm statistics never move) and ``_apply`` moves it with the learner.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.discovery.uno import UNO
from classlab.methods.discovery_learner import DiscoveryTask
from classlab.methods.registry import register_method


def class_relation(teacher_logits: torch.Tensor, label_classes: torch.Tensor, temperature: float) -> torch.Tensor:
    """r = softmax(t[:, label_classes] / T): the teacher's distribution over the known classes, in
    label index order (``label_classes[k]`` is the dataset class, i.e. the teacher's column, of index k)."""
    if temperature <= 0:
        raise ValueError(f"class_relation: kd_temperature must be > 0, got {temperature}")
    if len(label_classes) == 0 or int(label_classes.max()) >= teacher_logits.shape[1]:
        raise ValueError(f"class_relation: label_classes {label_classes.tolist()} do not index the teacher's "
                         f"{teacher_logits.shape[1]} classes")
    return F.softmax(teacher_logits.float()[:, label_classes] / temperature, dim=1)


def relation_distillation(known_logits: torch.Tensor, all_logits: torch.Tensor, relation: torch.Tensor,
                          temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """T^2 mean_{head, x} w(x) KL(r(x) || softmax(l(x) / T)), w(x) = the softmax(s(x) / T) mass on the known
    columns (the first ``relation.shape[1]`` of ``all_logits``), normalised to mean 1.

    known_logits [M, K_known]; all_logits [heads, M, K_known + K_novel]; relation [M, K_known].
    Returns (the loss, the normalised weights [heads, M])."""
    num_known = relation.shape[1]
    if known_logits.shape != relation.shape or all_logits.dim() != 3 or all_logits.shape[1:2] != relation.shape[:1]:
        raise ValueError(f"relation_distillation: shapes known {tuple(known_logits.shape)}, all "
                         f"{tuple(all_logits.shape)}, relation {tuple(relation.shape)} do not agree")
    T = float(temperature)
    log_p = F.log_softmax(known_logits.float() / T, dim=1)
    # KL(r || p) = sum_k r_k (log r_k - log p_k), with 0 log 0 = 0
    kl = (torch.special.xlogy(relation, relation) - relation * log_p).sum(1)
    # w(x) = sum_{k known} softmax(s(x) / T)_k, normalised by its batch mean (not detached: learnable)
    w = F.softmax(all_logits.float() / T, dim=-1)[..., :num_known].sum(-1)
    w = w / w.mean()
    return T * T * (w * kl.unsqueeze(0)).mean(), w


@register_method("discovery", "crkd")
class CRKD(UNO):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        if float(self.hparams.get("kd_temperature", 4.0)) <= 0:
            raise ValueError(f"discovery/crkd: kd_temperature must be > 0, got {self.hparams.get('kd_temperature')}")
        self._teacher: list[nn.Module] = []  # outside the module tree (see the module docstring)
        self.label_class_index = torch.zeros(0, dtype=torch.long)

    # --- the teacher ------------------------------------------------------------------------------
    def set_init_model(self, source: nn.Module, meta: dict) -> None:
        super().set_init_model(source, meta)
        teacher = copy.deepcopy(source)
        teacher.requires_grad_(False)
        device = next(self.model.parameters()).device
        self._teacher = [teacher.to(device).eval()]

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def train(self, mode: bool = True):
        super().train(mode)
        for teacher in self._teacher:
            teacher.eval()  # frozen: BatchNorm statistics fixed, dropout off
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for teacher in self._teacher:
            teacher._apply(fn, *args, **kwargs)
        return self

    def begin_task(self, task_id: int, info: DiscoveryTask) -> None:
        super().begin_task(task_id, info)
        if self.teacher is None:
            raise ValueError("discovery/crkd: needs the model trained on the known classes as its teacher: run it "
                             "with init: supervised_known (the protocol hands the init over with set_init_model); "
                             "no init was given")
        if not self.init_trained_head():
            raise ValueError(f"discovery/crkd: the init ({self.init_meta.get('family', '')}/"
                             f"{self.init_meta.get('method', '')}) has no head trained with labels; the teacher must "
                             f"be the supervised model of the known classes (init: supervised_known)")
        known = [int(c) for c in info.label_classes[:self.num_known]]
        if len(known) < self.num_known or min(known) < 0:
            raise ValueError(f"discovery/crkd: label_classes {known} must give a dataset class for each of the "
                             f"{self.num_known} label indices")
        trained = self.init_classes()
        if trained and set(known) - set(trained):
            raise ValueError(f"discovery/crkd: the teacher's head was trained on classes {sorted(trained)}, not on the "
                             f"known classes {sorted(known)}")
        self.label_class_index = torch.tensor(known, dtype=torch.long)

    @torch.no_grad()
    def teacher_known_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's logits, all dataset classes (its head's columns)."""
        return self.teacher(x).float()

    # --- the loss ---------------------------------------------------------------------------------
    def extra_loss(self, out: dict, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
        unl = batch["y"] < 0
        if not bool(unl.any()) or float(self.hparams.get("kd_weight", 0.1)) == 0:
            return out["known"].sum() * 0.0, {}
        rows = torch.cat([unl] * len(views))  # the novel samples of every view
        T, tau = float(self.hparams.get("kd_temperature", 4.0)), self.temperature
        index = self.label_class_index.to(out["known"].device)
        relation = class_relation(self.teacher_known_logits(torch.cat(views)[rows]), index, T)  # r(x), same view
        known = out["known"][rows] / tau
        every = torch.stack([torch.cat([out["known"][rows], novel[rows]], dim=1) for novel in out["novel"]]) / tau
        # L_kd = T^2 mean_x w(x) KL(r(x) || softmax(l(x) / (tau T))),  L = L_UNO + alpha L_kd
        kd, _ = relation_distillation(known, every, relation, T)
        return float(self.hparams.get("kd_weight", 0.1)) * kd, {"l_kd": kd.detach()}
