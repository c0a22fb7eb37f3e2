"""GRAM: a meta-learned prompt initialisation and a learned regulator of the prompt's gradient.

Li, Gao, Wei, Tang, Zhang, Li, Ji, Tian, Chua and Zhuang, "Gradient-Regulated Meta-Prompt Learning for
Generalizable Vision-Language Models", ICCV 2023 (arXiv 2303.06571). GRAM is model-agnostic: it wraps
a prompt-tuning method (here CoOp's context theta) and meta-learns two things with MAML's bi-level
objective: the initialisation theta of the context and a light gradient-regulating function M_beta,

    inner (a task's support set):   theta' = theta - alpha * M_beta( grad_theta L_sup(theta) )
    outer (the same task's query):  min_{theta, beta}  L_qry(theta'),

so that one regulated step on one set of images improves the prompt on other images: M_beta learns to
damp the directions of the raw gradient that fit the support images only (the paper's "domain-specific"
directions) and to keep those that carry over. Downstream, the prompt is tuned from the meta-learned
theta with the regulated gradient, theta <- theta - lr * M_beta(grad), beta frozen.

How it runs here (every line below that is not in the paper is our reading, said as such):

- **Meta-training data.** The paper meta-trains on unlabelled web image-text pairs (CC3M organised into
  domains by its cross-modal hierarchical clustering). We have no such data offline, so we meta-train on
  the few-shot BASE classes themselves: a task is a random subset of ``task_ways`` base classes (0: all
  of them), its images the batch's images of those classes, classified among those classes only. This is
  a substitute for the paper's data and task construction, not a reproduction of it; the new classes are
  never seen.
- **Two phases in one run.** The first ``meta_epochs`` epochs are meta-training (the loss of a step is
  the query loss after the regulated inner step); the remaining ``epochs - meta_epochs`` are CoOp's
  tuning from the meta-learned context with the regulated gradient (``optimizer_step``). The paper's
  meta-training is a separate stage on other data before the downstream tuning; the engine's base-to-novel
  protocol runs one ``fit``, so the phase is the epoch index (set in ``on_epoch_start``).
- **Support / query.** Each step splits the task's images of the batch into two disjoint halves
  (alternate images of each class): support for the inner step, query for the outer loss. The paper draws
  the query from another domain than the support (its clusters); without domains, the halves are disjoint
  images of the same classes, as in plain MAML.
- **First order.** ``first_order: true`` (our CPU default) treats the support gradient as a constant in
  the outer loss (FOMAML): d L_qry / d theta ~= grad L_qry(theta'); beta still receives its exact
  first-order meta-gradient -alpha * dM_beta(g)/dbeta^T grad L_qry(theta'). ``first_order: false``
  differentiates through the inner gradient (second order through the text tower).
- **The regulating function.** The paper calls M_beta a lightweight function that turns the raw gradient
  into a direction consistent across domains; its exact parameterisation could not be found offline.
  Ours is a gradient-conditioned per-coordinate gate, the identity at initialisation:

      r = g / rms(g),   gamma = 2 * sigmoid(w * r + b),   M_beta(g) = gamma * g,   beta = (w, b) = (0, 0) at start,

  with w, b shaped like the context. The gate never flips a coordinate's sign; it re-weights coordinates,
  which turns (aligns) the direction of the step. Its raw meta-gradient has the scale alpha * |g_sup| *
  |g_qry| (about 1e-8 here), which no fixed SGD rate serves, so its gradient is divided by its RMS before
  the step (a normalised-gradient step of size ``regulator_lr``); our choice.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from classlab.data.loader import mix_seed
from classlab.methods.registry import register_method
from classlab.methods.vlm.coop import CoOp

_TASKS = 0x6A4D  # stream tag of the task draws


class GradientRegulator(nn.Module):
    """M_beta: a per-coordinate gate on a gradient shaped like the context, conditioned on that gradient."""

    def __init__(self, shape, eps: float = 1e-12):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(shape))  # w: how the gate reacts to the gradient itself
        self.bias = nn.Parameter(torch.zeros(shape))    # b: the gate's resting logit
        self.eps = float(eps)

    def gate(self, grad: torch.Tensor) -> torch.Tensor:
        r = grad / (grad.pow(2).mean().sqrt() + self.eps)        # r = g / rms(g): the gate is scale-free
        return 2.0 * torch.sigmoid(self.weight * r + self.bias)  # gamma in (0, 2); 1 at w = b = 0

    def forward(self, grad: torch.Tensor) -> torch.Tensor:
        return self.gate(grad) * grad                            # M_beta(g) = gamma * g


def task_split(labels: torch.Tensor, classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query positions of the batch rows whose label is in ``classes``: the rows sorted by
    label (stable), alternate ones to each half, so each class's images split evenly and the halves are
    disjoint. One row only: it is both (the step is then a plain step on it)."""
    member = torch.isin(labels, torch.as_tensor(classes, device=labels.device))
    rows = torch.nonzero(member).flatten()
    rows = rows[torch.sort(labels[rows], stable=True).indices]
    if len(rows) < 2:
        return rows, rows
    return rows[0::2], rows[1::2]


@register_method("vlm", "gram")
class GRAM(CoOp):
    def build(self, class_names):
        super().build(class_names)
        self.regulator = GradientRegulator(self.prompt.ctx.shape).to(self.clip.logit_scale.device)
        self.epoch = 0

    # --- phases --------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def meta_phase(self) -> bool:
        return getattr(self, "epoch", 0) < int(self.hparams.get("meta_epochs", 0))

    def param_groups(self):
        return [{"params": [self.prompt.ctx]},
                {"params": list(self.regulator.parameters()), "lr": float(self.hparams["regulator_lr"]),
                 "weight_decay": 0.0}]

    # --- the meta-learning pieces --------------------------------------------------------
    def task_classes(self, labels: torch.Tensor, step: int) -> list[int]:
        """The step's task: ``task_ways`` base classes (all with 0), drawn from those present in the batch
        first (so the task has images), topped up with absent base classes as extra candidates; the draw
        depends on (seed, step) only, so the step stays a pure function of the batch."""
        base = list(self.train_classes)
        ways = int(self.hparams.get("task_ways", 0))
        ways = len(base) if ways <= 0 else min(max(ways, 2), len(base))
        gen = torch.Generator().manual_seed(mix_seed(int(self.hparams.get("seed", 0)), int(step), _TASKS))
        present = sorted(set(labels.tolist()) & set(base))
        absent = [c for c in base if c not in set(present)]
        chosen = [present[i] for i in torch.randperm(len(present), generator=gen).tolist()][:ways]
        chosen += [absent[i] for i in torch.randperm(len(absent), generator=gen).tolist()][:ways - len(chosen)]
        return sorted(chosen)

    def task_loss(self, ctx: torch.Tensor, image: torch.Tensor, labels: torch.Tensor,
                  classes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of ``image`` among ``classes`` with the context ``ctx`` in place of the learned one (the
        prompt learner is called functionally: its parameter is not touched), and the logits."""
        position = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([position[int(c)] for c in labels.tolist()], dtype=torch.long, device=image.device)
        sentences = functional_call(self.prompt, {"ctx": ctx}, (None, classes))
        logits = self.clip.logits(image, self.clip.encode_text(sentences))
        return F.cross_entropy(logits, targets), logits

    def inner_step(self, image: torch.Tensor, labels: torch.Tensor, classes: list[int],
                   first_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """theta' = theta - alpha * M_beta(grad_theta L_sup(theta)), computed without changing theta, and
        the support loss. ``first_order``: the support gradient is a constant of the outer loss."""
        theta = self.prompt.ctx
        support_loss, _ = self.task_loss(theta, image, labels, classes)
        (grad,) = torch.autograd.grad(support_loss, theta, create_graph=not first_order)
        if first_order:
            grad = grad.detach()
        adapted = theta - float(self.hparams["inner_lr"]) * self.regulator(grad)  # the regulated inner step
        return adapted, support_loss

    # --- the engine's hooks --------------------------------------------------------------
    def training_step(self, batch: dict):
        if not self.meta_phase:
            return super().training_step(batch)  # downstream phase: CoOp's loss (the gradient is regulated below)
        x, y = batch["x"], batch["y"]
        if bool((~torch.isin(y, torch.as_tensor(self.train_classes, device=y.device))).any()):
            raise ValueError(f"a training label is outside the training classes {self.train_classes}")
        classes = self.task_classes(y, self.global_step)
        support, query = task_split(y, classes)
        image = self.encode_image(x)
        first_order = bool(self.hparams.get("first_order", True))
        # second order differentiates the tower's attention twice: only its math kernel has that derivative
        kernel = contextlib.nullcontext() if first_order else sdpa_kernel([SDPBackend.MATH])
        with kernel:
            adapted, support_loss = self.inner_step(image[support], y[support], classes, first_order=first_order)
            query_loss, logits = self.task_loss(adapted, image[query], y[query], classes)  # L_qry(theta')
        position = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([position[int(c)] for c in y[query].tolist()], device=logits.device)
        acc = float((logits.argmax(1) == targets).float().mean())
        with torch.no_grad():
            gate = self.regulator.gate(torch.ones_like(self.prompt.ctx)).mean()
        return query_loss, {"ce": float(query_loss.detach()), "support_ce": float(support_loss.detach()),
                            "train_acc": acc, "task_ways": len(classes), "gate_mean": float(gate)}

    def optimizer_step(self, loss, optimizer, closure):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        reg = [p for p in self.regulator.parameters() if p.grad is not None]
        with torch.no_grad():
            if self.meta_phase:
                # the regulator's meta-gradient is tiny (alpha |g_sup| |g_qry|): normalised to unit RMS
                for p in reg:
                    p.grad.div_(p.grad.pow(2).mean().sqrt() + 1e-12)
            else:
                ctx = self.prompt.ctx
                if ctx.grad is not None:
                    ctx.grad.copy_(self.regulator(ctx.grad))  # downstream: theta <- theta - lr * M_beta(g)
                for p in reg:  # beta is frozen after meta-training
                    p.grad = None
        if float(self.hparams.get("grad_clip", 0) or 0) > 0 and self.prompt.ctx.grad is not None:
            # the prompt's gradient only: the regulator's is already normalised
            torch.nn.utils.clip_grad_norm_([self.prompt.ctx], float(self.hparams["grad_clip"]))
        optimizer.step()
