"""DER: a dynamically expandable representation, one new feature extractor per task.

Yan, Xie, He, "DER: Dynamically Expandable Representation for Class Incremental Learning",
CVPR 2021. At task t the extractors Phi_1..Phi_{t-1} are frozen and a new extractor Phi_t
(same architecture, fresh weights) is added; the super-feature is the concatenation
u = [Phi_1(x), ..., Phi_t(x)] and a classifier H_t over u covers all seen classes. An
auxiliary classifier H_a over the new extractor's features alone sees |new classes| + 1
outputs (all old classes merged into one), which pushes Phi_t to learn what is new:

    L = CE(H_t(u)|_{seen}, y) + lambda_a * CE(H_a(Phi_t(x)), y_a),
    y_a = 0 if y is an old class, 1 + (index of y among the new classes) otherwise.

The training set is the task's samples plus the protocol's exemplar memory; lambda_a = 1 as
in the paper. H_t is rebuilt in ``begin_task`` with an input of t * D features, the weights of
H_{t-1} copied into the first (t-1) * D columns (the new columns start at zero, so the old
classes' logits are unchanged at the start of the task).

Not implemented: the channel-level masks with the sparsity loss (the pruning of Phi_t) and the
class-balanced classifier re-training after each task ("classifier learning" stage).

Structure grows per task: extractors live in an ``nn.ModuleList`` and every module of task t is
created in ``begin_task(t)`` (replayed on resume before the checkpoint is loaded). All random
draws of task t's new modules (fresh extractor, auxiliary head) come from the seed
``init_seed + 1000 t`` (``init_seed``: a buffer drawn once at construction), so a resumed run
creates the same modules as an uninterrupted one. Old extractors are kept
frozen and in eval mode (their BatchNorm statistics do not move).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner


def fresh_copy(module: nn.Module) -> nn.Module:
    """The same architecture with re-initialised weights: reset_parameters of every submodule,
    then timm's ``init_weights`` where the model has one (draws from the global RNG)."""
    new = copy.deepcopy(module)
    for m in new.modules():
        if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
            m.reset_parameters()
    if hasattr(new, "init_weights") and callable(new.init_weights):
        new.init_weights()
    return new.requires_grad_(True)


def aux_targets(y: torch.Tensor, new_classes: torch.Tensor) -> torch.Tensor:
    """y_a = 0 for old classes, 1 + position of y in ``new_classes`` for new ones."""
    match = y[:, None] == new_classes[None, :]
    return torch.where(match.any(1), match.float().argmax(1) + 1, torch.zeros_like(y))


@register_method("incremental", "der")
class DER(IncrementalLearner):
    uses_memory = True

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.dim = int(self.model.num_features)
        self.extractors = nn.ModuleList()
        self.fc = None
        self.aux_fc = None
        self.register_buffer("init_seed", torch.randint(0, 2**31 - 1, (1,)))
        self.register_buffer("new_classes", torch.zeros(0, dtype=torch.long), persistent=False)

    def begin_task(self, task_id, new_classes, seen_classes):
        super().begin_task(task_id, new_classes, seen_classes)
        dev = self.seen_mask.device
        for ext in self.extractors:  # Phi_1..Phi_{t-1}: frozen
            ext.requires_grad_(False).eval()
        # every draw of this task's new modules comes from (init_seed, t): a resumed run
        # creates the same modules as an uninterrupted one, whatever the global RNG holds
        devices = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(int(self.init_seed) + 1000 * task_id)
            if len(self.extractors) == 0:
                new = self.model.backbone  # the first extractor is the model's (so --init applies)
            else:
                new = fresh_copy(self.model.backbone)
            self.extractors.append(new.to(dev))
            old_fc = self.fc
            fc = nn.Linear(self.dim * len(self.extractors), self.num_classes).to(dev)
            with torch.no_grad():
                if old_fc is None:
                    fc.load_state_dict(self.model.head.state_dict())
                else:  # keep H_{t-1} on the old features; the new features start with zero weight
                    fc.weight.zero_()
                    fc.weight[:, :old_fc.in_features] = old_fc.weight
                    fc.bias.copy_(old_fc.bias)
            self.fc = fc
            self.aux_fc = nn.Linear(self.dim, len(new_classes) + 1).to(dev) if task_id > 0 else None
        self.new_classes = torch.tensor(sorted(new_classes), dtype=torch.long, device=dev)

    def param_groups(self):
        params = list(self.extractors[-1].parameters()) + list(self.fc.parameters())
        if self.aux_fc is not None:
            params += list(self.aux_fc.parameters())
        return [{"params": [p for p in params if p.requires_grad]}]

    def train(self, mode: bool = True):
        super().train(mode)
        for ext in list(self.extractors)[:-1]:
            ext.eval()
        return self

    def features(self, x):
        # u = [Phi_1(x), ..., Phi_t(x)]
        return torch.cat([ext(x) for ext in self.extractors], dim=1)

    def predict(self, x):
        return self.fc(self.features(x))

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        feats = self.features(x)
        logits = self.mask_unseen(self.fc(feats))
        loss = F.cross_entropy(logits, y)
        if self.aux_fc is not None:
            # L = CE(H_t(u), y) + lambda_a * CE(H_a(Phi_t(x)), y_a), old classes merged into y_a = 0
            aux = self.aux_fc(feats[:, -self.dim:])
            loss = loss + float(self.hparams.get("aux_weight", 1.0)) * F.cross_entropy(
                aux, aux_targets(y, self.new_classes))
        return loss, {"logits": logits.detach()}
