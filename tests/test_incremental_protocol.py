"""The incremental protocol: scenario builders (and their refusals), the exemplar memory,
gold tests of the metrics against hand-computed matrices, and a resumed run."""
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from classlab.data.scenarios import ClassIncrementalScenario, ScenarioError, build_scenario
from classlab.metrics.incremental import (accuracy_matrix, anytime_auc, average_incremental_accuracy,
                                          backward_transfer, few_shot_summary, forgetting, forgetting_initial,
                                          last_accuracy, old_new_accuracy, summarize_incremental)
from classlab.protocols.memory import ExemplarMemory, herding_order

LABELS = np.repeat(np.arange(10), 20)


# --- scenarios -------------------------------------------------------------------------

def test_b0inc2_partitions_classes_and_samples():
    s = build_scenario("class_incremental", "toy", LABELS, 10, seed=3, initial=0, increment=2)
    assert s.num_tasks == 5
    assert sorted(c for t in s.tasks for c in t.classes) == list(range(10))
    assert s.class_order == np.random.default_rng(3).permutation(10).tolist()
    for task in s.tasks:
        assert set(LABELS[task.train_indices]) == set(task.classes)
    assert sorted(i for t in s.tasks for i in t.train_indices) == list(range(200))
    assert s.tasks[-1].test_classes == s.class_order


def test_bx_inc_first_task_is_larger():
    s = build_scenario("class_incremental", "toy", LABELS, 10, seed=0, initial=4, increment=2)
    assert [len(t.classes) for t in s.tasks] == [4, 2, 2, 2]
    assert s.params["name"] == "B4Inc2"


def test_few_shot_sessions_have_k_shots():
    s = build_scenario("few_shot", "toy", LABELS, 10, seed=0, base_classes=6, ways=2, shots=5)
    assert len(s.tasks) == 3 and len(s.tasks[0].train_indices) == 6 * 20
    for task in s.tasks[1:]:
        assert len(task.train_indices) == 2 * 5
        assert np.bincount(LABELS[task.train_indices], minlength=10)[task.classes].tolist() == [5, 5]


def test_few_shot_base_session_subset_keeps_the_sessions():
    full = build_scenario("few_shot", "toy", LABELS, 10, seed=0, base_classes=6, ways=2, shots=5)
    s = build_scenario("few_shot", "toy", LABELS, 10, seed=0, base_classes=6, ways=2, shots=5, samples_per_class=7)
    assert np.bincount(LABELS[s.tasks[0].train_indices], minlength=10)[s.tasks[0].classes].tolist() == [7] * 6
    assert [t.classes for t in s.tasks] == [t.classes for t in full.tasks]
    assert all(len(t.train_indices) == 10 for t in s.tasks[1:])
    assert full.to_json()["params"]["samples_per_class"] is None


def test_si_blurry_is_seeded_and_blurry():
    a = build_scenario("si_blurry", "toy", LABELS, 10, seed=1, num_tasks=4, disjoint_class_ratio=0.5,
                       blurry_sample_ratio=0.2)
    b = build_scenario("si_blurry", "toy", LABELS, 10, seed=1, num_tasks=4, disjoint_class_ratio=0.5,
                       blurry_sample_ratio=0.2)
    assert a.to_json() == b.to_json()
    assert sorted(i for t in a.tasks for i in t.train_indices) == list(range(200))  # every sample once
    blurry = a.class_order[5:]
    homes = [[t for t, task in enumerate(a.tasks) if c in set(LABELS[task.train_indices])] for c in blurry]
    assert any(len(h) > 1 for h in homes)  # blurry classes leak into other tasks
    disjoint = a.class_order[:5]
    assert all(len([t for t, task in enumerate(a.tasks) if c in set(LABELS[task.train_indices])]) == 1
               for c in disjoint)


def test_scenario_json_round_trip(tmp_path):
    s = build_scenario("class_incremental", "toy", LABELS, 10, seed=0, initial=0, increment=5)
    s.save(tmp_path / "s.json")
    assert ClassIncrementalScenario.load(tmp_path / "s.json").to_json() == s.to_json()


def test_test_subset_is_seeded_per_class_and_masks_evaluation():
    test_labels = np.repeat(np.arange(10), 30)
    s = build_scenario("class_incremental", "toy", LABELS, 10, seed=4, initial=0, increment=2,
                       test_labels=test_labels, test_samples_per_class=7)
    again = build_scenario("class_incremental", "toy", LABELS, 10, seed=4, initial=0, increment=2,
                           test_labels=test_labels, test_samples_per_class=7)
    assert s.test_indices == again.test_indices and s.params["test_samples_per_class"] == 7
    assert np.bincount(test_labels[s.test_indices], minlength=10).tolist() == [7] * 10
    mask = s.test_mask(torch.from_numpy(test_labels), s.tasks[0].test_classes)
    # only the subset's samples of the first task's classes are evaluated
    assert int(mask.sum()) == 14
    assert set(test_labels[mask.numpy()]) == set(s.tasks[0].classes)
    assert set(np.flatnonzero(mask.numpy())) <= set(s.test_indices)
    whole = build_scenario("class_incremental", "toy", LABELS, 10, seed=4, initial=0, increment=2)
    assert whole.test_indices is None
    assert int(whole.test_mask(torch.from_numpy(test_labels), whole.tasks[0].test_classes).sum()) == 60
    with pytest.raises(ScenarioError, match="scenario.test_samples_per_class"):
        build_scenario("class_incremental", "toy", LABELS, 10, seed=0, initial=0, increment=2,
                       test_labels=test_labels, test_samples_per_class=0)


@pytest.mark.parametrize("kind,params,field", [
    ("class_incremental", {"initial": 0, "increment": 3}, "increment"),      # 10 classes don't split into 3s
    ("class_incremental", {"initial": 12, "increment": 2}, "initial"),       # more classes than exist
    ("class_incremental", {"initial": 0, "increment": 0}, "increment"),
    ("few_shot", {"base_classes": 6, "ways": 2, "shots": 0}, "shots"),       # zero-shot sessions
    ("few_shot", {"base_classes": 6, "ways": 2, "shots": 50}, "shots"),      # more shots than samples
    ("few_shot", {"base_classes": 10, "ways": 2, "shots": 5}, "base_classes"),
    ("si_blurry", {"num_tasks": 20, "disjoint_class_ratio": 0.5, "blurry_sample_ratio": 0.1}, "num_tasks"),
])
def test_scenarios_that_do_not_fit_are_refused_naming_the_field(kind, params, field):
    with pytest.raises(ScenarioError, match=f"scenario.{field}"):
        build_scenario(kind, "toy", LABELS, 10, seed=0, **params)


def test_cli_refuses_bad_scenario_and_writes_nothing(tmp_path):
    from classlab.data.prepare import prepare
    from classlab.data.registry import get_dataset

    get_dataset("digits").download(tmp_path / "raw")
    prepare("digits", tmp_path / "raw", tmp_path / "prep")
    out = tmp_path / "scen.json"
    proc = subprocess.run([sys.executable, "-m", "classlab.cli", "build-scenario", "--data", str(tmp_path / "prep"),
                           "--params", json.dumps({"kind": "few_shot", "base_classes": 6, "ways": 2, "shots": 0}),
                           "--seed", "0", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode != 0 and "scenario.shots" in proc.stderr
    assert not out.exists()


def test_memory_budget_below_one_per_class_is_refused_by_config():
    import copy

    import yaml

    from classlab.config import ROOT, ConfigError, validate_config

    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config = copy.deepcopy(config)
    config["families"]["incremental"]["runs"]["b0inc2"].append("icarl")
    config["families"]["incremental"].setdefault("overrides", {})["icarl"] = {"memory_size": 5}
    with pytest.raises(ConfigError, match="memory_size"):
        validate_config(config)


# --- memory ----------------------------------------------------------------------------

def test_herding_picks_the_point_closest_to_the_mean_first():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7071, 0.7071]])
    # normalised mean is closest to the diagonal point; then the pair that balances the mean
    order = herding_order(feats, 3)
    assert order[0] == 2 and sorted(order.tolist()) == [0, 1, 2]


def test_memory_respects_the_total_budget_and_rebalances():
    mem = ExemplarMemory(budget=20, strategy="random", seed=0)
    embed = lambda idx: torch.randn(len(idx), 4)  # noqa: E731
    mem.update({0: torch.arange(0, 50), 1: torch.arange(50, 100)}, embed)
    assert len(mem) == 20 and all(len(v) == 10 for v in mem.per_class.values())
    kept = mem.per_class[0].clone()
    mem.update({2: torch.arange(100, 150), 3: torch.arange(150, 200)}, embed)
    assert len(mem) == 20 and all(len(v) == 5 for v in mem.per_class.values())
    assert torch.equal(mem.per_class[0], kept[:5])  # old classes keep their first exemplars


def test_memory_rejects_unknown_strategy():
    with pytest.raises(ValueError, match="memory_strategy"):
        ExemplarMemory(10, "fifo")


# --- metrics: gold tests ----------------------------------------------------------------

def _steps():
    """Three tasks with classes {0,1}, {2,3}, {4,5}; 2 test samples per class.
    After step 0: task0 2/4 right? No: 4/4. Hand-built predictions below."""
    y0 = np.array([0, 0, 1, 1])
    p0 = np.array([0, 0, 1, 0])                    # task0: 3/4
    y1 = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    p1 = np.array([0, 2, 2, 2, 2, 2, 3, 3])        # task0: 1/4, task1: 4/4
    y2 = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    p2 = np.array([0, 0, 4, 4, 2, 4, 4, 4, 4, 4, 5, 5])  # task0: 2/4, task1: 1/4, task2: 4/4
    return [(p0, y0), (p1, y1), (p2, y2)], {0: 0, 1: 0, 2: 1, 3: 1, 4: 2, 5: 2}


def test_accuracy_matrix_by_hand():
    steps, toc = _steps()
    a = accuracy_matrix(steps, toc)
    expected = np.array([[0.75, np.nan, np.nan], [0.25, 1.0, np.nan], [0.5, 0.25, 1.0]])
    np.testing.assert_allclose(a, expected)


def test_summary_metrics_by_hand():
    steps, toc = _steps()
    a = accuracy_matrix(steps, toc)
    assert last_accuracy(steps) == pytest.approx(7 / 12)
    assert average_incremental_accuracy(steps) == pytest.approx((3 / 4 + 5 / 8 + 7 / 12) / 3)
    # max-based: task0 max(.75,.25) - .5 = .25; task1 max(1.0) - .25 = .75 -> mean .5
    assert forgetting(a) == pytest.approx(0.5)
    # initial: task0 .75 - .5 = .25; task1 1.0 - .25 = .75 -> .5 (equal here); BWT = -.5
    assert forgetting_initial(a) == pytest.approx(0.5)
    assert backward_transfer(a) == pytest.approx(-0.5)
    on = old_new_accuracy(steps, toc)
    assert on[1] == {"old": 0.25, "new": 1.0}
    assert on[2]["old"] == pytest.approx(3 / 8)


def test_max_and_initial_forgetting_differ_when_accuracy_rises_later():
    a = np.array([[0.5, np.nan, np.nan], [0.9, 0.8, np.nan], [0.6, 0.8, 0.9]])
    assert forgetting(a) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.8)) / 2)
    assert forgetting_initial(a) == pytest.approx(((0.5 - 0.6) + 0.0) / 2)


def test_class_balanced_differs_from_sample_weighted():
    y = np.array([0, 0, 0, 1])
    p = np.array([0, 0, 0, 0])
    steps, toc = [(p, y)], {0: 0, 1: 0}
    assert last_accuracy(steps, "sample") == pytest.approx(0.75)
    assert last_accuracy(steps, "class") == pytest.approx(0.5)


def test_few_shot_summary_by_hand():
    steps, toc = _steps()
    s = few_shot_summary(steps, toc)
    assert s["performance_drop"] == pytest.approx(3 / 4 - 7 / 12)
    base, novel = 2 / 4, 5 / 8
    assert s["harmonic_mean"] == pytest.approx(2 * base * novel / (base + novel))


def test_anytime_auc_is_the_mean_of_equally_spaced_accuracies():
    assert anytime_auc(np.array([[100, 0.2], [200, 0.4], [300, 0.9]])) == pytest.approx(0.5)


def test_summary_has_named_variants():
    steps, toc = _steps()
    s = summarize_incremental(steps, toc)
    for key in ("last_accuracy", "last_accuracy_class_balanced", "forgetting", "forgetting_initial",
                "backward_transfer", "average_incremental_accuracy_class_balanced"):
        assert key in s


# --- a killed incremental run resumes to the same predictions --------------------------

def _inc_cmd(prep, scen, ck, ev):
    return [sys.executable, "-m", "classlab.cli", "train-incremental", "--method", "finetune", "--data", str(prep),
            "--scenario", str(scen), "--backbone", "convnet", "--backbone-kwargs",
            json.dumps({"widths": [8, 16], "pool_after": [0]}), "--seed", "1", "--ckpt-dir", str(ck),
            "--eval-dir", str(ev), "--overrides", json.dumps({"epochs": 4, "batch_size": 32}),
            "--threads", "1", "--no-progress"]


def test_killed_incremental_run_resumes_to_identical_predictions(tmp_path):
    from classlab.data.prepare import load_prepared, prepare
    from classlab.data.registry import get_dataset
    from tests.conftest import env_with_venv

    get_dataset("digits").download(tmp_path / "raw")
    prepare("digits", tmp_path / "raw", tmp_path / "prep")
    labels = load_prepared(tmp_path / "prep").train.y.numpy()
    scen = tmp_path / "scen.json"
    build_scenario("class_incremental", "digits", labels, 10, seed=0, initial=0, increment=2).save(scen)

    subprocess.run(_inc_cmd(tmp_path / "prep", scen, tmp_path / "ref_ck", tmp_path / "ref_ev"), check=True,
                   env=env_with_venv(), capture_output=True, timeout=600)
    proc = subprocess.Popen(_inc_cmd(tmp_path / "prep", scen, tmp_path / "ck", tmp_path / "ev"),
                            env=env_with_venv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "ck" / "task1.pt").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "ev" / "predictions.npz").exists()
    subprocess.run(_inc_cmd(tmp_path / "prep", scen, tmp_path / "ck", tmp_path / "ev"), check=True,
                   env=env_with_venv(), capture_output=True, timeout=600)
    with np.load(tmp_path / "ref_ev" / "predictions.npz") as a, np.load(tmp_path / "ev" / "predictions.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for key in a.files:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        # the last task also scores the validation split (every class seen by then), for choosing options
        val = load_prepared(tmp_path / "prep").val
        np.testing.assert_array_equal(a["val_labels_last"], val.y.numpy())
    metrics = tmp_path / "metrics.json"
    subprocess.run([sys.executable, "-m", "classlab.cli", "evaluate-incremental", "--predictions",
                    str(tmp_path / "ev" / "predictions.npz"), "--history", str(tmp_path / "ck" / "history.json"),
                    "--scenario", str(scen), "--out", str(metrics)], check=True, env=env_with_venv(),
                   capture_output=True, timeout=300)
    m = json.loads(metrics.read_text())
    with np.load(tmp_path / "ev" / "predictions.npz") as z:
        expected = float((z["val_logits_last"].argmax(1) == z["val_labels_last"]).mean())
    assert m["val_last_accuracy"] == pytest.approx(expected) and 0 < expected <= 1


def test_joint_trains_on_everything_seen_and_finetune_on_the_task_only():
    from classlab.methods.registry import get_method
    from classlab.models import build_classifier

    model = build_classifier("convnet", 1, 4, backbone_kwargs={"widths": [4], "pool_after": []})
    task, seen, memory = torch.arange(10, 20), torch.arange(0, 20), torch.tensor([3, 4])
    joint = get_method("incremental", "joint")(model, {"lr": 0.1}, 4)
    finetune = get_method("incremental", "finetune")(model, {"lr": 0.1}, 4)
    assert torch.equal(joint.training_indices(task, seen, memory), seen)
    assert torch.equal(finetune.training_indices(task, seen, memory), task)  # no memory for finetune


def test_learner_masks_classes_not_seen_yet():
    from classlab.methods.registry import get_method
    from classlab.models import build_classifier

    learner = get_method("incremental", "finetune")(build_classifier("convnet", 1, 4, backbone_kwargs={
        "widths": [4], "pool_after": []}), {"lr": 0.1}, 4)
    learner.begin_task(0, [2, 0], [2, 0])
    out = learner.mask_unseen(torch.zeros(1, 4))
    assert torch.isinf(out[0, 1]) and torch.isinf(out[0, 3]) and out[0, 0] == 0 and out[0, 2] == 0


def test_first_task_pretraining_sees_only_the_first_tasks_subset(tmp_path):
    """pretrain_first_task's command: trained on the first task's (subset) samples, nothing else."""
    from classlab.data.prepare import load_prepared
    from tests.shared_data import SHARED

    data = SHARED / "prepared" / "digits"
    labels = load_prepared(data).train.y.numpy()
    scen = build_scenario("class_incremental", "digits", labels, 10, seed=0, initial=4, increment=2,
                          samples_per_class=5)
    scen.save(tmp_path / "scen.json")
    out = tmp_path / "pre"
    subprocess.run([sys.executable, "-m", "classlab.cli", "train", "--family", "pretrain", "--method", "supervised",
                    "--data", str(data), "--backbone", "convnet", "--backbone-kwargs",
                    json.dumps({"widths": [4], "pool_after": [0]}), "--seed", "0", "--overrides",
                    json.dumps({"epochs": 1, "batch_size": 8}), "--classes-from-scenario", str(tmp_path / "scen.json"),
                    "--out-dir", str(out), "--no-progress"], check=True, capture_output=True, timeout=300)
    meta = json.loads((out / "history.json").read_text())["meta"]
    assert meta["train_samples"] == 4 * 5
    assert json.loads(meta["hparams"])["classes"] == scen.tasks[0].classes


def test_first_task_pretraining_refuses_an_empty_first_task(tmp_path):
    """Si-Blurry's boundaries are drawn with replacement: a first task can be empty, and pretraining
    on it must stop with a message naming the problem instead of training on nothing."""
    from classlab.data.prepare import load_prepared, prepare
    from classlab.data.registry import get_dataset

    get_dataset("digits").download(tmp_path / "raw")
    data = tmp_path / "prep"
    prepare("digits", tmp_path / "raw", data)
    labels = load_prepared(data).train.y.numpy()
    build_scenario("class_incremental", "digits", labels, 10, seed=0, initial=4, increment=2).save(tmp_path / "s.json")
    doc = json.loads((tmp_path / "s.json").read_text())
    doc["tasks"][0]["train_indices"] = []
    (tmp_path / "s.json").write_text(json.dumps(doc))
    out = tmp_path / "pre"
    proc = subprocess.run([sys.executable, "-m", "classlab.cli", "train", "--family", "pretrain", "--method",
                           "supervised", "--data", str(data), "--backbone", "convnet", "--backbone-kwargs",
                           json.dumps({"widths": [4], "pool_after": [0]}), "--seed", "0", "--classes-from-scenario",
                           str(tmp_path / "s.json"), "--out-dir", str(out), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "the first task holds no training samples" in proc.stderr
    assert not (out / "model.pt").exists()
