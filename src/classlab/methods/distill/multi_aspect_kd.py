"""Multi-aspect KD: extra outputs of the student distilled, with BCE, from aspect scores.

Lee, Bang, Kwon, Kim, "Multi-aspect Knowledge Distillation with Large Language Model",
arXiv:2501.13341, 2025. The paper asks a multimodal LLM N yes/no questions about aspects of each
training image, takes the answers' logits as aspect targets, widens the student's final layer from
K to K + N outputs and trains

    L = CE(z_class, y) + alpha BCE(sigmoid(z_aspect), p_aspect).

Here the K + N wide layer is the student's own K-wide head plus an N-wide linear ``aspect_head`` on
the same penultimate features (the same thing split in two, so the saved model stays a K-class
Classifier and evaluation is unchanged); the aspect head is trained with the student and dropped
at test time.

Where the targets come from (``aspect_source``): no image-text model is available offline, so the
aspect scores are CLASS-LEVEL, from the MiniLM text tower (``classlab.models.text``), not per-image
answers of an MLLM (``minilm_class_level``):

    cos[k, a] = <e("a photo of a {class k}"), e(aspect prompt a)>   (unit-norm MiniLM embeddings)
    p[k, a]   = (cos[k, a] - min_k cos[., a]) / (max_k cos[., a] - min_k cos[., a])

a per-aspect min-max over the classes, so each aspect's scores span [0, 1] (the class that fits the
prompt best gets 1, the worst 0). Every image of class y gets the target row p[y]. The scores are
computed once, before training, from the dataset's class names (``class_names``, set by the engine)
and kept in a buffer. With the vision-language family's image-text model these become per-image
scores of the aspect prompts.

A teacher network is accepted but not required: the paper distils only the aspect logits (the
"teacher" is the source of the aspect scores). Given ``--teacher`` and ``kd_weight`` > 0, Hinton's
T^2 KL term on the class logits is added as in ``kd``; the default ``kd_weight`` 0 is the paper's loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.distill.kd import KD
from classlab.methods.registry import register_method

ASPECT_SOURCES = ("minilm_class_level",)


def class_aspect_scores(class_names, aspects, class_prompt: str = "a photo of a {}") -> torch.Tensor:
    """(K, A) aspect scores in [0, 1]: MiniLM cosine of each class prompt with each aspect prompt,
    min-max scaled per aspect over the classes (0.5 where an aspect does not separate the classes)."""
    from classlab.models.text import encode_texts

    classes = encode_texts([class_prompt.format(name) for name in class_names])
    prompts = encode_texts(list(aspects))
    cos = classes @ prompts.T  # cos[k, a] = <e_k, e_a>, both unit-norm
    low, high = cos.min(dim=0).values, cos.max(dim=0).values
    span = high - low
    # p[k, a] = (cos[k, a] - min_k cos) / (max_k cos - min_k cos)
    scores = (cos - low) / span.clamp_min(1e-8)
    scores = torch.where(span > 1e-8, scores, torch.full_like(scores, 0.5))
    return scores.clamp(0.0, 1.0)


def aspect_bce(aspect_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE(sigmoid(z), p), averaged over samples and aspects."""
    # BCE = -[p log sigmoid(z) + (1 - p) log(1 - sigmoid(z))]; d/dz = sigmoid(z) - p
    return F.binary_cross_entropy_with_logits(aspect_logits.float(), targets.float())


@register_method("distill", "multi_aspect_kd")
class MultiAspectKD(KD):
    requires_teacher = False
    resizable_buffers = ("aspect_scores",)

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        source = self.hparams.get("aspect_source", "minilm_class_level")
        if source not in ASPECT_SOURCES:
            raise ValueError(f"method distill/multi_aspect_kd: aspect_source {source!r} is not available; "
                             f"known: {list(ASPECT_SOURCES)}")
        aspects = list(self.hparams.get("aspects") or [])
        if not aspects:
            raise ValueError("method distill/multi_aspect_kd needs at least one aspect prompt (hparam `aspects`)")
        self.aspect_head = nn.Linear(int(model.head.in_features), len(aspects))
        self.register_buffer("aspect_scores", torch.zeros(0))

    def param_groups(self) -> list[dict]:
        params = [p for p in self.model.parameters() if p.requires_grad] + list(self.aspect_head.parameters())
        return [{"params": params}]

    def on_train_start(self, loader) -> None:
        super().on_train_start(loader)
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"method distill/multi_aspect_kd: {len(self.class_names)} class names for "
                             f"{self.num_classes} classes")
        scores = class_aspect_scores(self.class_names, self.hparams["aspects"],
                                     self.hparams.get("class_prompt", "a photo of a {}"))
        self.aspect_scores = scores.to(self.aspect_head.weight.device)

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        features = self.model.features(x)
        logits = self.model.head(features)
        aspect_logits = self.aspect_head(features)
        logs = {"logits": logits.detach()}
        teacher_logits = self.teacher_outputs(x)[1] if self.teacher is not None else None
        # L = CE(z_class, y) + alpha BCE(sigmoid(z_aspect), p[y])   (+ w_kd T^2 KL with a teacher)
        loss = self.ce_and_kd(logits, y, teacher_logits, logs)
        bce = aspect_bce(aspect_logits, self.aspect_scores[y])
        loss = loss + float(self.hparams.get("aspect_weight", 1.0)) * bce
        logs["aspect_bce"] = bce.detach()
        return loss, logs
