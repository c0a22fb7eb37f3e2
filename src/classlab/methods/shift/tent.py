"""TENT: Wang, Shelhamer, Liu, Olshausen and Darrell, "Tent: Fully Test-Time Adaptation by
Entropy Minimization", ICLR 2021.

On each test batch the model predicts with BatchNorm normalising by the batch's own statistics,
and one gradient step minimises the mean Shannon entropy of those predictions,

    L = (1 / B) sum_i H(p_i),   H(p) = - sum_c p_c log p_c,   p_i = softmax(f(x_i)),

with respect to the BN affine parameters (scale gamma, shift beta) only; every other parameter
is frozen and the running statistics are not used. The prediction returned is the output of the
forward pass the step uses (TENT's online order: predict, then update). Optimiser: the paper's
CIFAR setting, Adam with lr 1e-3, betas (0.9, 0.999), no weight decay, one step per batch
(``hparams`` from config/methods/shift/tent.yaml). ``reset`` restores the source weights and a
fresh optimiser state.
"""
from __future__ import annotations

import torch

from classlab.methods.base import build_optimizer
from classlab.methods.registry import register_method
from classlab.methods.shift_learner import TestTimeMethod
from classlab.methods.shift.bn_adapt import bn_affine_parameters, require_batchnorm, use_batch_statistics


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) = - sum_c p_c log p_c per row."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


@register_method("shift", "tent")
class Tent(TestTimeMethod):
    def setup(self) -> None:
        require_batchnorm(self.model, self.name)
        self.model.requires_grad_(False)
        use_batch_statistics(self.model)
        params = bn_affine_parameters(self.model)
        if not params:
            raise ValueError(f"method shift/{self.name} trains the BN affine parameters; the model's BN layers "
                             f"have none (affine=False)")
        for p in params:
            p.requires_grad_(True)
        self.optimizer = build_optimizer(params, self.hparams, default="adam")

    def adaptation_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of one forward pass on the batch."""
        logits = self.model(x)
        return softmax_entropy(logits).mean(0), logits

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            loss, logits = self.adaptation_loss(x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return logits.detach()
