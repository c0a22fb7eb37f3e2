"""The keyword arguments each backbone accepts, as data: one place, read without torch.

``classlab.config`` checks a config's ``backbone_kwargs`` against these when the Snakefile is
parsed (types and ranges too); ``classlab.models.backbones.build_backbone`` refuses any other
keyword when a model is built (the ConvNet would otherwise swallow a misspelt one). Each entry
is a JSON Schema fragment for the value. Adding a keyword to a backbone: add it here.

This module sits outside ``classlab.models`` on purpose: that package imports torch and timm.
"""
from __future__ import annotations

_RATE = {"type": "number", "minimum": 0, "maximum": 1}

BACKBONE_KWARGS: dict[str, dict[str, dict]] = {
    # SmallConvNet: channels of each conv block; 2x2 max-pool after the blocks listed
    "convnet": {
        "widths": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 1}},
        "pool_after": {"type": "array", "uniqueItems": True, "items": {"type": "integer", "minimum": 0}},
    },
    # timm ResNet-18 with a 3x3 stride-1 stem
    "resnet18": {
        "drop_rate": _RATE,
        "drop_path_rate": _RATE,
    },
    # timm VisionTransformer with p x p patches (img_size comes from the data; patch_size p, default 4,
    # must divide it)
    "vit_tiny": {
        "patch_size": {"type": "integer", "minimum": 1},
        "depth": {"type": "integer", "minimum": 1},
        "embed_dim": {"type": "integer", "minimum": 1},
        "num_heads": {"type": "integer", "minimum": 1},
        "mlp_ratio": {"type": "number", "exclusiveMinimum": 0},
        "qkv_bias": {"type": "boolean"},
        "drop_rate": _RATE,
        "proj_drop_rate": _RATE,
        "attn_drop_rate": _RATE,
        "drop_path_rate": _RATE,
    },
    # DeepMLP: `depth` fully connected ReLU layers of `width` units on the flattened image;
    # init "simple" is N(0, init_std^2) (Neelakantan et al. 2015's poor init), "he" N(0, 2/fan_in)
    "deep_mlp": {
        "depth": {"type": "integer", "minimum": 1},
        "width": {"type": "integer", "minimum": 1},
        "init": {"type": "string", "enum": ["simple", "he"]},
        "init_std": {"type": "number", "exclusiveMinimum": 0},
    },
    # DC's ConvNet (condensation): `depth` blocks of 3x3 conv (`width` channels), instance norm, ReLU, 2x2
    # average pooling; features are the flattened last map (img_size comes from the data)
    "convnet_dc": {
        "width": {"type": "integer", "minimum": 1},
        "depth": {"type": "integer", "minimum": 1},
    },
}


def unknown_backbone_kwargs(name: str, kwargs: dict) -> list[str]:
    """The keywords of ``kwargs`` that backbone ``name`` does not declare (sorted)."""
    return sorted(set(kwargs) - set(BACKBONE_KWARGS.get(name, {})))


def check_backbone_kwargs(name: str, kwargs: dict) -> None:
    """Raise ValueError naming ``backbone_kwargs.<name>.<key>`` for an undeclared keyword."""
    if name not in BACKBONE_KWARGS:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONE_KWARGS)}")
    unknown = unknown_backbone_kwargs(name, kwargs)
    if unknown:
        keys = ", ".join(f"backbone_kwargs.{name}.{k}" for k in unknown)
        raise ValueError(f"unknown keyword {keys}; {name} accepts {sorted(BACKBONE_KWARGS[name])}")


# The named stages of each backbone (classlab.models.backbones.layer_names without building the
# model): checked when the Snakefile is parsed, so a misspelt layer stops the run before any job.
_DEFAULT_DEPTH = {"convnet": 5, "vit_tiny": 12, "deep_mlp": 20, "convnet_dc": 3}


def stage_names(name: str, kwargs: dict | None = None) -> list[str]:
    """The layer names of backbone ``name`` with ``kwargs``, input to output, then pooled and logits."""
    kwargs = kwargs or {}
    if name == "convnet":
        stages = [f"block{i}" for i in range(len(kwargs.get("widths", [0] * _DEFAULT_DEPTH[name])))]
    elif name == "resnet18":
        stages = ["stem", "layer1", "layer2", "layer3", "layer4"]
    elif name in ("vit_tiny", "deep_mlp", "convnet_dc"):
        stages = [f"block{i}" for i in range(int(kwargs.get("depth", _DEFAULT_DEPTH[name])))]
    else:
        raise ValueError(f"unknown backbone {name!r}; known: {sorted(BACKBONE_KWARGS)}")
    return [*stages, "pooled", "logits"]
