"""Backbones through timm: a name maps to a constructor, nothing else.

Every backbone returns pooled features (``num_classes=0`` in timm terms); the ``Classifier``
adds the linear head, so methods can swap heads, freeze the backbone or read features.
``pretrained`` is off by default; when a config turns it on, timm fetches ImageNet weights
(which needs internet and 3-channel inputs; single-channel images are repeated).
"""
from __future__ import annotations

from typing import Callable

import timm
import torch
from timm.models import register_model
from torch import nn


class SmallConvNet(nn.Module):
    """A BN ConvNet for 28x28 and 32x32 images: conv blocks of 3x3 conv, BN, ReLU.

    ``widths`` lists the channels of each block; a 2x2 max-pool follows every block whose
    index is in ``pool_after``. Global average pooling gives the feature vector.
    """

    def __init__(self, in_chans: int = 1, num_classes: int = 0, widths=(32, 32, 64, 64, 128),
                 pool_after=(1, 3), **_: object):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_chans
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(prev, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            prev = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = prev
        self.head = nn.Linear(prev, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.forward_features(x)).flatten(1))


@register_model
def classlab_convnet(pretrained: bool = False, **kwargs) -> SmallConvNet:
    if pretrained:
        raise ValueError("classlab_convnet has no published weights; set pretrained: false")
    return SmallConvNet(**kwargs)


def _convnet(in_chans: int, pretrained: bool, **kw) -> nn.Module:
    return timm.create_model("classlab_convnet", pretrained=pretrained, in_chans=in_chans, num_classes=0, **kw)


def _resnet18_small(in_chans: int, pretrained: bool, **kw) -> nn.Module:
    # ResNet-18 adapted to 28x28/32x32 inputs: 3x3 stride-1 stem and no max-pool, as is
    # usual for CIFAR-sized images (the ImageNet stem would leave a 1x1 map).
    model = timm.create_model("resnet18", pretrained=pretrained, in_chans=in_chans, num_classes=0, **kw)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _vit_tiny_p4(in_chans: int, pretrained: bool, img_size: int = 28, **kw) -> nn.Module:
    # ViT-Tiny (192-dim, 12 blocks, 3 heads) with 4x4 patches: a 28x28 image gives 49 tokens.
    return timm.create_model("vit_tiny_patch16_224", pretrained=pretrained, in_chans=in_chans, num_classes=0,
                             img_size=img_size, patch_size=4, **kw)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "convnet": _convnet,
    "resnet18": _resnet18_small,
    "vit_tiny": _vit_tiny_p4,
}


def build_backbone(name: str, in_chans: int, pretrained: bool = False, img_size: int | None = None,
                   **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    if name == "vit_tiny" and img_size is not None:
        kwargs["img_size"] = img_size
    return BACKBONES[name](in_chans=in_chans, pretrained=pretrained, **kwargs)


class Classifier(nn.Module):
    """backbone -> pooled features -> linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.head = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_classifier(backbone: str, in_chans: int, num_classes: int, img_size: int | None = None,
                     pretrained: bool = False, backbone_kwargs: dict | None = None) -> Classifier:
    return Classifier(build_backbone(backbone, in_chans, pretrained, img_size, **(backbone_kwargs or {})), num_classes)
