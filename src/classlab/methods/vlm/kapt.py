"""KAPT: a discrete knowledge prompt and a learned continuous prompt, with an adaptation head on the image.

Kan, Wang, Lu, Zhen, Guan and Zheng, "Knowledge-Aware Prompt Tuning for Generalizable Vision-Language
Models", ICCV 2023. The paper feeds the text encoder two complementary knowledge-aware prompts, a
DISCRETE one carrying the key information of a description of the category (extracted from external
text) and a CONTINUOUS one learned on the few shots (the overall context), and puts an ADAPTATION HEAD
on the visual encoder that makes the image feature discriminative for the task. Here:

- discrete knowledge prompt of class c (frozen): the shipped generic descriptions in the ensemble of
  ``descriptions.py``,  w_c^d = normalize( mean_d g("a photo of a {c}, which is {d}.") );
- continuous prompt (learned): CoOp's  w_c^s = g([v_1, ..., v_M, CLASS_c]),  M = 4 context vectors
  initialised from "a photo of a";
- adaptation head: a residual bottleneck on the unit-norm image feature f(x),

      f~(x) = normalize( (1 - alpha) f(x) + alpha A(f(x)) ),   A = W_2 ReLU(W_1 .),  W_1: E -> E/r, W_2: E/r -> E;

- scores: each branch compares the adapted image with its text features and the two are mixed,

      logit(x, c) = exp(t) [ (1 - beta) <f~(x), w_c^s> + beta <f~(x), w_c^d> ]
                  = exp(t) <f~(x), (1 - beta) w_c^s + beta w_c^d>,

  which is why ``text_features`` returns the (not re-normalised) mixture: its logits are exactly the
  weighted sum of the two branches' logits;
- loss: cross-entropy of these logits over the base classes; the learned parts are the context vectors
  and A (text tower, projections and image encoder frozen).

Our reading, said plainly (the paper's method section and code could not be read offline; only its
abstract was):

- the knowledge text is the project's shipped descriptions, not keywords extracted from Wikipedia;
- the two branches are mixed at the logits with beta = 0.5 (``knowledge_weight``);
- the adaptation head: the paper's head attends over the visual encoder's token features; our image
  encoder gives one pooled vector per image, so the head is CLIP-Adapter's residual bottleneck (Gao et
  al., IJCV 2024) on that vector, with its ratio alpha = 0.2 and reduction r = 4 (``adapter_ratio``,
  ``adapter_reduction``), without biases and with no ReLU after W_2;
- W_2 starts at zero, so an untrained KAPT is the training-free mixture of zero-shot CLIP ("a photo of a
  {c}.") and the description ensemble (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.vlm.coop import CoOp
from classlab.methods.vlm_descriptions import class_mean, generic_embeddings


class ResidualAdapter(nn.Module):
    """f -> normalize((1 - alpha) f + alpha W_2 ReLU(W_1 f)); W_2 = 0 at the start (the identity on unit f)."""

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        hidden = max(1, int(dim) // int(reduction))
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        self.ratio = float(ratio)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        residual = self.up(F.relu(self.down(feature)))                                   # A(f)
        return F.normalize((1.0 - self.ratio) * feature + self.ratio * residual, dim=-1)  # f~


@register_method("vlm", "kapt")
class KAPT(CoOp):
    def build(self, class_names):
        super().build(class_names)  # the continuous prompt (CoOp's learner)
        device = self.clip.logit_scale.device
        self.descriptions, self.generic_texts, sentences, owner = generic_embeddings(self.hparams, self.class_names,
                                                                                     device)
        self.register_buffer("generic_sentences", sentences, persistent=False)
        self.register_buffer("generic_owner", owner, persistent=False)
        self.adapter = ResidualAdapter(self.clip.embed_dim, int(self.hparams["adapter_reduction"]),
                                       float(self.hparams["adapter_ratio"])).to(device)

    def knowledge_features(self) -> torch.Tensor:
        """w^d for every class, (K, E): the discrete knowledge prompt (the description ensemble), frozen."""
        return class_mean(self.clip.encode_text(self.generic_sentences), self.generic_owner, len(self.class_names))

    def encode_image(self, x):
        return self.adapter(super().encode_image(x))  # f~(x): the adaptation head on the frozen encoder's feature

    def text_features(self, classes, image):
        beta = float(self.hparams["knowledge_weight"])
        continuous = self.clip.encode_text(self.prompt(classes=classes))        # w^s, learned
        discrete = self.knowledge_features()[classes]                          # w^d, frozen
        return (1.0 - beta) * continuous + beta * discrete                     # logits = (1-b) s<f~,w^s> + b s<f~,w^d>
