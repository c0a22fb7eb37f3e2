"""Single-target scenes (the explain family's localisation data): the builder, the registry's scene
datasets, `prepare` with a recipe (boxes following their scenes into train/val/test), and bad recipes."""
import json

import numpy as np
import pytest
import torch

from classlab.cli import main as cli_main
from classlab.data.prepare import load_prepared, prepare, stratified_holdout
from classlab.data.registry import DATASETS, FASHION_MNIST_MIRROR, get_dataset
from classlab.data.scenes import (SINGLE_TARGET_RECIPE, SceneError, build_single_target_dataset,
                                  build_single_target_scenes, load_scene_boxes, resolve_single_target_recipe)

SMALL = {"n_train": 240, "n_test": 60}


@pytest.fixture(scope="module")
def digits_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_raw")
    spec = get_dataset("digits_scenes")
    spec.download(root)
    return root, spec.load_raw(root)


@pytest.fixture(scope="module")
def prepared(digits_raw, tmp_path_factory):
    raw_dir, _ = digits_raw
    out = tmp_path_factory.mktemp("prepared") / "digits_scenes"
    manifest = prepare("digits_scenes", raw_dir, out, seed=0, recipe=SMALL)
    return out, manifest


def _toy(n_per_class=6, classes=6, size=4, seed=0):
    """Images whose pixels encode (class, index) so a pasted cell names its source."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.integers(1, 256, size=(len(y), 1, size, size), dtype=np.uint8)  # never black: cells are findable
    return x, y


# --- the builder ------------------------------------------------------------------------------

def test_each_scene_holds_one_target_and_its_distractors_at_their_boxes():
    x, y = _toy()
    s, reuse = build_single_target_scenes(x, y, n_scenes=40, grid=3, n_distractors=2, target_classes=[0, 1, 2],
                                          distractor_classes=[3, 4, 5], seed=1)
    assert s.x.shape == (40, 1, 12, 12) and s.y.dtype == torch.int64 and s.boxes.shape == (40, 4)
    assert s.distractor_boxes.shape == (40, 2, 4) and s.distractor_labels.shape == (40, 2)
    targets = np.array([0, 1, 2])
    for i in range(40):
        src = s.sources[i].numpy()
        assert y[src[0]] == targets[s.y[i]]                      # label = index of the target's class
        assert set(y[src[1:]].tolist()) <= {3, 4, 5}               # distractors from their own classes
        assert y[src[1:]].tolist() == s.distractor_labels[i].tolist()
        assert len(set(s.distractor_labels[i].tolist())) == 2      # distinct when there are enough classes
        occupied = np.zeros((12, 12), bool)
        for box, k in zip([s.boxes[i]] + list(s.distractor_boxes[i]), src):
            x0, y0, x1, y1 = box.tolist()
            assert (x1 - x0, y1 - y0) == (4, 4) and x0 % 4 == 0 and y0 % 4 == 0
            assert np.array_equal(s.x[i, :, y0:y1, x0:x1].numpy(), x[k])  # the box holds its source image
            assert not occupied[y0:y1, x0:x1].any()                        # distinct cells
            occupied[y0:y1, x0:x1] = True
        assert (s.x[i, 0].numpy()[~occupied] == 0).all()           # the rest of the canvas is black
    assert reuse > 1  # 40 scenes need ~14 images of each target class; the toy split has 6


def test_targets_are_balanced_and_sources_reused_only_when_a_class_runs_out():
    x, y = _toy(n_per_class=10)
    s, reuse = build_single_target_scenes(x, y, n_scenes=30, grid=2, n_distractors=0, target_classes=[0, 1, 2],
                                          distractor_classes=[3, 4, 5], seed=0)
    assert s.distractor_boxes.shape == (30, 0, 4)
    assert np.bincount(s.y.numpy()).tolist() == [10, 10, 10]
    assert reuse == 1 and len(np.unique(s.sources[:, 0])) == 30  # 10 scenes per class, 10 images each
    s, reuse = build_single_target_scenes(x, y, n_scenes=45, grid=2, n_distractors=0, target_classes=[0, 1, 2],
                                          distractor_classes=[3, 4, 5], seed=0)
    assert reuse == 2
    counts = np.bincount(s.sources[:, 0].numpy(), minlength=len(y))
    assert counts[y < 3].min() >= 1 and counts.max() == 2  # every image used before any is used twice


def test_scenes_are_a_function_of_the_recipe():
    x, y = _toy()
    kw = dict(n_scenes=20, grid=3, n_distractors=2, target_classes=[0, 1], distractor_classes=[2, 3, 4, 5])
    a, _ = build_single_target_scenes(x, y, seed=5, **kw)
    b, _ = build_single_target_scenes(x, y, seed=5, **kw)
    c, _ = build_single_target_scenes(x, y, seed=6, **kw)
    assert torch.equal(a.x, b.x) and torch.equal(a.boxes, b.boxes) and torch.equal(a.sources, b.sources)
    assert not torch.equal(a.boxes, c.boxes)


def test_more_distractors_than_distractor_classes_draws_with_replacement():
    x, y = _toy()
    s, _ = build_single_target_scenes(x, y, n_scenes=10, grid=3, n_distractors=4, target_classes=[0, 1],
                                      distractor_classes=[4, 5], seed=0)
    assert set(s.distractor_labels.unique().tolist()) <= {4, 5} and s.distractor_labels.shape == (10, 4)


def test_train_scenes_come_from_the_train_split_and_test_scenes_from_the_test_split(digits_raw):
    _, raw = digits_raw
    names = [str(k) for k in range(10)]
    train, test, info = build_single_target_dataset(raw.train_x, raw.train_y, raw.test_x, raw.test_y, names,
                                                    {"n_train": 50, "n_test": 30}, base="digits")
    for scenes, bx, by in ((train, raw.train_x, raw.train_y), (test, raw.test_x, raw.test_y)):
        for i in range(len(scenes)):
            x0, y0, x1, y1 = scenes.boxes[i].tolist()
            src = int(scenes.sources[i, 0])
            assert np.array_equal(scenes.x[i, :, y0:y1, x0:x1].numpy(), bx[src]) and by[src] == scenes.y[i]
    assert info["recipe"]["target_classes"] == [0, 1, 2, 3, 4]
    assert info["recipe"]["distractor_classes"] == [5, 6, 7, 8, 9]
    assert info["box_area_share"] == pytest.approx(1 / 9) and info["canvas"] == [24, 24] and info["cell"] == [8, 8]
    assert info["target_class_names"] == ["0", "1", "2", "3", "4"] and info["base_dataset"] == "digits"


# --- the registry -----------------------------------------------------------------------------

def test_scene_datasets_are_registry_entries_built_on_their_base():
    for name, base in (("fashion_mnist_scenes", "fashion_mnist"), ("digits_scenes", "digits"),
                       ("mnist_scenes", "mnist")):
        assert name in DATASETS and callable(DATASETS[name])
        spec, b = get_dataset(name), get_dataset(base)
        assert spec.scene_base == base and spec.name == name
        assert [f.name for f in spec.files] == [f.name for f in b.files]  # the base's raw files
        assert spec.default_mirror == b.default_mirror and spec.load_raw is b.load_raw
        assert spec.class_names == b.class_names[:5] and spec.size == 3 * b.size
        assert spec.with_files([]).scene_base == base                     # copies keep the role
    assert get_dataset("fashion_mnist_scenes").default_mirror == FASHION_MNIST_MIRROR
    assert get_dataset("fashion_mnist_scenes").scene_defaults == {"n_train": 6000, "n_test": 1000}
    assert get_dataset("digits").scene_base is None


# --- prepare ----------------------------------------------------------------------------------

def test_prepared_scenes_have_the_layout_of_every_dataset_plus_boxes(prepared, digits_raw):
    out, manifest = prepared
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test.pt", "train.pt", "val.pt"]
    data = load_prepared(out)
    assert data.num_classes == 5 and manifest["class_names"] == ["0", "1", "2", "3", "4"]
    assert data.train.x.dtype == torch.uint8 and data.train.x.shape[1:] == (1, 24, 24)
    for part in (data.train, data.val, data.test):
        n = len(part)
        assert part.boxes.shape == (n, 4) and part.boxes.dtype == torch.int64
        assert part.distractor_boxes.shape == (n, 2, 4) and part.distractor_labels.shape == (n, 2)
        assert part.object_sources.shape == (n, 3)
    assert len(data.train) + len(data.val) == SMALL["n_train"] and len(data.test) == SMALL["n_test"]
    boxes, dboxes, dlabels = load_scene_boxes(out, "test")
    assert torch.equal(boxes, data.test.boxes) and torch.equal(dlabels, data.test.distractor_labels)
    scenes = manifest["scenes"]
    assert scenes["recipe"] == {**SINGLE_TARGET_RECIPE, **SMALL, "target_classes": [0, 1, 2, 3, 4],
                                "distractor_classes": [5, 6, 7, 8, 9]}
    assert scenes["base_dataset"] == "digits" and scenes["canvas"] == [24, 24]
    assert scenes["box_area_share"] == pytest.approx(1 / 9)
    x = data.train.x.double() / 255.0  # normalisation statistics of the part trained on
    assert manifest["channel_mean"] == pytest.approx(x.mean(dim=(0, 2, 3)).tolist())
    assert manifest["channel_std"] == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist())


def test_validation_is_held_out_by_scene_label_and_the_boxes_follow_their_scenes(prepared, digits_raw):
    out, manifest = prepared
    _, raw = digits_raw
    data = load_prepared(out)
    names = [str(k) for k in range(10)]
    train, test, _ = build_single_target_dataset(raw.train_x, raw.train_y, raw.test_x, raw.test_y, names, SMALL)
    keep, held = stratified_holdout(train.y.numpy(), 0.1, 0)
    assert data.val.source_index.tolist() == held.tolist() and data.train.source_index.tolist() == keep.tolist()
    assert manifest["splits"]["val"]["per_class"] == np.bincount(train.y.numpy()[held], minlength=5).tolist()
    for part, idx in ((data.train, keep), (data.val, held)):
        assert torch.equal(part.x, train.x[idx]) and torch.equal(part.y, train.y[idx])
        assert torch.equal(part.boxes, train.boxes[idx])
        assert torch.equal(part.distractor_boxes, train.distractor_boxes[idx])
        assert torch.equal(part.distractor_labels, train.distractor_labels[idx])
    assert torch.equal(data.test.x, test.x) and torch.equal(data.test.boxes, test.boxes)
    # the box really frames the target: the labelled digit's source image
    i = 3
    x0, y0, x1, y1 = data.test.boxes[i].tolist()
    src = int(data.test.object_sources[i, 0])
    assert np.array_equal(data.test.x[i, :, y0:y1, x0:x1].numpy(), raw.test_x[src])


def test_ordinary_datasets_have_no_boxes(digits_raw, tmp_path):
    raw_dir, _ = digits_raw
    prepare("digits", raw_dir, tmp_path / "digits")
    data = load_prepared(tmp_path / "digits")
    assert data.train.boxes is None and data.test.distractor_labels is None
    assert "scenes" not in data.manifest
    with pytest.raises(SceneError, match="not a scene dataset"):
        load_scene_boxes(tmp_path / "digits")


def test_a_recipe_overrides_the_defaults_through_the_cli(digits_raw, tmp_path):
    raw_dir, _ = digits_raw
    recipe = {"grid": 2, "n_distractors": 1, "target_classes": [3, 7], "distractor_classes": [1],
              "n_train": 40, "n_test": 10, "seed": 4}
    rc = cli_main(["prepare", "--dataset", "digits_scenes", "--raw-dir", str(raw_dir),
                   "--out-dir", str(tmp_path / "p"), "--recipe", json.dumps(recipe)])
    assert rc == 0
    data = load_prepared(tmp_path / "p")
    assert data.manifest["class_names"] == ["3", "7"] and data.manifest["shape"] == [1, 16, 16]
    assert data.manifest["scenes"]["recipe"] == recipe and data.manifest["scenes"]["box_area_share"] == 0.25
    assert (data.test.distractor_labels == 1).all()


@pytest.mark.parametrize("recipe, key", [
    ({"n_distractors": 9}, "scenes.n_distractors"),          # 10 objects, 9 cells
    ({"grid": 1, "n_distractors": 1}, "scenes.n_distractors"),
    ({"grid": 0}, "scenes.grid"),
    ({"colour": True}, "scenes.colour"),
    ({"target_classes": [0, 1], "distractor_classes": [1, 2]}, "scenes.distractor_classes"),
    ({"target_classes": [0, 12]}, "scenes.target_classes"),
    ({"target_classes": [3]}, "scenes.target_classes"),
    ({"distractor_classes": [-1]}, "scenes.distractor_classes"),
    ({"n_train": 0}, "scenes.n_train"),
    ({"seed": "zero"}, "scenes.seed"),
    ({"target_classes": list(range(10))}, "scenes.distractor_classes"),  # no distractor class left
])
def test_a_bad_recipe_names_its_key_and_writes_nothing(digits_raw, tmp_path, recipe, key):
    raw_dir, _ = digits_raw
    out = tmp_path / "never"
    with pytest.raises(SceneError, match=key.replace(".", r"\.")):
        prepare("digits_scenes", raw_dir, out, recipe=recipe)
    assert not out.exists()
    rc = cli_main(["prepare", "--dataset", "digits_scenes", "--raw-dir", str(raw_dir),
                   "--out-dir", str(out), "--recipe", json.dumps(recipe)])
    assert rc == 2 and not out.exists()


def test_a_recipe_for_an_ordinary_dataset_or_bad_json_is_refused(digits_raw, tmp_path, capsys):
    raw_dir, _ = digits_raw
    with pytest.raises(SceneError, match="digits_scenes"):
        prepare("digits", raw_dir, tmp_path / "a", recipe={"grid": 2})
    rc = cli_main(["prepare", "--dataset", "digits_scenes", "--raw-dir", str(raw_dir),
                   "--out-dir", str(tmp_path / "b"), "--recipe", "{grid: 2"])
    assert rc == 2 and "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resolve_fills_defaults_and_keeps_explicit_classes():
    r = resolve_single_target_recipe({"target_classes": [9, 2]}, 10, {"n_train": 7})
    assert r["target_classes"] == [9, 2] and r["distractor_classes"] == [0, 1, 3, 4, 5, 6, 7, 8]
    assert r["n_train"] == 7 and r["n_test"] == SINGLE_TARGET_RECIPE["n_test"] and r["grid"] == 3
    assert resolve_single_target_recipe({"n_distractors": 0, "target_classes": [0, 1],
                                         "distractor_classes": []}, 4)["n_distractors"] == 0
    with pytest.raises(SceneError, match="scenes: the recipe must be a mapping"):
        resolve_single_target_recipe([1, 2], 10)


def test_scene_bases_table_matches_the_specs():
    """The workflow reads SCENE_BASES (no torch) while it builds the DAG; the specs must agree."""
    from classlab.data.registry import DATASETS, SCENE_BASES, get_dataset

    scene_sets = {name for name in DATASETS if get_dataset(name).scene_base}
    assert scene_sets == set(SCENE_BASES)
    assert all(get_dataset(name).scene_base == base for name, base in SCENE_BASES.items())
