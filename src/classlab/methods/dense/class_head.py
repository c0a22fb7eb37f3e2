"""The detection baseline: the shared query-based detector (``classlab.methods.dense_detector``)
with a plain classification head, one linear layer over all C classes.

The head of DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020) and of
Deformable DETR / DINO (Zhang et al., "DINO: DETR with Improved DeNoising Anchor Boxes for End-to-End
Object Detection", ICLR 2023), in its sigmoid (focal-loss) form:

    logit_qc = w_c . o_q + b_c,   p_qc = sigmoid(logit_qc),   b_c initialised to -log((1 - 0.01) / 0.01)

for object query embedding o_q and every class c. Every query gets a focal-loss term for every one of
the C classes, so a rare class's few positives compete with the negatives of every query of every
image: the "gradient dilution" that CQ-DINO (``cq_dino``) targets. One head serves the encoder's
proposals and every decoder layer (DETR shares its class head across the auxiliary outputs).
"""
from __future__ import annotations

import torch
from torch import nn

from classlab.methods.dense_detector import QueryDetector, prior_bias
from classlab.methods.registry import register_method


@register_method("dense", "class_head")
class ClassHead(QueryDetector):
    task = "detection"

    def build_class_head(self, d: int) -> None:
        self.class_head = nn.Linear(d, self.num_classes)
        nn.init.constant_(self.class_head.bias, prior_bias())

    def class_logits(self, embeddings: torch.Tensor, context: dict) -> torch.Tensor:
        return self.class_head(embeddings)  # logit_qc = w_c . o_q + b_c over all C classes
