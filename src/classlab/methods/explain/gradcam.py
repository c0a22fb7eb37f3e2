"""Grad-CAM at a named layer.

Selvaraju, Cogswell, Das, Vedantam, Parikh, Batra, "Grad-CAM: Visual Explanations from Deep
Networks via Gradient-based Localization", ICCV 2017. With A^k the k-th channel of the layer's
activation and y^c the logit of the explained class (before the softmax):

    alpha_k^c = 1/Z sum_{i,j} dy^c / dA^k_{ij}          (the spatial mean of the gradient)
    L^c       = ReLU( sum_k alpha_k^c A^k )             (on the layer's grid)

Computed with pytorch-grad-cam (PyPI ``grad-cam``, ``pytorch_grad_cam.GradCAM``): its hooks
capture A and dy^c/dA at the layer's module (``ClassifierOutputTarget(c)``: the raw logit), its
``get_cam_weights`` / ``get_cam_image`` give sum_k alpha_k A^k. The package's own output is
min-max normalised per image and resized to the input with OpenCV, and there is no option to
turn that off; the raw map is taken at the layer's resolution by overriding the two documented
per-layer steps, ``compute_cam_per_layer`` (ReLU only, no scaling) and ``aggregate_multi_layers``
(the one layer as it is). Upsampling (bilinear, align_corners=False) is the base class's.

Layers are addressed by our names (``saliency_method.resolve_layer``). A ViT's blocks output token
sequences: the reshape transform keeps the patch tokens (class token, registers, prompts dropped)
on the patch grid. Note that with timm's class-token pooling the last block's patch tokens do not
reach the logits, so Grad-CAM there is zero everywhere (pytorch-grad-cam's ViT example hooks
``blocks[-1].norm1`` for that reason; that name works here too).
"""
from __future__ import annotations

import torch

from classlab.methods.registry import register_method
from classlab.methods.saliency_method import SaliencyMethod, as_map, resolve_layer, token_grid


def _raw_gradcam_class():
    """pytorch_grad_cam.GradCAM returning ReLU(sum_k alpha_k A^k) at the layer's resolution
    (imported on first use: the package imports in seconds)."""
    import numpy as np
    from pytorch_grad_cam import GradCAM

    class RawGradCAM(GradCAM):
        def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
            acts = [a.cpu().data.numpy() for a in self.activations_and_grads.activations]
            grads = [g.cpu().data.numpy() for g in self.activations_and_grads.gradients]
            if len(grads) != len(self.target_layers):
                raise RuntimeError("no gradient of the explained logit reached the layer (is it on the path "
                                   "to the logits?)")
            cams = []
            for layer, a, g in zip(self.target_layers, acts, grads):
                cam = self.get_cam_image(input_tensor, layer, targets, a, g, eigen_smooth)  # sum_k alpha_k A^k
                cams.append(np.maximum(cam, 0))  # ReLU, no min-max, no resize
            return cams

        def aggregate_multi_layers(self, cam_per_target_layer):
            return cam_per_target_layer[0]

    return RawGradCAM


@register_method("explain", "gradcam")
class GradCAMSaliency(SaliencyMethod):
    layered = True

    def _attribute(self, model, x, classes, layer, baseline):
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        module, _ = resolve_layer(model, layer)
        grid = token_grid(model, tuple(x.shape[-2:]))
        cam = _raw_gradcam_class()(model, [module], reshape_transform=lambda t: as_map(t, grid, layer))
        try:
            # the input carries the graph: every parameter is frozen while a method runs
            maps = cam(x.detach().clone().requires_grad_(True),
                       targets=[ClassifierOutputTarget(int(c)) for c in classes.tolist()])
        finally:
            cam.activations_and_grads.release()  # not `with`: its __exit__ swallows IndexError
            cam.outputs = None
        return torch.as_tensor(maps, dtype=torch.float32, device=x.device)
