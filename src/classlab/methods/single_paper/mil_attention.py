"""ABMIL: attention-based deep multiple instance learning, the bag-level baseline of the mil protocol.

Ilse, Tomczak and Welling, "Attention-based Deep Multiple Instance Learning", ICML 2018 (official code:
github.com/AMLab-Amsterdam/AttentionDeepMIL, read for the model sizes and the optimiser). A bag
X = {x_1, ..., x_K} is embedded instance by instance, h_k = f(x_k) (the protocol's shared ConvNet
backbone followed by a ReLU fully connected layer to ``embed_dim`` units, as the paper's MNIST-bags
feature extractor ends); the gated attention pooling (the paper's Eq. 9) gives

    a_k = exp(w^T (tanh(V h_k) * sigm(U h_k))) / sum_j exp(w^T (tanh(V h_j) * sigm(U h_j))),
    z   = sum_k a_k h_k                                            (Eq. 6, permutation invariant),

with V, U of shape (``attention_dim``, ``embed_dim``) and * the element-wise product; the bag
probability is theta(X) = sigm(c^T z + b) and the loss the Bernoulli negative log-likelihood of the bag
label (binary cross-entropy on the bag logit). The instance labels are never read.

Instance scores for evaluation: the attention weights a_k (what the WSI literature reads as ABMIL's
instance classification), and, as a second read-out, the bag classifier applied to one instance as a
bag of its own, sigm(c^T h_k + b) (a single-instance bag has a_k = 1, so z = h_k).

Training goes through the shared engine on a bag-level loader: the protocol's loader runs over bag
ids (``batch["index"]``: positions of the training bags; ``batch["y"]``: their labels), ``batch_size``
bags per step (the paper: one bag per step; several here so that BatchNorm sees more than one bag),
and the method gathers each bag's instances from the tensor the protocol handed it with
``set_bags``. Translation and flip augmentation (``augment_pad``, ``augment_hflip``) are applied here,
to the gathered instances, from a generator seeded by (run seed, global step), so ``training_step``
stays a pure function of the batch and the step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.data.loader import mix_seed, random_crop, random_hflip
from classlab.methods.base import Method
from classlab.methods.registry import register_method

AUGMENT_STREAM = 0xAB1


def gather_bag_instances(offsets: torch.Tensor, bags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The instance positions of ``bags`` (bag b holds positions offsets[b] .. offsets[b + 1] - 1) and,
    for each, the position of its bag within ``bags`` (0 .. len(bags) - 1), bag after bag."""
    bags = bags.long()
    starts, sizes = offsets[bags], offsets[bags + 1] - offsets[bags]
    owner = torch.repeat_interleave(torch.arange(len(bags), device=bags.device), sizes)
    first = torch.cumsum(sizes, 0) - sizes  # where each bag starts in the gathered list
    within = torch.arange(int(sizes.sum()), device=bags.device) - first[owner]
    return starts[owner] + within, owner


def segment_softmax(scores: torch.Tensor, owner: torch.Tensor, n_bags: int) -> torch.Tensor:
    """softmax of ``scores`` within each bag (``owner`` gives each score's bag): the a_k of Eq. 9."""
    peak = torch.full((n_bags,), float("-inf"), dtype=scores.dtype, device=scores.device)
    peak = peak.scatter_reduce(0, owner, scores, reduce="amax", include_self=True)
    e = torch.exp(scores - peak[owner].detach())
    total = torch.zeros(n_bags, dtype=scores.dtype, device=scores.device).index_add(0, owner, e)
    return e / total[owner]


class GatedAttention(nn.Module):
    """The attention logits w^T (tanh(V h) * sigm(U h)) of the paper's Eq. 9 (before the softmax)."""

    def __init__(self, embed_dim: int, attention_dim: int):
        super().__init__()
        self.V = nn.Linear(embed_dim, attention_dim)
        self.U = nn.Linear(embed_dim, attention_dim)
        self.w = nn.Linear(attention_dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # Eq. 9: w^T (tanh(V h_k) ⊙ sigm(U h_k)), one logit per instance
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)


@register_method("single_paper", "mil_attention")
class AttentionMIL(Method):
    trains_on = "bags"        # the protocol's loader yields bag ids; set_bags supplies the instances
    augment = False           # the loader must not augment bag ids; the method augments the instances
    instance_score_name = "attention_weight"

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        embed, attn = int(hp.get("embed_dim", 500)), int(hp.get("attention_dim", 128))
        self.embedding = nn.Sequential(nn.Linear(int(model.num_features), embed), nn.ReLU(inplace=True))
        self.attention = GatedAttention(embed, attn)
        self.classifier = nn.Linear(embed, 1)
        self.run_seed = 0
        self._x = None          # (N, C, H, W) uint8: the training bags' instances, bag after bag
        self._offsets = None    # (B + 1,) long: bag b holds _x[offsets[b]:offsets[b + 1]]
        self._mean = self._std = None

    def param_groups(self) -> list[dict]:
        # the protocol's Classifier head (model.head) is not ABMIL's: only the backbone is shared
        params = [p for p in self.model.backbone.parameters() if p.requires_grad]
        for module in (self.embedding, self.attention, self.classifier):
            params += list(module.parameters())
        return [{"params": params}]

    # --- the training bags ---------------------------------------------------------------------
    def set_bags(self, x: torch.Tensor, offsets: torch.Tensor, mean, std, seed: int = 0) -> None:
        """The training bags: their instances ``x`` (uint8, bag after bag), ``offsets`` (B + 1,), the
        dataset's channel statistics and the run seed (the augmentation stream)."""
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"mil_attention: set_bags expects uint8 images (N, C, H, W), got {x.dtype} "
                             f"{tuple(x.shape)}")
        offsets = torch.as_tensor(offsets, dtype=torch.long)
        if int(offsets[-1]) != len(x) or bool((offsets[1:] <= offsets[:-1]).any()):
            raise ValueError("mil_attention: offsets must rise strictly (no empty bag) and end at len(x)")
        self._x, self._offsets = x, offsets
        stat = (1, -1, 1, 1)
        self._mean = torch.tensor(mean if mean is not None else [0.0], dtype=torch.float32).view(stat) * 255.0
        self._std = torch.tensor(std if std is not None else [1.0], dtype=torch.float32).view(stat) * 255.0
        self.run_seed = int(seed)

    def on_train_start(self, loader) -> None:
        if self._x is None:
            raise RuntimeError("mil_attention: call set_bags before training")
        device = loader.device
        self._x, self._offsets = self._x.to(device), self._offsets.to(device)
        self._mean, self._std = self._mean.to(device), self._std.to(device)

    def _instances(self, positions: torch.Tensor) -> torch.Tensor:
        x = self._x[positions].float()
        pad, flip = int(self.hparams.get("augment_pad", 0)), bool(self.hparams.get("augment_hflip", False))
        if pad > 0 or flip:
            gen = torch.Generator(device=x.device)
            gen.manual_seed(mix_seed(self.run_seed, AUGMENT_STREAM, self.global_step))
            if pad > 0:
                x = random_crop(x, pad, gen)
            if flip:
                x = random_hflip(x, gen)
        return (x - self._mean) / self._std

    # --- the model -----------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """h_k = f(x_k): backbone features, then the ReLU layer to ``embed_dim``."""
        return self.embedding(self.model.backbone(x))

    def pool(self, h: torch.Tensor, owner: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(z, a): each bag's attention-pooled embedding (n_bags, embed_dim) and the instances' weights."""
        a = segment_softmax(self.attention(h), owner, n_bags)           # Eq. 9
        z = torch.zeros(n_bags, h.shape[1], dtype=h.dtype, device=h.device).index_add(0, owner, a[:, None] * h)  # Eq. 6
        return z, a

    def bag_logits(self, h: torch.Tensor, owner: torch.Tensor, n_bags: int) -> tuple[torch.Tensor, torch.Tensor]:
        z, a = self.pool(h, owner, n_bags)
        return self.classifier(z).squeeze(-1), a   # theta(X) = sigm(c^T z + b)

    def training_step(self, batch: dict):
        bags = batch["index"]
        positions, owner = gather_bag_instances(self._offsets, bags)
        logits, _ = self.bag_logits(self.embed(self._instances(positions)), owner, len(bags))
        loss = F.binary_cross_entropy_with_logits(logits.float(), batch["y"].float())  # Bernoulli log-likelihood
        return loss, {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The bag logit of each instance taken as a bag of its own (a = 1, z = h)."""
        return self.classifier(self.embed(x)).squeeze(-1)

    # --- evaluation (the protocol's bag scoring) -----------------------------------------------
    def instance_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per instance: its embedding h, its attention logit and its single-instance bag logit."""
        h = self.embed(x)
        return {"h": h, "attention_logit": self.attention(h), "single_logit": self.classifier(h).squeeze(-1)}

    @torch.no_grad()
    def bag_scores(self, outputs: dict[str, torch.Tensor], owner: torch.Tensor,
                   n_bags: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(bag probabilities, {"instance": attention weights, "instance_single": single-instance bag
        probabilities}) from ``instance_outputs`` gathered over every instance of the bags."""
        device = self.classifier.weight.device
        h, owner = outputs["h"].to(device), owner.to(device)
        a = segment_softmax(outputs["attention_logit"].to(device), owner, n_bags)
        z = torch.zeros(n_bags, h.shape[1], device=device).index_add(0, owner, a[:, None] * h)
        bag = torch.sigmoid(self.classifier(z).squeeze(-1))
        return bag.cpu(), {"instance": a.cpu(), "instance_single": torch.sigmoid(outputs["single_logit"]).cpu()}
