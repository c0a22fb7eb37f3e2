"""EWC: elastic weight consolidation with an accumulated (online) diagonal Fisher.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
After each task the parameters theta* and the diagonal of the empirical Fisher information
F_i = E_(x,y)[(d log p(y|x; theta) / d theta_i)^2] at theta* are kept; while learning the next
task a quadratic penalty keeps every parameter near theta* in proportion to its importance:

    L(theta) = CE(f(x)|_{seen classes}, y) + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2.

As in the class-incremental survey baselines (Masana et al., "Class-incremental learning:
survey and performance evaluation", TPAMI 2022 / FACIL; Zhou et al., "Deep Class-Incremental
Learning: A Survey", 2023 / PyCIL), one Fisher is kept and merged across tasks:

    F <- alpha * F_old + (1 - alpha) * F_new      (F <- F_new after the first task),

with a fixed ``alpha`` (FACIL: 0.5) or ``fisher_alpha: auto``, alpha = |old classes| / |seen
classes| (PyCIL; FACIL's alpha = -1). F_new is the exact empirical Fisher on the task's
training samples: the mean over samples of the squared per-sample gradient of the masked
cross-entropy with the true label (per-sample gradients through ``torch.func``; the model in
eval mode, no augmentation). Every trainable parameter of the model, head included, is
regularised (rows of the head for classes not yet seen get zero Fisher since their logits are
masked). ``fisher_max`` > 0 clamps F_new as PyCIL does (off by default).

Note on lambda: with plain SGD the penalty is a quadratic of curvature lambda * F_i, which
diverges once lr * lambda * max_i F_i exceeds ~2(1 + momentum). On a small network F_i is
large (up to ~3 for the first conv of the digits convnet), so the survey's lambda = 5000
(sized for ResNet-32 on CIFAR) is lowered in the YAML for the embedded data.

theta* and F are flat buffers of a fixed length, so ``state_dict`` has one structure.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner, TaskContext


def ewc_penalty(theta: torch.Tensor, theta_star: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """(1/2) * sum_i F_i (theta_i - theta*_i)^2 (without lambda)."""
    return 0.5 * (fisher * (theta - theta_star).pow(2)).sum()


def merge_fisher(old: torch.Tensor, new: torch.Tensor, alpha: float) -> torch.Tensor:
    """F = alpha * F_old + (1 - alpha) * F_new."""
    return alpha * old + (1.0 - alpha) * new


def empirical_fisher(model: torch.nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor,
                     mask: torch.Tensor | None = None, chunk: int = 64) -> torch.Tensor:
    """Flat diagonal empirical Fisher: (1/N) sum_n (d/d theta CE(f(x_n), y_n))^2 over ``names``.

    Per-sample gradients with ``torch.func`` (``model`` is put in eval mode so that BatchNorm
    uses its running statistics); ``mask`` (bool over classes) masks the logits as in training.
    """
    was_training = model.training
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def loss_one(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi[None],))
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        return F.cross_entropy(logits, yi[None])

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for lo in range(0, len(x), chunk):
        g = per_sample(params, x[lo:lo + chunk], y[lo:lo + chunk])
        for n in total:
            total[n] += g[n].pow(2).sum(0)  # sum_n g_n^2
    model.train(was_training)
    return torch.cat([(total[n] / max(len(x), 1)).reshape(-1) for n in names])


@register_method("incremental", "ewc")
class EWC(IncrementalLearner):

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.ewc_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        theta = self._theta().detach()
        self.register_buffer("theta_star", theta.clone())
        self.register_buffer("fisher", torch.zeros_like(theta))
        self._norm = None  # (mean, std) of the loader, to normalise images in end_task

    def _theta(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].reshape(-1) for n in self.ewc_names])

    def on_train_start(self, loader) -> None:
        self._norm = (loader.mean, loader.std)

    def training_step(self, batch):
        logits = self.mask_unseen(self.model(batch["x"]))
        loss = F.cross_entropy(logits, batch["y"])
        if self.task_id > 0:
            # L = CE + (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2
            loss = loss + float(self.hparams.get("lamb", 5000.0)) * ewc_penalty(self._theta(), self.theta_star,
                                                                                  self.fisher)
        return loss, {"logits": logits.detach()}

    def _alpha(self, context: TaskContext) -> float:
        alpha = self.hparams.get("fisher_alpha", 0.5)
        if alpha == "auto":  # |old classes| / |seen classes|
            return (len(context.seen_classes) - len(context.new_classes)) / len(context.seen_classes)
        return float(alpha)

    @torch.no_grad()
    def end_task(self, task_id: int, context: TaskContext) -> None:
        if self._norm is None:
            raise RuntimeError("ewc: end_task before any training loader was seen (no normalisation known)")
        mean, std = self._norm
        idx = context.task_indices
        x = (context.train_x[idx].to(context.device).float() - mean) / std
        y = context.train_y[idx].to(context.device)
        with torch.enable_grad():
            f_new = empirical_fisher(self.model, self.ewc_names, x, y, self.seen_mask,
                                     int(self.hparams.get("fisher_batch", 64)))
        fmax = float(self.hparams.get("fisher_max", 0.0))
        if fmax > 0:  # PyCIL's clamp of the Fisher (off by default)
            f_new = f_new.clamp(max=fmax)
        # F = alpha * F_old + (1 - alpha) * F_new  (the first task: F = F_new)
        self.fisher.copy_(f_new if task_id == 0 else merge_fisher(self.fisher, f_new, self._alpha(context)))
        self.theta_star.copy_(self._theta().detach())
