"""ECAML: an energy-confusion term, trained adversarially against the metric loss.

Chen and Deng, "Energy Confused Adversarial Metric Learning for Zero-Shot Image Retrieval and
Clustering", AAAI 2019.

The embedding is f = W h + b (normalised), h = the backbone's features and (W, b) the linear embedding
head: the metric. The metric loss L_m (the base loss, ``base_loss``) trains the backbone and the metric
to separate the classes. The Energy Confusion term regards the embeddings as particles and takes the
energy between samples of *different* classes, N = {(i, j): y_i != y_j} of the batch:

    E = 1/|N| sum_{(i,j) in N} 1/2 || f_i - f_j ||^2,        L_EC = log E

and is minimised by the metric only: its gradient reaches W and b but not the backbone (the official
Caffe model feeds the EC layer a second copy of the embedding layer, weights shared, on the backbone's
output with ``propagate_down: 0``). The two objectives pull the metric in opposite directions: L_m
spreads different classes apart, L_EC draws them together ("confuses" the metric), so the backbone can no
longer rely on the few features that separate the seen classes most easily and learns more of them,
which is what transfers to unseen classes. One step minimises

    L = L_m(f(theta, W)) + lambda * L_EC(W; stopgrad(h(theta)))

over the backbone theta and the metric W together (``ec_weight`` = lambda).

Values: lambda = 0.13, the official Cars training file's loss weight. The base loss defaults to
multi_similarity: the paper's strongest base is the binomial-deviance loss (its ECAML(Bin) row), which
the multi-similarity loss generalises (Wang et al., CVPR 2019, Sec. 4) and which this family does not
carry; the claim "ECAML beats its base loss" compares ``ecaml`` with ``multi_similarity`` at the same
loss hyperparameters (read from multi_similarity.yaml) and the same budget.

Choices of ours: the official layer draws 10 random partners per sample (in batches of 2 images per
class, all of them of another class); here every different-class pair of the batch enters E (the
subsample's expectation; the log makes the normalisation a constant). The official code computes E on
the raw embedding of its BIER model; here on the L2-normalised embedding every base loss of the family
uses, where shrinking W cannot lower the energy without moving the classes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.metric_learner import MetricLearner

ENERGY_EPS = 1e-8  # keeps log E finite when every different-class pair coincides


def energy_confusion(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_EC = log( mean over different-class pairs i < j of 1/2 ||f_i - f_j||^2 ) (module docstring);
    0 (with a graph) when the batch holds one class."""
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        f = embeddings.float()
        different = labels[:, None] != labels[None, :]
        pairs = torch.triu(different, diagonal=1)
        if not bool(pairs.any()):
            return f.sum() * 0.0
        i, j = torch.nonzero(pairs, as_tuple=True)
        energy = 0.5 * (f[i] - f[j]).pow(2).sum(dim=1).mean()   # E = 1/|N| sum_{(i,j) in N} 1/2 ||f_i - f_j||^2
        return torch.log(energy + ENERGY_EPS)    # L_EC = log E


@register_method("metric", "ecaml")
class ECAML(MetricLearner):
    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        h = self.model.features(batch["x"])                      # backbone features (theta)
        f = F.normalize(self.model.head(h).float(), dim=1)       # the metric W on them
        loss_metric = self.metric_loss(f, batch["y"])
        weight = float(self.hparams["ec_weight"])
        if weight == 0:
            return loss_metric, {"loss_metric": loss_metric.detach()}
        # the confusion term reaches the metric W only: the features enter detached
        f_ec = F.normalize(self.model.head(h.detach()).float(), dim=1)
        loss_ec = energy_confusion(f_ec, batch["y"])
        loss = loss_metric + weight * loss_ec                    # L = L_m + lambda * L_EC
        return loss, {"loss_metric": loss_metric.detach(), "loss_ec": loss_ec.detach()}
