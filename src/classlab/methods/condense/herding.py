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
from classlab.protocols.memory import herding_order


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
            chosen.append(members[herding_order(feats, ipc, normalize=False)])
        idx = torch.cat(chosen)
        return data.normalize(data.x[idx]), idx
