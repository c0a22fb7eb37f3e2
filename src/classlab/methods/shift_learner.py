"""What a domain-shift method is: the two bases of the family.

**Domain generalisation** (DomainBed, Gulrajani and Lopez-Paz 2021). The protocol trains on
every domain but the test one. Each optimizer step sees one minibatch per training domain,
concatenated in domain order (the engine's ``MixedLoader``, one source per domain), so
``batch["source"]`` holds each sample's training-domain index in ``0 .. num_domains - 1`` and
every domain has the same number of samples in the batch. A method overrides
``training_step`` and uses ``domain_batches`` to get the per-domain pieces; penalties that
switch on after ``penalty_anneal_iters`` read ``global_step`` (set by the engine).

**Test-time adaptation.** A source model (trained by the supervised family) meets a stream of
corrupted test batches. ``forward_and_adapt(x)`` returns the logits the method predicts for
the batch and takes at most one adaptation step on it (TENT's order: the prediction is the
output of the forward pass the step uses). ``reset()`` restores the source state before a new
stream. ``source_stats`` (class-conditional feature statistics of the source training set,
a DAG artefact of the source model) is given to methods that need it.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from classlab.methods.base import Method


class DomainGeneralizationMethod(Method):
    """ERM's structure: the shared loop, one minibatch per training domain in each batch."""

    num_domains: int = 1  # set by the protocol before training

    def domain_batches(self, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(x_d, y_d)] for each training domain d, in domain order."""
        src = batch["source"]
        return [(batch["x"][src == d], batch["y"][src == d]) for d in range(self.num_domains)]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.features(x)
        return feats, self.model.head(feats)


class TestTimeMethod(nn.Module):
    """Online adaptation of a trained classifier (``classlab.models.backbones.Classifier``)."""

    name: str = "test_time"
    family: str = "shift"
    needs_source_stats: bool = False

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int, source_stats: dict | None = None):
        super().__init__()
        if self.needs_source_stats and source_stats is None:
            raise ValueError(f"method shift/{self.name} needs the source model's class statistics (source_stats)")
        self.model = model
        self.hparams = dict(hparams)
        self.num_classes = num_classes
        self.source_stats = source_stats
        self._source_state = copy.deepcopy(model.state_dict())
        self.setup()

    def setup(self) -> None:
        """Choose what adapts (requires_grad, BN modes) and build the optimizer; called again by reset."""
        self.model.eval()
        self.model.requires_grad_(False)

    def reset(self) -> None:
        """Back to the source model before a new stream."""
        self.model.load_state_dict(self._source_state)
        self.setup()

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)
