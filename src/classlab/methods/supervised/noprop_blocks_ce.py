"""Backprop of NoProp's size: NoProp's T image encoders as one network, trained end to end with CE.

The baseline of the NoProp claim (Li, Teh, Pascanu, "NoProp: Training Neural Networks without
Back-propagation or Forward-propagation", arXiv:2503.24322, 2025: NoProp-DT against
back-propagation). ``noprop_backprop`` differentiates NoProp's own inference chain, and that chain
collapses classes under backpropagation (a softmax over class embeddings inside every step
saturates and passes no gradient; ``bench/diagnose_noprop.py``). This baseline is the plain
classifier made of the same layers: block t's image encoder h_t(x) (identical to NoProp's block t
image path) and an MLP head f_t on it (hidden -> head_hidden -> K), the T blocks' logits averaged
and one cross-entropy backpropagated through all of them:

    logits(x) = 1/T sum_t f_t(h_t(x)),    L = CE(logits(x), y).

A classifier gets no noisy label as input, so it has no label-embedding path; the heads take its
place in the parameter budget. At the defaults (T = 10, block_widths [16, 32], hidden 128) NoProp
has 735,250 trained parameters; with head_hidden 384 this network has 747,940 (+1.7%).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method
from classlab.methods.supervised.noprop import _in_chans, block_shape, image_encoder


@register_method("supervised", "noprop_blocks_ce")
class NoPropBlocksCE(Method):
    evaluate_with_method = True

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.T, widths, hidden = block_shape(self.hparams, "noprop_blocks_ce")
        head_hidden = int(self.hparams.get("head_hidden", 384))
        self.encoders = nn.ModuleList(image_encoder(_in_chans(model), widths, hidden) for _ in range(self.T))
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, head_hidden), nn.ReLU(), nn.Linear(head_hidden, num_classes))
            for _ in range(self.T))
        for p in self.model.parameters():  # the engine's model is not part of this network
            p.requires_grad_(False)

    def param_groups(self) -> list[dict]:
        return [{"params": [*self.encoders.parameters(), *self.heads.parameters()]}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # logits(x) = 1/T sum_t f_t(h_t(x))
        return torch.stack([head(enc(x)) for enc, head in zip(self.encoders, self.heads)]).mean(dim=0)

    def training_step(self, batch):
        logits = self(batch["x"])
        return F.cross_entropy(logits.float(), batch["y"]), {"logits": logits.detach()}
