"""The tensor-resident loader: batched augmentation is correct, seeded by (seed, epoch), complete."""
import torch

from classlab.data.loader import AugmentSpec, TensorLoader, random_crop, random_hflip


def test_random_crop_is_a_translated_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    gen = torch.Generator().manual_seed(3)
    out = random_crop(x, 2, gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    gen = torch.Generator().manual_seed(3)
    dy = torch.randint(0, 5, (2,), generator=gen)
    dx = torch.randint(0, 5, (2,), generator=gen)
    for i in range(2):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5])


def test_hflip_flips_about_half():
    x = torch.arange(1000 * 3, dtype=torch.float32).view(1000, 1, 1, 3)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == x[:, 0, 0, 2])
    assert torch.all(flipped | (out[:, 0, 0, 0] == x[:, 0, 0, 0]))
    assert 400 < int(flipped.sum()) < 600


def _loader(seed=0, **kw):
    x = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(50) % 5
    return TensorLoader(x, y, 8, device=torch.device("cpu"), mean=[0.5], std=[0.25], shuffle=True, seed=seed,
                        augment=AugmentSpec(pad=1, hflip=True), **kw)


def test_epoch_is_a_function_of_seed_and_epoch():
    a, b = _loader(), _loader()
    a.set_epoch(3)
    b.set_epoch(3)
    for ba, bb in zip(a, b):
        assert torch.equal(ba["x"], bb["x"]) and torch.equal(ba["index"], bb["index"])
    b.set_epoch(4)
    assert not torch.equal(next(iter(a))["index"], next(iter(b))["index"])


def test_every_sample_once_per_epoch_and_labels_follow_indices():
    loader = _loader()
    seen = torch.cat([b["index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(50))
    for b in loader:
        assert torch.equal(b["y"], b["index"] % 5)


def test_normalisation_and_views():
    x = torch.full((4, 1, 2, 2), 128, dtype=torch.uint8)
    loader = TensorLoader(x, torch.zeros(4, dtype=torch.long), 4, device=torch.device("cpu"),
                          mean=[128 / 255], std=[0.5], views=2)
    batch = next(iter(loader))
    assert torch.allclose(batch["x"], torch.zeros_like(batch["x"]))
    assert len(batch["views"]) == 2
