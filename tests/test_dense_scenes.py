"""Long-tailed dense scenes (classlab.data.dense_scenes): object masks inside their boxes and covering
the objects' bright pixels, semantic masks agreeing with the box labels, long-tail counts following the
recipe and recorded in the manifest, LVIS bands, mask checks that reject before writing, bad recipes,
and the existing scene/pairs datasets left byte-for-byte as they were."""
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from classlab.cli import main as cli_main
from classlab.data.dense_scenes import (DENSE_RECIPE, DenseScenes, MaskError, apportion, build_dense_dataset,
                                        check_masks, detection_targets, frequency_bands, long_tail_counts,
                                        plan_split, profile_weights, resolve_dense_recipe)
from classlab.data.pairs import PALETTE
from classlab.data.prepare import load_prepared, prepare, stratified_holdout, write_dense_prepared
from classlab.data.registry import DATASETS, DENSE_BASES, FASHION_MNIST_MIRROR, get_dataset
from classlab.data.scenarios import ScenarioError
from classlab.data.scenes import SceneError

SMALL = {"colors": ["red", "green", "blue"], "n_train": 160, "n_val": 40, "n_test": 80, "imbalance_ratio": 10.0,
         "k_min": 2, "k_max": 4, "rare_max": 5, "common_max": 20}
DIGIT_NAMES = [str(k) for k in range(10)]


@pytest.fixture(scope="module")
def digits_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_raw")
    spec = get_dataset("digits_lt_scenes")
    spec.download(root)
    return root, spec.load_raw(root)


@pytest.fixture(scope="module")
def prepared(digits_raw, tmp_path_factory):
    raw_dir, _ = digits_raw
    out = tmp_path_factory.mktemp("prepared") / "digits_lt_scenes"
    manifest = prepare("digits_lt_scenes", raw_dir, out, seed=0, recipe=SMALL)
    return out, manifest


def _toy(n_per_class=8, classes=4, size=6, threshold=10, seed=0):
    """Grayscale images: a bright rectangle (60..255) on a background of 0 and faint (<= threshold) pixels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = (rng.random((len(y), 1, size, size)) < 0.3) * rng.integers(1, threshold + 1, (len(y), 1, size, size))
    for i in range(len(y)):
        r0, c0 = rng.integers(0, size - 2, 2)
        r1, c1 = r0 + rng.integers(1, size - r0 + 1), c0 + rng.integers(1, size - c0 + 1)
        x[i, 0, r0:r1, c0:c1] = rng.integers(60, 256, (r1 - r0, c1 - c0))
    return x.astype(np.uint8), y


# --- masks, boxes and labels of built scenes ----------------------------------------------------------

def _check_scene_objects(scenes: DenseScenes, base_x, base_y, resolved, pool):
    """Every object: pixels = its tinted source, instance mask = source > threshold, tight box, cell."""
    r = resolved["recipe"]
    thr, n_obj = r["mask_threshold"], len(resolved["objects"])
    h, w = base_x.shape[2:]
    for i in range(len(scenes)):
        labels = scenes.object_labels[i].numpy()
        k = int((labels >= 0).sum())
        assert (labels[:k] >= 0).all() and (labels[k:] == -1).all()
        inst, sem = scenes.instance_masks[i].numpy(), scenes.semantic_masks[i].numpy()
        # semantic mask classes match the box labels; the image label is their multi-hot set
        assert set(np.unique(sem).tolist()) - {0} == set((labels[:k] + 1).tolist())
        assert np.flatnonzero(scenes.y[i].numpy()).tolist() == sorted(set(labels[:k].tolist()))
        assert set(np.unique(inst).tolist()) == set(range(k + 1))
        assert ((sem > 0) == (inst > 0)).all()
        # the masks cover exactly the bright pixels of the canvas (every colour has a channel at 255)
        assert ((scenes.x[i].numpy().max(axis=0) > thr) == (inst > 0)).all()
        for j in range(k):
            src = int(scenes.object_sources[i, j])
            assert src in pool and base_y[src] == resolved["object_classes"][labels[j] % n_obj]
            colour = np.array(PALETTE[resolved["attributes"][labels[j] // n_obj]], dtype=np.float64)
            x0, y0, x1, y1 = scenes.object_cells[i, j].tolist()
            assert (x1 - x0, y1 - y0) == (w, h) and x0 % w == 0 and y0 % h == 0
            expected = np.rint(base_x[src, 0][None].astype(np.float64) * colour[:, None, None] / 255.0)
            assert np.array_equal(scenes.x[i, :, y0:y1, x0:x1].numpy(), expected.astype(np.uint8))
            fg = base_x[src, 0] > thr
            assert np.array_equal(inst[y0:y1, x0:x1] == j + 1, fg)
            assert (sem[y0:y1, x0:x1][fg] == labels[j] + 1).all()
            # the tight box: the mask's bounding box, inside the cell; the whole mask lies inside it
            rows, cols = np.nonzero(inst == j + 1)
            bx0, by0, bx1, by1 = scenes.object_boxes[i, j].tolist()
            assert (bx0, by0, bx1, by1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1
            target = detection_targets(scenes, i)
            assert torch.equal(target["masks"][j].bool(), torch.from_numpy(inst == j + 1))
        assert (scenes.object_boxes[i, k:] == -1).all() and (scenes.object_sources[i, k:] == -1).all()


def test_masks_lie_in_their_boxes_cover_the_bright_pixels_and_match_the_labels():
    x, y = _toy()
    names = ["a", "b", "c", "d"]
    recipe = {"colors": ["red", "cyan", "orange"], "n_train": 30, "n_val": 10, "n_test": 12, "grid": 2,
              "k_min": 1, "k_max": 4, "imbalance_ratio": 4.0, "mask_threshold": 10}
    train_pool, val_pool = np.arange(0, 32, 2), np.arange(1, 32, 2)
    splits, info = build_dense_dataset(x, y, x, y, names, recipe, train_pool=train_pool, val_pool=val_pool, base="toy")
    resolved = resolve_dense_recipe(recipe, names)
    for split, pool in (("train", train_pool), ("val", val_pool), ("test", np.arange(32))):
        s = splits[split]
        assert s.x.shape == (recipe[f"n_{split}"], 3, 12, 12) and s.x.dtype == torch.uint8
        assert s.instance_masks.shape == s.semantic_masks.shape == (len(s), 12, 12)
        assert s.object_boxes.shape == (len(s), 4, 4) and s.y.shape == (len(s), 12)
        _check_scene_objects(s, x, y, resolved, set(pool.tolist()))
        counts = np.bincount(s.object_labels[s.object_labels >= 0].numpy(), minlength=12)
        assert info["object_counts"][split] == counts.tolist()
    assert info["class_names"][:5] == ["red a", "red b", "red c", "red d", "cyan a"]
    assert info["masks"]["semantic_num_classes"] == 13 and info["masks"]["ignore_index"] == 255


def test_scenes_are_a_function_of_the_recipe():
    x, y = _toy()
    recipe = {"colors": ["red", "green"], "n_train": 20, "n_val": 0, "n_test": 10, "grid": 2, "k_max": 3,
              "imbalance_ratio": 3.0}
    a, _ = build_dense_dataset(x, y, x, y, list("abcd"), recipe)
    b, _ = build_dense_dataset(x, y, x, y, list("abcd"), recipe)
    c, _ = build_dense_dataset(x, y, x, y, list("abcd"), {**recipe, "seed": 1})
    assert all(torch.equal(getattr(a["train"], k), getattr(b["train"], k)) for k in ("x", "instance_masks",
                                                                                      "object_boxes"))
    assert not torch.equal(a["train"].object_labels, c["train"].object_labels)
    assert len(a["val"]) == 0 and a["val"].x.shape == (0, 3, 12, 12)


# --- long-tail counts and bands ------------------------------------------------------------------------

def test_apportion_and_profiles_by_hand():
    # quotas 111 * (4/7, 2/7, 1/7) = 63.43, 31.71, 15.86: floors 63, 31, 15 and two leftovers to .86 and .71
    assert apportion(111, np.array([1.0, 0.5, 0.25])).tolist() == [63, 32, 16]
    assert apportion(7, np.ones(3)).tolist() == [3, 2, 2]  # ties go to the lower rank
    assert profile_weights(3, 4.0, "exp").tolist() == pytest.approx([1.0, 0.5, 0.25])
    s = math.log(4.0) / math.log(3)
    assert profile_weights(3, 4.0, "zipf").tolist() == pytest.approx([1.0, 2 ** -s, 0.25])
    for profile in ("exp", "zipf"):
        w = profile_weights(40, 100.0, profile)
        assert w[0] / w[-1] == pytest.approx(100.0) and (np.diff(w) < 0).all()
        c = long_tail_counts(10_000, 40, 100.0, profile)
        assert c.sum() == 10_000 and (np.diff(c) <= 0).all()
    assert long_tail_counts(40, 40, 1.0, "exp").tolist() == [1] * 40


@pytest.mark.parametrize("profile", ["exp", "zipf"])
def test_train_head_to_tail_ratio_follows_the_imbalance_ratio(profile):
    resolved = resolve_dense_recipe({"n_train": 6000, "imbalance_ratio": 50.0, "profile": profile}, DIGIT_NAMES)
    k, labels, counts = plan_split(resolved, "train")
    assert len(labels) == k.sum() and np.bincount(labels, minlength=40).tolist() == counts.tolist()
    by_rank = counts[resolved["order"]]
    assert (np.diff(by_rank) <= 0).all()
    assert by_rank[0] / by_rank[-1] == pytest.approx(50.0, rel=0.08)
    # val and test are class-balanced by default
    _, _, val_counts = plan_split(resolved, "val")
    assert val_counts.max() - val_counts.min() <= 1


def test_bands_follow_the_lvis_thresholds():
    assert frequency_bands([1, 10, 11, 100, 101, 5000], 10, 100) == ["rare", "rare", "common", "common",
                                                                     "frequent", "frequent"]
    assert frequency_bands([3, 4, 8], 3, 7) == ["rare", "common", "frequent"]


# --- prepare -------------------------------------------------------------------------------------------

def test_prepared_dense_scenes_layout_and_manifest(prepared, digits_raw):
    out, manifest = prepared
    _, raw = digits_raw
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.pt", "train.pt", "val.pt"]
    data = load_prepared(out)
    n_classes = 30
    assert data.num_classes == n_classes and manifest["shape"] == [3, 24, 24]
    assert manifest["class_names"][:2] == ["red 0", "red 1"] and manifest["class_names"][-1] == "blue 9"
    dense = manifest["dense"]
    held = np.asarray(dense["base_val_indices"])
    keep = np.setdiff1d(np.arange(len(raw.train_y)), held)
    assert held.tolist() == stratified_holdout(raw.train_y, 0.1, 0)[1].tolist()
    resolved = resolve_dense_recipe(SMALL, DIGIT_NAMES)
    for split, pool, bx, by in (("train", keep, raw.train_x, raw.train_y), ("val", held, raw.train_x, raw.train_y),
                                ("test", np.arange(len(raw.test_y)), raw.test_x, raw.test_y)):
        part = getattr(data, split)
        n = SMALL[f"n_{split}"]
        assert len(part) == n and part.x.shape == (n, 3, 24, 24) and part.x.dtype == torch.uint8
        assert part.y.shape == (n, n_classes) and part.y.dtype == torch.int64
        assert part.object_boxes.shape == part.object_cells.shape == (n, 4, 4)
        assert part.object_labels.shape == part.object_sources.shape == (n, 4)
        assert part.instance_masks.shape == part.semantic_masks.shape == (n, 24, 24)
        assert part.instance_masks.dtype == part.semantic_masks.dtype == torch.uint8
        assert part.boxes is None and part.distractor_boxes is None
        # the manifest's frequencies are the data's
        counts = np.bincount(part.object_labels[part.object_labels >= 0].numpy(), minlength=n_classes)
        assert dense["object_counts"][split] == counts.tolist() == manifest["splits"][split]["objects_per_class"]
        assert dense["image_counts"][split] == part.y.sum(0).tolist() == manifest["splits"][split]["per_class"]
        # sources come from their own part of the base only
        _check_scene_objects(part, bx, by, resolved, set(pool.tolist()))
    assert set(data.train.object_sources.unique().tolist()) - {-1} <= set(keep.tolist())
    assert set(data.val.object_sources.unique().tolist()) - {-1} <= set(held.tolist())
    # train follows the recipe's long tail, val and test are balanced
    train = np.asarray(dense["object_counts"]["train"])
    expected = long_tail_counts(int(train.sum()), n_classes, 10.0, "exp")
    assert train[dense["head_to_tail"]].tolist() == expected.tolist()
    assert [dense["class_rank"][c] for c in dense["head_to_tail"]] == list(range(n_classes))
    for split in ("val", "test"):
        assert max(dense["object_counts"][split]) - min(dense["object_counts"][split]) <= 1
    # bands: LVIS thresholds (rare_max 5, common_max 20 here) on training image counts
    images = dense["image_counts"]["train"]
    assert dense["class_band"] == ["rare" if c <= 5 else "common" if c <= 20 else "frequent" for c in images]
    assert sorted(sum(dense["bands"].values(), [])) == list(range(n_classes))
    assert dense["band_sizes"] == {b: len(dense["bands"][b]) for b in ("frequent", "common", "rare")}
    assert all(dense["band_sizes"][b] > 0 for b in ("frequent", "common", "rare"))
    assert dense["recipe"] == {**DENSE_RECIPE, **get_dataset("digits_lt_scenes").dense_defaults, **SMALL,
                               "objects": list(range(10))}
    x = data.train.x.double() / 255.0
    assert manifest["channel_mean"] == pytest.approx(x.mean(dim=(0, 2, 3)).tolist())
    assert manifest["channel_std"] == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist())


def test_prepare_is_deterministic_and_follows_the_recipe_seed(prepared, digits_raw, tmp_path):
    out, manifest = prepared
    raw_dir, _ = digits_raw
    again = prepare("digits_lt_scenes", raw_dir, tmp_path / "again", seed=0, recipe=SMALL)
    assert again["splits"] == manifest["splits"]  # byte-identical files (sha256)
    other = prepare("digits_lt_scenes", raw_dir, tmp_path / "other", seed=0, recipe={**SMALL, "seed": 3})
    assert other["splits"]["train"]["sha256"] != manifest["splits"]["train"]["sha256"]
    assert other["dense"]["base_val_indices"] == manifest["dense"]["base_val_indices"]  # prepare's seed: the cut


def test_the_cli_prepares_a_dense_dataset(digits_raw, tmp_path):
    raw_dir, _ = digits_raw
    recipe = {"colors": ["red", "green"], "n_train": 60, "n_val": 20, "n_test": 30, "imbalance_ratio": 3}
    rc = cli_main(["prepare", "--dataset", "digits_lt_scenes", "--raw-dir", str(raw_dir), "--out-dir",
                   str(tmp_path / "p"), "--recipe", json.dumps(recipe)])
    assert rc == 0
    data = load_prepared(tmp_path / "p")
    assert data.num_classes == 20 and data.manifest["dense"]["recipe"]["imbalance_ratio"] == 3.0


# --- rejection before writing --------------------------------------------------------------------------

def test_check_masks_names_the_field():
    images = torch.zeros(4, 3, 12, 12, dtype=torch.uint8)
    check_masks(images, torch.zeros(4, 12, 12, dtype=torch.uint8))
    check_masks(images, np.zeros((4, 2, 12, 12), dtype=bool))
    for bad in (torch.zeros(4, 12, 11, dtype=torch.uint8), torch.zeros(3, 12, 12, dtype=torch.uint8),
                torch.zeros(4, 12, dtype=torch.uint8), torch.zeros(4, 12, 12), None):
        with pytest.raises(MaskError, match=r"^masks") as err:
            check_masks(images, bad)
        assert isinstance(err.value, SceneError) and isinstance(err.value, ScenarioError)


@pytest.mark.parametrize("field, bad", [
    ("semantic_masks", lambda m: m[:, :-1]),      # one row short
    ("instance_masks", lambda m: m[1:]),          # one scene short
    ("semantic_masks", lambda m: m.float()),      # not integer
])
def test_mismatched_masks_are_rejected_and_nothing_is_written(digits_raw, tmp_path, field, bad):
    _, raw = digits_raw
    splits, info = build_dense_dataset(raw.train_x, raw.train_y, raw.test_x, raw.test_y, DIGIT_NAMES,
                                       {**SMALL, "n_val": 0}, base="digits")
    setattr(splits["test"], field, bad(getattr(splits["test"], field)))
    out = tmp_path / "never"
    with pytest.raises(MaskError, match=rf"masks \({field}, test\)"):
        write_dense_prepared("digits_lt_scenes", splits, info, out)
    assert not out.exists()


def test_loading_rejects_masks_that_do_not_fit_their_images(prepared, tmp_path):
    out, _ = prepared
    copy = tmp_path / "tampered"
    copy.mkdir()
    for f in out.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    blob = torch.load(copy / "val.pt", weights_only=True)
    blob["instance_masks"] = blob["instance_masks"][:, :, :-2]
    torch.save(blob, copy / "val.pt")
    with pytest.raises(MaskError, match=r"masks \(instance_masks, val\)"):
        load_prepared(copy)


@pytest.mark.parametrize("recipe, key", [
    ({"imbalance_ratio": 0.5}, "scenes.imbalance_ratio"),
    ({"imbalance_ratio": "high"}, "scenes.imbalance_ratio"),
    ({"imbalance_ratio": 1e6}, "scenes.imbalance_ratio"),     # the tail class would get no object
    ({"profile": "pareto"}, "scenes.profile"),
    ({"eval_profile": "tail"}, "scenes.eval_profile"),
    ({"colors": ["red", "mauve"]}, "scenes.colors"),
    ({"colors": ["red", "red"]}, "scenes.colors"),
    ({"objects": [0, 10]}, "scenes.objects"),
    ({"colors": ["red"], "objects": [3]}, "scenes.objects"),  # a single class
    ({"k_max": 10}, "scenes.k_max"),                          # 9 cells
    ({"k_min": 4, "k_max": 3}, "scenes.k_max"),
    ({"grid": 0}, "scenes.grid"),
    ({"n_test": 2}, "scenes.n_test"),                         # fewer objects than classes
    ({"n_train": 0}, "scenes.n_train"),
    ({"mask_threshold": 300}, "scenes.mask_threshold"),
    ({"rare_max": 50, "common_max": 50}, "scenes.common_max"),
    ({"seed": 1.5}, "scenes.seed"),
    ({"n_distractors": 1}, "scenes.n_distractors"),           # a single-target key: unknown here
])
def test_a_bad_recipe_names_its_key_and_writes_nothing(digits_raw, tmp_path, recipe, key):
    raw_dir, _ = digits_raw
    out = tmp_path / "never"
    with pytest.raises(SceneError, match=key.replace(".", r"\.")):
        prepare("digits_lt_scenes", raw_dir, out, recipe=recipe)
    assert not out.exists()


def test_bad_recipes_through_the_cli_exit_2_and_a_missing_val_part_is_named(digits_raw, tmp_path):
    raw_dir, _ = digits_raw
    out = tmp_path / "never"
    rc = cli_main(["prepare", "--dataset", "digits_lt_scenes", "--raw-dir", str(raw_dir), "--out-dir", str(out),
                   "--recipe", json.dumps({"profile": "pareto"})])
    assert rc == 2 and not out.exists()
    with pytest.raises(SceneError, match=r"scenes\.n_val"):
        prepare("digits_lt_scenes", raw_dir, out, val_fraction=0.0, recipe=SMALL)
    assert not out.exists()


# --- the registry and the existing datasets ------------------------------------------------------------

def test_dense_datasets_are_registry_entries_built_on_their_base():
    assert {n for n in DATASETS if get_dataset(n).dense_base} == set(DENSE_BASES)
    for name, base in DENSE_BASES.items():
        spec, b = get_dataset(name), get_dataset(base)
        assert spec.dense_base == base and spec.scene_base is None and spec.pairs_base is None
        assert spec.load_raw is b.load_raw and [f.name for f in spec.files] == [f.name for f in b.files]
        assert spec.channels == 3 and spec.size == 3 * b.size and spec.num_classes == 40
    fm = get_dataset("fashion_mnist_lt_scenes")
    assert fm.default_mirror == FASHION_MNIST_MIRROR and fm.class_names[0] == "red t-shirt/top"
    assert fm.class_names[-1] == "yellow ankle boot"


def _content_digest(prepared_dir: Path) -> str:
    """sha256 of every split's arrays (names, dtypes, shapes, bytes) and the manifest without file hashes:
    the data itself, independent of torch's file format."""
    h = hashlib.sha256()
    m = json.loads((prepared_dir / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        m["splits"][split].pop("sha256")
        blob = torch.load(prepared_dir / f"{split}.pt", weights_only=True)
        for key in sorted(blob):
            t = blob[key].contiguous()
            h.update(f"{split}/{key}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
    h.update(json.dumps(m, sort_keys=True).encode())
    return h.hexdigest()[:16]


# measured on the data layer before the dense scenes were added (digits_scenes with its test's small recipe)
EXISTING = {"digits": (None, "8e03ce2fc394284b"),
            "digits_scenes": ({"n_train": 240, "n_test": 60}, "09b77ac1a1d04662"),
            "digits_pairs": (None, "e057cad6dd5b12c9")}


@pytest.mark.parametrize("name", sorted(EXISTING))
def test_existing_datasets_are_unchanged(digits_raw, tmp_path, name):
    raw_dir, _ = digits_raw
    recipe, digest = EXISTING[name]
    prepare(name, raw_dir, tmp_path / name, seed=0, recipe=recipe)
    data = load_prepared(tmp_path / name)
    assert data.train.instance_masks is None and "dense" not in data.manifest
    assert _content_digest(tmp_path / name) == digest
