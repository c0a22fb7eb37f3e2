"""Herding: per class, the real images whose running feature mean best tracks the class mean.

Welling, "Herding Dynamical Weights to Learn", ICML 2009, in the greedy form of iCaRL (Rebuffi et al.,
CVPR 2017), as the coreset baseline of DC (Zhao, Mopuri and Bilen, ICLR 2021, Table 1 "Herding"). With
f the feature map of a ConvNet trained on the real training set (the embedding the DC paper uses for its
coreset baselines, as we read it; our CPU network is trained for ``feature_steps`` steps only) and
mu_c the mean of f over the candidates of class c, the k-th pick is

    p_k = argmin_{i not yet picked} || mu_c - (1/k) (f(x_i) + sum_{j<k} f(x_{p_j})) ||_2,

so the first pick is the candidate closest to the class mean. ``candidates`` caps the pool per class (a
seeded random subset; null: every image of the class). No optimisation follows.
"""
from __future__ import annotations

import copy

import torch

from classlab.methods.condense_learner import (CondensationMethod, cpu_generator, embed,
                                               train_reference_network)
from classlab.methods.registry import register_method


def herding_order(features: torch.Tensor, count: int) -> torch.Tensor:
    """Positions (into ``features`` [n, d]) of ``count`` greedy herding picks, without repetition."""
    if count > len(features):
        raise ValueError(f"herding: {count} picks from {len(features)} candidates")
    mu = features.mean(0)
    running = torch.zeros_like(mu)  # sum of the picked features
    available = torch.ones(len(features), dtype=torch.bool)
    picks = []
    for k in range(1, count + 1):
        dist = (mu.unsqueeze(0) - (features + running.unsqueeze(0)) / k).norm(dim=1)  # || mu - (f_i + sum) / k ||
        dist[~available] = float("inf")
        i = int(dist.argmin())
        picks.append(i)
        available[i] = False
        running += features[i]
    return torch.tensor(picks, dtype=torch.long)


@register_method("condense", "herding")
class Herding(CondensationMethod):
    optimises = False

    def initialise(self, data, ipc, device):
        hp = self.hparams
        net = copy.deepcopy(self.model)
        train_reference_network(net, data, self.seed, int(hp["feature_steps"]), int(hp["feature_batch"]),
                                float(hp["feature_lr"]), device)
        chosen = []
        for c in range(data.num_classes):
            members = data.class_indices(c)
            if len(members) < ipc:
                raise ValueError(f"images_per_class: {ipc} exceeds the {len(members)} training samples of class {c}")
            pool = hp.get("candidates")
            if pool is not None and int(pool) < len(members):
                order = torch.randperm(len(members), generator=cpu_generator(self.seed, 9, c))
                members = members[order[:max(int(pool), ipc)]]
            feats = embed(net, data.normalize(data.x[members]), device)
            chosen.append(members[herding_order(feats, ipc)])
        idx = torch.cat(chosen)
        return data.normalize(data.x[idx]), idx
