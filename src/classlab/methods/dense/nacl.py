"""NACL, neighbour-aware calibration, on the per-pixel head's logits.

Murugesan, Adiga Vasudeva, Liu, Lombaert, Ben Ayed and Dolz, "Neighbor-Aware Calibration of
Segmentation Networks with Penalty-Based Constraints", Medical Image Analysis 2024 (extending "Trust
your neighbours: Penalty-based constraints for model calibration", MICCAI 2023).

SVLS (spatially varying label smoothing) trains on labels blurred over each pixel's neighbourhood;
the paper shows that this amounts to an implicit constraint tying the predictions to the class
proportions around the pixel, with no weight of its own. NACL makes the constraint explicit, on the
logits, as an equality relaxed into an L1 penalty with its own weight lambda:

    tau_k(i) = (1 / s^2) sum_{j in W_s(i)} 1[y_j = k]          (the labels' proportions in the s x s window)
    L = L_CE + lambda * (1 / (N K)) sum_i sum_k |tau_k(i) - l_k(i)|

over the N labelled pixels and K = C + 1 classes. As in the official code (``AdaptMarginSVLS`` with
``kernel_ops='mean'``): the window is centred, neighbours beyond the image count as label 0 (there
the background, as the scenes' black border is), and the penalty is the mean over pixels and
classes. Defaults are the paper's: s = 3 (mean kernel), lambda = 0.1. Pixels labelled
IGNORE_INDEX count in no class's proportion and carry no penalty.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.config import ConfigError
from classlab.methods.dense.pixel_head import PixelHead
from classlab.methods.dense_segmenter import IGNORE_INDEX
from classlab.methods.registry import register_method


@torch.no_grad()
def neighbourhood_proportions(target: torch.Tensor, num_classes: int, kernel_size: int) -> torch.Tensor:
    """tau (B, K, H, W): the share of each class among the labels of the s x s window centred on each
    pixel, pixels beyond the border counted as class 0 and ignored pixels as no class."""
    radius = kernel_size // 2
    padded = F.pad(target, (radius, radius, radius, radius), value=0)  # out of the image: label 0
    # one-hot (B, K + 1, H', W') by scatter, an ignored pixel going to the extra channel K, which is dropped
    slot = torch.where(padded == IGNORE_INDEX, torch.full_like(padded, num_classes), padded).unsqueeze(1)
    b, _, h, w = slot.shape
    onehot = torch.zeros(b, num_classes + 1, h, w, device=target.device).scatter_(1, slot, 1.0)[:, :num_classes]
    # the mean over the window: sum_j 1[y_j = k] / s^2 (no padding left: the labels were padded above)
    return F.avg_pool2d(onehot, kernel_size, stride=1)


def nacl_penalty(logits: torch.Tensor, target: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(1 / (N K)) sum_i sum_k |tau_k(i) - l_k(i)| over the labelled pixels."""
    tau = neighbourhood_proportions(target, logits.shape[1], kernel_size)
    per_pixel = (tau - logits).abs().mean(dim=1)  # (B, H, W): (1/K) sum_k |tau_k - l_k|
    labelled = target != IGNORE_INDEX
    return per_pixel[labelled].mean() if bool(labelled.any()) else per_pixel.sum() * 0.0


@register_method("dense", "nacl")
class NeighbourAwareCalibration(PixelHead):
    def __init__(self, model, hparams: dict, num_classes: int, image_shape=(3, 84, 84)):
        super().__init__(model, hparams, num_classes, image_shape=image_shape)
        self.kernel_size = int(self.hparams.get("nacl_kernel_size", 3))
        self.penalty_weight = float(self.hparams.get("nacl_lambda", 0.1))
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ConfigError(f"nacl_kernel_size: an odd integer >= 1 expected (a window centred on the pixel), "
                              f"got {self.kernel_size}")
        if self.penalty_weight < 0:
            raise ConfigError(f"nacl_lambda: >= 0 expected, got {self.penalty_weight}")

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        penalty = nacl_penalty(logits, target, self.kernel_size)
        # L = L_CE + lambda * mean_{i,k} |tau_k(i) - l_k(i)|
        return ce + self.penalty_weight * penalty, {"ce": ce.detach(), "nacl_penalty": penalty.detach()}
