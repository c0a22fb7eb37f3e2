"""Loki: the Frechet mean under a label metric instead of the argmax.

Roberts, Li, Adila, Cromp, Huang, Zhao and Sala, "Geometry-Aware Adaptation for Pretrained Models",
NeurIPS 2023. A model trained on k observed classes lambda_1..lambda_k gives probabilities P_i(x); with
a metric d over the whole label space Y, Loki predicts

    y^(x) = argmin_{y in Y} sum_{i=1}^{k} P_i(x) d(y, lambda_i)^2,

the Frechet mean of the observed classes weighted by the model's probabilities, which can be a class
never observed (between two observed ones the model hesitates over). Nothing is trained for it: it is a
drop-in prediction rule. Here the model is CoOp's prompt learner over the training (base) classes
(``epochs: 0``: zero-shot CLIP over the base classes; train it to put Loki on CoOp), P = softmax of its
logits over the base classes, and d is the paper's self-derived metric from class embeddings when no
external one exists: the distance between the MiniLM sentence embeddings of "a photo of a {class}."
(``classlab.metrics.vlm.embedding_label_metric``). ``forward`` returns the negated Frechet objective
for every class, so the argmax (over every class, or over the base or the new ones) is Loki's rule
restricted accordingly.
"""
import torch

from classlab.methods.registry import register_method
from classlab.methods.vlm.coop import CoOp
from classlab.methods.vlm_learner import HAND_WRITTEN


@register_method("vlm", "loki")
class Loki(CoOp):
    def build(self, class_names):
        super().build(class_names)
        from classlab.metrics.vlm import embedding_label_metric
        from classlab.models.image_text import encode_sentences

        embeddings = encode_sentences([HAND_WRITTEN.format(n) for n in self.class_names]).numpy()
        distances = torch.tensor(embedding_label_metric(embeddings), dtype=torch.float32)
        self.register_buffer("label_distances", distances.to(self.clip.logit_scale.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.encode_image(x)
        probs = self.clip.logits(image, self.text_features(self.train_classes, image)).softmax(-1)  # P_i(x)
        d2 = self.label_distances[:, self.train_classes] ** 2                                       # d(y, lambda_i)^2
        return -(probs @ d2.t())  # -sum_i P_i(x) d(y, lambda_i)^2 for every y: argmax = the Frechet mean
