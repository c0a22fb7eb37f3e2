"""CAFA: Jung, Lee, Kim, Shaban, Boots and Choo, "CAFA: Class-Aware Feature Alignment for
Test-Time Adaptation", ICCV 2023 (arXiv 2206.00205).

Before adaptation, the source model's pooled features g(x) on (a subset of) its training set give
one Gaussian per class, N(mu_c, Sigma_c) (``classlab.methods.source_stats``). At test time
a feature is compared with each class through the squared Mahalanobis distance

    D(x; mu, Sigma) = (g(x) - mu)^T Sigma^{-1} (g(x) - mu),

and with the model's prediction y_hat = argmax_c f(x)_c as pseudo-label (no gradient through it)

    D_intra(x) = D(x; mu_{y_hat}, Sigma_{y_hat})           (pull x to its predicted class)
    D_inter(x) = sum_{c != y_hat} D(x; mu_c, Sigma_c)      (push x from the other classes)

The two are combined as a ratio, which needs no weighting hyperparameter:

    L_CAFA = (1 / B) sum_i log( D_intra(x_i) / sum_{c=1}^{C} D(x_i; mu_c, Sigma_c) )

(the denominator is D_intra + D_inter, so the ratio lies in (0, 1]). As in TENT, BatchNorm
normalises with the test batch's statistics, only the BN affine parameters are updated, one step
per batch, and the prediction is the output of the forward pass the step uses; the optimiser is
TENT's (CAFA follows TENT's setup), from config/methods/shift/cafa.yaml.
"""
from __future__ import annotations

import torch

from classlab.methods.registry import register_method
from classlab.methods.shift.tent import Tent


def mahalanobis_sq(features: torch.Tensor, mu: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """D[i, c] = (f_i - mu_c)^T P_c (f_i - mu_c) for features (B, D), mu (C, D), precision P (C, D, D)."""
    diff = features[:, None, :] - mu[None, :, :]                 # (B, C, D)
    return torch.einsum("bcd,cde,bce->bc", diff, precision, diff)


def cafa_loss(features: torch.Tensor, logits: torch.Tensor, mu: torch.Tensor, precision: torch.Tensor,
              tiny: float = 1e-12) -> torch.Tensor:
    """L_CAFA = mean_i log( D_intra(x_i) / sum_c D(x_i; mu_c, Sigma_c) ), pseudo-labels argmax of logits."""
    dist = mahalanobis_sq(features, mu, precision)                      # (B, C)
    pseudo = logits.detach().argmax(1)                                  # y_hat: no gradient
    intra = dist.gather(1, pseudo[:, None]).squeeze(1)                  # D_intra
    total = dist.sum(1)                                                 # D_intra + D_inter
    return (torch.log(intra.clamp_min(tiny)) - torch.log(total.clamp_min(tiny))).mean()


@register_method("shift", "cafa")
class Cafa(Tent):
    needs_source_stats = True

    def setup(self) -> None:
        super().setup()
        stats = self.source_stats
        mu = torch.as_tensor(stats["mu"])
        precision = stats.get("precision")
        precision = torch.linalg.inv(torch.as_tensor(stats["cov"]).double()) if precision is None \
            else torch.as_tensor(precision)
        dim = int(getattr(self.model, "num_features", mu.shape[-1]))
        if mu.shape != (self.num_classes, dim) or precision.shape != (self.num_classes, dim, dim):
            raise ValueError(f"source_stats: mu {tuple(mu.shape)} and precision {tuple(precision.shape)} do not "
                             f"match {self.num_classes} classes of {dim}-d features")
        self._mu, self._precision = mu.float(), precision.float()

    def adaptation_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        logits = self.model.head(features)
        if self._mu.device != features.device:
            self._mu, self._precision = self._mu.to(features.device), self._precision.to(features.device)
        return cafa_loss(features.float(), logits, self._mu, self._precision), logits
