"""What a saliency method is, and the pieces every one of them shares.

A ``SaliencyMethod`` explains a trained classifier; it is not trained and it is not an
``nn.Module``. It is registered like every method (``register_method("explain", name)``), its
hyperparameters come from ``config/methods/explain/<name>.yaml`` and its constructor takes them
alone: ``get_method("explain", name)(resolve_hparams("explain", name, overrides))``.

- ``attribute(model, x, classes, layer)`` -> ``(B, h, w)``: the raw map at its native resolution
  (the layer's grid for the layered methods, the input grid for the input-space ones), no
  normalisation. ``model`` is a ``classlab.models.backbones.Classifier``; ``x`` normalised float
  ``(B, C, H, W)``; ``classes`` ``(B,)`` integer, the class explained in each image.
- ``explain(...)`` -> ``(B, H, W)`` float32: ``attribute`` upsampled bilinearly
  (``align_corners=False``) to the input size. No min-max normalisation: the metrics rank maps.
- ``layered``: True when the method reads a named layer (Grad-CAM, NormGrad); False when it
  attributes the input (gradients, Integrated Gradients, random), whose layer is ``None`` or
  ``"input"``. ``needs_baseline``: True when ``attribute`` needs ``baseline=`` (Integrated
  Gradients; ``black_baseline`` builds the raw-0 image in the model's normalisation).

Both check their input before any work: a layer the model does not have is a ``KeyError``
listing the valid names, a class outside the head a ``ValueError`` naming the number of classes.
Both leave the model as they found it: parameters, buffers, ``requires_grad`` flags, the
train/eval mode of every module and every ``.grad`` (methods run in eval mode, with the
parameters frozen and gradients taken with respect to the input or the hooked activations).

Layers are addressed by the names of ``classlab.models.backbones.layer_names`` (convnet
``block0`` ..; resnet18 ``stem``, ``layer1`` .. ``layer4``; vit_tiny ``block0`` ..) or by any
submodule name of the classifier (``backbone.features.3``, ``backbone.blocks.1.norm1``).
``resolve_layer`` maps a name to the module whose forward output *is* that layer's map (the
tensor ``intermediates`` returns; a test keeps the two equal) and a transform to ``(B, C, h, w)``:
a ViT's token sequence loses its class/prompt tokens and is laid out on the patch grid.
Hooks are needed for the ViT: ``intermediates`` gives a reshaped copy of the block output, off
the path to the logits, so no gradient reaches it.

``randomisation_cascade`` and ``randomise_`` serve the model-randomisation sanity check (Adebayo
et al., "Sanity Checks for Saliency Maps", NeurIPS 2018): the classifier's head, then the
backbone's stages from the top down, each re-initialised in turn, cumulatively.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from classlab.models.backbones import Classifier, SmallConvNet, layer_names

INPUT = "input"        # the layer name of the input-space methods
_FINAL = ("pooled", "logits")


# --- layers by name ----------------------------------------------------------------------------

def _is_vit(backbone: nn.Module) -> bool:
    import timm

    return isinstance(backbone, timm.models.vision_transformer.VisionTransformer)


def _is_resnet(backbone: nn.Module) -> bool:
    import timm

    return isinstance(backbone, timm.models.resnet.ResNet)


def stage_modules(model: Classifier) -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (the submodule whose output is the stage's map, the submodules that make up
    the stage), all as submodule names of ``model``, input to output.

    The same stages as ``layer_names(model)`` (checked): convnet ``block{b}`` = conv, BN, ReLU of
    block b (its output is the ReLU's, before any max-pool); resnet18 ``stem`` = conv1, bn1,
    act1 and ``layer{k}``; vit_tiny ``block{i}`` = ``backbone.blocks.{i}``; any other backbone
    its top-level children.
    """
    backbone = model.backbone
    out: dict[str, tuple[str, list[str]]] = {}
    if isinstance(backbone, SmallConvNet):
        start, block = 0, 0
        for i, layer in enumerate(backbone.features):
            if isinstance(layer, nn.ReLU):
                out[f"block{block}"] = (f"backbone.features.{i}",
                                        [f"backbone.features.{j}" for j in range(start, i + 1)])
                start, block = i + 1, block + 1
    elif _is_resnet(backbone):
        out["stem"] = ("backbone.act1", ["backbone.conv1", "backbone.bn1", "backbone.act1"])
        for k in range(1, 5):
            out[f"layer{k}"] = (f"backbone.layer{k}", [f"backbone.layer{k}"])
    elif _is_vit(backbone):
        for i in range(len(backbone.blocks)):
            out[f"block{i}"] = (f"backbone.blocks.{i}", [f"backbone.blocks.{i}"])
    else:
        for name, _ in backbone.named_children():
            out[name] = (f"backbone.{name}", [f"backbone.{name}"])
    expected = [n for n in layer_names(model) if n not in _FINAL]
    if list(out) != expected:  # backbones.py changed its stages: say so rather than hook the wrong module
        raise RuntimeError(f"saliency_method.stage_modules gives stages {list(out)} but layer_names gives "
                           f"{expected} for {type(backbone).__name__}; update stage_modules")
    return out


def spatial_layers(model: nn.Module) -> list[str]:
    """The named stages of ``model`` (the names a layered method takes, besides submodule names)."""
    if not isinstance(model, Classifier):
        return []
    return [n for n in layer_names(model) if n not in _FINAL]


def _valid_hint(model: nn.Module) -> str:
    return (f"valid layers: {spatial_layers(model)} (the named stages of layer_names), or any submodule "
            f"name of the model such as {_example_submodule(model)!r}")


def _example_submodule(model: nn.Module) -> str:
    names = [n for n, _ in model.named_modules() if n.count(".") >= 2]
    return names[0] if names else "backbone"


def token_grid(model: nn.Module, size: tuple[int, int]) -> tuple[int, int] | None:
    """(h, w) of a ViT's patch grid for an input of ``size``; None for other backbones."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not _is_vit(backbone):
        return None
    ph, pw = backbone.patch_embed.patch_size
    return size[0] // ph, size[1] // pw


def as_map(t: torch.Tensor, grid: tuple[int, int] | None, layer: str) -> torch.Tensor:
    """A layer's output as a spatial map (B, C, h, w).

    4-D outputs are maps already. A ViT's token sequence (B, N, D) keeps its last h*w tokens, the
    patches (timm puts the class and register tokens first, Prompt-CAM and VPT put their prompts
    before the patches too), laid out row by row on the (h, w) patch grid as timm's NCHW
    intermediates are. Anything else (a pooled vector, an MLP's activation) has no spatial map.
    """
    if not torch.is_tensor(t):
        raise ValueError(f"layer {layer!r} outputs a {type(t).__name__}, not a tensor: name a module whose output is "
                         f"the map (B, C, h, w) or a ViT token sequence (B, N, D)")
    if t.dim() == 4:
        return t
    if t.dim() == 3 and grid is not None and t.shape[1] >= grid[0] * grid[1]:
        h, w = grid
        return t[:, t.shape[1] - h * w:].transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)
    raise ValueError(f"layer {layer!r} gives a tensor of shape {tuple(t.shape)}, not a spatial map (B, C, h, w) "
                     f"nor a ViT token sequence (B, N, D): a layered method needs a convolutional stage or a "
                     f"transformer block")


def resolve_layer(model: nn.Module, layer: str) -> tuple[nn.Module, str]:
    """(the module whose forward output is ``layer``, its submodule name); KeyError for a name the
    model does not have (listing the valid ones), ValueError for pooled/logits (no spatial map)."""
    if not isinstance(layer, str):
        raise KeyError(f"layer must be a name, got {layer!r}; {_valid_hint(model)}")
    if layer in _FINAL:
        raise ValueError(f"layer {layer!r} is a vector (B, K), not a spatial map; {_valid_hint(model)}")
    modules = dict(model.named_modules())
    if isinstance(model, Classifier):
        stages = stage_modules(model)
        if layer in stages:
            name = stages[layer][0]
            return modules[name], name
    if layer in modules and layer != "":
        return modules[layer], layer
    raise KeyError(f"unknown layer {layer!r}; {_valid_hint(model)}")


@contextmanager
def captured(model: nn.Module, layers: list[str]):
    """Forward hooks keeping the raw outputs of ``layers`` (name -> tensor, in the autograd graph)
    of every forward pass run inside the block."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        module, _ = resolve_layer(model, layer)

        def keep(_module, _inputs, output, layer=layer):
            outputs[layer] = output
        handles.append(module.register_forward_hook(keep))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def layer_maps_and_grads(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, layers: list[str]
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Activations A (B, C, h, w) of ``layers`` and the gradients dy_c/dA of the explained class's
    logit, from one forward and one backward pass (``torch.autograd.grad``: nothing accumulates
    in ``.grad``). Images are independent (eval mode), so summing the batch's logits gives each
    image its own gradient. A layer the logits do not depend on gets a zero gradient."""
    x = x.detach().requires_grad_(True)  # the graph exists even with every parameter frozen
    grid = token_grid(model, tuple(x.shape[-2:]))
    with captured(model, layers) as raw:
        logits = model(x)
    missing = [n for n in layers if n not in raw]
    if missing:
        raise ValueError(f"layers {missing} were not run by the model's forward pass")
    score = logits.gather(1, classes[:, None]).sum()  # sum_b y_{c_b}(x_b)
    tensors = [raw[n] for n in layers]
    grads = torch.autograd.grad(score, tensors, allow_unused=True)
    acts, outs = {}, {}
    for n, t, g in zip(layers, tensors, grads):
        g = torch.zeros_like(t) if g is None else g
        acts[n] = as_map(t.detach(), grid, n)
        outs[n] = as_map(g.detach(), grid, n)
    return acts, outs


# --- checks and the untouched model ------------------------------------------------------------

def num_classes(model: nn.Module, x: torch.Tensor | None = None) -> int:
    """The width of the model's head (a Classifier's ``head``, a method's ``num_classes``, or the
    logits of one forward pass on ``x[:1]``)."""
    head = getattr(model, "head", None)
    if isinstance(model, Classifier) and isinstance(head, nn.Linear):
        return int(head.out_features)
    if isinstance(getattr(model, "num_classes", None), int):
        return int(model.num_classes)
    if x is None:
        raise ValueError(f"cannot tell the number of classes of a {type(model).__name__} without an input")
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return int(model(x[:1]).shape[1])
    finally:
        for m, mode in was:
            m.training = mode


def check_classes(model: nn.Module, x: torch.Tensor, classes) -> torch.Tensor:
    """``classes`` as a LongTensor (B,) on x's device; ValueError naming the number of classes."""
    classes = torch.as_tensor(classes, device=x.device)
    if classes.is_floating_point() or classes.dtype == torch.bool:
        raise ValueError(f"classes must be integer class indices, got dtype {classes.dtype}")
    classes = classes.long().reshape(-1)
    if classes.numel() != x.shape[0]:
        raise ValueError(f"classes has {classes.numel()} entries for a batch of {x.shape[0]} images")
    k = num_classes(model, x)
    bad = classes[(classes < 0) | (classes >= k)]
    if bad.numel():
        raise ValueError(f"class index {int(bad[0])} is outside the model's head: it has {k} classes "
                         f"(valid: 0 .. {k - 1})")
    return classes


@contextmanager
def untouched(model: nn.Module):
    """Run the block in eval mode with every parameter frozen and gradients enabled; afterwards put
    back every module's mode, every ``requires_grad`` flag and every ``.grad`` (a library that
    calls ``model.zero_grad()`` or ``model.eval()`` leaves no trace)."""
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield model
    finally:
        for p, flag, grad in zip(params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in modes:
            m.training = mode


@contextmanager
def stepped_weights(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, lr: float):
    """Meta-saliency's inner step (Rebuffi et al., CVPR 2020; TorchRay ``meta_saliency``):
    inside the block the weights are theta' = theta - lr * grad_theta CE(f_theta(x), c), one plain
    SGD step on every parameter (frozen ones included) with the cross-entropy of the explained
    class, no optimizer state; afterwards every parameter and buffer is copied back bit for bit.
    Call it on one image for per-image steps (the loss is the batch mean)."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    buffers = list(model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x.detach()), classes)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        with torch.no_grad():
            for p, g in zip(params, grads):
                if g is not None:
                    p.sub_(lr * g)  # theta' = theta - lr dCE/dtheta
        yield model
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
            for b, s in zip(buffers, saved_buffers):
                b.copy_(s)
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


# --- maps --------------------------------------------------------------------------------------

def upsample(maps: torch.Tensor, size) -> torch.Tensor:
    """(B, h, w) -> (B, H, W) float32, bilinear with align_corners=False (no normalisation)."""
    size = tuple(int(s) for s in size)
    maps = maps.float()
    if tuple(maps.shape[-2:]) == size:
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each map (B, H, W) scaled to [0, 1] by its own min and max; a constant map becomes all ones
    (it carries no ranking; ones leave a product of maps unchanged)."""
    flat = maps.flatten(1)
    lo, hi = flat.min(1).values[:, None, None], flat.max(1).values[:, None, None]
    span = hi - lo
    out = (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, out, torch.ones_like(out))


def black_baseline(mean, std, dtype=torch.float32, device=None) -> torch.Tensor:
    """The raw-0 (black) image in the model's normalisation, (C, 1, 1): (0 - mean_c) / std_c, with
    ``mean``/``std`` per channel in the units of the raw images the normalisation was fitted on."""
    mean = torch.as_tensor(mean, dtype=dtype, device=device).reshape(-1, 1, 1)
    std = torch.as_tensor(std, dtype=dtype, device=device).reshape(-1, 1, 1)
    return (0.0 - mean) / std


class SaliencyMethod:
    """Base of the saliency methods (see the module docstring for the contract).

    A subclass sets ``layered`` (and ``needs_baseline``) and implements ``_attribute(model, x,
    classes, layer, baseline)``, which runs on checked inputs inside ``untouched(model)``.
    """

    family = "explain"
    name = "saliency_method"
    layered = True
    needs_baseline = False

    def __init__(self, hparams: dict | None = None):
        self.hparams = dict(hparams or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.hparams})"

    # the contract -------------------------------------------------------------------------------
    def attribute(self, model: nn.Module, x: torch.Tensor, classes, layer: str | None = None, *,
                  baseline: torch.Tensor | float | None = None) -> torch.Tensor:
        """The raw map (B, h, w) at the method's native resolution."""
        x, classes = self.check(model, x, classes, layer)
        with untouched(model):
            maps = self._attribute(model, x, classes, layer, baseline)
        return maps.detach().float()

    def explain(self, model: nn.Module, x: torch.Tensor, classes, layer: str | None = None, *,
                baseline: torch.Tensor | float | None = None) -> torch.Tensor:
        """``attribute`` upsampled (bilinear, align_corners=False) to the input size: (B, H, W) float32."""
        return upsample(self.attribute(model, x, classes, layer, baseline=baseline), x.shape[-2:])

    def _attribute(self, model, x, classes, layer, baseline) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} implements no _attribute")

    # checks -------------------------------------------------------------------------------------
    def check(self, model: nn.Module, x: torch.Tensor, classes, layer) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name} explains a torch model, got {type(model).__name__}")
        if not torch.is_tensor(x) or x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a normalised float batch (B, C, H, W), got "
                             f"{tuple(x.shape) if torch.is_tensor(x) else type(x).__name__}")
        self.check_layer(model, layer)
        return x.detach(), check_classes(model, x, classes)

    def check_layer(self, model: nn.Module, layer) -> None:
        if not self.layered:
            if layer not in (None, INPUT):
                raise ValueError(f"{self.name} is not layered: it attributes the input; pass layer None or "
                                 f"{INPUT!r}, not {layer!r}")
            return
        if layer is None or layer == INPUT:
            raise ValueError(f"{self.name} reads a layer of the model; name one ({_valid_hint(model)})")
        resolve_layer(model, layer)


# --- the model-randomisation cascade ------------------------------------------------------------

def randomisation_cascade(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """The steps of cascading randomisation, top (output) to bottom: ``[(name, modules), ...]``.

    For a ``Classifier``: ``("head", [head])``, then the backbone's modules after its last stage
    that carry parameters (a ViT's final norm: ``"backbone.norm"``), then the named stages of
    ``layer_names`` from the top down (each with the modules of ``stage_modules``), then the
    modules before the first stage that carry parameters (a ViT's patch embedding). Parameters
    held directly by the backbone rather than by a submodule (a ViT's class token and position
    embedding) are in no step: as in quantus' MPRT, only modules are re-initialised.
    A model that is not a Classifier may define ``randomisation_cascade()`` itself; one that
    wraps a Classifier as ``.model`` gets its own parameter-carrying children first (as "head"),
    then the wrapped backbone's steps.
    """
    own = getattr(model, "randomisation_cascade", None)
    if callable(own):
        return own()
    if not isinstance(model, Classifier):
        inner = getattr(model, "model", None)
        if not isinstance(inner, Classifier):
            raise TypeError(f"randomisation_cascade needs a Classifier (or a method wrapping one as .model), "
                            f"got {type(model).__name__}")
        extra = [m for n, m in model.named_children() if n != "model" and _has_params(m)]
        steps = [s for s in randomisation_cascade(inner) if s[0] != "head"]
        return ([("head", extra)] if extra else []) + steps
    modules = dict(model.named_modules())
    stages = stage_modules(model)
    covered = {n for _, (_, names) in stages.items() for n in names}
    children = [(f"backbone.{n}", m) for n, m in model.backbone.named_children()]
    stage_children = {name.split(".")[1] for name in covered}
    first = next((i for i, (n, _) in enumerate(children) if n.split(".")[1] in stage_children), len(children))
    last = max((i for i, (n, _) in enumerate(children) if n.split(".")[1] in stage_children), default=-1)
    before = [(n, m) for n, m in children[:first] if n not in covered and _has_params(m)]
    after = [(n, m) for n, m in children[last + 1:] if n not in covered and _has_params(m)]
    steps: list[tuple[str, list[nn.Module]]] = [("head", [model.head])]
    steps += [(n, [m]) for n, m in reversed(after)]
    steps += [(stage, [modules[n] for n in names]) for stage, (_, names) in reversed(list(stages.items()))]
    steps += [(n, [m]) for n, m in reversed(before)]
    return steps


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def randomise_(modules: list[nn.Module], seed: int) -> None:
    """Re-initialise ``modules`` in place, seeded: every submodule with ``reset_parameters`` (Conv,
    Linear, BatchNorm: its running statistics too, LayerNorm, ...) calls it; a parameter held by a
    submodule without one (a ViT's layer-scale gamma) is drawn from N(0, 0.02^2). The global RNG
    state is left as it was."""
    devices = sorted({p.device.index or 0 for m in modules for p in m.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        with torch.no_grad():
            for module in modules:
                for sub in module.modules():
                    if callable(getattr(sub, "reset_parameters", None)):
                        sub.reset_parameters()
                    else:
                        for p in sub.parameters(recurse=False):
                            p.normal_(0.0, 0.02)

