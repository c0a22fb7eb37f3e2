"""Deep CORAL: ERM + alignment of the penultimate features' first two moments across domains.

Sun and Saenko, "Deep CORAL: Correlation Alignment for Deep Domain Adaptation", ECCV 2016
workshops; the multi-domain form of DomainBed (Gulrajani and Lopez-Paz, ICLR 2021).

With phi_e the penultimate features of domain e's minibatch (n_e rows, d columns),
    mu_e = mean of the rows,   C_e = (phi_e - mu_e)^T (phi_e - mu_e) / (n_e - 1),
    D(i, j) = mean_k (mu_i - mu_j)_k^2 + mean_{k,l} (C_i - C_j)_{kl}^2,
    L = 1/E sum_e R_e + gamma * mean_{i < j} D(i, j),
where R_e is domain e's mean cross-entropy (``coral_gamma`` is DomainBed's ``mmd_gamma``).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.shift.erm import ERM


def coral_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D(a, b): mean squared difference of the means plus of the (unbiased) covariances."""
    mu_a, mu_b = a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    ca, cb = a - mu_a, b - mu_b
    cov_a = ca.t() @ ca / (len(a) - 1)
    cov_b = cb.t() @ cb / (len(b) - 1)
    return (mu_a - mu_b).pow(2).mean() + (cov_a - cov_b).pow(2).mean()


def coral_penalty(features: list[torch.Tensor]) -> torch.Tensor:
    """mean over domain pairs i < j of D(phi_i, phi_j); 0 with a single domain."""
    pairs = list(itertools.combinations(range(len(features)), 2))
    if not pairs:
        return features[0].new_zeros(())
    return torch.stack([coral_distance(features[i], features[j]) for i, j in pairs]).mean()


@register_method("shift", "coral")
class CORAL(ERM):
    def training_step(self, batch):
        feats, logits = self.features_and_logits(batch["x"])
        parts = self.split_by_domain(batch, feats, logits, batch["y"])
        # 1/E sum_e R_e (equal-size domains: the mean CE of the batch)
        nll = torch.stack([F.cross_entropy(z, y) for _, z, y in parts]).mean()
        penalty = coral_penalty([f for f, _, _ in parts])
        loss = nll + float(self.hparams["coral_gamma"]) * penalty
        return loss, {"logits": logits.detach(), "nll": nll.detach(), "penalty": penalty.detach()}
