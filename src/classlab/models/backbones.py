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


def _vit_tiny_p4(in_chans: int, pretrained: bool, img_size: int = 28, patch_size: int = 4, **kw) -> nn.Module:
    # ViT-Tiny (192-dim, 12 blocks, 3 heads) with p x p patches, p = ``patch_size`` (4 by default):
    # a 28x28 image gives (28 / 4)^2 = 49 patch tokens. Depth, width and heads follow backbone_kwargs.
    if patch_size < 1 or img_size % patch_size:
        raise ValueError(f"backbone_kwargs.vit_tiny.patch_size: {patch_size} must be a positive divisor of the "
                         f"image size {img_size}")
    return timm.create_model("vit_tiny_patch16_224", pretrained=pretrained, in_chans=in_chans, num_classes=0,
                             img_size=img_size, patch_size=patch_size, **kw)


class DeepMLP(nn.Module):
    """A deep fully connected ReLU network on the flattened image: the model of Neelakantan et al.,
    "Adding Gradient Noise Improves Learning for Very Deep Networks" (arXiv 1511.06807, 2015), whose
    MNIST experiment trains ``depth`` = 20 hidden layers of ``width`` = 50 units (the Classifier's
    head is the output layer).

    ``init``: "simple", the paper's poor initialisation, every weight drawn from N(0, init_std^2)
    with init_std 0.1 (biases zero); with 50 units a layer and ReLU the signal shrinks about 2x per
    layer, so the 20-layer net starts with almost no gradient. "he": N(0, 2 / fan_in) (He et al.,
    2015), one of the paper's good initialisations, for comparison. Stages block0 ..
    block{depth-1} are the hidden layers' activations (after their ReLU), (B, width).
    """

    def __init__(self, in_features: int, depth: int = 20, width: int = 50, init: str = "simple",
                 init_std: float = 0.1):
        super().__init__()
        if init not in ("simple", "he"):
            raise ValueError(f"deep_mlp init must be 'simple' or 'he', got {init!r}")
        prev = in_features
        for i in range(depth):
            linear = nn.Linear(prev, width)
            std = init_std if init == "simple" else (2.0 / prev) ** 0.5
            nn.init.normal_(linear.weight, 0.0, std)
            nn.init.zeros_(linear.bias)
            self.add_module(f"block{i}", nn.Sequential(linear, nn.ReLU()))
            prev = width
        self.depth = depth
        self.num_features = width

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i in range(self.depth):
            h = getattr(self, f"block{i}")(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _deep_mlp(in_chans: int, pretrained: bool, img_size: int | tuple[int, int] = 28, **kw) -> nn.Module:
    if pretrained:
        raise ValueError("deep_mlp has no published weights; set pretrained: false")
    # a square image, or (H, W): tabular rows are stored as (1, 1, features)
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return DeepMLP(in_chans * h * w, **kw)


class ConvNetDC(nn.Module):
    """DC's ConvNet (Zhao, Mopuri and Bilen, "Dataset Condensation with Gradient Matching", ICLR 2021),
    the network of the condensation family: ``depth`` blocks (``block0`` ..) of 3x3 conv with ``width``
    channels and a bias, instance norm (a GroupNorm with one group per channel, affine), ReLU and 2x2
    average pooling. The feature vector is the flattened last map (DC's classifier is one linear layer
    on it). Single-channel 28x28 images: the first conv pads by 3, so the map is 32x32 as for CIFAR.
    """

    def __init__(self, in_chans: int = 1, img_size: int = 28, width: int = 128, depth: int = 3):
        super().__init__()
        size, prev = int(img_size), in_chans
        for d in range(depth):
            pad = 3 if (in_chans == 1 and d == 0) else 1
            self.add_module(f"block{d}", nn.Sequential(
                nn.Conv2d(prev, width, 3, padding=pad), nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True), nn.AvgPool2d(2, 2)))
            size, prev = (size + 2 * pad - 2) // 2, width
        self.depth = depth
        self.num_features = width * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in range(self.depth):
            x = getattr(self, f"block{d}")(x)
        return x.flatten(1)


def _convnet_dc(in_chans: int, pretrained: bool, img_size: int | None = None, **kw) -> nn.Module:
    if pretrained:
        raise ValueError("convnet_dc has no published weights; set pretrained: false")
    return ConvNetDC(in_chans, 28 if img_size is None else int(img_size), **kw)


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "convnet": _convnet,
    "resnet18": _resnet18_small,
    "vit_tiny": _vit_tiny_p4,
    "deep_mlp": _deep_mlp,
    "convnet_dc": _convnet_dc,
}


def build_backbone(name: str, in_chans: int, pretrained: bool = False, img_size: int | None = None,
                   **kwargs) -> nn.Module:
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    from classlab.backbone_specs import check_backbone_kwargs

    check_backbone_kwargs(name, kwargs)  # the declared keywords only (SmallConvNet would swallow any)
    if name in ("vit_tiny", "deep_mlp", "convnet_dc") and img_size is not None:
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


# --- intermediate layers by name (saliency, feature distillation) ---------------------------
#
# Every backbone names its stages, input to output, followed by "pooled" (the backbone's
# feature vector) and "logits" (the head's output):
#   convnet:  block0 .. block{k-1}: each conv block's activation (after its ReLU, before any
#             max-pool), (B, C, H, W);
#   resnet18: stem (after the first conv/BN/ReLU), layer1 .. layer4, (B, C, H, W);
#   vit_tiny: block0 .. block{depth-1} (block11 at the default depth 12): each transformer block's
#             patch tokens as a map (B, D, H/p, W/p), p the patch size (backbone_kwargs patch_size,
#             default 4), class token dropped (timm's NCHW intermediates).
#   deep_mlp: block0 .. block{depth-1}: each hidden layer's activation (after its ReLU), (B, width).
# timm backbones that offer ``forward_intermediates`` (ResNet, ViT) are read through it;
# the rest through forward hooks. Any submodule name of the classifier (``backbone.blocks.3``,
# ``head``) is accepted too and gives that module's raw output through a hook.

_FINAL = ("pooled", "logits")


def _stages(model: Classifier) -> dict[str, tuple[str, object]]:
    """Stage name -> ("timm", index for forward_intermediates) or ("module", submodule name)."""
    backbone = model.backbone
    if isinstance(backbone, SmallConvNet):
        relus = [i for i, layer in enumerate(backbone.features) if isinstance(layer, nn.ReLU)]
        return {f"block{b}": ("module", f"backbone.features.{i}") for b, i in enumerate(relus)}
    if isinstance(backbone, timm.models.resnet.ResNet):
        return {name: ("timm", i) for i, name in enumerate(("stem", "layer1", "layer2", "layer3", "layer4"))}
    if isinstance(backbone, timm.models.vision_transformer.VisionTransformer):
        return {f"block{i}": ("timm", i) for i in range(len(backbone.blocks))}
    # another backbone: its top-level children, through hooks
    return {name: ("module", f"backbone.{name}") for name, _ in backbone.named_children()}


def layer_names(model: Classifier) -> list[str]:
    """The named stages of ``model`` (a ``Classifier``), input to output, then pooled and logits."""
    return [*_stages(model), *_FINAL]


def intermediates(model: Classifier, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
    """The outputs named in ``names`` of one forward pass of ``model`` on ``x``.

    Names come from ``layer_names(model)`` or are submodule names of ``model``. Hooked outputs
    (ConvNet stages, submodule names) stay in the autograd graph unless the caller runs under
    ``torch.no_grad()``; the stages read through timm's ``forward_intermediates`` (ResNet, ViT)
    are reshaped copies off the path to the logits, so gradients do not reach them: saliency
    methods hook the stage's module instead (``classlab.methods.saliency_method.stage_modules``).
    Mode and device are the caller's.
    """
    names = list(dict.fromkeys(names))
    stages = _stages(model)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in stages and n not in _FINAL and n not in modules]
    if unknown:
        raise KeyError(f"unknown layers {unknown}; named stages: {layer_names(model)} (or any submodule name)")
    timm_index = {n: stages[n][1] for n in names if n in stages and stages[n][0] == "timm"}
    hooked = {n: (stages[n][1] if n in stages else n) for n in names
              if n not in timm_index and n not in _FINAL}
    out: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_module, _inputs, output):
            out[name] = output
        return hook

    handles = [modules[m].register_forward_hook(keep(n)) for n, m in hooked.items()]
    try:
        if timm_index:
            backbone = model.backbone
            order = sorted(set(timm_index.values()))
            if hooked or any(n in _FINAL for n in names):
                final, maps = backbone.forward_intermediates(x, indices=order, intermediates_only=False)
                pooled = backbone.forward_head(final)
                out["pooled"], out["logits"] = pooled, model.head(pooled)
            else:  # stages only: stop after the last one asked for
                maps = backbone.forward_intermediates(x, indices=order, stop_early=True, intermediates_only=True)
            for n, i in timm_index.items():
                out[n] = maps[order.index(i)]
        else:
            pooled = model.backbone(x)
            out["pooled"], out["logits"] = pooled, model.head(pooled)
    finally:
        for handle in handles:
            handle.remove()
    return {n: out[n] for n in names}


def dense_features(model: Classifier, x: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map, (B, D, h, w), in the autograd graph: what dense methods
    train on (CoTAP) and dense probes read (a segmentation probe on frozen features).

    ConvNet: the last block's activation (before global pooling; after its max-pool if it has
    one). ResNet: layer4. ViT: the final-normed patch tokens as a map, class token dropped (the
    tokens the pooled feature is computed from, not an un-normed intermediate block).
    """
    backbone = model.backbone
    if isinstance(backbone, SmallConvNet):
        return backbone.forward_features(x)
    if isinstance(backbone, timm.models.vision_transformer.VisionTransformer):
        tokens = backbone.forward_features(x)[:, backbone.num_prefix_tokens:]
        h, w = backbone.patch_embed.dynamic_feat_size(x.shape[-2:]) if hasattr(
            backbone.patch_embed, "dynamic_feat_size") else backbone.patch_embed.grid_size
        return tokens.transpose(1, 2).reshape(len(x), tokens.shape[-1], h, w)
    if isinstance(backbone, timm.models.resnet.ResNet):
        return backbone.forward_features(x)
    raise TypeError(f"dense_features: no feature map for a {type(backbone).__name__} backbone "
                    f"(convnet, resnet18 and vit_tiny have one)")
