"""The vlm family's learner: every method adapts a pretrained image-text model to few-shot base classes.

The model a vlm method receives is the pretrain stage's offline CLIP (``pretrain/image_text``, its
``clip``: image encoder, projections, temperature), frozen. A method says only what differs:

- ``build(class_names)``: create its learnable parts (context vectors, a meta-net, adapters) once the
  class names are known; called by the protocol before the optimizer exists, so they are trained and
  checkpointed like any parameter of the method;
- ``text_features(classes, image)``: joint-space features of the given classes, (C, E), or per image
  (B, C, E) where the prompt depends on the image (CoCoOp); unit-norm, except where a method mixes
  branches on purpose (KAPT, MSGCoOp: a weighted sum of unit features makes the logits the same
  weighted sum of the branches' logits);
- ``extra_loss(logits, targets, image, text)``: a regulariser added to the cross-entropy (KgCoOp's
  distance to the hand-written prompts); none by default;
- ``tune_image(image, text)``: the image features as the method adapts them to the class texts
  before scoring (TMM's text-guided feature tuning); the identity by default.

``training_step`` is the same for all: image features of the batch (a frozen encoder unless the method
trains it), logits ``exp(t) <image, text>`` over the TRAINING classes only (the base classes: the new
ones are never candidates in training, as in CoOp/CoCoOp's base-to-novel protocol), cross-entropy on
the position of the label among them, plus ``extra_loss``. ``forward`` scores every class, so one
prediction pass serves base accuracy (among base), new accuracy (among new) and H
(``classlab.metrics.vlm``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.base import Method

# CoOp's hand-written prompt for a photo dataset, the zero-shot baseline and KgCoOp's anchor
HAND_WRITTEN = "a photo of a {}."


class PromptMethod(Method):
    family = "vlm"
    learns: bool = True  # False: nothing is trained (zero-shot, training-free caches)
    predicts_unobserved: bool = True  # False: scores only the training classes (new accuracy undefined)
    pairs: dict | None = None  # a pairs dataset's manifest section, set by the compositional protocol

    def __init__(self, model, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        if not hasattr(model, "clip"):
            raise ValueError("a vlm method needs the pretrain stage's image_text model (pretrain/image_text), "
                             f"got {type(model).__name__}")
        model.requires_grad_(False)
        self.clip = model.clip
        self.train_classes: list[int] = list(range(num_classes))
        self.register_buffer("hand_written", torch.zeros(0), persistent=False)

    # --- what a method says -------------------------------------------------------------
    def build(self, class_names: list[str]) -> None:
        """Create the learnable parts for these classes (the protocol calls it before training)."""
        self.class_names = list(class_names)
        from classlab.models.image_text import encode_sentences

        sentences = encode_sentences([HAND_WRITTEN.format(n) for n in self.class_names])
        self.hand_written = sentences.to(self.clip.logit_scale.device)

    def text_features(self, classes: list[int], image: torch.Tensor) -> torch.Tensor:
        """The hand-written prompts' features (zero-shot CLIP); methods override."""
        return self.clip.encode_text(self.hand_written[classes])

    def use_pairs(self) -> torch.Tensor:
        """For a method that scores attributes and objects (CSP, ComCa): sets ``attributes`` and
        ``objects`` from ``self.pairs`` and returns ``pair_index`` (K, 2), each class's (attribute,
        object), registered as a buffer. No pairs (a dataset that is not a pairs dataset) is an error."""
        if not self.pairs or "pairs" not in self.pairs:
            raise ValueError(f"{type(self).__name__} scores attributes and objects: it needs a pairs dataset "
                             "(the compositional protocol sets method.pairs from the manifest)")
        self.attributes, self.objects = list(self.pairs["attributes"]), list(self.pairs["objects"])
        index = torch.as_tensor(self.pairs["pairs"], dtype=torch.long)
        if index.shape != (self.num_classes, 2):
            raise ValueError(f"pairs gives {tuple(index.shape)} (attribute, object) rows for {self.num_classes} classes")
        self.register_buffer("pair_index", index.to(self.clip.logit_scale.device), persistent=False)
        return self.pair_index

    def extra_loss(self, logits: torch.Tensor, targets: torch.Tensor, image: torch.Tensor,
                   text: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return logits.new_zeros(()), {}

    # --- shared -------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        params = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("model.")]
        return [{"params": params}]

    def train(self, mode: bool = True):
        # a frozen image encoder keeps its BatchNorm statistics: it stays in eval mode while prompts train
        super().train(mode)
        if not any(p.requires_grad for p in self.clip.image_encoder.parameters()):
            self.model.eval()
        return self

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        if any(p.requires_grad for p in self.clip.image_encoder.parameters()):
            return self.clip.encode_image(x)
        with torch.no_grad():
            return self.clip.encode_image(x)

    def positions_among(self, y: torch.Tensor, classes: list[int] | None = None) -> torch.Tensor:
        """Each label's position among ``classes`` (the training classes by default): the target of a
        cross-entropy over those classes' logits. A label outside them is an error."""
        classes = self.train_classes if classes is None else classes
        position = torch.full((self.num_classes,), -1, dtype=torch.long, device=y.device)
        position[torch.tensor(classes, device=y.device)] = torch.arange(len(classes), device=y.device)
        targets = position[y]
        if bool((targets < 0).any()):
            raise ValueError(f"a training label is outside the training classes {classes}")
        return targets

    def training_step(self, batch: dict):
        x, y = batch["x"], batch["y"]
        classes = self.train_classes
        targets = self.positions_among(y)
        image = self.encode_image(x)
        text = self.text_features(classes, image)
        image = self.tune_image(image, text)
        logits = self.clip.logits(image, text)
        ce = F.cross_entropy(logits, targets)
        extra, logs = self.extra_loss(logits, targets, image, text)
        acc = float((logits.argmax(1) == targets).float().mean())
        return ce + extra, {"ce": float(ce.detach()), "train_acc": acc, **logs}

    def tune_image(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = self.encode_image(x)
        text = self.text_features(list(range(self.num_classes)), image)
        return self.clip.logits(self.tune_image(image, text), text)
