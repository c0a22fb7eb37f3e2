"""Integrated Gradients with a black baseline.

Sundararajan, Taly, Yan, "Axiomatic Attribution for Deep Networks", ICML 2017. With F_c the logit
of the explained class, x' the baseline and x the image, per input feature i:

    IG_i(x) = (x_i - x'_i) * int_0^1 dF_c(x' + a (x - x')) / dx_i da

approximated by captum's ``IntegratedGradients`` (``multiply_by_inputs=True``) with ``n_steps``
points of the rule ``integration`` (captum's default Gauss-Legendre; the paper's Riemann sums are
``riemann_*``). Completeness: sum_i IG_i = F_c(x) - F_c(x') up to the quadrature error.

Baseline: the black image, raw 0, which in the model's normalisation is (0 - mean_c) / std_c per
channel (``saliency_method.black_baseline(mean, std)``); the caller passes it as
``baseline=`` (a tensor broadcastable to x, e.g. (C, 1, 1), in normalised units): the statistics
belong to the model's data, not to the method. It is also the scenes' background, so the path runs
from an empty canvas to the scene.

Map: the attributions summed over channels, signed. The sum keeps completeness per pixel (a
pixel's total contribution to F_c(x) - F_c(x')); the sign keeps the direction, positive evidence
for the class first, which is what the pointing game (the maximum), the energy share (positive
saliency) and the deletion order (most supporting pixels first) read; |.| would rank evidence
against the class alongside evidence for it.
"""
from __future__ import annotations

import torch

from classlab.methods.registry import register_method
from classlab.methods.saliency_method import SaliencyMethod

INTEGRATION = ("gausslegendre", "riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid")
_CHUNK = 256  # images per forward pass inside captum (memory only: the sum is the same)


def _expand_baseline(baseline, x: torch.Tensor) -> torch.Tensor:
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if b.dim() == 3:
        b = b[None]
    try:
        return torch.broadcast_to(b, x.shape).contiguous()
    except RuntimeError:
        raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to the batch {tuple(x.shape)}; "
                         f"give (C, 1, 1), (C, H, W), (1, C, H, W) or (B, C, H, W) in normalised units") from None


@register_method("explain", "integrated_gradients")
class IntegratedGradientsSaliency(SaliencyMethod):
    layered = False
    needs_baseline = True

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.n_steps = int(self.hparams.get("n_steps", 50))
        if self.n_steps < 1:
            raise ValueError(f"integrated_gradients n_steps: {self.n_steps} must be >= 1")
        self.integration = str(self.hparams.get("integration", "gausslegendre"))
        if self.integration not in INTEGRATION:
            raise ValueError(f"integrated_gradients integration: {self.integration!r} is not allowed; allowed values: "
                             f"{list(INTEGRATION)}")

    def _attribute(self, model, x, classes, layer, baseline):
        from captum.attr import IntegratedGradients  # imported on first use

        if baseline is None:
            raise ValueError("integrated_gradients needs baseline=: the black image in the model's normalisation, "
                             "saliency_method.black_baseline(channel_mean, channel_std) (C, 1, 1)")
        attributions = IntegratedGradients(model, multiply_by_inputs=True).attribute(
            x.detach().clone(), baselines=_expand_baseline(baseline, x), target=classes, n_steps=self.n_steps,
            method=self.integration, internal_batch_size=max(_CHUNK, x.shape[0]))
        return attributions.sum(dim=1)  # signed sum over channels of IG_i
