"""Tensor-resident batches with batched augmentation on the training device.

The whole uint8 dataset is moved to the device once. Each epoch draws a permutation from a
generator seeded by (seed, epoch), so an epoch's batches and augmentations depend only on
those two numbers: a run resumed at an epoch boundary replays exactly what an uninterrupted
run would have seen. No per-sample Python or PIL work happens in the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class AugmentSpec:
    """Batched augmentation: random translation by up to ``pad`` pixels and horizontal flips."""

    pad: int = 0
    hflip: bool = False

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.hflip


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``pad`` and crop back to the original size at a random offset per sample."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=generator.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing gathers (n, h, w, c); move channels back to dim 1
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class TensorLoader:
    """Iterate over (x, y, index) batches of a tensor-resident dataset.

    ``x`` is returned as normalised float32; ``views`` > 1 returns a list of independently
    augmented views (for SimCLR/GCD-style methods) under ``batch['views']``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, device: torch.device,
                 mean: list[float], std: list[float], shuffle: bool = False, seed: int = 0,
                 augment: AugmentSpec = AugmentSpec(), drop_last: bool = False, views: int = 1,
                 indices: torch.Tensor | None = None):
        if x.dtype != torch.uint8:
            raise TypeError(f"TensorLoader expects uint8 images, got {x.dtype}")
        if indices is not None:
            x, y = x[indices], y[indices]
            self.source_index = indices.to(device)
        else:
            self.source_index = torch.arange(len(y), device=device)
        self.x = x.to(device)
        self.y = y.to(device)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255.0
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.drop_last = drop_last
        self.views = views
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _generator(self) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 100_003 + self.epoch)
        return gen

    def _view(self, xb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        xb = xb.float()
        if self.augment.pad > 0:
            xb = random_crop(xb, self.augment.pad, gen)
        if self.augment.hflip:
            xb = random_hflip(xb, gen)
        return (xb - self.mean) / self.std

    def __iter__(self) -> Iterator[dict]:
        gen = self._generator()
        n = len(self.y)
        order = torch.randperm(n, generator=gen, device=self.device) if self.shuffle else torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb = self.x[idx]
            batch = {"y": self.y[idx], "index": self.source_index[idx]}
            if self.views > 1:
                batch["views"] = [self._view(xb, gen) for _ in range(self.views)]
                batch["x"] = batch["views"][0]
            else:
                batch["x"] = self._view(xb, gen)
            yield batch
