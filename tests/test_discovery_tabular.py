"""Tabular NCD (Troisemaine et al.): the mnist1d dataset, PBN's loss and class-number estimate, the
k-fold over hidden known classes, NCD k-means and NCD spectral clustering."""
from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch

from tests.discovery_helpers import digits_split, tiny_run

TINY_MLP = {"depth": 2, "width": 32, "init": "he"}


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """One thread for torch, BLAS and OpenMP (scikit-learn's k-means): the tensors are tiny, and on a
    shared machine spinning thread pools cost far more than they give."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


# --- the mnist1d dataset ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist1d_prepared(tmp_path_factory):
    """mnist1d generated and prepared with every socket refused: no download can happen."""
    from classlab.data.prepare import prepare
    from classlab.data.registry import get_dataset

    def refuse(*args, **kwargs):
        raise OSError("network access during mnist1d generation")

    root = tmp_path_factory.mktemp("mnist1d")
    np_state = np.random.get_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        get_dataset("mnist1d").download(root / "raw")
        prepare("mnist1d", root / "raw", root / "prepared")
    return root, np_state


def test_mnist1d_materialises_offline_as_40_features_in_10_classes(mnist1d_prepared):
    from classlab.data.prepare import load_prepared

    root, np_state_before = mnist1d_prepared
    data = load_prepared(root / "prepared")
    assert data.manifest["dataset"] == "mnist1d" and data.num_classes == 10
    assert data.manifest["shape"] == [1, 1, 40]
    assert data.train.x.dtype == torch.uint8 and data.test.x.shape[1:] == (1, 1, 40)
    # the package's default set: 5,000 signals, 4,000 train (of which prepare holds out 10%) and 1,000 test
    assert len(data.train.y) + len(data.val.y) == 4000 and len(data.test.y) == 1000
    assert set(torch.unique(data.train.y).tolist()) == set(range(10))
    # the generator reseeds numpy's global generator; the caller's state is put back
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(np_state_before, np.random.get_state()))


def test_mnist1d_quantisation_is_the_documented_affine_map(mnist1d_prepared):
    from classlab.data.registry import MNIST1D_OFFSET, MNIST1D_SCALE, get_dataset

    root, _ = mnist1d_prepared
    with np.load(root / "raw" / "mnist1d.npz") as z:
        x, offset, scale = z["x_test"], float(z["quant_offset"]), float(z["quant_scale"])
    assert (offset, scale) == (MNIST1D_OFFSET, MNIST1D_SCALE) == (6.0, 255.0 / 12.0)
    raw = get_dataset("mnist1d").load_raw(root / "raw")
    q = raw.test_x.reshape(len(x), 40).astype(np.float64)
    # nothing is clipped (the set spans about [-5.5, 4.5] inside [-6, 6]) ...
    assert x.min() > -offset and x.max() < 255 / scale - offset
    # ... so undoing the map recovers each value within half a quantisation step, 1 / (2 * 21.25)
    assert np.abs(q / scale - offset - x).max() <= 0.5 / scale + 1e-12
    # flattening a stored (1, 1, 40) sample (what deep_mlp does) gives its 40 features in signal order
    assert np.array_equal(torch.from_numpy(raw.test_x[:3]).flatten(1).numpy(), raw.test_x[:3, 0, 0, :])


# --- PBN: its loss and its class-number estimate --------------------------------------------------

def test_tabular_ncd_pbn_loss_weights_cross_entropy_and_reconstruction():
    from classlab.methods.discovery.tabular_ncd import pbn_loss

    # two labelled samples with equal logits over 2 classes: CE = ln 2. Reconstruction errors per
    # sample: |(1, 0) - 0|^2 = 1 and 0, so the batch mean is 0.5. With w = 0.25:
    # L = 0.25 ln 2 + 0.75 * 0.5
    loss, logs = pbn_loss(torch.zeros(2, 2), torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                          torch.zeros(2, 2), w=0.25)
    assert logs["ce"].item() == pytest.approx(math.log(2))
    assert logs["mse"].item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(0.25 * math.log(2) + 0.75 * 0.5)


def test_tabular_ncd_estimates_the_number_of_well_separated_blobs():
    from classlab.methods.discovery.tabular_ncd import estimate_novel_k

    # four tight blobs (std 0.3) at the corners of a square of side 10: k = 4 gives silhouettes near
    # 1; k = 3 merges two blobs 10 apart (b/a drops), k = 5 splits a blob (a ~ b inside it)
    rng = np.random.default_rng(0)
    corners = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=float)
    z = np.concatenate([c + 0.3 * rng.standard_normal((30, 2)) for c in corners])
    k, curve = estimate_novel_k(z, 2, 8, seed=0, runs=1, n_init=3)
    assert k == 4 and sorted(curve) == list(range(2, 9))
    assert curve[4] > 0.9 and curve[4] > max(v for kk, v in curve.items() if kk != 4)


# --- the k-fold over hidden known classes --------------------------------------------------------

def test_known_class_kfold_hides_whole_classes_once_each():
    from classlab.methods.discovery.tabular_ncd import known_class_kfold

    classes = [3, 5, 7, 8, 11, 12]
    folds = list(known_class_kfold(classes, 3, seed=1))
    assert len(folds) == 3
    held = [set(h.tolist()) for _, h in folds]
    assert all(len(h) == 2 for h in held)                      # 6 classes in 3 folds: 2 hidden each
    assert set().union(*held) == set(classes) and sum(map(len, held)) == 6  # each hidden exactly once
    for train, h in folds:
        assert set(train.tolist()) | set(h.tolist()) == set(classes) and not set(train.tolist()) & set(h.tolist())
    # a fold hiding one class scores 1 whatever the method: refused, naming k
    with pytest.raises(ValueError, match="k:"):
        list(known_class_kfold(classes, 4))
    with pytest.raises(ValueError, match="k:"):
        list(known_class_kfold(classes, 1))
    with pytest.raises(ValueError, match="known_label_indices"):
        list(known_class_kfold([1, 1, 2, 3], 2))


def test_known_class_cv_score_hides_whole_known_classes_and_no_novel_label(digits_prepared, tmp_path, monkeypatch):
    from classlab.methods.discovery.tabular_ncd import TabularNCD, known_class_cv_score

    split = digits_split(digits_prepared, tmp_path / "ncd.json", kind="ncd")
    doc = json.loads(split.read_text())
    seen = []
    original = TabularNCD.end_task

    def spy(self, task_id, context):
        seen.append((context.labelled.clone(), context.unlabelled.clone(), context.visible_labels.clone(),
                     int(self.task_info.num_clusters)))
        return original(self, task_id, context)

    monkeypatch.setattr(TabularNCD, "end_task", spy)
    out = known_class_cv_score("tabular_ncd", digits_prepared, split, "deep_mlp", folds=2, backbone_kwargs=TINY_MLP,
                               overrides={"epochs": 1, "batch_size": 64, "estimate_k": False, "n_init": 2})
    assert len(out["folds"]) == 2 and 0.0 <= out["score"] <= 1.0
    assert out["score"] == pytest.approx(np.mean([f["accuracy"] for f in out["folds"]]))
    # 5 known classes in 2 folds: 3 then 2 hidden (or 2 then 3), together all the known classes once
    held = [set(f["held_out"]) for f in out["folds"]]
    assert sorted(map(len, held)) == [2, 3] and set().union(*held) == set(doc["known_classes"])
    labelled, novel = set(doc["labelled"]), set(doc["unlabelled"])
    for (lab, unl, vis, clusters), fold_held in zip(seen, held):
        assert set(lab.tolist()) <= labelled                            # labels of the fold's known classes only
        hidden = set(unl.tolist()) - novel
        assert hidden <= labelled and novel <= set(unl.tolist())       # pool: hidden known samples + the novel pool
        assert bool((vis[unl] == -1).all())                             # no label of the pool reaches the learner
        assert int(vis.max()) + 1 == 5 - len(fold_held)
        assert clusters == 5 + 5                                        # the fold's known + hidden + novel classes
    # without the novel pool the folds read the split's labelled samples only
    seen.clear()
    known_class_cv_score("tabular_ncd", digits_prepared, split, "deep_mlp", folds=2, backbone_kwargs=TINY_MLP,
                         include_novel=False, overrides={"epochs": 1, "batch_size": 64, "estimate_k": False})
    assert all(set(unl.tolist()) <= labelled and clusters == 5 for _, unl, _, clusters in seen)


# --- NCD k-means ----------------------------------------------------------------------------------

def test_ncd_kmeans_seeding_never_starts_inside_a_known_class():
    from classlab.methods.discovery.ncd_kmeans import ncd_kmeans_seeds

    # two unlabelled samples sit on the known centroid (0, 0): D = 0, probability 0. The one at
    # (5, 0) has D^2 = 25, so it is the first novel centroid for every seed. (Plain k-means++ would
    # draw the first one uniformly and pick (0, 0) two times in three.)
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    for seed in range(20):
        seeds = ncd_kmeans_seeds(x, np.array([[0.0, 0.0]]), 1, np.random.default_rng(seed))
        assert seeds.tolist() == [[5.0, 0.0]]


def test_ncd_kmeans_recovers_hand_made_novel_blobs():
    from classlab.methods.discovery.ncd_kmeans import ncd_kmeans
    from classlab.metrics.discovery import cluster_accuracy

    # a known class around (0, 0); three novel blobs of 5 points (a centre and its 4 neighbours at
    # distance 0.5) at (10, 0), (0, 10), (10, 10): the seeding puts one centroid per blob (the blobs
    # are 10 apart, 20x the spread), Lloyd's keeps them, each centroid ends at its blob's centre
    offsets = np.array([[0, 0], [0.5, 0], [-0.5, 0], [0, 0.5], [0, -0.5]])
    centres = np.array([[10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = np.concatenate([c + offsets for c in centres])
    truth = np.repeat([0, 1, 2], 5)
    assign, found, inertia = ncd_kmeans(x, np.array([[0.0, 0.0]]), 3, seed=0, n_init=3)
    assert cluster_accuracy(truth, assign) == 1.0
    assert sorted(map(tuple, np.round(found, 6))) == sorted(map(tuple, centres))
    assert inertia == pytest.approx(3 * 4 * 0.25)  # 12 points at squared distance 0.25 from their centroid


# --- NCD spectral clustering --------------------------------------------------------------------

def _ring(radius: float, n: int, centre=(0.0, 0.0)) -> np.ndarray:
    angle = 2 * np.pi * np.arange(n) / n
    return np.stack([centre[0] + radius * np.cos(angle), centre[1] + radius * np.sin(angle)], 1)


def test_ncd_spectral_separates_concentric_rings_that_kmeans_cannot():
    from sklearn.cluster import KMeans

    from classlab.methods.discovery.ncd_spectral import PoolNeighbours, ncd_spectral_clustering
    from classlab.metrics.discovery import cluster_accuracy

    # novel: rings of radius 1 and 5 (60 evenly spaced points each); known: a ring of radius 9 about
    # the same centre. Neighbours on a ring are at most 2 pi 9 / 60 ~ 0.94 apart, the rings 4 apart,
    # so the spanning tree's longest edges are the two gaps of 4; min_dist = 0.01 sets their affinity to
    # 0.01 and leaves in-ring neighbours above 0.9: the graph is one component per ring up to a 1%
    # leak, and the embedding separates the rings. k-means cuts the plane by a line and mixes them.
    x_known, x_unlab = _ring(9, 60), np.concatenate([_ring(1, 60), _ring(5, 60)])
    truth = np.repeat([0, 1], 60)
    assign = ncd_spectral_clustering(x_known, np.zeros(60, dtype=int), x_unlab, 2, seed=0, min_dist=0.01)
    assert cluster_accuracy(truth, assign) == 1.0
    plain = KMeans(n_clusters=2, n_init=10, random_state=0).fit_predict(x_unlab)
    assert cluster_accuracy(truth, plain) < 0.9
    # a new sample takes its nearest pool sample's cluster; a pool sample gets its own
    pool = PoolNeighbours()
    pool.store(torch.from_numpy(x_unlab), assign, 2)
    scores = pool(torch.tensor([[0.0, 1.2], [0.0, -4.6]], dtype=torch.float64))
    assert scores.argmax(1).tolist() == [int(assign[15]), int(assign[60 + 45])]  # (0, 1) and (0, -5)
    assert pool(torch.from_numpy(x_unlab)).argmax(1).tolist() == assign.tolist()


# --- one tiny run per method ----------------------------------------------------------------------

def _reloaded_assignments(method: str, work, prepared, positions, overrides: dict | None = None) -> np.ndarray:
    """The clusters of train ``positions`` under a fresh learner that loads the run's saved state
    (the clustering buffers are sized by end_task, so loading must resize them)."""
    from classlab.config import resolve_hparams
    from classlab.data.prepare import load_prepared
    from classlab.engine import load_checkpoint
    from classlab.methods.registry import get_method
    from classlab.models import build_classifier

    data = load_prepared(prepared)
    mean, std = data.manifest["channel_mean"][0], data.manifest["channel_std"][0]
    x = (data.train.x[torch.as_tensor(positions)].float() / 255 - mean) / std
    model = build_classifier("deep_mlp", 1, 10, img_size=8, backbone_kwargs=TINY_MLP)
    learner = get_method("discovery", method)(model, resolve_hparams("discovery", method, overrides), 10)
    learner.load_state_dict(load_checkpoint(work / "ckpt" / "model.pt")["learner"])
    with torch.no_grad():
        return learner.eval().predict(x).argmax(1).numpy()


@pytest.fixture(scope="module")
def ncd_split(digits_prepared, tmp_path_factory):
    return digits_split(digits_prepared, tmp_path_factory.mktemp("split") / "ncd.json", kind="ncd")


def test_tabular_ncd_runs_on_an_ncd_split_and_saves_its_k_estimate(digits_prepared, ncd_split, tmp_path):
    out = tiny_run("tabular_ncd", digits_prepared, ncd_split, tmp_path, backbone="deep_mlp", backbone_kwargs=TINY_MLP,
                   overrides={"k_max": 7, "k_runs": 1, "n_init": 2})
    doc = json.loads(ncd_split.read_text())
    z = out["predictions"]
    k_hat = int(z["estimated_k_task0"][0])
    assert 2 <= k_hat <= 7
    assert len(z["pred_unlabelled_task0"]) == len(doc["unlabelled"])
    assert set(np.unique(z["labels_unlabelled_task0"])) == set(doc["novel_classes"])
    assert z["pred_unlabelled_task0"].max() < k_hat and z["pred_test_task0"].max() < k_hat
    # the saved state reproduces the assignments (its centroids are resized on load)
    assert np.array_equal(_reloaded_assignments("tabular_ncd", tmp_path, digits_prepared, doc["unlabelled"]),
                          z["pred_unlabelled_task0"])


@pytest.mark.parametrize("method", ["ncd_kmeans", "ncd_spectral"])
def test_ncd_clusterings_run_on_an_ncd_split(digits_prepared, ncd_split, tmp_path, method):
    from classlab.metrics.discovery import cluster_accuracy

    out = tiny_run(method, digits_prepared, ncd_split, tmp_path, backbone="deep_mlp", backbone_kwargs=TINY_MLP)
    z = out["predictions"]
    assert set(np.unique(z["pred_unlabelled_task0"])) <= set(range(5))  # 5 novel classes, known k
    # raw digits pixels cluster far above chance (0.2 for 5 balanced classes)
    assert cluster_accuracy(z["labels_unlabelled_task0"], z["pred_unlabelled_task0"]) > 0.5
    unlabelled = json.loads(ncd_split.read_text())["unlabelled"]
    assert np.array_equal(_reloaded_assignments(method, tmp_path, digits_prepared, unlabelled),
                          z["pred_unlabelled_task0"])
