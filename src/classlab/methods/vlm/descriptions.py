"""Classification by description: the generic description ensemble, nothing trained.

Menon and Vondrick, "Visual Classification via Description from Large Language Models", ICLR 2023. Each
class c is described by a few short texts D(c) (theirs written by GPT-3; here the project's shipped
``generic`` descriptions, ``config/descriptions/<dataset>.yaml``), and an image is scored against the
descriptions instead of the bare class name. The paper averages the per-description similarities,
s(c, x) = 1/|D(c)| sum_d <f(x), g(d)>; with unit-norm features that is <f(x), mean_d g(d)>, and we use the
normalised mean, the usual form of a prompt ensemble (CLIP's own template ensembling):

    w_c = normalize( 1/|D(c)| sum_{d in D(c)} g("a photo of a {c}, which is {d}.") ),
    logit(x, c) = exp(t) <f(x), w_c>,

g the unit-norm joint-space text feature (the MiniLM tower and the pretrained text projection). The
normalisation (ours; the paper's mean of similarities equals it up to a per-class factor |mean_d g(d)|)
keeps every class on the same scale as zero-shot CLIP's. FuDD (fudd.py) is compared against this baseline
and falls back to these w_c where a pair of classes has no differential description. The template is ``vlm_descriptions.GENERIC_TEMPLATE`` (the paper's
"{c}, which (is/has) {d}" behind CLIP's "a photo of a"); which descriptions file is read:
``descriptions_dataset``, or inferred from the class names (``classlab.methods.vlm_descriptions``).
"""
from __future__ import annotations

import torch

from classlab.methods.registry import register_method
from classlab.methods.vlm_descriptions import class_mean, generic_embeddings
from classlab.methods.vlm_learner import PromptMethod


@register_method("vlm", "descriptions")
class Descriptions(PromptMethod):
    learns = False

    def build(self, class_names):
        super().build(class_names)
        device = self.clip.logit_scale.device
        self.descriptions, self.generic_texts, sentences, owner = generic_embeddings(self.hparams, self.class_names,
                                                                                     device)
        # sentence embeddings of every generic description and the class each belongs to (rebuilt by build)
        self.register_buffer("generic_sentences", sentences, persistent=False)
        self.register_buffer("generic_owner", owner, persistent=False)

    def description_features(self) -> torch.Tensor:
        """w_c for every class, (K, E): the normalised mean of g(description) over the class's descriptions."""
        return class_mean(self.clip.encode_text(self.generic_sentences), self.generic_owner, len(self.class_names))

    def text_features(self, classes, image):
        return self.description_features()[classes]
