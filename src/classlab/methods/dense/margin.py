"""MbLS, the margin-based label smoothing, on the per-pixel head's logits (a baseline of NACL).

Liu, Ben Ayed, Galdran and Dolz, "The Devil is in the Margins: Margin-based Label Smoothing for
Network Calibration", CVPR 2022 (and, for segmentation, Murugesan, Liu, Galdran, Ben Ayed and Dolz,
"Calibrating Segmentation Networks with Margin-based Label Smoothing", MedIA 2023).

Label smoothing pushes every logit distance d_k = max_j l_j - l_k towards zero; MbLS only penalises
distances larger than a margin m, with an inequality constraint relaxed into a hinge penalty:

    L = L_CE + lambda * (1 / (N K)) sum_i sum_k max(0, max_j l_ij - l_ik - m)

over the N labelled pixels and K = C + 1 classes (the mean over pixels and classes is the official
code's ``LogitMarginL1``; the paper writes the per-sample sum over k). Defaults are the paper's:
m = 10, lambda = 0.1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.config import ConfigError
from classlab.methods.dense.pixel_head import PixelHead
from classlab.methods.dense_segmenter import IGNORE_INDEX
from classlab.methods.registry import register_method


def flat_labelled(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The (N, K) logits of the pixels whose label is not IGNORE_INDEX."""
    flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    return flat[target.reshape(-1) != IGNORE_INDEX]


def margin_penalty(logits: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """(1 / (N K)) sum_i sum_k max(0, max_j l_ij - l_ik - m) over the labelled pixels."""
    flat = flat_labelled(logits, target)
    distances = flat.max(dim=1, keepdim=True).values - flat  # d_ik = max_j l_ij - l_ik >= 0
    return F.relu(distances - margin).mean()


@register_method("dense", "margin")
class MarginLabelSmoothing(PixelHead):
    def __init__(self, model, hparams: dict, num_classes: int, image_shape=(3, 84, 84)):
        super().__init__(model, hparams, num_classes, image_shape=image_shape)
        self.margin = float(self.hparams.get("mbls_margin", 10.0))
        self.penalty_weight = float(self.hparams.get("mbls_lambda", 0.1))
        if self.margin < 0:
            raise ConfigError(f"mbls_margin: >= 0 expected, got {self.margin}")
        if self.penalty_weight < 0:
            raise ConfigError(f"mbls_lambda: >= 0 expected, got {self.penalty_weight}")

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)
        penalty = margin_penalty(logits, target, self.margin)
        # L = L_CE + lambda * mean_{i,k} max(0, d_ik - m)
        return ce + self.penalty_weight * penalty, {"ce": ce.detach(), "margin_penalty": penalty.detach()}
