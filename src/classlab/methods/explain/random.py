"""Random: a seeded uniform map, the baseline every saliency method must beat.

Not a paper's method: the control of the sanity checks (Adebayo et al., "Sanity Checks for
Saliency Maps", NeurIPS 2018). Each pixel of the input grid gets u ~ U[0, 1), drawn from a
generator seeded by (``seed``, a CRC-32 of the image's bytes): the same image gets the same map
whatever its batch, different images get different maps, and the model is never read. So it
points at the box at the box-area share, and it fails the randomisation check by construction:
re-initialising the model leaves the map identical (rank correlation 1).
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from classlab.methods.registry import register_method
from classlab.methods.saliency_method import SaliencyMethod


@register_method("explain", "random")
class RandomSaliency(SaliencyMethod):
    layered = False

    def __init__(self, hparams=None):
        super().__init__(hparams)
        self.seed = int(self.hparams.get("seed", 0))
        if self.seed < 0:
            raise ValueError(f"random seed: {self.seed} must be >= 0")

    def _attribute(self, model, x, classes, layer, baseline):
        h, w = x.shape[-2:]
        images = x.detach().float().cpu().numpy()
        maps = [np.random.default_rng([self.seed, zlib.crc32(image.tobytes())]).random((h, w), dtype=np.float32)
                for image in images]
        return torch.from_numpy(np.stack(maps)).to(x.device)
