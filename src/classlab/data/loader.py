"""Tensor-resident batches with batched augmentation on the training device.

The whole dataset (uint8 images, or float tensors: features, condensed images) is moved to
the device once. An epoch's permutation comes from a generator seeded by (seed, epoch), and
each batch's augmentation from a generator seeded by (seed, epoch, batch index). A batch is
therefore a function of those numbers alone, not of how many batches were drawn before it:
a run resumed at an epoch boundary, or in the middle of an epoch with ``iter_from``, replays
exactly what an uninterrupted run would have seen. No per-sample Python or PIL work happens
in the loop.

``MixedLoader`` draws one batch from each of several loaders per step (labelled and
unlabelled data in GCD, forget and retain data in GS-LoRA) under the same rules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*values: int) -> int:
    """A 63-bit generator seed from a tuple of integers (chained splitmix64), the same on every
    machine and run; nearby tuples give unrelated seeds."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


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


# the two uses of a generator seed, kept apart so a permutation never shares draws with a batch
_PERMUTATION, _BATCH = 0, 1


class TensorLoader:
    """Iterate over (x, y, index) batches of a tensor-resident dataset.

    ``x`` is uint8 images (N, C, H, W) or a float tensor of any shape (N, ...): features
    (N, D), condensed or otherwise float images (N, C, H, W). Batches hold float32 ``x``:

    - uint8: ``(x / 255 - mean) / std`` with ``mean``/``std`` per channel in [0, 1] units
      (``None``: ``x / 255``);
    - float: ``(x - mean) / std`` with ``mean``/``std`` in the tensor's own units along dim 1,
      or ``x`` unchanged when they are ``None`` (already normalised).

    Augmentation (translation, flips) applies to 4-D image tensors only; asking for it on
    other shapes is an error. ``views`` > 1 returns a list of independently augmented views
    (SimCLR/GCD-style methods) under ``batch['views']``, with ``batch['x']`` the first.
    ``index`` is each sample's position in the ``x`` passed in (``indices`` select a subset).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, device: torch.device,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, shuffle: bool = False,
                 seed: int = 0, augment: AugmentSpec = AugmentSpec(), drop_last: bool = False, views: int = 1,
                 indices: torch.Tensor | None = None):
        if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
            raise TypeError(f"TensorLoader expects uint8 images or a float tensor, got {x.dtype}")
        if x.ndim < 2:
            raise ValueError(f"TensorLoader expects x of shape (N, ...) with at least 2 dims, got {tuple(x.shape)}")
        if len(x) != len(y):
            raise ValueError(f"TensorLoader: {len(x)} inputs but {len(y)} labels")
        if augment.active and x.ndim != 4:
            raise ValueError(f"augmentation {augment} needs 4-D images (N, C, H, W), got shape {tuple(x.shape)}")
        if batch_size < 1 or views < 1:
            raise ValueError(f"batch_size and views must be >= 1, got {batch_size} and {views}")
        self.device = torch.device(device)
        self.num_train_samples = len(x)  # size of the whole split, which ``index`` positions refer to
        if indices is not None:
            indices = torch.as_tensor(indices, dtype=torch.long)
            x, y = x[indices], y[indices]
            self.source_index = indices.to(self.device)
        else:
            self.source_index = torch.arange(len(y), device=self.device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size = batch_size
        stat_shape = (1, -1) + (1,) * (x.ndim - 2)
        if x.dtype == torch.uint8:
            # uint8 statistics live in 0..255 units (methods that normalise raw images read them)
            self.mean = torch.tensor(mean if mean is not None else [0.0], device=self.device).view(stat_shape) * 255.0
            self.std = torch.tensor(std if std is not None else [1.0], device=self.device).view(stat_shape) * 255.0
        else:
            if (mean is None) != (std is None):
                raise ValueError("give both mean and std for float inputs, or neither (already normalised)")
            self.mean = None if mean is None else torch.tensor(mean, device=self.device, dtype=torch.float32).view(stat_shape)
            self.std = None if std is None else torch.tensor(std, device=self.device, dtype=torch.float32).view(stat_shape)
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

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The loader's normalisation of raw inputs (uint8 or float, on its device) as float32."""
        x = x.float()
        return x if self.mean is None else (x - self.mean) / self.std

    def _generator(self, *key: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.seed, *key))
        return gen

    def _order(self, epoch: int, stream: int = 0, cycle: int = 0) -> torch.Tensor:
        """The sample order of one pass: a permutation seeded by (seed, epoch, stream, cycle)."""
        n = len(self.y)
        if not self.shuffle:
            return torch.arange(n, device=self.device)
        return torch.randperm(n, generator=self._generator(epoch, stream, cycle, _PERMUTATION), device=self.device)

    def _view(self, xb: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        xb = xb.float()
        if gen is not None:
            if self.augment.pad > 0:
                xb = random_crop(xb, self.augment.pad, gen)
            if self.augment.hflip:
                xb = random_hflip(xb, gen)
        return xb if self.mean is None else (xb - self.mean) / self.std

    def _batch(self, order: torch.Tensor, b: int, epoch: int, stream: int = 0, cycle: int = 0) -> dict:
        """Batch ``b`` of a pass in ``order``; its augmentation draws come from a generator seeded
        by (seed, epoch, stream, cycle, b), so they do not depend on the batches before it."""
        idx = order[b * self.batch_size:(b + 1) * self.batch_size]
        xb = self.x[idx]
        gen = self._generator(epoch, stream, cycle, _BATCH, b) if self.augment.active else None
        batch = {"y": self.y[idx], "index": self.source_index[idx]}
        if self.views > 1:
            batch["views"] = [self._view(xb, gen) for _ in range(self.views)]
            batch["x"] = batch["views"][0]
        else:
            batch["x"] = self._view(xb, gen)
        return batch

    def iter_from(self, start_batch: int = 0) -> Iterator[dict]:
        """Batches ``start_batch, ..., len(self) - 1`` of the current epoch: exactly those an
        uninterrupted pass would yield from that index on (mid-epoch resume)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        epoch = self.epoch

        def batches():
            order = self._order(epoch)
            for b in range(start_batch, len(self)):
                yield self._batch(order, b, epoch)
        return batches()

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)


class MixedLoader:
    """One batch from each of several loaders per step, concatenated into one batch.

    ``parts[k]`` is source ``k`` (named ``names[k]``); a step's batch holds ``x``, ``y`` and
    ``index`` (the position within its own source's data) of every part in order, plus
    ``source``, a long tensor of source ids (``k``) per sample, and ``views`` when the parts
    have views (every part must have the same number). An epoch has ``len(parts[0])`` steps;
    a shorter part cycles: each pass over it gets its own permutation, seeded by the part's
    (seed, epoch, stream k, pass). The first part behaves exactly as on its own, and a step's
    batch depends only on (seeds, epoch, step), so ``iter_from`` resumes mid-epoch exactly.
    """

    def __init__(self, parts: Sequence[TensorLoader], names: Sequence[str]):
        parts, names = list(parts), list(names)
        if not parts:
            raise ValueError("MixedLoader needs at least one part")
        if len(names) != len(parts) or len(set(names)) != len(names):
            raise ValueError(f"MixedLoader needs one distinct name per part, got {names} for {len(parts)} parts")
        for name, part in zip(names, parts):
            if len(part) == 0:
                raise ValueError(f"MixedLoader: part {name!r} yields no batch")
            if part.device != parts[0].device:
                raise ValueError(f"MixedLoader: part {name!r} is on {part.device}, not {parts[0].device}")
        if len({part.views for part in parts}) != 1:
            raise ValueError(f"MixedLoader: parts have different numbers of views {[p.views for p in parts]}")
        self.parts, self.names = parts, names
        self.device = parts[0].device
        self.views = parts[0].views
        self.epoch = 0

    @property
    def mean(self):  # the first part's normalisation (for methods that read it from their loader)
        return self.parts[0].mean

    @property
    def std(self):
        return self.parts[0].std

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for part in self.parts:
            part.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.parts[0])

    def iter_from(self, start_batch: int = 0) -> Iterator[dict]:
        """Steps ``start_batch, ..., len(self) - 1`` of the current epoch, as an uninterrupted
        epoch would yield them."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        epoch = self.epoch

        def batches():
            orders: dict[int, tuple[int, torch.Tensor]] = {}
            for step in range(start_batch, len(self)):
                pieces = []
                for k, part in enumerate(self.parts):
                    cycle, b = divmod(step, len(part))
                    if k not in orders or orders[k][0] != cycle:
                        orders[k] = (cycle, part._order(epoch, k, cycle))
                    pieces.append(part._batch(orders[k][1], b, epoch, k, cycle))
                yield self._concat(pieces)
        return batches()

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)

    def _concat(self, pieces: list[dict]) -> dict:
        batch = {key: torch.cat([p[key] for p in pieces]) for key in ("x", "y", "index")}
        batch["source"] = torch.cat([torch.full((len(p["y"]),), k, dtype=torch.long, device=self.device)
                                     for k, p in enumerate(pieces)])
        if self.views > 1:
            batch["views"] = [torch.cat([p["views"][v] for p in pieces]) for v in range(self.views)]
            batch["x"] = batch["views"][0]
        return batch
