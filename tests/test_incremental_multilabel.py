"""Multi-label class-incremental learning: the scene builder, the mAP metric, the protocol, and
the methods multi_lane (MULTI-LANE, De Min et al., CoLLAs 2024) and shared_prompt (its
shared-prompt baseline)."""
import json
import math

import numpy as np
import pytest
import torch

from classlab.data.scenes import SceneError, build_scene_dataset, build_scenes, load_scenes, save_scenes
from classlab.data.scenarios import ScenarioError, build_scenario
from classlab.methods.registry import get_method
from classlab.models import build_classifier
from classlab.protocols.multilabel import (evaluate_multilabel, mean_average_precision, run_multilabel,
                                           summarize_multilabel, task_annotations)

SMALL_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
HP = {"num_selectors": 3, "num_prompts": 2, "num_prompt_layers": 2, "normalize_features": True,
      "temperature": 0.1, "lr": 0.05, "optimizer": "adam", "weight_decay": 0.0}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread


def _toy_source(n_per_class=4, num_classes=5, size=4):
    """Images whose every pixel is 10 * (class + 1) + instance, so a cell names its source."""
    x = np.zeros((n_per_class * num_classes, 1, size, size), dtype=np.uint8)
    y = np.repeat(np.arange(num_classes), n_per_class)
    for i in range(len(y)):
        x[i] = 10 * (y[i] + 1) + i % n_per_class
    return torch.from_numpy(x), y


# --- scenes -------------------------------------------------------------------------------

def test_scene_labels_match_the_placed_objects():
    x, y = _toy_source()
    s = build_scenes(x, y, 5, n_scenes=50, k_min=2, k_max=4, grid=2, seed=3)
    assert s.x.shape == (50, 1, 8, 8) and s.x.dtype == torch.uint8 and s.y.shape == (50, 5)
    for i in range(50):
        valid = s.box_labels[i] >= 0
        k = int(valid.sum())
        assert 2 <= k <= 4
        assert sorted(torch.nonzero(s.y[i]).flatten().tolist()) == sorted(s.box_labels[i][valid].tolist())
        covered = torch.zeros(8, 8, dtype=torch.bool)
        for box, cls, src in zip(s.boxes[i][valid], s.box_labels[i][valid], s.sources[i][valid]):
            x0, y0, x1, y1 = box.tolist()
            assert (x1 - x0, y1 - y0) == (4, 4)
            assert y[int(src)] == int(cls)
            assert torch.equal(s.x[i, :, y0:y1, x0:x1], x[int(src)])  # the box holds that very image
            covered[y0:y1, x0:x1] = True
        assert int(covered.sum()) == 16 * k                              # distinct cells
        assert (s.x[i, 0][~covered] == 0).all()                          # the rest is background
        assert (s.boxes[i][~valid] == -1).all() and (s.sources[i][~valid] == -1).all()


def test_scenes_are_deterministic_given_the_seed():
    x, y = _toy_source()
    a = build_scenes(x, y, 5, n_scenes=20, seed=7)
    b = build_scenes(x, y, 5, n_scenes=20, seed=7)
    c = build_scenes(x, y, 5, n_scenes=20, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a.to_dict().values(), b.to_dict().values()))
    assert not torch.equal(a.x, c.x)


def test_scene_dataset_records_its_recipe_and_round_trips(tmp_path):
    x, y = _toy_source()
    recipe = {"seed": 1, "k_min": 2, "k_max": 3, "grid": 3, "n_train": 12, "n_test": 6}
    train, test, manifest = build_scene_dataset(x, y, x, y, 5, recipe, dataset="toy")
    assert manifest["recipe"] == recipe and manifest["canvas"] == [12, 12] and manifest["shape"] == [1, 12, 12]
    assert len(train) == 12 and len(test) == 6
    save_scenes(tmp_path / "scenes", train, test, manifest)
    train2, test2, manifest2 = load_scenes(tmp_path / "scenes")
    assert manifest2 == json.loads(json.dumps(manifest)) and torch.equal(train2.y, train.y)
    assert torch.equal(test2.boxes, test.boxes)


@pytest.mark.parametrize("kwargs,key", [({"k_min": 2, "k_max": 5, "grid": 2}, "k_max"),
                                        ({"k_min": 3, "k_max": 2, "grid": 2}, "k_min")])
def test_impossible_scene_recipes_are_refused(kwargs, key):
    x, y = _toy_source()
    with pytest.raises(SceneError, match=key):
        build_scene_dataset(x, y, x, y, 5, kwargs)
    with pytest.raises(SceneError, match="unknown"):
        build_scene_dataset(x, y, x, y, 5, {"canvas": 3})


def test_task_annotations_keep_only_the_task_classes():
    y = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.uint8)
    idx, yt = task_annotations(y, [0, 1])
    assert idx.tolist() == [0, 2]                     # scenes with at least one task class
    assert yt[2].tolist() == [1, 0, 0, 0]             # class 3 is present but not annotated


# --- mAP --------------------------------------------------------------------------------

def test_map_of_perfect_scores_is_one():
    rng = np.random.default_rng(0)
    t = (rng.random((30, 4)) < 0.4).astype(int)
    t[0] = 1
    assert mean_average_precision(t, t + 0.1 * rng.random((30, 4))) == pytest.approx(1.0)


def test_map_matches_a_hand_computed_example():
    t = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    s = np.array([[0.9, 0.5, 0.3], [0.8, 0.2, 0.2], [0.7, 0.9, 0.1], [0.1, 0.1, 0.0]])
    # class 0: ranks pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2 = 5/6
    # class 1: ranks neg (0.9), neg (0.5), pos (0.2)   -> AP = 1/3
    # class 2: no positive -> left out of the mean
    assert mean_average_precision(t, s) == pytest.approx((5 / 6 + 1 / 3) / 2)
    assert mean_average_precision(t, s, [1]) == pytest.approx(1 / 3)
    from torchmetrics.functional.classification import multilabel_average_precision

    tm = multilabel_average_precision(torch.tensor(s[:, :2]), torch.tensor(t[:, :2]), num_labels=2)
    assert float(tm) == pytest.approx(7 / 12)


def test_map_matrix_columns_use_the_scenes_of_their_task():
    # after task 1 more scenes join (negatives of class 0) but class 0's scores are unchanged
    t0 = np.array([[1, 0], [0, 0]]), np.array([[2.0, 0.0], [1.0, 0.0]])
    t1 = np.array([[1, 0], [0, 0], [0, 1]]), np.array([[2.0, 0.0], [1.0, 0.0], [3.0, 1.0]])
    m = summarize_multilabel([t0, t1], [[0], [1]], [np.array([0, 1]), np.array([0, 1, 2])])
    assert m["map_matrix"][1][0] == m["map_matrix"][0][0] == 1.0 and m["map_forgetting"] == 0.0
    assert m["map_per_task"][1] == pytest.approx((0.5 + 1.0) / 2)   # class 0 is now outranked by scene 2


# --- MULTI-LANE -------------------------------------------------------------------------

def _learner(name, num_classes=4, seed=0):
    torch.manual_seed(seed)
    model = build_classifier("vit_tiny", 1, num_classes, img_size=8, backbone_kwargs=SMALL_VIT)
    return get_method("incremental", name)(model, HP, num_classes)


def test_multi_lane_summary_is_a_softmax_weighted_sum_of_patches():
    lane = _learner("multi_lane")
    sel = torch.tensor([[[[1.0, 0.0]]]])                  # (T=1, B=1, M=1, D=2)
    patches = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])    # (B=1, N=2, D=2)
    lane.dim = 2
    w = torch.softmax(torch.tensor([2.0, 0.0]) / math.sqrt(2), 0)
    assert torch.allclose(lane.summarize(sel, patches)[0, 0, 0], w[0] * patches[0, 0] + w[1] * patches[0, 1])
    lane = _learner("multi_lane")
    s = torch.randn(3, 5, 4, 32)
    assert lane.summarize(s, torch.randn(5, 16, 32)).shape == (3, 5, 4, 32)
    lane.begin_task(0, [0, 1], [0, 1])
    lane.begin_task(1, [2, 3], [0, 1, 2, 3])
    x = torch.randn(5, 1, 8, 8)
    assert lane.lane_features(x, [0, 1]).shape == (2, 5, 32)
    assert lane.predict(x).shape == (5, 4)


def _train_steps(learner, n=4, classes=(0, 1)):
    torch.manual_seed(1)
    opt = learner.configure_optimizer()
    learner.train()
    for _ in range(n):
        y = torch.zeros(8, learner.num_classes)
        y[:, list(classes)] = (torch.rand(8, len(classes)) < 0.5).float()
        loss, _ = learner.training_step({"x": torch.randn(8, 1, 8, 8), "y": y})
        learner.optimizer_step(loss, opt, lambda: loss)


def test_multi_lane_old_lanes_stay_unchanged_while_a_new_task_trains():
    lane = _learner("multi_lane")
    x = torch.randn(6, 1, 8, 8)
    lane.begin_task(0, [0, 1], [0, 1])
    _train_steps(lane, classes=(0, 1))
    lane.eval()
    old_scores = lane.predict(x)[:, :2].clone()
    old = {k: v.clone() for k, v in lane.state_dict().items()}
    lane.begin_task(1, [2, 3], [0, 1, 2, 3])
    assert torch.equal(lane.selectors[1], lane.selectors[0])     # a new lane starts from the last one
    trained = {id(p) for g in lane.param_groups() for p in g["params"]}
    assert trained == {id(p) for p in lane._lane_params(1)}
    _train_steps(lane, classes=(2, 3))
    new = lane.state_dict()
    for k in old:
        if k.startswith(("selectors.0", "prompts.0", "heads.0", "model.")):
            assert torch.equal(new[k], old[k]), f"{k} changed while task 1 trained"
    assert not torch.equal(new["selectors.1"], old["selectors.1"])
    lane.eval()
    # old classes' scores are frozen (up to float reassociation: lanes are evaluated stacked)
    assert torch.allclose(lane.predict(x)[:, :2], old_scores, atol=1e-5, rtol=0)


def test_shared_prompt_keeps_training_its_single_lane():
    base = _learner("shared_prompt")
    assert len(base.heads) == 1 and base.shared_lane
    x = torch.randn(6, 1, 8, 8)
    base.begin_task(0, [0, 1], [0, 1])
    _train_steps(base, classes=(0, 1))
    base.eval()
    before = base.predict(x)[:, :2].clone()
    base.begin_task(1, [2, 3], [0, 1, 2, 3])
    _train_steps(base, classes=(2, 3))
    base.eval()
    assert not torch.allclose(base.predict(x)[:, :2], before, atol=1e-3)   # the shared prompt drifts


# --- end to end -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from classlab.data.prepare import load_prepared, prepare
    from classlab.data.registry import get_dataset

    root = tmp_path_factory.mktemp("digits_ml")
    get_dataset("digits").download(root / "raw")
    prepare("digits", root / "raw", root / "prep")
    labels = load_prepared(root / "prep").train.y.numpy()
    build_scenario("class_incremental", "digits", labels, 10, seed=0, initial=4, increment=3).save(root / "scen.json")
    return root


SCENES = {"seed": 0, "k_min": 2, "k_max": 3, "grid": 2, "n_train": 500, "n_test": 200}
OVERRIDES = {"epochs": 2, "batch_size": 64, "num_selectors": 3, "num_prompts": 4, "num_prompt_layers": 2,
             "lr": 0.05}


def _run(digits, method, out, **kw):
    return run_multilabel(method, digits / "prep", digits / "scen.json", SCENES, "vit_tiny", 0, out / "ck",
                          out / "ev", overrides=OVERRIDES, backbone_kwargs=SMALL_VIT, threads=1, progress=False, **kw)


def test_multi_lane_and_shared_prompt_end_to_end_on_digit_scenes(digits, tmp_path):
    metrics = {}
    for method in ("multi_lane", "shared_prompt"):
        out = tmp_path / method
        _run(digits, method, out)
        for f in ("ck/model.pt", "ck/history.json", "ev/predictions.npz", "ev/scenes.json"):
            assert (out / f).exists(), f
        assert not list((out / "ck").glob("task*.pt"))
        m = evaluate_multilabel(out / "ev/predictions.npz", out / "ck/history.json", out / "ev/metrics.json")
        assert m["scenario_kind"] == "multilabel" and m["scenes"] == SCENES
        assert m["init_kind"] == "scratch"
        assert len(m["map_per_task"]) == 3 and all(0.0 < v <= 1.0 for v in m["map_per_task"])
        assert m["average_incremental_map"] == pytest.approx(np.mean(m["map_per_task"]))
        metrics[method] = m
    col0 = [row[0] for row in metrics["multi_lane"]["map_matrix"]]
    # frozen lanes: task 0's mAP on its scenes never moves, so no forgetting
    assert col0 == pytest.approx([col0[0]] * 3, abs=1e-6)
    assert metrics["multi_lane"]["map_forgetting"] == pytest.approx(0.0, abs=1e-6)
    print("final mAP multi_lane %.4f shared_prompt %.4f; forgetting %.4f vs %.4f" % (
        metrics["multi_lane"]["final_map"], metrics["shared_prompt"]["final_map"],
        metrics["multi_lane"]["map_forgetting"], metrics["shared_prompt"]["map_forgetting"]))


def test_interrupted_multi_lane_run_resumes_to_identical_predictions(digits, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    _run(digits, "multi_lane", ref)
    cls = get_method("incremental", "multi_lane")
    original = cls.end_task

    def crash(self, task_id, context):
        if task_id == 1:
            raise KeyboardInterrupt("killed after task 1's epochs")
        return original(self, task_id, context)

    out = tmp_path / "resumed"
    monkeypatch.setattr(cls, "end_task", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(digits, "multi_lane", out)
    assert (out / "ck/task0.pt").exists() and (out / "ck/task1_last.pt").exists()
    monkeypatch.setattr(cls, "end_task", original)
    _run(digits, "multi_lane", out)
    with np.load(ref / "ev/predictions.npz") as a, np.load(out / "ev/predictions.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for k in a.files:
            assert np.array_equal(a[k], b[k]), k


def test_protocols_refuse_methods_of_the_other_kind(digits, tmp_path):
    with pytest.raises(ScenarioError, match="multilabel"):
        run_multilabel("finetune", digits / "prep", digits / "scen.json", SCENES, "vit_tiny", 0, tmp_path / "ck",
                       tmp_path / "ev", backbone_kwargs=SMALL_VIT, threads=1, progress=False)
    from classlab.protocols.incremental import run_incremental

    with pytest.raises(ScenarioError, match="multilabel"):
        run_incremental("multi_lane", digits / "prep", digits / "scen.json", "vit_tiny", 0, tmp_path / "ck2",
                        tmp_path / "ev2", backbone_kwargs=SMALL_VIT, threads=1, progress=False)


def test_multi_lane_refuses_a_backbone_without_patch_tokens():
    model = build_classifier("convnet", 1, 4, backbone_kwargs={"widths": [8], "pool_after": []})
    with pytest.raises(ValueError, match="VisionTransformer"):
        get_method("incremental", "multi_lane")(model, HP, 4)
