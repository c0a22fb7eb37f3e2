"""What every semantic segmentation method of the dense family shares: one pixel decoder and one
training step (the methods are in ``classlab.methods.dense``; this module is not a method).

Pixel decoder. The backbone's last feature map F (B, D, h, w) (``DenseLearner.features``; 21x21 on
84x84 scenes with the convnet of the family's default) knows which garment sits where but is too
coarse to trace a garment's outline; a shallow stem of 3x3 convolutions on the image itself sees each
pixel's colour and brightness (the masks are the bright pixels of the pasted object). The decoder

    Z = context(ReLU(BN(W_p F)))                                  (B, d, h, w)        ``project``
    E = ReLU(BN(conv3x3([upsample(Z), stem(x)])))                 (B, d, H/s, W/s)    ``upsample_fuse``

gives every pixel a d-dimensional embedding. ``context`` is ``context_depth`` 3x3 convolutions on the
coarse grid (the small convnet's receptive field, about 18 pixels, is less than a 28-pixel garment;
each of them adds 8). s = ``embedding_stride``: E is computed at 1/s of the image's resolution (the
stem's first convolution has stride s) and the logits are upsampled bilinearly to the image, which
keeps a CPU run within its budget at s = 2. Every segmentation method reads E the same way; they
differ in the head on E and in the loss: a 1x1 convolution (``pixel_head``, and the calibration losses
on its logits), or class tokens decoded against Z and dotted with E (``segface``, which refines Z
between the two stages, as SegFace refines its fused features before upscaling them).

Training step. ``segment_logits(x)`` gives (B, C + 1, H, W) logits, channel 0 the background; the
loss of a batch is ``pixel_loss(logits, semantic_target)``, the hook each loss method overrides;
by default the pixel-wise cross-entropy with the ``label_smoothing`` hyperparameter (0 unless set;
``label_smoothing.yaml`` sets it). Pixels labelled ``IGNORE_INDEX`` count in no loss.

Hyperparameters read here (the same in every segmentation YAML, a test checks): ``decoder_dim`` (d),
``context_depth``, ``stem_width`` (the stem's channels), ``stem_depth`` (its 3x3 convolutions) and
``embedding_stride`` (s).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.methods.dense_learner import DenseLearner

IGNORE_INDEX = 255  # classlab.data.dense_scenes: the semantic masks' reserved "ignore" value
DECODER_KEYS = ("decoder_dim", "context_depth", "stem_width", "stem_depth", "embedding_stride")


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class PixelDecoder(nn.Module):
    """Backbone map -> per-pixel embeddings E (B, dim, H / stride, W / stride) (module docstring)."""

    def __init__(self, feature_channels: int, in_chans: int, dim: int, stem_width: int, stem_depth: int = 1,
                 stride: int = 1, context_depth: int = 0):
        super().__init__()
        self.dim = int(dim)
        self.stride = int(stride)
        # 1x1 to the decoder's width, then 3x3 convolutions on the coarse grid: each widens the receptive
        # field by 2 cells of the map (8 pixels at stride 4), so that a whole 28-pixel garment is seen
        self.proj = nn.Sequential(conv_bn_relu(feature_channels, self.dim, 1),
                                  *(conv_bn_relu(self.dim, self.dim, 3) for _ in range(int(context_depth))))
        layers, prev = [], in_chans
        for d in range(int(stem_depth)):
            layers.append(conv_bn_relu(prev, stem_width, 3, stride=self.stride if d == 0 else 1))
            prev = stem_width
        if not layers and self.stride > 1:
            layers.append(nn.AvgPool2d(self.stride))
        self.stem = nn.Sequential(*layers)
        self.fuse = conv_bn_relu(self.dim + (stem_width if stem_depth > 0 else in_chans), self.dim, 3)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Z: the backbone map in the decoder's width (and ``context_depth`` 3x3 convolutions), still at (h, w)."""
        return self.proj(features)

    def upsample_fuse(self, coarse: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """E from a coarse map (B, dim, h, w) and the image (B, 3, H, W)."""
        local = self.stem(x) if len(self.stem) else x
        up = F.interpolate(coarse, size=local.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([up, local], dim=1))

    def forward(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.upsample_fuse(self.project(features), x)


def _int_key(hparams: dict, key: str, minimum: int = 1) -> int:
    if key not in hparams:
        raise ConfigError(f"{key}: missing; every dense segmentation method sets {list(DECODER_KEYS)}")
    value = hparams[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: an integer >= {minimum} expected, got {value!r}")
    return int(value)


class PixelSegmenter(DenseLearner):
    """Base of the segmentation methods: the shared ``PixelDecoder``, ``segment_logits`` from a head
    (``logits_from`` by subclasses), the training step over ``pixel_loss``."""

    task = "segmentation"

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int,
                 image_shape: tuple[int, int, int] = (3, 84, 84)):
        super().__init__(model, hparams, num_classes, image_shape=image_shape)
        self.num_outputs = int(num_classes) + 1  # channel 0 is the background
        dim = _int_key(self.hparams, "decoder_dim")
        stem_width = _int_key(self.hparams, "stem_width")
        stem_depth = _int_key(self.hparams, "stem_depth", minimum=0)
        smoothing = float(self.hparams.get("label_smoothing", 0.0) or 0.0)
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"label_smoothing: in [0, 1) expected, got {smoothing}")
        self.label_smoothing = smoothing
        stride = _int_key(self.hparams, "embedding_stride")
        context_depth = _int_key(self.hparams, "context_depth", minimum=0)
        self.decoder = PixelDecoder(self.feature_shape[0], self.image_shape[0], dim, stem_width, stem_depth, stride,
                                    context_depth)

    # --- prediction --------------------------------------------------------------------------------
    def pixel_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """E (B, decoder_dim, H / embedding_stride, W / embedding_stride)."""
        return self.decoder(self.features(x), x)

    def logits_from(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def segment_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logits_from(x)
        if tuple(logits.shape[-2:]) != tuple(x.shape[-2:]):  # embeddings at 1 / embedding_stride
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits

    # --- training ----------------------------------------------------------------------------------
    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(loss, logs) of one batch: the pixel-wise cross-entropy, label-smoothed by ``label_smoothing``
        (Szegedy et al. 2016: target (1 - eps) onehot + eps / K)."""
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        return ce, {"ce": ce.detach()}

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        target = self.batch_targets(batch).semantic
        logits = self.segment_logits(batch["x"])
        if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
            raise RuntimeError(f"dense/{self.name}: logits {tuple(logits.shape)} for masks {tuple(target.shape)}")
        loss, logs = self.pixel_loss(logits, target)
        # per-pixel logits stay out of logs: the engine reads logs["logits"] as one row per image
        return loss, logs
