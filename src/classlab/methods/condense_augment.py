"""Differentiable Siamese Augmentation (DSA) for the condensation family.

Zhao and Bilen, "Dataset Condensation with Differentiable Siamese Augmentation", ICML 2021
(strategy and parameter ranges of the official code, VICO-UoE/DatasetCondensation, ``ParamDiffAug``
with ``aug_mode 'S'``). A strategy such as ``color_crop_cutout_flip_scale_rotate`` names families of
transformations; one call draws ONE family uniformly, then its parameters:

- ``color``: brightness ``x + (b - 1/2) * 1.0``, saturation ``(x - mean_c x) * 2s + mean_c x`` (the mean
  over channels: a no-op on grey images), contrast ``(x - mean x) * (c + 1/2) + mean x``; b, s, c ~ U(0, 1);
- ``crop``: a translation by integers in [-r, r] per axis, r = round(0.125 H), zeros shifted in;
- ``cutout``: a square of side round(H / 2) set to zero, its centre uniform over the image;
- ``flip``: left-right with probability 1/2;
- ``scale``: ``x`` and ``y`` stretched by factors ~ U(1/1.2, 1.2) (bilinear resampling);
- ``rotate``: an angle ~ U(-15, 15) degrees (bilinear resampling).

Every transformation is differentiable in the pixels, so the gradient of a loss on an augmented
synthetic image reaches the stored image. **Siamese**: ``sample_dsa(..., n=1)`` draws one parameter
set that ``apply_dsa`` broadcasts over any batch, so the real and the synthetic batch of a class get
the same transformation (DSA's shared seed, where every sample of a batch shares the draw);
``n = len(x)`` draws one set per sample (DSA's training of the network on augmented data, and its
evaluation). All draws come from a CPU ``torch.Generator`` and are moved to the images' device, so
a draw depends on the seed alone, not on the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")

# ParamDiffAug of the official code
BRIGHTNESS = 1.0
SATURATION = 2.0
CONTRAST = 0.5
CROP_PAD = 0.125
CUTOUT = 0.5
FLIP_PROB = 0.5
SCALE = 1.2
ROTATE_DEG = 15.0


def strategy_families(strategy: str) -> tuple[str, ...]:
    """The families a strategy string names ("none" or "": none)."""
    if not strategy or strategy.lower() == "none":
        return ()
    names = tuple(strategy.split("_"))
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"dsa_strategy: unknown augmentation(s) {unknown} in {strategy!r}; known: {list(FAMILIES)}")
    return names


@dataclass
class DSAParams:
    """One draw: the family and its parameters, each a CPU tensor of length n (1: shared by a batch)."""

    family: str
    values: dict

    @property
    def n(self) -> int:
        return len(next(iter(self.values.values())))


def sample_dsa(strategy: str, n: int, generator: torch.Generator, size: tuple[int, int]) -> DSAParams | None:
    """Draw a family of ``strategy`` and ``n`` parameter sets for images of ``size`` (H, W); None for
    the empty strategy."""
    families = strategy_families(strategy)
    if not families:
        return None
    family = families[int(torch.randint(len(families), (1,), generator=generator))]
    h, w = size
    u = lambda: torch.rand(n, generator=generator)  # noqa: E731
    if family == "color":
        values = {"brightness": u(), "saturation": u(), "contrast": u()}
    elif family == "crop":
        rh, rw = int(h * CROP_PAD + 0.5), int(w * CROP_PAD + 0.5)
        values = {"dy": torch.randint(-rh, rh + 1, (n,), generator=generator),
                  "dx": torch.randint(-rw, rw + 1, (n,), generator=generator)}
    elif family == "cutout":
        ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
        values = {"cy": torch.randint(0, h + (1 - ch % 2), (n,), generator=generator),
                  "cx": torch.randint(0, w + (1 - cw % 2), (n,), generator=generator)}
    elif family == "flip":
        values = {"flip": (u() < FLIP_PROB).float()}
    elif family == "scale":
        values = {"sx": u() * (SCALE - 1.0 / SCALE) + 1.0 / SCALE, "sy": u() * (SCALE - 1.0 / SCALE) + 1.0 / SCALE}
    else:  # rotate
        values = {"angle": (u() - 0.5) * 2.0 * ROTATE_DEG / 180.0 * math.pi}
    return DSAParams(family, values)


def _per_sample(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[n] -> [B] on x's device (n = 1 broadcasts; otherwise n must equal B)."""
    value = value.to(x.device)
    if len(value) == 1:
        return value.expand(x.shape[0])
    if len(value) != x.shape[0]:
        raise ValueError(f"DSA parameters for {len(value)} samples applied to a batch of {x.shape[0]}")
    return value


def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_dsa(x: torch.Tensor, params: DSAParams | None) -> torch.Tensor:
    """``x`` (B, C, H, W) transformed by ``params``; differentiable in ``x``."""
    if params is None:
        return x
    b, _, h, w = x.shape
    v = {k: _per_sample(t, x) for k, t in params.values.items()}
    fam = params.family
    if fam == "color":
        bright = v["brightness"].to(x.dtype).view(b, 1, 1, 1)
        x = x + (bright - 0.5) * BRIGHTNESS
        sat = v["saturation"].to(x.dtype).view(b, 1, 1, 1)
        mean_c = x.mean(dim=1, keepdim=True)
        x = (x - mean_c) * (sat * SATURATION) + mean_c
        con = v["contrast"].to(x.dtype).view(b, 1, 1, 1)
        mean_all = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean_all) * (con + CONTRAST) + mean_all
    if fam == "crop":
        rh, rw = int(h * CROP_PAD + 0.5), int(w * CROP_PAD + 0.5)
        padded = F.pad(x, (rw, rw, rh, rh))
        rows = (rh + v["dy"].long())[:, None] + torch.arange(h, device=x.device)[None, :]  # (B, H)
        cols = (rw + v["dx"].long())[:, None] + torch.arange(w, device=x.device)[None, :]  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if fam == "cutout":
        ch, cw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
        top = v["cy"].long() - ch // 2
        left = v["cx"].long() - cw // 2
        r = torch.arange(h, device=x.device)[None, :]
        c = torch.arange(w, device=x.device)[None, :]
        in_rows = (r >= top[:, None]) & (r < top[:, None] + ch)   # (B, H)
        in_cols = (c >= left[:, None]) & (c < left[:, None] + cw)  # (B, W)
        keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
        return x * keep[:, None].to(x.dtype)
    if fam == "flip":
        flip = v["flip"].view(b, 1, 1, 1) > 0.5
        return torch.where(flip, x.flip(3), x)
    if fam == "scale":
        zero = torch.zeros(b, device=x.device)
        theta = torch.stack([torch.stack([v["sx"], zero, zero], 1), torch.stack([zero, v["sy"], zero], 1)], 1)
        return _affine(x, theta)
    if fam == "rotate":
        a = v["angle"]
        zero = torch.zeros(b, device=x.device)
        theta = torch.stack([torch.stack([a.cos(), -a.sin(), zero], 1), torch.stack([a.sin(), a.cos(), zero], 1)], 1)
        return _affine(x, theta)
    raise ValueError(f"unknown DSA family {fam!r}")


def dsa_augment(x: torch.Tensor, strategy: str, generator: torch.Generator, siamese: bool = False) -> torch.Tensor:
    """Augment ``x`` with one draw of ``strategy``: per sample, or (``siamese``) one draw for the batch."""
    params = sample_dsa(strategy, 1 if siamese else x.shape[0], generator, tuple(x.shape[-2:]))
    return apply_dsa(x, params)
