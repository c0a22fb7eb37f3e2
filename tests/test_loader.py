"""The tensor-resident loader: batched augmentation is correct, seeded by (seed, epoch), complete."""
import pytest
import torch

from classlab.data.loader import AugmentSpec, MixedLoader, TensorLoader, random_crop, random_hflip


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


# --- float inputs --------------------------------------------------------------------------

def test_float_features_pass_through_unnormalised_when_no_statistics_are_given():
    feats = torch.randn(30, 7, generator=torch.Generator().manual_seed(1))
    y = torch.arange(30) % 3
    loader = TensorLoader(feats, y, 8, device=torch.device("cpu"), shuffle=True, seed=2)
    seen = []
    for batch in loader:
        assert batch["x"].shape[1:] == (7,) and batch["x"].dtype == torch.float32
        assert torch.equal(batch["x"], feats[batch["index"]]) and torch.equal(batch["y"], y[batch["index"]])
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(30))


def test_float_features_with_statistics_are_normalised_per_dimension():
    feats = torch.randn(10, 3, dtype=torch.float64)
    mean, std = [1.0, -2.0, 0.5], [2.0, 4.0, 0.25]
    batch = next(iter(TensorLoader(feats, torch.zeros(10, dtype=torch.long), 10, device=torch.device("cpu"),
                                   mean=mean, std=std)))
    expected = (feats.float() - torch.tensor(mean)) / torch.tensor(std)
    assert torch.allclose(batch["x"], expected)


def test_float_images_augment_like_uint8_images():
    x = torch.randint(0, 256, (20, 2, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    y = torch.arange(20) % 4
    common = dict(device=torch.device("cpu"), shuffle=True, seed=5, augment=AugmentSpec(pad=1, hflip=True), views=2)
    as_uint8 = TensorLoader(x, y, 6, mean=[0.4, 0.6], std=[0.2, 0.3], **common)
    as_float = TensorLoader(x.float(), y, 6, mean=[0.4 * 255, 0.6 * 255], std=[0.2 * 255, 0.3 * 255], **common)
    for a, b in zip(as_uint8, as_float):
        assert torch.equal(a["index"], b["index"])
        for va, vb in zip(a["views"], b["views"]):
            assert torch.allclose(va, vb, atol=1e-5)


def test_loader_refuses_augmenting_non_images_and_integer_tensors():
    with pytest.raises(ValueError, match="4-D"):
        TensorLoader(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), 2, device=torch.device("cpu"),
                     augment=AugmentSpec(pad=1))
    with pytest.raises(TypeError):
        TensorLoader(torch.zeros(5, 4, dtype=torch.int32), torch.zeros(5, dtype=torch.long), 2,
                     device=torch.device("cpu"))
    with pytest.raises(ValueError, match="both"):
        TensorLoader(torch.randn(5, 4), torch.zeros(5, dtype=torch.long), 2, device=torch.device("cpu"), mean=[0.0])


# --- mid-epoch resume ----------------------------------------------------------------------

def _assert_same_batches(a: list[dict], b: list[dict]):
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        assert ba.keys() == bb.keys()
        for key in ba:
            if key == "views":
                assert all(torch.equal(va, vb) for va, vb in zip(ba[key], bb[key]))
            else:
                assert torch.equal(ba[key], bb[key]), key


@pytest.mark.parametrize("views", [1, 2])
def test_resumed_epoch_yields_the_uninterrupted_batches_bit_for_bit(views):
    full = _loader(seed=3, views=views, drop_last=True)
    full.set_epoch(2)
    reference = list(full)
    assert len(reference) == 6
    for start in (0, 1, 4, 6):
        resumed = _loader(seed=3, views=views, drop_last=True)  # a fresh loader, as after a restart
        resumed.set_epoch(2)
        _assert_same_batches(list(resumed.iter_from(start)), reference[start:])
    if views > 1:  # the views of one batch are independent draws
        assert not torch.equal(reference[0]["views"][0], reference[0]["views"][1])
    with pytest.raises(ValueError):
        full.iter_from(7)


def test_a_batch_does_not_depend_on_how_many_batches_came_before():
    loader = _loader(seed=1)
    loader.set_epoch(1)
    order = loader._order(1)
    direct = loader._batch(order, 3, 1)
    via_epoch = list(loader)[3]
    assert torch.equal(direct["x"], via_epoch["x"])


# --- several sources per step --------------------------------------------------------------

def _part(n, batch, seed, offset=0, views=1, classes=5):
    x = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    y = offset + torch.arange(n) % classes
    return TensorLoader(x, y, batch, device=torch.device("cpu"), mean=[0.5], std=[0.25], shuffle=True, seed=seed,
                        augment=AugmentSpec(pad=1, hflip=True), drop_last=True, views=views)


def test_mixed_loader_concatenates_one_batch_of_each_source_per_step():
    labelled, unlabelled = _part(40, 8, seed=0), _part(18, 4, seed=1, offset=100)
    mixed = MixedLoader([labelled, unlabelled], ["labelled", "unlabelled"])
    assert len(mixed) == len(labelled) == 5
    mixed.set_epoch(3)
    assert labelled.epoch == unlabelled.epoch == 3
    ref = _part(40, 8, seed=0)
    ref.set_epoch(3)
    batches = list(mixed)
    for step, (batch, alone) in enumerate(zip(batches, ref)):
        assert batch["source"].tolist() == [0] * 8 + [1] * 4
        assert batch["x"].shape == (12, 1, 6, 6) and batch["y"].shape == batch["index"].shape == (12,)
        # the first source behaves exactly as on its own; the labels follow each source's samples
        assert torch.equal(batch["x"][:8], alone["x"]) and torch.equal(batch["index"][:8], alone["index"])
        assert torch.equal(batch["y"][8:], 100 + batch["index"][8:] % 5)


def test_a_shorter_source_cycles_with_a_new_permutation_each_pass():
    mixed = MixedLoader([_part(48, 4, seed=0), _part(12, 4, seed=1)], ["a", "b"])  # 12 steps; b has 3 per pass
    mixed.set_epoch(0)
    b_index = [batch["index"][batch["source"] == 1] for batch in mixed]
    passes = [torch.cat(b_index[p * 3:(p + 1) * 3]) for p in range(4)]
    for order in passes:
        assert sorted(order.tolist()) == list(range(12))  # each pass sees every sample once
    assert len({tuple(order.tolist()) for order in passes}) > 1  # and in a different order


def test_mixed_loader_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    def make(views=1):
        return MixedLoader([_part(40, 8, seed=0, views=views), _part(18, 4, seed=1, views=views)], ["l", "u"])

    for views in (1, 2):
        a, b = make(views), make(views)
        a.set_epoch(5)
        b.set_epoch(5)
        reference = list(a)
        _assert_same_batches(list(b), reference)
        for start in (1, 2, 4):
            resumed = make(views)
            resumed.set_epoch(5)
            _assert_same_batches(list(resumed.iter_from(start)), reference[start:])
        if views > 1:
            assert len(reference[0]["views"]) == 2 and torch.equal(reference[0]["x"], reference[0]["views"][0])
        b.set_epoch(6)
        assert not torch.equal(next(iter(b))["index"], reference[0]["index"])


def test_mixed_loader_refuses_mismatched_parts():
    with pytest.raises(ValueError, match="views"):
        MixedLoader([_part(10, 2, seed=0), _part(10, 2, seed=1, views=2)], ["a", "b"])
    with pytest.raises(ValueError, match="name"):
        MixedLoader([_part(10, 2, seed=0), _part(10, 2, seed=1)], ["a", "a"])
    with pytest.raises(ValueError, match="no batch"):
        MixedLoader([_part(10, 2, seed=0), _part(3, 4, seed=1)], ["a", "b"])
