"""Tabular NCD: the projection-based model (PBN), its estimate of the number of novel classes, and the
k-fold protocol over hidden known classes that tunes it without touching the novel ones.

Troisemaine, Reiffers-Masson, Gosselin, Lemaire and Vaton, "A Practical Approach to Novel Class
Discovery in Tabular Data", Data Mining and Knowledge Discovery, 2024 (arXiv 2311.05440, 2023).

**PBN** (Projection-Based NCD, Section 3.4): an encoder f maps a sample to a latent vector
z = f(x) / |f(x)|; a linear head classifies the labelled (known-class) samples from z and a decoder
g reconstructs every sample (known and novel) from z. One loss, on each batch of labelled and
unlabelled samples:

    L = w * CE(h(z_l), y_l) + (1 - w) * (1/B) sum_i |g(z_i) - x_i|^2

the cross-entropy makes the latent space separate classes the way the known ones are separated,
the reconstruction keeps in it what the novel samples need. Then the novel samples are clustered
in that latent space (k-means in the paper; ``clustering: ncd_kmeans`` seeds it away from the known
classes' means, ``ncd_spectral`` runs NCD spectral clustering there; see those modules). The
encoder here is the protocol's backbone (``deep_mlp`` on the flattened features) followed by one
linear layer to ``latent_dim`` (the paper's last encoder layer, no activation) with dropout before
it; the decoder mirrors it with one hidden layer of the backbone's width. The paper's encoder and
decoder also carry BatchNorm between their layers, which ``deep_mlp`` does not have.

**Number of novel classes** (Section 5): a cluster validity index in PBN's latent space. For each k
in ``k_min``..``k_max``, k-means on the novel samples' latent vectors, and the mean silhouette

    s(i) = (b(i) - a(i)) / max(a(i), b(i))

(a: mean distance to the own cluster, b: to the nearest other cluster) averaged over ``k_runs``
k-means runs; the estimate is the k of the best mean silhouette (the index the official code uses,
averaging 3 runs over k = 2..30). It is written to the
learner's ``estimated_k`` buffer and the clustering uses it.

**Hyperparameters without novel labels** (Sections 4 and 6): k-fold cross-validation over the
*known classes*: the known classes are split into k groups; in each fold one group is hidden (its
labelled samples lose their labels and join the unlabelled pool, next to the novel samples) and the
method runs exactly as on the real task; its clustering accuracy on the hidden samples scores the
setting, averaged over the folds. The number of clusters a method finds in a fold's pool, minus
the hidden classes, estimates the number of novel classes along the way (the paper's Section 6).
``known_class_kfold`` yields the class folds, ``known_class_cv_score`` runs a method through them
(no novel label is ever read), so a grid over ``overrides`` picks a setting by its score::

    from classlab.methods.discovery.tabular_ncd import known_class_cv_score
    grid = [{"w": w, "lr": lr} for w in (0.2, 0.5, 0.8) for lr in (1e-3, 3e-3)]
    scores = [known_class_cv_score("tabular_ncd", prepared, split, "deep_mlp", folds=2,
                                   overrides=hp, backbone_kwargs=kw)["score"] for hp in grid]
    best = grid[max(range(len(grid)), key=scores.__getitem__)]

then the chosen setting runs on the real split. Each fold must hide at least two classes (a lone
hidden class without the novel pool lands in one cluster and scores 1 whatever the method does), so
k <= known // 2.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.discovery.kmeans import nearest_centre_scores
from classlab.methods.discovery.ncd_kmeans import class_means, ncd_kmeans
from classlab.methods.discovery.ncd_spectral import PoolNeighbours, ncd_spectral_clustering
from classlab.methods.discovery_learner import DiscoveryContext, DiscoveryLearner, DiscoveryTask, as_numpy
from classlab.methods.registry import register_method

CLUSTERINGS = ("kmeans", "ncd_kmeans", "ncd_spectral")


def pbn_loss(known_logits: torch.Tensor, known_labels: torch.Tensor, reconstruction: torch.Tensor,
             target: torch.Tensor, w: float) -> tuple[torch.Tensor, dict]:
    """PBN's objective: w * CE on the labelled samples + (1 - w) * the per-sample summed squared
    reconstruction error, averaged over the batch."""
    mse = (reconstruction - target).pow(2).sum(1).mean()  # (1/B) sum_i |g(z_i) - x_i|^2
    ce = F.cross_entropy(known_logits, known_labels) if len(known_labels) else mse * 0.0
    loss = w * ce + (1.0 - w) * mse  # L = w CE + (1 - w) MSE
    return loss, {"ce": ce.detach(), "mse": mse.detach()}


def estimate_novel_k(z: np.ndarray, k_min: int, k_max: int, seed: int, runs: int = 3,
                     n_init: int = 10) -> tuple[int, dict[int, float]]:
    """The number of clusters of ``z`` by the silhouette: argmax over k in [k_min, k_max] of the mean
    silhouette of ``runs`` k-means clusterings. Returns (k, {k: mean silhouette}); ties go to the
    smaller k."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    z = np.asarray(z, dtype=np.float64)
    k_max = min(int(k_max), len(z) - 1)  # the silhouette needs k < number of samples
    k_min = max(int(k_min), 2)            # ... and at least two clusters
    if k_max < k_min:
        raise ValueError(f"estimate_novel_k: no k in [{k_min}, {k_max}] for {len(z)} samples (k_min, k_max)")
    curve = {}
    for k in range(k_min, k_max + 1):
        scores = [silhouette_score(z, KMeans(n_clusters=k, n_init=n_init, random_state=seed + r).fit_predict(z))
                  for r in range(max(int(runs), 1))]
        curve[k] = float(np.mean(scores))
    best = max(curve, key=lambda k: (curve[k], -k))
    return best, curve


def known_class_kfold(known_label_indices, k: int, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Split the known classes into ``k`` groups (a seeded shuffle, then near-equal consecutive
    groups); yield (train_known, held_out_known) class arrays, each group held out once. Every
    class is held out in exactly one fold; a fold never splits a class. Each group must hold at
    least 2 classes (a lone hidden class can score 1 without any discovery)."""
    classes = np.asarray(list(known_label_indices), dtype=np.int64)
    if classes.ndim != 1 or len(classes) == 0:
        raise ValueError("known_label_indices: needs a non-empty list of class ids")
    if len(np.unique(classes)) != len(classes):
        raise ValueError(f"known_label_indices: repeats a class ({classes.tolist()})")
    k = int(k)
    if k < 2:
        raise ValueError(f"k: k-fold needs at least 2 folds, got {k}")
    if len(classes) // k < 2:
        raise ValueError(f"k: {k} folds of {len(classes)} known classes would hide fewer than 2 classes in a fold "
                         f"(at most {len(classes) // 2} folds)")
    order = np.random.default_rng(seed).permutation(classes)
    for held in np.array_split(order, k):
        yield np.sort(order[~np.isin(order, held)]), np.sort(held)


def known_class_cv_score(method: str, prepared: Path, split: Path, backbone: str, seed: int = 0, folds: int = 2,
                         overrides: dict | None = None, backbone_kwargs: dict | None = None,
                         include_novel: bool = True, device: str | None = None) -> dict:
    """Score one hyperparameter setting of a discovery ``method`` by the paper's k-fold over hidden
    known classes. For each fold of ``known_class_kfold``: the fold's training classes keep their
    labelled samples; the labelled samples of its held-out classes lose their labels and join the
    unlabelled pool, together with the split's novel samples (``include_novel``, the paper's
    setting: the model trains with every unlabelled sample, as it will on the real task; the novel
    labels are never read). The method trains through the engine on the same labelled + unlabelled
    batches as the protocol's NCD task, clusters the pool in ``end_task``, and the fold's score is the
    clustering accuracy (one Hungarian matching) of the held-out samples against their classes.

    Returns {"score": mean accuracy over folds, "novel_k_estimate": mean over folds of the method's
    estimated number of clusters minus the held-out classes (None without an estimate or without
    the novel pool), "folds": [{"held_out": dataset classes, "accuracy", "estimated_k", "hidden_k"}]}."""
    from classlab.data.discovery_split import SplitError, load_discovery_split
    from classlab.data.prepare import load_prepared
    from classlab.engine import Trainer, TrainConfig, predict_logits
    from classlab.engine.device import pick_device
    from classlab.metrics.discovery import cluster_accuracy
    from classlab.models import build_classifier
    from classlab.protocols.runner import FunctionModule, resolve_learner

    hparams, learner_cls = resolve_learner(method, "ncd", backbone, overrides, family="discovery")
    data = load_prepared(prepared)
    doc = load_discovery_split(split)
    if doc["dataset"] != data.manifest["dataset"]:
        raise SplitError(f"split: {split} was built for {doc['dataset']!r}, not {data.manifest['dataset']!r}")
    dev = pick_device(device)
    mean, std, shape = data.manifest["channel_mean"], data.manifest["channel_std"], data.manifest["shape"]
    known = sorted(int(c) for c in doc["known_classes"])
    labelled = torch.tensor(doc["labelled"], dtype=torch.long)
    novel_pool = torch.tensor(doc["unlabelled"] if include_novel else [], dtype=torch.long)
    num_novel = len(doc["novel_classes"]) if include_novel else 0
    label_index = {c: i for i, c in enumerate(known)}
    labelled_index = torch.tensor([label_index[int(c)] for c in data.train.y[labelled]], dtype=torch.long)

    rows = []
    for fold, (train_cls, held_cls) in enumerate(known_class_kfold(range(len(known)), folds, seed)):
        relabel = {int(c): i for i, c in enumerate(train_cls)}
        in_train = torch.isin(labelled_index, torch.from_numpy(train_cls))
        fold_labelled, hidden = labelled[in_train], labelled[~in_train]
        pool = torch.cat([hidden, novel_pool])
        visible = torch.full((len(data.train.y),), -1, dtype=torch.long)  # the pool stays -1: hidden and novel
        visible[fold_labelled] = torch.tensor([relabel[int(i)] for i in labelled_index[in_train]], dtype=torch.long)
        clusters = len(train_cls) + len(held_cls) + num_novel
        torch.manual_seed(seed * 7919 + fold)
        model = build_classifier(backbone, int(shape[0]), clusters, img_size=int(shape[1]),
                                 backbone_kwargs=backbone_kwargs)
        learner = learner_cls(model, hparams, clusters).to(dev)
        learner.scenario_kind = "ncd"
        learner.begin_task(0, DiscoveryTask(0, len(train_cls), clusters, 0, "ncd", [known[c] for c in train_cls]))
        if learner.task_phases(0):
            trainer = Trainer(learner, TrainConfig.from_hparams(hparams), dev, seed * 1000 + fold, None, False)
            half = max(int(trainer.config.batch_size) // 2, 1)
            loader = trainer.make_mixed_loader(data.train.x, visible, mean, std,
                                               {"unlabelled": pool, "labelled": fold_labelled},
                                               {"unlabelled": half, "labelled": half})
            trainer.fit(loader)

        def embed_with(fn):
            def run(indices):
                learner.eval()
                return predict_logits(FunctionModule(fn), data.train.x[indices], mean, std, dev).float()
            return run

        context = DiscoveryContext(0, fold_labelled, pool, visible, embed_with(learner.features),
                                   embed_with(learner.predict), dev, seed, data.train.x, mean, std)
        learner.end_task(0, context)
        pred = context.scores(hidden).argmax(1).numpy()
        k_hat = int(learner.estimated_k)
        rows.append({"held_out": [known[c] for c in held_cls],
                     "accuracy": cluster_accuracy(data.train.y[hidden].numpy(), pred),
                     "estimated_k": k_hat if k_hat >= 0 else None, "hidden_k": len(held_cls)})
    estimates = [r["estimated_k"] - r["hidden_k"] for r in rows if r["estimated_k"] is not None]
    return {"score": float(np.mean([r["accuracy"] for r in rows])),
            "novel_k_estimate": float(np.mean(estimates)) if estimates and include_novel else None,
            "folds": rows}


def _input_width(backbone: nn.Module) -> int:
    """The number of input features of an MLP backbone: its first linear layer's input width."""
    first = next((m for m in backbone.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise ValueError("tabular_ncd: the backbone must be an MLP on the flattened features (backbone: deep_mlp); "
                         f"got {type(backbone).__name__}, which has no linear input layer")
    return int(first.in_features)


@register_method("discovery", "tabular_ncd")
class TabularNCD(DiscoveryLearner):
    num_views = 1
    augment = False  # tabular features: a shift or a flip of the feature vector is another sample

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        self.clustering = str(hp.get("clustering", "kmeans"))
        if self.clustering not in CLUSTERINGS:
            raise ValueError(f"tabular_ncd: clustering must be one of {list(CLUSTERINGS)}, got {self.clustering!r}")
        width, latent = int(model.num_features), int(hp.get("latent_dim", 32))
        in_features = _input_width(model.backbone)
        self.dropout = nn.Dropout(float(hp.get("dropout", 0.0)))
        self.projector = nn.Linear(width, latent)  # the encoder's last layer: no activation, then L2 norm
        self.decoder = nn.Sequential(nn.Linear(latent, width), nn.ReLU(), nn.Linear(width, in_features))
        self.classifier = nn.Linear(latent, num_classes)  # label index k -> output k (known classes first)
        self.register_buffer("centres", torch.zeros(0))  # [k_novel, latent], sized by end_task (and on load)
        self.pool = PoolNeighbours()                     # ncd_spectral's clustered pool

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "centres")
        if saved is not None:
            self.centres = torch.zeros_like(saved, device=self.centres.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def param_groups(self):
        params = [p for p in self.model.backbone.parameters() if p.requires_grad]
        for part in (self.projector, self.decoder, self.classifier):
            params += list(part.parameters())
        return [{"params": params}]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.dropout(self.model.features(x))), dim=1)  # z = f(x) / |f(x)|

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        z = self.encode(x)
        known = y >= 0
        n_known = max(int(self.task_info.num_label_indices), 1)
        logits = self.classifier(z[known])[:, :n_known]
        w = float(self.hparams.get("w", 0.5))
        return pbn_loss(logits, y[known], self.decoder(z), x.flatten(1).float(), w)  # reconstructs the flat input

    def features(self, x):
        return self.encode(x)

    def novel_cluster_count(self, z_unlab: np.ndarray, seed: int) -> int:
        hp = self.hparams
        if not hp.get("estimate_k", True):
            k = int(self.task_info.num_clusters) - int(self.task_info.num_label_indices)
            if k < 1:
                raise ValueError(f"tabular_ncd: num_clusters {self.task_info.num_clusters} leaves no novel cluster "
                                 f"beside {self.task_info.num_label_indices} known classes")
            return k
        k, _ = estimate_novel_k(z_unlab, int(hp.get("k_min") or 2), int(hp.get("k_max") or 30), seed,
                                int(hp.get("k_runs", 3)), int(hp.get("n_init", 10)))
        self.estimated_k.fill_(k)
        return k

    def end_task(self, task_id, context):
        from sklearn.cluster import KMeans

        z_unlab = as_numpy(context.embed(context.unlabelled)).astype(np.float64)
        labels = as_numpy(context.visible_labels[context.labelled])
        z_known = as_numpy(context.embed(context.labelled)).astype(np.float64)
        k = self.novel_cluster_count(z_unlab, context.seed)
        n_init = int(self.hparams.get("n_init", 10))
        self.centres = torch.zeros(0, device=self.estimated_k.device)
        if self.clustering == "kmeans":  # the paper's PBN: k-means on the novel samples' latent vectors
            km = KMeans(n_clusters=k, n_init=n_init, random_state=context.seed).fit(z_unlab)
            self.centres = torch.from_numpy(km.cluster_centers_).float().to(self.estimated_k.device)
        elif self.clustering == "ncd_kmeans":
            known = class_means(z_known, labels) if len(labels) else None
            _, centres, _ = ncd_kmeans(z_unlab, known, k, context.seed, n_init)
            self.centres = torch.from_numpy(centres).float().to(self.estimated_k.device)
        else:
            assign = ncd_spectral_clustering(z_known, labels, z_unlab, k, context.seed,
                                             float(self.hparams.get("min_dist", 0.5)),
                                             int(self.hparams.get("n_components", 0)), n_init)
            self.pool.store(torch.from_numpy(z_unlab), assign, k)

    def predict(self, x):
        z = self.encode(x)
        if self.clustering == "ncd_spectral":
            return self.pool(z)
        return nearest_centre_scores(z, self.centres)
