"""ComCa: a training-free compositional cache whose values are soft attribute and object labels.

Garosi, Conti, Liu, Ricci and Mancini, "Compositional Caching for Training-free Open-vocabulary
Attribute Detection", CVPR 2025. OUR READING (the paper's full text could not be read offline; its
abstract and summaries were): ComCa builds an auxiliary cache of images for attribute-object
compositions (retrieved from a web-scale database, the compositions chosen by an LLM's estimate of
attribute-object compatibility), gives each cached image a SOFT label over the attributes rather than
a one-hot one (so that it reflects the other attributes the image shows), aggregates the labels of the
cached images by their similarity to the test image and fuses that with CLIP's zero-shot score,
f(x, a) = eta(lambda f_ComCa(x, a) + f_CLIP(x, a)), without any training.

Here, for attribute-object pairs: the cache is the few-shot images of the seen pairs (keys: their
unit-norm image features k_i); each gets soft labels over the attributes and over the objects from
the model's zero-shot similarities,

    v_i^attr = (1 - h) softmax_a( s <k_i, g("a photo of a <a> object.")> ) + h onehot(attr of i),
    v_i^obj  = (1 - h) softmax_o( s <k_i, g("a photo of a <o>.")> )       + h onehot(obj of i),

h = ``hard_weight`` the share of the cached image's own (known) attribute and object (ours: ComCa's
cached images come with the composition they were retrieved for; its exact mix could not be read).
With Tip-Adapter's affinity A = exp(-beta (1 - f(x) K^T)) (``cache.py``), a pair scores

    score(x, (a, o)) = s <f(x), g("a photo of a <a> <o>.")> + alpha * ([A V^attr]_a + [A V^obj]_o),

so an unseen pair gets cache score from its attribute's and its object's seen occurrences (the plain
cache gives it none). alpha = 0 is zero-shot exactly (tested). No LLM and no retrieval database here:
the compatibility-driven choice of cached compositions is replaced by the given seen pairs' shots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.vlm.cache import SupportCache
from classlab.methods.vlm_learner import HAND_WRITTEN


@register_method("vlm", "comca")
class ComCa(SupportCache):
    def build(self, class_names):
        super().build(class_names)
        from classlab.models.image_text import encode_sentences

        device = self.clip.logit_scale.device
        self.use_pairs()  # attributes, objects, pair_index
        self.register_buffer("attribute_sentences", encode_sentences(
            [HAND_WRITTEN.format(f"{a} object") for a in self.attributes]).to(device), persistent=False)
        self.register_buffer("object_sentences", encode_sentences(
            [HAND_WRITTEN.format(o) for o in self.objects]).to(device), persistent=False)

    def soft_labels(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The zero-shot soft labels of unit-norm image features: softmax over the attributes' and the
        objects' CLIP logits, (N, A) and (N, O)."""
        with torch.no_grad():
            attr = self.clip.logits(features, self.clip.encode_text(self.attribute_sentences)).softmax(-1)
            obj = self.clip.logits(features, self.clip.encode_text(self.object_sentences)).softmax(-1)
        return attr, obj

    def fill_values(self) -> None:
        attr, obj = self.soft_labels(self.keys)
        h = float(self.hparams["hard_weight"])
        known = self.pair_index[self.key_labels]  # (N, 2) the cached images' own attribute and object
        attr = (1 - h) * attr + h * F.one_hot(known[:, 0], len(self.attributes)).float()
        obj = (1 - h) * obj + h * F.one_hot(known[:, 1], len(self.objects)).float()
        self.register_buffer("attribute_values", attr, persistent=False)
        self.register_buffer("object_values", obj, persistent=False)

    def cache_scores(self, image):
        a = self.affinity(image)  # (B, N)
        attr, obj = a @ self.attribute_values, a @ self.object_values  # (B, A), (B, O)
        return attr[:, self.pair_index[:, 0]] + obj[:, self.pair_index[:, 1]]  # (B, K): pair (a, o) gets both
