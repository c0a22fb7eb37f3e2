"""The category-discovery protocol: GCD, NCD, continual (stages) and active (query rounds).

The protocol owns the split (``classlab.data.discovery_split``: known and novel classes, the
labelled subset of the known classes, the unlabelled pool), hides the labels of the unlabelled
samples from the learner, runs the tasks of its kind through the shared runner
(``classlab.protocols.runner``: checkpoints, resume, outputs) and saves cluster assignments for
the metrics (``classlab.metrics.discovery``), which are computed after the run from the saved
predictions. No checkpoint or hyperparameter is chosen on these numbers: the last epoch is used.

Tasks by kind:

- ``gcd``: one task on the labelled and the unlabelled pool (known and novel classes mixed);
- ``ncd``: the same, with an unlabelled pool of novel classes only;
- ``continual``: task 0 trains on the labelled known classes only; task s >= 1 on stage s's
  unlabelled pool alone (new classes plus recurring old ones), as in Happy's protocol;
- ``latent_shift``: one task over the domains' samples, no class label at all: the learner sees
  each sample's domain id as its label (a domain discriminator's target), and is scored with
  ``predict_in_domain`` (LLS's p_d(y|x));
- ``active``: task 0 as ``gcd``; before each of the ``rounds`` later tasks the learner queries
  ``budget / rounds`` unlabelled samples, whose labels are revealed (each revealed class gets a
  label index by ``learner.map_revealed``); the queried positions are saved per round.

Each step's batch joins one batch of the unlabelled pool (which defines the epoch) and one of the
labelled set (cycled), half the batch size each, as GCD's sampler balances the two in expectation;
``batch["y"]`` is -1 for the unlabelled part.

Evaluation after each task: cluster assignments (argmax of ``learner.predict``) of the task's
unlabelled pool (transductive, as the papers report) and of the test samples of the classes seen so
far, with their true labels, in ``predictions.npz``; after the last task also a seeded sample of the
unlabelled pool's backbone features for the 2-D projection.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from classlab.data.discovery_split import SplitError, load_discovery_split
from classlab.data.prepare import load_prepared
from classlab.engine.fingerprint import file_digest
from classlab.io import write_json
from classlab.methods.discovery_learner import DiscoveryContext, DiscoveryTask
from classlab.models import build_classifier
from classlab.protocols.runner import FunctionModule, ProtocolRun, describe_init
from classlab.engine import predict_logits

PROJECTION_SAMPLES = 2000  # unlabelled features kept for the 2-D projection figure


class DiscoveryRun(ProtocolRun):
    family = "discovery"

    def __init__(self, method, data_dir, split_path: Path, backbone, seed, ckpt_dir, eval_dir, **kwargs):
        super().__init__(method, data_dir, backbone, seed, ckpt_dir, eval_dir, **kwargs)
        self.split_path = Path(split_path)
        self.split = load_discovery_split(self.split_path)
        self.kind = self.split["kind"]

    # --- structure ---------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        if self.kind == "continual":
            return 1 + len(self.split["stages"])
        if self.kind == "active":
            return 1 + int(self.split["params"]["rounds"])
        return 1

    def fingerprint_parts(self) -> dict:
        return {"split": file_digest(self.split_path)}

    def setup(self) -> None:
        self.data = load_prepared(self.data_dir)
        self.manifest = self.data.manifest
        if self.manifest["dataset"] != self.split["dataset"]:
            raise SplitError(f"split: {self.split_path} was built for {self.split['dataset']!r}, "
                             f"not {self.manifest['dataset']!r}")
        if len(self.data.train.y) <= max(self.split["labelled"] + self.split["unlabelled"]):
            raise SplitError(f"split: {self.split_path} indexes past the {len(self.data.train.y)} training samples")
        self.mean, self.std = self.manifest["channel_mean"], self.manifest["channel_std"]
        self.known = list(self.split["known_classes"])
        self.novel = list(self.split["novel_classes"])
        num_clusters = int(self.hparams.get("num_clusters") or len(self.known) + len(self.novel))
        _, h, w = (int(v) for v in self.manifest["shape"])
        model = build_classifier(self.backbone, int(self.manifest["shape"][0]), num_clusters,
                                 img_size=h if h == w else (h, w),  # tabular rows (1, 1, features): deep_mlp only
                                 backbone_kwargs=self.backbone_kwargs)
        if self.init is not None:
            from classlab.train import load_model

            source, self.init_meta = load_model(self.init)
            self._check_init(self.init_meta)
            model.backbone.load_state_dict(source.backbone.state_dict())
        self.learner = self.learner_cls(model, self.hparams, num_clusters).to(self.device)
        self.learner.scenario_kind = self.kind
        if self.init is not None:
            # the whole init model (its head too): NCD methods start their known head from it, CRKD's
            # teacher is it; rebuilt from the file on every start (its digest is in the fingerprint)
            self.learner.set_init_model(source, self.init_meta)
        self.train_y = self.data.train.y
        self.labelled = torch.tensor(self.split["labelled"], dtype=torch.long)
        self.domain_of = torch.full((len(self.train_y),), -1, dtype=torch.long)
        if self.kind == "latent_shift":
            for d, members in enumerate(self.split["domains"]):
                self.domain_of[torch.tensor(members, dtype=torch.long)] = d
        self.test_idx = torch.tensor(self.split["test"], dtype=torch.long) if self.split["test"] \
            else torch.arange(len(self.data.test.y))
        if self.kind == "active":
            rounds, budget = int(self.split["params"]["rounds"]), int(self.split["params"]["budget"])
            self.round_budget = [budget // rounds + (1 if r < budget % rounds else 0) for r in range(rounds)]

    def _check_init(self, meta: dict) -> None:
        """The novel classes' labels must never reach a backbone: a supervised init must have been
        trained on known classes only (self-supervised and scratch inits see no labels)."""
        hp = json.loads(meta.get("hparams", "{}"))
        if meta.get("method") == "simclr" or not meta.get("head_trained", True):
            return
        classes = hp.get("classes") or []
        if not classes or set(classes) - set(self.known):
            raise SplitError(f"init: {self.init} was trained with labels of classes "
                             f"{sorted(classes) if classes else 'all'}; discovery needs a backbone that saw labels of "
                             f"the known classes {self.known} only (use the simclr pretraining node or "
                             f"init: supervised_known)")

    # --- labels the learner may see ----------------------------------------------------------
    def visible_labels(self, t: int) -> torch.Tensor:
        """[N train] label index per sample, -1 where hidden: the labelled known samples (task 0 onward
        for gcd/ncd/active; task 0 only for continual), plus the active rounds' revealed queries."""
        vis = torch.full((len(self.train_y),), -1, dtype=torch.long)
        if self.kind == "latent_shift":
            return self.domain_of.clone()  # the domain is the only label there is
        if self.kind == "continual" and t > 0:
            return vis
        index_of = {c: k for k, c in enumerate(self.known)}
        vis[self.labelled] = torch.tensor([index_of[int(c)] for c in self.train_y[self.labelled]], dtype=torch.long)
        if self.kind == "active":
            for r in range(1, t + 1):
                if f"queries_round{r}" not in self.outputs:  # a replayed begin_task, before the state is loaded
                    break
                queried = torch.from_numpy(self.outputs[f"queries_round{r}"]).long()
                mapping = {int(a): int(b) for a, b in self.outputs[f"label_map_round{r}"]}
                index_of.update(mapping)
                vis[queried] = torch.tensor([index_of[int(c)] for c in self.train_y[queried]], dtype=torch.long)
        return vis

    def unlabelled_pool(self, t: int) -> torch.Tensor:
        if self.kind == "continual":
            if t == 0:
                return torch.zeros(0, dtype=torch.long)
            return torch.tensor(self.split["stages"][t - 1]["unlabelled"], dtype=torch.long)
        return torch.tensor(self.split["unlabelled"], dtype=torch.long)

    def seen_classes(self, t: int) -> list[int]:
        if self.kind == "continual":
            seen = list(self.known)
            for stage in self.split["stages"][:t]:
                seen += stage["new_classes"]
            return sorted(seen)
        if self.kind in ("ncd", "latent_shift"):
            return list(self.novel)
        return sorted(self.known + self.novel)

    def old_classes(self, t: int) -> list[int]:
        """The classes the evaluation calls Old: the known ones (and, in continual discovery, the
        classes of earlier stages)."""
        if self.kind == "continual" and t > 0:
            return sorted(set(self.seen_classes(t - 1)))
        return list(self.known)

    # --- the tasks ---------------------------------------------------------------------------
    def _run_task(self, t: int, first_phase: int) -> None:
        # active discovery: the round's queries come from the model as the previous task left it (the
        # runner has loaded that state); a resumed round queries again from the same state, so the same
        if self.kind == "active" and t > 0 and f"queries_round{t}" not in self.outputs:
            self._query(t)
        super()._run_task(t, first_phase)

    def begin_task(self, t: int) -> None:
        vis = self.visible_labels(t)
        new = len(self.split["stages"][t - 1]["new_classes"]) if self.kind == "continual" and t > 0 else 0
        clusters = len(self.seen_classes(t)) if self.kind == "continual" else self.learner.num_classes
        self.learner.begin_task(t, DiscoveryTask(t, int(vis.max()) + 1 if bool((vis >= 0).any()) else 0,
                                                 clusters, new, self.kind, self.label_classes(t)))

    def label_classes(self, t: int) -> list[int]:
        """The dataset class of each label index: the known classes, then the active rounds' revealed ones."""
        if self.kind == "latent_shift":
            return []
        index_of = {c: k for k, c in enumerate(self.known)}
        for r in range(1, t + 1):
            if f"label_map_round{r}" in self.outputs:
                index_of.update({int(a): int(b) for a, b in self.outputs[f"label_map_round{r}"]})
        out = [-1] * (max(index_of.values()) + 1 if index_of else 0)  # -1: an index no class holds (yet)
        for c, k in index_of.items():
            out[k] = c
        return out

    def _query(self, t: int) -> None:
        """Active discovery: the learner picks this round's samples; the oracle reveals their classes."""
        context = self.context(t - 1)
        queried = self.learner.select_queries(context, self.round_budget[t - 1]).long().cpu()
        pool = set(self.unlabelled_pool(t).tolist())
        hidden = context.visible_labels
        if len(set(queried.tolist())) != len(queried) or any(int(i) not in pool or hidden[int(i)] >= 0
                                                            for i in queried):
            raise SplitError(f"{self.method}: select_queries must return distinct, not yet labelled positions of the "
                             f"unlabelled pool")
        index_of = {c: k for k, c in enumerate(self.known)}
        for r in range(1, t):
            index_of.update({int(a): int(b) for a, b in self.outputs[f"label_map_round{r}"]})
        revealed = sorted(set(int(c) for c in self.train_y[queried]) - set(index_of))
        # the first free index after every one in use (a learner's mapping may leave gaps)
        first_free = max(index_of.values()) + 1 if index_of else 0
        mapping = self.learner.map_revealed(revealed, first_free, context, queried, self.train_y[queried])
        taken = set(index_of.values())
        if set(mapping) != set(revealed) or len(set(mapping.values())) != len(mapping) or taken & set(mapping.values()):
            raise SplitError(f"{self.method}: map_revealed must give each revealed class {revealed} its own head "
                             f"index not already in use ({sorted(taken)}); got {mapping}")
        self.outputs[f"queries_round{t}"] = queried.numpy().astype(np.int64)
        self.outputs[f"label_map_round{t}"] = np.array(sorted(mapping.items()), dtype=np.int64).reshape(-1, 2)
        self.eval_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.eval_dir / f"queries_round{t}.json",
                   {"round": t, "budget": int(self.round_budget[t - 1]), "indices": queried.tolist(),
                    "revealed_classes": revealed, "label_map": {str(k): v for k, v in mapping.items()}})

    def train_loader(self, t: int, trainer):
        vis = self.visible_labels(t)
        labelled = torch.nonzero(vis >= 0).flatten()
        pool = self.unlabelled_pool(t)
        pool = pool[vis[pool] < 0]  # latent_shift: every sample carries its domain, so all are in ``labelled``
        self.task_train_samples = len(labelled) + len(pool)
        half = max(int(trainer.config.batch_size) // 2, 1)
        sources, sizes = {}, {}
        if len(pool):
            sources["unlabelled"], sizes["unlabelled"] = pool, half if len(labelled) else 2 * half
        if len(labelled):
            sources["labelled"], sizes["labelled"] = labelled, half if len(pool) else 2 * half
        if not sources:
            return None
        return trainer.make_mixed_loader(self.data.train.x, vis, self.mean, self.std, sources, sizes)

    def context(self, t: int) -> DiscoveryContext:
        x = self.data.train.x
        vis = self.visible_labels(t)
        labelled = torch.nonzero(vis >= 0).flatten() if self.kind != "latent_shift" else torch.zeros(0, dtype=torch.long)
        return DiscoveryContext(t, labelled, self.unlabelled_pool(t), vis,
                                self.embed_fn(x, self.mean, self.std, self.learner.features),
                                self.embed_fn(x, self.mean, self.std, self.learner.predict), self.device, self.seed,
                                x, self.mean, self.std, self.domain_of if self.kind == "latent_shift" else None)

    def _assign(self, x: torch.Tensor, domains: torch.Tensor | None = None) -> np.ndarray:
        self.learner.eval()
        if domains is None:
            scores = predict_logits(FunctionModule(self.learner.predict), x, self.mean, self.std, self.device)
            return scores.argmax(1).numpy().astype(np.int64)
        out = []
        for d in torch.unique(domains).tolist():  # p_d(y|x): one domain at a time
            rows = torch.nonzero(domains == d).flatten()
            fn = FunctionModule(lambda xb, d=d: self.learner.predict_in_domain(xb, torch.full((len(xb),), d,
                                                                                               dtype=torch.long,
                                                                                               device=xb.device)))
            out.append((rows, predict_logits(fn, x[rows], self.mean, self.std, self.device).argmax(1)))
        pred = torch.zeros(len(x), dtype=torch.long)
        for rows, p in out:
            pred[rows] = p
        return pred.numpy().astype(np.int64)

    def evaluate_task(self, t: int) -> dict:
        pool = self.unlabelled_pool(t) if not (self.kind == "continual" and t == 0) else self.labelled
        vis = self.visible_labels(t)
        if self.kind == "active":
            pool = pool[vis[pool] < 0]  # queried samples are labelled now
        seen = self.seen_classes(t)
        test = self.test_idx[torch.isin(self.data.test.y[self.test_idx], torch.tensor(seen))]
        shift = self.kind == "latent_shift"
        self.outputs[f"pred_unlabelled_task{t}"] = self._assign(self.data.train.x[pool],
                                                                 self.domain_of[pool] if shift else None)
        self.outputs[f"labels_unlabelled_task{t}"] = self.train_y[pool].numpy().astype(np.int64)
        if shift:  # test samples carry the domain they were drawn for (none: no test evaluation)
            test_dom = torch.tensor(self.split["test_domains"], dtype=torch.long)
            test = torch.tensor(self.split["test"], dtype=torch.long)
            self.outputs[f"pred_test_task{t}"] = self._assign(self.data.test.x[test], test_dom)
        else:
            self.outputs[f"pred_test_task{t}"] = self._assign(self.data.test.x[test])
        self.outputs[f"labels_test_task{t}"] = self.data.test.y[test].numpy().astype(np.int64)
        self.outputs[f"old_classes_task{t}"] = np.array(self.old_classes(t), dtype=np.int64)
        if t == self.num_tasks - 1 and not shift and len(self.data.val):
            # the validation split (held out from train by prepare) on the classes seen at the end: the
            # score `make choices` reads; its labels are used for nothing else (latent-shift splits
            # have no validation domains)
            val = torch.nonzero(torch.isin(self.data.val.y, torch.tensor(seen, dtype=self.data.val.y.dtype))).flatten()
            self.outputs["pred_val_last"] = self._assign(self.data.val.x[val])
            self.outputs["labels_val_last"] = self.data.val.y[val].numpy().astype(np.int64)
        if int(self.learner.estimated_k) >= 0:
            self.outputs[f"estimated_k_task{t}"] = np.array([int(self.learner.estimated_k)], dtype=np.int64)
        if t == self.num_tasks - 1:
            gen = np.random.default_rng(self.seed)
            keep = np.sort(gen.permutation(len(pool))[:PROJECTION_SAMPLES])
            idx = pool[torch.from_numpy(keep)]
            self.learner.eval()
            feats = predict_logits(FunctionModule(self.learner.features), self.data.train.x[idx], self.mean, self.std,
                                   self.device)
            self.outputs["projection_features"] = feats.numpy().astype(np.float32)
            self.outputs["projection_labels"] = self.train_y[idx].numpy().astype(np.int64)
            self.outputs["projection_pred"] = self.outputs[f"pred_unlabelled_task{t}"][keep]
        return {"unlabelled": int(len(pool)), "labelled": int((vis >= 0).sum()), "seen_classes": seen}

    def meta(self) -> dict:
        return {"method": self.method, "family": "discovery", "seed": self.seed, "backbone": self.backbone,
                "dataset": self.split["dataset"], "split": self.split.get("params", {}).get("name", self.kind),
                "split_kind": self.kind, "hparams": json.dumps(self.hparams, sort_keys=True),
                "init": str(self.init) if self.init else "", "init_kind": describe_init(self.init_meta),
                "known_classes": self.known, "novel_classes": self.novel, "split_seed": self.split["seed"],
                "num_clusters": int(self.learner.num_classes)}


def run_discovery(method: str, data_dir: Path, split_path: Path, backbone: str, seed: int, ckpt_dir: Path,
                  eval_dir: Path, overrides: dict | None = None, init: Path | None = None,
                  backbone_kwargs: dict | None = None, threads: int | None = None, device: str | None = None,
                  progress: bool = True) -> dict:
    """Run ``method`` through the split; write ``ckpt_dir/model.pt``, ``history.json`` and
    ``eval_dir/predictions.npz`` (per task: cluster assignments and true labels of the unlabelled pool
    and of the seen classes' test samples, the Old classes; at the end, projection features)."""
    return DiscoveryRun(method, data_dir, split_path, backbone, seed, ckpt_dir, eval_dir, overrides=overrides,
                        init=init, backbone_kwargs=backbone_kwargs, threads=threads, device=device,
                        progress=progress).run()
