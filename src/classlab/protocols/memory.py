"""Exemplar memory under a fixed total budget, as its own component (herding or random).

After each task the budget M is shared equally among the classes seen so far: m = M // |seen|
exemplars per class. Old classes keep the first m of their (priority-ordered) exemplars, new
classes are selected from the task's samples.

Herding (Welling, "Herding Dynamical Weights to Learn", ICML 2009; as used by iCaRL, Rebuffi
et al., CVPR 2017, Alg. 4): with L2-normalised features phi and class mean mu, the k-th
exemplar is  p_k = argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||.
"""
from __future__ import annotations

from typing import Callable

import torch


def herding_order(features: torch.Tensor, m: int, normalize: bool = True) -> torch.Tensor:
    """Indices (into ``features``) of the first ``m`` herding picks, in priority order, without
    repetition. ``normalize``: on L2-normalised features (iCaRL's exemplars); off, on the features
    as they are (the condensation baseline)."""
    feats = torch.nn.functional.normalize(features.float(), dim=1) if normalize else features.float()
    mu = feats.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(len(feats), dtype=torch.bool)
    for k in range(1, min(m, len(feats)) + 1):
        # || mu - (phi(x) + running) / k || for every candidate x
        dist = (mu[None, :] - (feats + running[None, :]) / k).norm(dim=1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += feats[i]
    return torch.tensor(chosen, dtype=torch.long)


class ExemplarMemory:
    def __init__(self, budget: int, strategy: str = "herding", seed: int = 0):
        if strategy not in ("herding", "random"):
            raise ValueError(f"memory_strategy: {strategy!r} is not allowed; allowed values: ['herding', 'random']")
        self.budget = int(budget)
        self.strategy = strategy
        self.seed = seed
        self.per_class: dict[int, torch.Tensor] = {}  # class -> train indices, priority-ordered

    @property
    def indices(self) -> torch.Tensor:
        if not self.per_class:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat([self.per_class[c] for c in sorted(self.per_class)])

    def __len__(self) -> int:
        return sum(len(v) for v in self.per_class.values())

    def update(self, new_class_indices: dict[int, torch.Tensor], embed: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Shrink old classes to the new per-class quota and select exemplars of the new ones.

        ``new_class_indices`` maps each new class to its train indices; ``embed`` gives the
        current model's features of train indices (used by herding).
        """
        n_classes = len(self.per_class) + len(new_class_indices)
        quota = self.budget // max(n_classes, 1)
        for c in list(self.per_class):
            self.per_class[c] = self.per_class[c][:quota]
        gen = torch.Generator().manual_seed(self.seed * 7919 + n_classes)
        for c, idx in sorted(new_class_indices.items()):
            idx = torch.as_tensor(idx, dtype=torch.long)
            if self.strategy == "random":
                order = torch.randperm(len(idx), generator=gen)[:quota]
            else:
                order = herding_order(embed(idx), quota)
            self.per_class[int(c)] = idx[order]

    def state_dict(self) -> dict:
        return {"budget": self.budget, "strategy": self.strategy,
                "per_class": {str(c): v.clone() for c, v in self.per_class.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.per_class = {int(c): v.clone() for c, v in state["per_class"].items()}
