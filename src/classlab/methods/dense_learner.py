"""The dense family's learner: what every detection and segmentation method on scenes shares (the
protocol is ``classlab.protocols.dense``).

A method is a ``DenseLearner`` of one ``task``:

- ``"detection"``: ``detect(x)`` returns, per image, the kept detections (boxes x0, y0, x1, y1 in
  canvas pixels, scores in [0, 1], class ids 0..C-1), scored by pycocotools' COCO AP;
- ``"segmentation"``: ``segment_logits(x)`` returns per-pixel logits (B, C + 1, H, W) at the image's
  resolution, channel 0 the background (the VOC convention of the scenes' semantic masks); the
  protocol scores the argmax (IoU, F1) and the softmax (pixel calibration).

The backbone is the repo's classifier (``classlab.models.build_classifier``); its last feature map
(``classlab.models.backbones.dense_features``) is what the heads read, its own classification head is
unused. ``feature_shape`` (D, h, w) is measured once on a blank image of the dataset's shape.

Targets. The engine's loader yields the images and their train-split positions (``batch["index"]``);
the protocol hands the whole train split's targets to ``set_targets`` once (plain attributes, not
buffers: they are data, not state, and stay out of checkpoints), and ``training_step`` reads its
batch's rows with ``batch_targets(batch)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from classlab.methods.base import Method
from classlab.models.backbones import dense_features

FAMILY = "dense"
TASKS = ("detection", "segmentation")


@dataclass
class DenseTargets:
    """The targets of a split, on the training device. ``boxes`` float32 (N, k_max, 4) x0, y0, x1, y1
    (x1, y1 exclusive, canvas pixels); ``labels`` int64 (N, k_max), class 0..C-1, -1 pads a slot;
    ``semantic`` int64 (N, H, W), 0 background and k + 1 class k."""

    boxes: torch.Tensor
    labels: torch.Tensor
    semantic: torch.Tensor

    def rows(self, index: torch.Tensor) -> "DenseTargets":
        return DenseTargets(self.boxes[index], self.labels[index], self.semantic[index])

    def to(self, device) -> "DenseTargets":
        return DenseTargets(self.boxes.to(device), self.labels.to(device), self.semantic.to(device))

    def objects(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (k, 4), labels (k,)) of image ``i``, padding dropped."""
        keep = self.labels[i] >= 0
        return self.boxes[i][keep], self.labels[i][keep]


class DenseLearner(Method):
    """Base of the dense methods: a backbone, a task, targets read by batch position."""

    task: str = "segmentation"
    augment = False  # flips and shifts would have to move the boxes and masks with the pixels

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int,
                 image_shape: tuple[int, int, int] = (3, 84, 84)):
        super().__init__(model, hparams, num_classes)
        self.image_shape = tuple(int(v) for v in image_shape)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            fmap = dense_features(model, torch.zeros(1, *self.image_shape))
        model.train(was_training)
        self.feature_shape = tuple(int(v) for v in fmap.shape[1:])  # (D, h, w)
        self.targets: DenseTargets | None = None

    # --- data ------------------------------------------------------------------------------------
    def set_targets(self, targets: DenseTargets) -> None:
        self.targets = targets

    def batch_targets(self, batch: dict) -> DenseTargets:
        if self.targets is None:
            raise RuntimeError(f"dense/{self.name}: set_targets was not called before training")
        index = batch["index"].to(self.targets.labels.device)
        return self.targets.rows(index)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map (B, D, h, w), in the autograd graph."""
        return dense_features(self.model, x)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # --- prediction (one of them, by task) ------------------------------------------------------
    def detect(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per image: ``{"boxes": (n, 4) float, "scores": (n,), "labels": (n,) int64}``."""
        raise NotImplementedError(f"dense/{self.name} is a {self.task} method")

    def segment_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C + 1, H, W) logits at the image's resolution, channel 0 background."""
        raise NotImplementedError(f"dense/{self.name} is a {self.task} method")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task == "segmentation":
            return self.segment_logits(x)
        raise NotImplementedError("a detector's output is a list: call detect(x)")
