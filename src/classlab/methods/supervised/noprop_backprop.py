"""NoProp's own baseline: the same blocks trained end to end by backpropagation.

Li, Teh and Pascanu, "NoProp: Training Neural Networks without Back-propagation or
Forward-propagation" (2025) compare NoProp-DT with "backprop" on the same architecture. Here the
architecture is ``noprop``'s: T denoising blocks (each its own image encoder), the class
embeddings and the linear head. Instead of NoProp's per-block denoising losses on detached noisy
labels, the inference chain itself (z_0 = 0, z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1}) is
trained with one cross-entropy on its output, so gradients flow through every block:

    L = CE(head(z_T(x)), y),  dL/dtheta_t != 0 for every block t.
"""
from __future__ import annotations

import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.supervised.noprop import NoPropDT


@register_method("supervised", "noprop_backprop")
class NoPropBackprop(NoPropDT):
    def training_step(self, batch):
        h = [block.encode(batch["x"]) for block in self.blocks]
        logits = self._chain(h, noise=False)  # the same chain that NoProp infers with, here differentiated
        return F.cross_entropy(logits.float(), batch["y"]), {"logits": logits.detach()}
