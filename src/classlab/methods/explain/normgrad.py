"""NormGrad at a named layer, its scaling variant, the multi-layer combination and meta-saliency.

Rebuffi, Fong, Ji, Vedaldi, "There and Back Again: Revisiting Backpropagation Saliency Methods",
CVPR 2020 (arXiv 2004.02866; standalone code github.com/srebuffi/revisiting_saliency, full
implementation in TorchRay's ``normgrad`` branch).

Insert a virtual identity layer with weights W right after the layer. With a_u the activation
vector at location u and g_u = dy^c/da_u the gradient of the explained class's logit there, the
weight gradient is a sum over locations, and the saliency at u is the size of u's term:

- ``variant: conv1x1`` (NormGrad; virtual 1x1 convolution, W in R^{K x K}):
      dy^c/dW = sum_u g_u a_u^T,     s(u) = ||g_u a_u^T||_F = ||g_u||_2 ||a_u||_2
- ``variant: scaling`` (virtual per-channel scaling, W = diag(w)):
      dy^c/dw = sum_u g_u (.) a_u,   s(u) = ||g_u (.) a_u||_2
  (the official code's phase 1 'scaling' with phase 2 'norm': the L2 norm over channels of the
  elementwise product, no clamping).

A test inserts real identity layers and checks both identities with autograd. As for Grad-CAM, a
ViT's last block gives a zero map when the head reads the class token only (timm's default
pooling): its patch tokens get no gradient.

``combine_layers`` (a list of layer names, or "all" for every named stage): the maps of those
layers, from one backward pass, each upsampled bilinearly to the input, min-max normalised per
image, then combined: ``combine_rule: product`` multiplies them (the standalone code's "combi",
``Extract_Aggregate.__call__``: ``final_out *= out``), ``sum`` averages them (TorchRay's
``weighted_saliency`` with uniform weights). The combination's map is at the input resolution and
takes no layer argument (the instance is not layered; pass None or "input").

``meta_step_lr`` > 0 (the paper's meta-saliency; TorchRay ``meta_saliency``): per image,
one plain SGD step on every parameter with the cross-entropy of the explained class,
theta' = theta - lr grad_theta CE(f_theta(x), c), then the map of f_theta' (same layer, same class);
the weights and buffers are copied back bit for bit afterwards (``saliency_method.stepped_weights``).
The authors' scripts use lr = 0.0025 (``examples/meta_saliency.py``; the function's default is 1e-4).
"""
from __future__ import annotations

import torch

from classlab.methods.registry import register_method
from classlab.methods.saliency_method import (INPUT, SaliencyMethod, layer_maps_and_grads, minmax, resolve_layer,
                                              spatial_layers, stepped_weights, upsample)

VARIANTS = ("conv1x1", "scaling")
RULES = ("product", "sum")


def normgrad_map(a: torch.Tensor, g: torch.Tensor, variant: str) -> torch.Tensor:
    """Per-location saliency (B, h, w) from activations and gradients (B, K, h, w)."""
    if variant == "conv1x1":
        return g.norm(dim=1) * a.norm(dim=1)  # ||g_u a_u^T||_F = ||g_u||_2 ||a_u||_2
    if variant == "scaling":
        return (g * a).norm(dim=1)            # ||g_u (.) a_u||_2
    raise ValueError(f"normgrad variant: {variant!r} is not allowed; allowed values: {list(VARIANTS)}")


@register_method("explain", "normgrad")
class NormGrad(SaliencyMethod):
    layered = True

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.variant = str(self.hparams.get("variant", "conv1x1"))
        if self.variant not in VARIANTS:
            raise ValueError(f"normgrad variant: {self.variant!r} is not allowed; allowed values: {list(VARIANTS)}")
        combine = self.hparams.get("combine_layers", []) or []
        if isinstance(combine, str) and combine != "all":
            raise ValueError(f"normgrad combine_layers: {combine!r}; give a list of layer names or 'all'")
        self.combine_layers = combine if isinstance(combine, str) else [str(n) for n in combine]
        self.combine_rule = str(self.hparams.get("combine_rule", "product"))
        if self.combine_rule not in RULES:
            raise ValueError(f"normgrad combine_rule: {self.combine_rule!r} is not allowed; allowed values: "
                             f"{list(RULES)}")
        self.meta_step_lr = float(self.hparams.get("meta_step_lr", 0.0))
        if self.meta_step_lr < 0:
            raise ValueError(f"normgrad meta_step_lr: {self.meta_step_lr} must be >= 0 (0: no meta step)")
        # a combination is one map per image at the input resolution: not layered
        self.layered = not self.combine_layers

    def _layers(self, model, layer) -> list[str]:
        if not self.combine_layers:
            return [layer]
        return spatial_layers(model) if self.combine_layers == "all" else list(self.combine_layers)

    def check_layer(self, model, layer) -> None:
        super().check_layer(model, layer)
        if self.combine_layers:
            layers = self._layers(model, layer)
            if not layers:
                raise ValueError(f"normgrad combine_layers: {type(model).__name__} has no named stages to combine")
            for name in layers:
                resolve_layer(model, name)  # KeyError listing the valid names

    def _maps(self, model, x, classes, layers) -> torch.Tensor:
        acts, grads = layer_maps_and_grads(model, x, classes, layers)
        maps = [normgrad_map(acts[n], grads[n], self.variant) for n in layers]
        if not self.combine_layers:
            return maps[0]
        scaled = [minmax(upsample(m, x.shape[-2:])) for m in maps]  # each layer in [0, 1] at the input size
        if self.combine_rule == "product":
            return torch.stack(scaled).prod(0)  # S = prod_l norm(up(S_l))
        return torch.stack(scaled).mean(0)      # S = 1/L sum_l norm(up(S_l))

    def _attribute(self, model, x, classes, layer, baseline):
        layers = self._layers(model, None if layer == INPUT else layer)
        if self.meta_step_lr <= 0:
            return self._maps(model, x, classes, layers)
        out = []
        for i in range(x.shape[0]):  # one step per image: its own theta'
            xi, ci = x[i:i + 1], classes[i:i + 1]
            with stepped_weights(model, xi, ci, self.meta_step_lr):
                out.append(self._maps(model, xi, ci, layers))
        return torch.cat(out)
