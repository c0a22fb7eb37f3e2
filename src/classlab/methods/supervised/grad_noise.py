"""Annealed Gaussian gradient noise.

Neelakantan, Vilnis, Le, Sutskever, Kaiser, Kurach, Martens, "Adding Gradient Noise Improves
Learning for Very Deep Networks", arXiv 1511.06807, 2015 (ICLR 2016 workshop).

The loss is ERM's cross-entropy. After backpropagation and before the optimizer's step, every
trained parameter's gradient gets fresh Gaussian noise whose variance decays with the step t:
    g_t <- g_t + N(0, sigma_t^2),   sigma_t^2 = eta / (1 + t)^gamma
with gamma = 0.55 and eta chosen per task from {0.01, 0.3, 1.0}.
t is ``global_step`` (the optimizer step counted over the whole run). The noise comes from torch's
global generator, which the engine reseeds from (seed, epoch) and checkpoints, so a resumed run
draws the same noise. Gradient clipping (``grad_clip``), where set, applies after the noise.
"""
from __future__ import annotations

import math

import torch

from classlab.methods.registry import register_method
from classlab.methods.supervised.erm import ERM


def noise_std(step: int, eta: float, gamma: float) -> float:
    """sigma_t = sqrt(eta / (1 + t)^gamma), the standard deviation of the noise at step t."""
    return math.sqrt(eta / (1.0 + step) ** gamma)


@register_method("supervised", "grad_noise")
class GradNoise(ERM):
    def optimizer_step(self, loss, optimizer, closure):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        std = noise_std(self.global_step, float(self.hparams.get("grad_noise_eta", 0.01)),
                        float(self.hparams.get("grad_noise_gamma", 0.55)))
        if std > 0:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            # g <- g + N(0, eta / (1 + t)^gamma)
                            p.grad.add_(torch.randn_like(p.grad), alpha=std)
        if self.hparams.get("grad_clip", 0) > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.hparams["grad_clip"])
        optimizer.step()
