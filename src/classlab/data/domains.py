"""Domains for domain generalisation, built by code from a prepared dataset (DomainBed's recipes).

Two kinds, each a list of environments drawn from disjoint images of the prepared train split
(the official test split stays untouched; in domain generalisation the held-out domain is the
test):

- ``rotated`` (RotatedMNIST, Ghifary et al. 2015 as in DomainBed): the images are shuffled once
  and dealt to the environments in turn; environment ``k`` rotates its share by ``angles[k]``
  degrees (bilinear, zero fill). Labels are the dataset's classes. ``downsample: 2`` keeps every
  second pixel after rotating (a CPU-budget option; DomainBed's RotatedMNIST is 28x28).
- ``colored`` (ColoredMNIST, Arjovsky et al. 2019 as in DomainBed): a binary label
  y = 1[class >= num_classes / 2], flipped with probability ``label_noise`` (0.25); a colour
  c = y xor Bernoulli(e_k) with environment ``k``'s flip probability e_k (0.1, 0.2, 0.9): in the
  first two environments the colour agrees with the label 90% and 80% of the time, in the last
  one only 10%, so a classifier that uses colour fails there. The image is two channels (red,
  green), the one not named by the colour zeroed, downsampled 2x as DomainBed does.

The result is one tensor file (uint8 images, labels, environment ids) and a manifest that
records the recipe, each environment's name, size, class counts and measured colour-label
agreement. The 80/20 split of each environment is the protocol's (it depends on the trial).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classlab.io import atomic_path, read_json, write_json

if TYPE_CHECKING:  # torch is imported where it is used: config validation reads the recipes without it
    import torch

DOMAIN_KINDS = ("rotated", "colored")
DEFAULTS = {
    "rotated": {"angles": [0, 15, 30, 45, 60, 75], "per_domain": 0, "downsample": 1, "seed": 0},
    "colored": {"flip_probs": [0.1, 0.2, 0.9], "label_noise": 0.25, "per_domain": 0, "downsample": 2, "seed": 0},
}


class DomainError(ValueError):
    """A domain recipe or a domain name is invalid; the message names the field."""


@dataclass
class DomainSet:
    x: torch.Tensor       # uint8 (N, C, H, W)
    y: torch.Tensor       # int64 (N,)
    domain: torch.Tensor  # int64 (N,): environment index
    manifest: dict

    @property
    def names(self) -> list[str]:
        return [d["name"] for d in self.manifest["domains"]]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def index_of(self, name: str) -> int:
        if name not in self.names:
            raise DomainError(f"test_domain: {name!r} is not among the domains {self.names}")
        return self.names.index(name)


def resolve_recipe(kind: str, recipe: dict | None, field: str = "recipe") -> dict:
    """The recipe with the kind's defaults filled in; refuses unknown kinds, keys and bad values."""
    if kind not in DOMAIN_KINDS:
        raise DomainError(f"{field}.kind: {kind!r} is not a domain kind; valid: {list(DOMAIN_KINDS)}")
    out = dict(DEFAULTS[kind])
    for key, value in (recipe or {}).items():
        if key not in out:
            raise DomainError(f"{field}.{key}: not a setting of {kind} domains; valid: {sorted(out)}")
        out[key] = value
    if not isinstance(out["per_domain"], int) or out["per_domain"] < 0:
        raise DomainError(f"{field}.per_domain: {out['per_domain']!r}; give an integer >= 0 (0: an equal share of all)")
    if kind == "rotated":
        angles = out["angles"]
        if out["downsample"] not in (1, 2):
            raise DomainError(f"{field}.downsample: {out['downsample']!r}; give 1 or 2")
        if not isinstance(angles, list) or len(angles) < 2 or not all(isinstance(a, (int, float)) for a in angles):
            raise DomainError(f"{field}.angles: {angles!r}; give a list of at least two angles in degrees")
        if len(set(angles)) != len(angles):
            raise DomainError(f"{field}.angles: {angles!r} repeats an angle")
    else:
        probs = out["flip_probs"]
        if not isinstance(probs, list) or len(probs) < 2 or not all(isinstance(p, (int, float)) and 0 <= p <= 1
                                                                   for p in probs):
            raise DomainError(f"{field}.flip_probs: {probs!r}; give at least two probabilities in [0, 1]")
        if not 0 <= out["label_noise"] < 0.5:
            raise DomainError(f"{field}.label_noise: {out['label_noise']!r}; give a probability in [0, 0.5)")
        if out["downsample"] not in (1, 2):
            raise DomainError(f"{field}.downsample: {out['downsample']!r}; give 1 or 2")
    return out


def domain_names(kind: str, recipe: dict) -> list[str]:
    if kind == "rotated":
        return [f"rot{int(a) if float(a).is_integer() else a}" for a in recipe["angles"]]
    return [f"flip{int(round(100 * p))}" for p in recipe["flip_probs"]]


def _deal(n: int, num_domains: int, per_domain: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    shares = [order[k::num_domains] for k in range(num_domains)]
    if per_domain:
        if per_domain > min(len(s) for s in shares):
            raise DomainError(f"per_domain: {per_domain} images per domain, but {n} images give each of the "
                              f"{num_domains} domains at most {min(len(s) for s in shares)}")
        shares = [s[:per_domain] for s in shares]
    return shares


def _rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    from torchvision.transforms.functional import InterpolationMode, rotate

    return rotate(x, float(angle), interpolation=InterpolationMode.BILINEAR, fill=0)


def build_domains(kind: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, recipe: dict | None = None,
                  dataset: str = "") -> DomainSet:
    """Environments of ``kind`` from uint8 images ``x`` (N, C, H, W) and labels ``y``."""
    import torch

    recipe = resolve_recipe(kind, recipe)
    names = domain_names(kind, recipe)
    shares = _deal(len(y), len(names), recipe["per_domain"], recipe["seed"])
    gen = torch.Generator().manual_seed(int(recipe["seed"]) + 1)
    xs, ys, ds, info = [], [], [], []
    for k, (name, idx) in enumerate(zip(names, shares)):
        idx_t = torch.from_numpy(np.sort(idx))
        xk, yk = x[idx_t], y[idx_t].long()
        entry = {"name": name, "size": int(len(idx_t))}
        if kind == "rotated":
            xk = _rotate(xk, recipe["angles"][k])
            if recipe["downsample"] == 2:
                xk = xk[:, :, ::2, ::2]
            entry["angle"] = recipe["angles"][k]
            k_classes = num_classes
        else:
            grey = xk[:, :1]
            if recipe["downsample"] == 2:
                grey = grey[:, :, ::2, ::2]
            binary = (yk >= num_classes / 2).long()
            # y = binary label flipped with probability label_noise; c = y xor Bernoulli(e_k)
            noisy = binary ^ (torch.rand(len(yk), generator=gen) < recipe["label_noise"]).long()
            colour = noisy ^ (torch.rand(len(yk), generator=gen) < recipe["flip_probs"][k]).long()
            xk = torch.cat([grey, grey], dim=1).clone()
            xk[torch.arange(len(xk)), 1 - colour] = 0  # keep only the channel the colour names
            yk = noisy
            entry.update({"flip_prob": recipe["flip_probs"][k],
                          "colour_label_agreement": float((colour == noisy).float().mean()),
                          "label_noise_measured": float((noisy != binary).float().mean())})
            k_classes = 2
        entry["class_counts"] = torch.bincount(yk, minlength=k_classes).tolist()
        xs.append(xk.contiguous())
        ys.append(yk)
        ds.append(torch.full((len(yk),), k, dtype=torch.long))
        info.append(entry)
    out_classes = num_classes if kind == "rotated" else 2
    x_all = torch.cat(xs)
    manifest = {"kind": kind, "dataset": dataset, "recipe": recipe, "num_classes": out_classes,
                "domains": info, "in_chans": int(x_all.shape[1]), "img_size": list(x_all.shape[2:]),
                "channel_mean": (x_all.float().mean(dim=(0, 2, 3)) / 255).tolist(),
                "channel_std": (x_all.float().std(dim=(0, 2, 3)) / 255).clamp_min(1e-3).tolist()}
    if kind == "colored":
        manifest["label_rule"] = f"1 if the {dataset or 'dataset'} class is >= {num_classes // 2}, else 0"
    return DomainSet(x_all, torch.cat(ys), torch.cat(ds), manifest)


def save_domains(out_dir: Path, domains: DomainSet) -> None:
    """``domains.pt`` then ``manifest.json``, each atomic; the manifest is written last."""
    import torch

    out_dir = Path(out_dir)
    with atomic_path(out_dir / "domains.pt") as tmp:
        torch.save({"x": domains.x, "y": domains.y, "domain": domains.domain}, tmp)
    write_json(out_dir / "manifest.json", {**domains.manifest, "file": "domains.pt"})


def load_domains(out_dir: Path) -> DomainSet:
    import torch

    out_dir = Path(out_dir)
    manifest = read_json(out_dir / "manifest.json")
    blob = torch.load(out_dir / manifest["file"], weights_only=True)
    return DomainSet(blob["x"], blob["y"], blob["domain"], manifest)


def in_out_split(domains: DomainSet, trial: int, holdout: float = 0.2) -> tuple[dict, dict]:
    """DomainBed's per-environment split for one trial: ``holdout`` of each environment is its
    "out" part (validation), the rest its "in" part (training, and the test domain's reported
    accuracy). Returns {domain index: positions} for in and out."""
    import torch

    if not 0 < holdout < 1:
        raise DomainError(f"holdout: {holdout!r}; give a fraction in (0, 1)")
    ins, outs = {}, {}
    for k in range(len(domains.names)):
        pos = torch.nonzero(domains.domain == k).flatten().numpy()
        rng = np.random.default_rng([int(trial), k, 20210])
        perm = rng.permutation(pos)
        n_out = int(round(holdout * len(pos)))
        outs[k], ins[k] = np.sort(perm[:n_out]), np.sort(perm[n_out:])
    return ins, outs
