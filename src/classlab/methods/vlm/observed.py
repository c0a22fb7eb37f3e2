"""The observed-classes baseline of Loki: the adapted model predicts only the classes it trained on.

Roberts et al., "Geometry-Aware Adaptation for Pretrained Models" (NeurIPS 2023) compare their rule
with the usual one, y^(x) = argmax_{i in observed} P_i(x): a classifier of k observed classes can only
ever output one of them. Here that is CoOp's prompt learner (``epochs: 0``: zero-shot CLIP) whose
scores of the classes outside its training classes are set below every observed one, so the argmax
over every class is the argmax over the observed ones. It cannot predict a new class, so its new
accuracy and H are not defined (``predicts_unobserved = False``: the protocol records them as NaN);
its label-metric scores (accuracy on the unobserved classes, 0; the expected squared distance) are
what Loki is compared with.
"""
import torch

from classlab.methods.registry import register_method
from classlab.methods.vlm.coop import CoOp

UNOBSERVED_SCORE = -1.0e4  # below any logit exp(t) <f, g> (|.| <= 100)


@register_method("vlm", "observed")
class ObservedArgmax(CoOp):
    predicts_unobserved = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.encode_image(x)
        observed = self.clip.logits(image, self.text_features(self.train_classes, image))
        scores = observed.new_full((len(x), self.num_classes), UNOBSERVED_SCORE)
        scores[:, self.train_classes] = observed  # argmax_{i in observed} P_i(x)
        return scores
