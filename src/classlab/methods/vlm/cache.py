"""Tip-Adapter: a training-free cache of the few-shot images, one-hot pair labels as its values.

Zhang, Zhang, Fang, Gao, Li, Dai, Qiao and Li, "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022. The cache holds the N support images' unit-norm features as keys
F (N, E) and their one-hot labels as values L (N, K); a test image with feature f scores

    logits = s f W^T + alpha * A L,   A = exp(-beta (1 - f F^T)),

s f W^T the zero-shot CLIP logits, A the affinity to each cached image; alpha = 1, beta = 5.5 are the
paper's defaults (its Tip-Adapter without fine-tuning). Nothing is trained.

Compositional zero-shot: the support is the few-shot images of the SEEN pairs, so the values have no
mass on an unseen pair's column and the cache only ever adds score to seen pairs (tested): the baseline
ComCa (``comca.py``) is compared against.

How a training-free cache gets its images (the family's ``needs_support`` hook): the protocol builds
the method, computes the support images' features with the method's own ``encode_image`` (the
evaluation normalisation, no augmentation) and calls ``fit_support(features, labels)`` once, before
prediction; ``learns = False`` keeps the engine out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.vlm_learner import PromptMethod


class SupportCache(PromptMethod):
    """The shared part of the training-free caches: zero-shot pair logits plus alpha times a cache score."""

    learns = False
    needs_support = True  # the protocol calls fit_support(features, labels) with the shots

    def __init__(self, model, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("keys", torch.zeros(0, self.clip.embed_dim), persistent=False)
        self.register_buffer("key_labels", torch.zeros(0, dtype=torch.long), persistent=False)

    def fit_support(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Fill the cache: ``features`` (N, E) the support images' image features (renormalised here),
        ``labels`` (N,) their classes."""
        if features.dim() != 2 or len(features) != len(labels):
            raise ValueError(f"fit_support: {tuple(features.shape)} features for {len(labels)} labels")
        device = self.clip.logit_scale.device
        self.keys = F.normalize(features.detach().float(), dim=-1).to(device)
        self.key_labels = labels.detach().long().to(device)
        self.fill_values()

    def fill_values(self) -> None:  # a method's cache values from self.keys / self.key_labels
        raise NotImplementedError

    def affinity(self, image: torch.Tensor) -> torch.Tensor:
        """Tip-Adapter's A = exp(-beta (1 - <f(x), k_i>)): (B, N)."""
        return torch.exp(-float(self.hparams["beta"]) * (1.0 - image @ self.keys.t()))

    def cache_scores(self, image: torch.Tensor) -> torch.Tensor:  # (B, K), added with weight alpha
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.encode_image(x)
        text = self.text_features(list(range(self.num_classes)), image)
        zero_shot = self.clip.logits(image, text)
        if len(self.keys) == 0:
            return zero_shot
        return zero_shot + float(self.hparams["alpha"]) * self.cache_scores(image)


@register_method("vlm", "cache")
class TipAdapterCache(SupportCache):
    def fill_values(self) -> None:
        self.register_buffer("values", F.one_hot(self.key_labels, self.num_classes).float(), persistent=False)  # L

    def cache_scores(self, image):
        return self.affinity(image) @ self.values  # A L
