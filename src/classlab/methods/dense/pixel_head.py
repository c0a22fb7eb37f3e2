"""The per-pixel head: the baseline of the dense family's segmentation claims.

A 1x1 convolution on the shared pixel embeddings E (``classlab.methods.dense_segmenter``) gives each
pixel's C + 1 logits, l(i) = W E(i) + b, trained with the pixel-wise cross-entropy

    L_CE = -(1/N) sum_i log softmax(l(i))_{y_i}

(the fully convolutional classifier of Long, Shelhamer and Darrell, "Fully Convolutional Networks for
Semantic Segmentation", CVPR 2015). ``label_smoothing.yaml`` extends it with eps = 0.1 (Szegedy et
al., "Rethinking the Inception Architecture for Computer Vision", CVPR 2016); ``margin`` and ``nacl``
add their penalties to the same logits; ``segface`` replaces the static class vectors W by class
tokens decoded from the image.
"""
from __future__ import annotations

import torch
from torch import nn

from classlab.methods.dense_segmenter import PixelSegmenter
from classlab.methods.registry import register_method


@register_method("dense", "pixel_head")
class PixelHead(PixelSegmenter):
    def __init__(self, model: nn.Module, hparams: dict, num_classes: int,
                 image_shape: tuple[int, int, int] = (3, 84, 84)):
        super().__init__(model, hparams, num_classes, image_shape=image_shape)
        self.head = nn.Conv2d(self.decoder.dim, self.num_outputs, kernel_size=1)

    def logits_from(self, x: torch.Tensor) -> torch.Tensor:
        # l(i) = W E(i) + b at every pixel
        return self.head(self.pixel_embeddings(x))
