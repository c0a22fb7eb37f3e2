"""SAM: sharpness-aware minimisation of the cross-entropy.

Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021; the SAM arm of Nguyen et al., "Changing the Training Data
Distribution to Reduce Simplicity Bias Improves In-distribution Generalization", NeurIPS 2024.

SAM minimises max_{||e|| <= rho} L(w + e). To first order the inner maximiser is
    e(w) = rho g / ||g||_2,   g = grad L(w)  (the norm over all trained parameters together),
and the step uses the gradient at the perturbed point:
    w <- w - lr * step_rule(grad L(w + e(w)))
where the step rule is whatever ``optimizer`` names (SGD with momentum, as the paper). Each step
costs two forward and two backward passes: ``optimizer_step`` backpropagates the loss at w, moves
to w + e, re-evaluates the batch through ``closure`` (``training_step`` is pure), backpropagates,
moves back to w and steps. BatchNorm running statistics are restored after the second forward,
so they are updated once per step, from the unperturbed weights.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.supervised.erm import ERM


@contextmanager
def frozen_bn_statistics(model: nn.Module):
    """Restore every BatchNorm's running mean, variance and batch count on exit."""
    saved = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                buf = getattr(module, name, None)
                if buf is not None:
                    saved.append((buf, buf.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


@register_method("supervised", "sam")
class SAM(ERM):
    def optimizer_step(self, loss, optimizer, closure):
        rho = float(self.hparams.get("rho", 0.05))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            scale = rho / (grad_norm + 1e-12)
            # e(w) = rho g / ||g||_2: the first-order worst case within the rho-ball
            origin = [p.detach().clone() for p in params]
            for p in params:
                p.add_(p.grad * scale)
        optimizer.zero_grad(set_to_none=True)
        # the statistics come back after the backward: BatchNorm's backward checks its running buffers
        with frozen_bn_statistics(self.model):
            perturbed = closure()  # L(w + e), same batch (training_step is pure)
            perturbed.backward()  # grad L(w + e): the gradient SAM steps with
        with torch.no_grad():
            for p, w in zip(params, origin):
                p.copy_(w)  # back to w exactly (w + e - e would round)
        if self.hparams.get("grad_clip", 0) > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           self.hparams["grad_clip"])
        optimizer.step()
