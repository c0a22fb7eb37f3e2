"""Z-loss: a classification loss invariant to any shift and positive rescaling of the outputs.

de Brébisson & Vincent, "The Z-loss: a shift and scale invariant classification loss belonging to
the Spherical Family", arXiv:1604.08859, 2016.

The K outputs o of the network are standardised over the class dimension,
    mu = 1/K sum_k o_k,   sigma = sqrt(1/K sum_k o_k^2 - mu^2),   z = (o - mu) / sigma,
and the loss of the target class y is a softplus of its standardised score,
    L(o, y) = 1/a softplus(a (b - z_y)) = 1/a log(1 + exp(a (b - z_y))).
Since z is unchanged by o -> alpha o + beta (alpha > 0), so is L: only the ranking-like
geometry of the outputs matters, which is why the paper pairs it with top-k scores. ``b`` places
the knee of the softplus (z_y cannot exceed sqrt(K - 1)), ``a`` its sharpness.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method


def z_scores(logits: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """z = (o - mean o) / std o over the class dimension (population std, as the paper's sigma).
    ``eps`` keeps the gradient finite when every output is equal; it is far below any variance a
    network produces, so the invariance holds to float precision."""
    logits = logits.float()
    mu = logits.mean(dim=1, keepdim=True)
    var = (logits - mu).pow(2).mean(dim=1, keepdim=True)
    return (logits - mu) / torch.sqrt(var + eps)


def z_loss(logits: torch.Tensor, y: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """Mean over the batch of L = softplus(a (b - z_y)) / a."""
    z_y = z_scores(logits).gather(1, y[:, None]).squeeze(1)
    # L = 1/a log(1 + exp(a (b - z_y)))
    return (F.softplus(a * (b - z_y)) / a).mean()


@register_method("supervised", "z_loss")
class ZLoss(Method):
    def training_step(self, batch):
        logits = self.model(batch["x"])
        loss = z_loss(logits, batch["y"], float(self.hparams["z_a"]), float(self.hparams["z_b"]))
        return loss, {"logits": logits.detach()}
