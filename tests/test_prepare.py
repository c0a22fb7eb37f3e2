"""prepare holds out a seeded, per-class stratified validation split from the raw train split."""
import numpy as np
import pytest
import torch

from classlab.data.prepare import load_prepared, prepare, stratified_holdout
from classlab.data.registry import get_dataset


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    spec = get_dataset("digits")
    spec.download(root / "raw")
    raw = spec.load_raw(root / "raw")
    prepare("digits", root / "raw", root / "seed0", seed=0)  # the CLI's call: default val fraction
    return root, raw


def test_train_and_val_are_disjoint_and_their_union_is_the_raw_train_split(digits):
    root, raw = digits
    data = load_prepared(root / "seed0")
    tr, va = data.train.source_index.numpy(), data.val.source_index.numpy()
    assert len(va) > 0 and not set(tr) & set(va)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(len(raw.train_y)))
    # each sample is the raw sample it claims to be, and test is the raw test split unchanged
    for part, src in ((data.train, tr), (data.val, va)):
        assert torch.equal(part.x, torch.from_numpy(raw.train_x[src]))
        assert torch.equal(part.y, torch.from_numpy(raw.train_y[src]))
    assert torch.equal(data.test.x, torch.from_numpy(raw.test_x))
    assert torch.equal(data.test.y, torch.from_numpy(raw.test_y))


def test_val_is_ten_percent_of_every_class(digits):
    root, raw = digits
    data = load_prepared(root / "seed0")
    raw_counts = np.bincount(raw.train_y, minlength=10)
    val_counts = np.bincount(data.val.y.numpy(), minlength=10)
    assert val_counts.tolist() == [max(1, int(round(0.1 * n))) for n in raw_counts]
    assert (np.bincount(data.train.y.numpy(), minlength=10) + val_counts).tolist() == raw_counts.tolist()


def test_the_manifest_records_the_split(digits):
    root, raw = digits
    data = load_prepared(root / "seed0")
    m = data.manifest
    val = m["splits"]["val"]
    assert m["val_fraction"] == 0.1 and m["val_seed"] == 0 and val["fraction"] == 0.1 and val["seed"] == 0
    assert val["source_indices"] == data.val.source_index.tolist()
    # train is the complement of the recorded val indices, and the cut can be recomputed
    assert m["raw_train_count"] == len(raw.train_y)
    complement = sorted(set(range(m["raw_train_count"])) - set(val["source_indices"]))
    assert complement == data.train.source_index.tolist()
    keep, held = stratified_holdout(raw.train_y, m["val_fraction"], m["val_seed"])
    assert held.tolist() == val["source_indices"] and keep.tolist() == complement
    for split, part in (("train", data.train), ("val", data.val), ("test", data.test)):
        assert m["splits"][split]["count"] == len(part)
        assert m["splits"][split]["per_class"] == np.bincount(part.y.numpy(), minlength=10).tolist()
    # normalisation statistics come from the part that is trained on
    x = data.train.x.double() / 255.0
    assert m["channel_mean"] == pytest.approx(x.mean(dim=(0, 2, 3)).tolist())


def test_the_split_is_a_function_of_the_seed(digits, tmp_path):
    root, _ = digits
    prepare("digits", root / "raw", tmp_path / "again", seed=0)
    prepare("digits", root / "raw", tmp_path / "seed1", seed=1)
    a, again, other = (load_prepared(p).manifest for p in (root / "seed0", tmp_path / "again", tmp_path / "seed1"))
    assert again["splits"] == a["splits"]  # same indices and byte-identical files (sha256)
    assert other["splits"]["val"]["source_indices"] != a["splits"]["val"]["source_indices"]
    assert other["splits"]["val"]["per_class"] == a["splits"]["val"]["per_class"]


def test_zero_fraction_keeps_the_whole_train_split(digits, tmp_path):
    root, raw = digits
    prepare("digits", root / "raw", tmp_path / "noval", seed=0, val_fraction=0.0)
    data = load_prepared(tmp_path / "noval")
    assert len(data.val) == 0 and torch.equal(data.train.y, torch.from_numpy(raw.train_y))


def test_small_classes_get_at_least_one_validation_sample_and_keep_one_for_training():
    y = np.array([0] * 1 + [1] * 2 + [2] * 5 + [3] * 40)
    keep, held = stratified_holdout(y, 0.1, seed=3)
    assert np.bincount(y[held], minlength=4).tolist() == [0, 1, 1, 4]
    assert np.bincount(y[keep], minlength=4).tolist() == [1, 1, 4, 36]
    with pytest.raises(ValueError):
        stratified_holdout(y, 1.0, seed=0)


def test_a_class_cut_does_not_depend_on_the_other_classes():
    y = np.array([0] * 30 + [1] * 30)
    _, held = stratified_holdout(y, 0.2, seed=5)
    _, held_alone = stratified_holdout(y[:30], 0.2, seed=5)
    assert held[held < 30].tolist() == held_alone.tolist()
