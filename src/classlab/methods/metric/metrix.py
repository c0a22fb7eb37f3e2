"""Metrix (Metric Mix): mixup of inputs, intermediate features or embeddings for a metric loss.

Venkataramanan, Psomas, Kijak, Amsaleg, Karantzalos and Avrithis, "It Takes Two to Tango: Mixup for Deep
Metric Learning", ICLR 2022.

Generic loss (paper, Sec. 3). A pair-based loss of anchor a with positives P(a) and negatives N(a) is
tau(sigma+(a), sigma-(a)), sigma+ = sum_{p in P(a)} rho+(s(a, p)), sigma- = sum_{n in N(a)} rho-(s(a, n)).
Metrix gives each example u a label y in [0, 1] towards the anchor (1 positive, 0 negative) and
generalises it to

    l~(a) = tau( sum_u y_u rho+(s(a, u)),  sum_u (1 - y_u) rho-(s(a, u)) )

A mixed example u = lam * x + (1 - lam) * x' of a positive x and a negative x' of the anchor gets
y = lam, lam ~ Beta(alpha, alpha). Instances computed here:

- contrastive (rho+ = [D - m_pos]_+, rho- = [m_neg - D]_+, tau = sum, parts averaged over their non-zero
  terms): l~ = lam [D(a, u) - m_pos]_+ + (1 - lam) [m_neg - D(a, u)]_+ ;
- multi-similarity (tau = 1/alpha log(1 + sigma+) + 1/beta log(1 + sigma-),
  rho+ = exp(-alpha (s - lambda)), rho- = exp(beta (s - lambda))):
  l~ = 1/alpha log(1 + lam e^{-alpha (s - lambda)}) + 1/beta log(1 + (1 - lam) e^{beta (s - lambda)});
- proxy anchor (the proxies are the anchors; u's label towards proxy c is y_c = lam [c = y_x] +
  (1 - lam) [c = y_x']): its two log-sum-exp terms with exp(-alpha (s - delta)) weighted by y_c and
  exp(alpha (s + delta)) by 1 - y_c.

The step's loss is L = L_clean + w * L_mixed (``mix_weight`` w = 0.4, the official code's), L_clean the
base loss on the clean batch (with its miner). Pairing (official code, one of two per step at random):
(a) a positive of the anchor mixed with a negative, (b) the anchor itself mixed with a negative; each is
compared with the clean anchor. The official code mixes every such pair; here, CPU-sized, each anchor of
the batch gets one mixed example: a random positive (a) or itself (b) mixed with its hardest negative (the
most similar clean embedding of another class, the official input mode's top-1), so a step adds as many
mixed examples as the batch has anchors.

Where to mix (``mix``): ``input`` (images, a second forward pass), ``feature`` (intermediate features)
or ``embedding`` (the L2-normalised embeddings, renormalised after mixing). Default ``feature``, the
official code's default mode. The official code mixes ResNet-50's last feature
map, followed by average + max pooling; with this family's ConvNet (average pooling, linear head) that
point would be the same as mixing the embedding before normalisation, so here ``feature`` mixes the input
of the backbone's last block (the ConvNet's last conv block, a ResNet's layer4) and runs the mixed maps
through that block. alpha = 2 (Beta(2, 2)) as in the official code. The base loss defaults to
multi_similarity (the paper's strongest, "MS + Metrix"); the claim compares ``metrix`` with the same base
method (``multi_similarity``, its YAML's loss hyperparameters, the same budget).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.data.loader import mix_seed
from classlab.methods.registry import register_method
from classlab.methods.metric_learner import MetricLearner

MIX_MODES = ("input", "feature", "embedding")


# --- the generalised (soft-label) losses ---------------------------------------------------------

def _avg_nonzero(values: torch.Tensor) -> torch.Tensor:
    """pml's AvgNonZeroReducer: the mean of the positive entries (0 when none)."""
    nonzero = values > 0
    return values[nonzero].mean() if bool(nonzero.any()) else values.sum() * 0.0


def _log1p_weighted_sum(z: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """log(1 + sum_k w_k e^{z_k}) along ``dim``, terms with w = 0 left out: pml's masked log-sum-exp
    (``add_one``) over z + log w."""
    from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

    keep = w > 0
    return lmu.logsumexp(z + torch.log(w.clamp_min(1e-30)), keep_mask=keep, add_one=True, dim=dim).squeeze(dim)


def mixed_contrastive(anchors: torch.Tensor, mixed: torch.Tensor, y: torch.Tensor, pos_margin: float,
                      neg_margin: float) -> torch.Tensor:
    """l~ = y [D - m_pos]_+ + (1 - y) [m_neg - D]_+ per anchor-mixed pair (rows), each part averaged over
    its non-zero pairs; embeddings L2-normalised, D Euclidean."""
    d = (F.normalize(anchors, dim=1) - F.normalize(mixed, dim=1)).norm(dim=1)
    pos = y * F.relu(d - pos_margin)            # y rho+(D)
    neg = (1 - y) * F.relu(neg_margin - d)      # (1 - y) rho-(D)
    return _avg_nonzero(pos) + _avg_nonzero(neg)


def mixed_multi_similarity(anchors: torch.Tensor, mixed: torch.Tensor, y: torch.Tensor, alpha: float,
                           beta: float, base: float) -> torch.Tensor:
    """l~ = 1/alpha log(1 + y e^{-alpha (s - base)}) + 1/beta log(1 + (1 - y) e^{beta (s - base)}) per
    anchor-mixed pair (rows, s the cosine similarity), averaged over the pairs."""
    s = (F.normalize(anchors, dim=1) * F.normalize(mixed, dim=1)).sum(dim=1)
    pos = _log1p_weighted_sum((-alpha * (s - base))[:, None], y[:, None], dim=1) / alpha    # y rho+
    neg = _log1p_weighted_sum((beta * (s - base))[:, None], (1 - y)[:, None], dim=1) / beta  # (1 - y) rho-
    return (pos + neg).mean()


def mixed_proxy_anchor(mixed: torch.Tensor, soft_labels: torch.Tensor, proxies: torch.Tensor, alpha: float,
                       delta: float) -> torch.Tensor:
    """Proxy Anchor with soft labels Y (M, C) in [0, 1]:
    1/|P+| sum_{c: sum_u Y_uc > 0} log(1 + sum_u Y_uc e^{-alpha (s_uc - delta)})
    + 1/C sum_c log(1 + sum_u (1 - Y_uc) e^{alpha (s_uc + delta)}); one-hot Y gives the plain loss."""
    s = F.normalize(mixed, dim=1) @ F.normalize(proxies, dim=1).T           # (M, C) cosine
    pos = _log1p_weighted_sum(-alpha * (s - delta), soft_labels, dim=0)       # per proxy
    neg = _log1p_weighted_sum(alpha * (s + delta), 1 - soft_labels, dim=0)
    with_pos = soft_labels.sum(0) > 0
    return pos[with_pos].sum() / max(int(with_pos.sum()), 1) + neg.sum() / soft_labels.shape[1]


# --- pairs and mixing --------------------------------------------------------------------------------

def mixing_pairs(embeddings: torch.Tensor, labels: torch.Tensor, pairing: str, generator: torch.Generator):
    """(anchors, first, negatives): for each anchor with a positive and a negative in the batch, the
    example mixed with weight lam (a random positive for pairing "pos_neg", the anchor itself for
    "anchor_neg") and the one mixed with 1 - lam (its hardest negative: the most similar of another class)."""
    with torch.no_grad():
        e = F.normalize(embeddings.detach().float(), dim=1)
        sim = e @ e.T
        same = labels[:, None] == labels[None, :]
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        positive, negative = same & ~eye, ~same
        anchors = torch.nonzero(positive.any(1) & negative.any(1)).flatten()
        hardest = sim.masked_fill(~negative, float("-inf")).argmax(1)
        if pairing == "pos_neg":
            draw = torch.rand(sim.shape, generator=generator, device=generator.device).to(sim.device)
            first = draw.masked_fill(~positive, -1.0).argmax(1)
        elif pairing == "anchor_neg":
            first = torch.arange(len(labels), device=labels.device)
        else:
            raise ValueError(f"pairing {pairing!r}: pos_neg or anchor_neg")
    return anchors, first[anchors], hardest[anchors]


def mixed_labels(labels: torch.Tensor, first: torch.Tensor, negatives: torch.Tensor, lam: float,
                 num_classes: int) -> torch.Tensor:
    """Soft class labels (M, C) of the mixed examples lam * x_first + (1 - lam) * x_negative."""
    one_hot = F.one_hot(labels, num_classes).float()
    return lam * one_hot[first] + (1 - lam) * one_hot[negatives]


def split_backbone(model: nn.Module):
    """(head part, tail part) of ``model`` (a Classifier) around the input of its backbone's last block:
    tail(head(x)) is the pooled feature vector. ConvNet and ResNet backbones; else None."""
    from timm.models.resnet import ResNet

    from classlab.models.backbones import SmallConvNet

    backbone = model.backbone
    if isinstance(backbone, SmallConvNet):
        convs = [i for i, layer in enumerate(backbone.features) if isinstance(layer, nn.Conv2d)]
        cut = convs[-1]

        def tail(h):
            return backbone.head(backbone.pool(backbone.features[cut:](h)).flatten(1))
        return backbone.features[:cut], tail
    if isinstance(backbone, ResNet):
        def head(x):
            x = backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(x))))
            return backbone.layer3(backbone.layer2(backbone.layer1(x)))

        def tail(h):
            return backbone.forward_head(backbone.layer4(h), pre_logits=True)
        return head, tail
    return None


@register_method("metric", "metrix")
class Metrix(MetricLearner):
    def __init__(self, model, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        mode = hparams["mix"]
        if mode not in MIX_MODES:
            raise ConfigError(f"mix: {mode!r}; allowed values: {list(MIX_MODES)}")
        if mode == "feature" and split_backbone(model) is None:
            raise ConfigError(f"mix: feature mixing splits a convnet or resnet18 backbone at its last block; "
                              f"{type(model.backbone).__name__} has no such split (use input or embedding)")

    def _draws(self, batch: dict) -> tuple[float, str, torch.Generator]:
        """This step's lam ~ Beta(alpha, alpha), pairing and generator: seeded by the step and the batch's
        sample positions, so that ``training_step`` stays a pure function of the batch."""
        index = batch["index"]
        seed = mix_seed(0x3E721, self.global_step, int(index[0]), int(index[-1]), len(index))
        rng = np.random.default_rng(seed)
        alpha = float(self.hparams["mix_alpha"])
        lam = float(rng.beta(alpha, alpha))
        pairing = ("pos_neg", "anchor_neg")[int(rng.integers(2))]
        generator = torch.Generator(device=batch["x"].device).manual_seed(seed)
        return lam, pairing, generator

    def mixed_loss(self, anchors: torch.Tensor, mixed: torch.Tensor, soft: torch.Tensor, y_anchor: torch.Tensor,
                   lam: float) -> torch.Tensor:
        """The base loss generalised to mixed examples (module docstring): anchor-mixed pairs with y = lam
        for the pair-based losses, soft class labels towards the proxies for Proxy Anchor."""
        hp, base = self.loss_hparams, self.hparams["base_loss"]
        with torch.autocast(device_type=mixed.device.type, enabled=False):
            anchors, mixed = anchors.float(), mixed.float()
            y = torch.full((len(mixed),), lam, device=mixed.device)
            if base == "contrastive":
                return mixed_contrastive(anchors, mixed, y, float(hp["pos_margin"]), float(hp["neg_margin"]))
            if base == "multi_similarity":
                return mixed_multi_similarity(anchors, mixed, y, float(hp["ms_alpha"]), float(hp["ms_beta"]),
                                              float(hp["ms_base"]))
            return mixed_proxy_anchor(mixed, soft, self.loss_fn.proxies, float(hp["pa_alpha"]),
                                      float(hp["pa_delta"]))

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x, labels = batch["x"], batch["y"]
        mode, weight = self.hparams["mix"], float(self.hparams["mix_weight"])
        if mode == "feature" and weight > 0:
            head, tail = split_backbone(self.model)
            h = head(x)
            f = F.normalize(self.model.head(tail(h)).float(), dim=1)
        else:
            f = self.embed(x)
        loss_clean = self.metric_loss(f, labels)
        if weight == 0:
            return loss_clean, {"loss_metric": loss_clean.detach()}
        lam, pairing, generator = self._draws(batch)
        anchors, first, negatives = mixing_pairs(f, labels, pairing, generator)
        if len(anchors) == 0:
            return loss_clean, {"loss_metric": loss_clean.detach()}
        # u = lam * (first) + (1 - lam) * (hardest negative), at the chosen depth
        if mode == "input":
            mixed = self.embed(lam * x[first] + (1 - lam) * x[negatives])
        elif mode == "feature":
            mixed = F.normalize(self.model.head(tail(lam * h[first] + (1 - lam) * h[negatives])).float(), dim=1)
        else:
            mixed = F.normalize(lam * f[first] + (1 - lam) * f[negatives], dim=1)
        soft = mixed_labels(labels, first, negatives, lam, self.num_classes)
        loss_mixed = self.mixed_loss(f[anchors], mixed, soft, labels[anchors], lam)
        loss = loss_clean + weight * loss_mixed                      # L = L_clean + w * L_mixed
        return loss, {"loss_metric": loss_clean.detach(), "loss_mixed": loss_mixed.detach(),
                      "lam": torch.tensor(lam)}
