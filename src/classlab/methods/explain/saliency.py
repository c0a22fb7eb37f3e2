"""Saliency: the plain input gradient of the class score.

Simonyan, Vedaldi, Zisserman, "Deep Inside Convolutional Networks: Visualising Image
Classification Models and Saliency Maps", ICLR Workshop 2014. With S_c the logit of the explained
class (before the softmax) and w = dS_c/dx at the image:

    M_ij = max_ch |w_{ch, i, j}|

The gradient is captum's ``Saliency`` (``abs=True``: |dS_c/dx| per channel); the reduction over
channels is the paper's (its Sec. 3.1: one value per pixel, the largest magnitude of w over the
colour channels), so a pixel counts as much as its most sensitive channel. For the single-channel
scenes it is |dS_c/dx|. The map is at the input resolution.
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.saliency_method import SaliencyMethod


@register_method("explain", "saliency")
class GradientSaliency(SaliencyMethod):
    layered = False

    def _attribute(self, model, x, classes, layer, baseline):
        from captum.attr import Saliency  # imported on first use

        inputs = x.detach().clone().requires_grad_(True)
        grads = Saliency(model).attribute(inputs, target=classes, abs=True)  # |dS_c/dx|, (B, C, H, W)
        return grads.amax(dim=1)  # M_ij = max_ch |w_ch,ij|
