"""CQ-DINO: learnable category queries with image-guided top-K category selection, on the shared
query-based detector (``classlab.methods.dense_detector``).

Sun, Hu, Ma, Liu, Chen, Tang, Hu and Xu, "CQ-DINO: Mitigating Gradient Dilution via Category
Queries for Vast Vocabulary Object Detection", arXiv 2503.18430, 2025 (official code:
github.com/RedAIGC/CQ-DINO, mmdetection; its COCO variant is what is followed here).

Idea. A classification head gives every query a sigmoid term for every one of C classes: a rare
class's few positive gradients are diluted by the many negatives of every query of every image, and
the informative (hard) negatives drown among easy ones. CQ-DINO replaces the head by learnable
category queries and classifies an object query against only the K categories that an image-level
selection keeps for the image, so the negative space of each image shrinks from C to K plausible
(hence hard) categories.

Equations (names of the official code in brackets):

1. Category queries (``label_embed``, ``wordvec_proj``, ``label_attn``; the COCO variant's
   self-attention among categories, which stands for the hierarchy tree used on V3Det):
       E_0 = ReLU(W_p Q),   E = LN(E_0 + SelfAttn(E_0)),   Q in R^{C x d_c} learned.
2. Image-guided query selection (``tagging_head``: BERT layers whose self-attention is removed, so
   the categories attend only to the image): image tokens T = W_i [avgpool(F); F] from the backbone
   map F; for each of ``selection_layers`` layers
       E <- LN(E + CrossAttn(E, T)),   E <- LN(E + FFN(E)),
   giving image-conditioned category embeddings E^I (B x C x d_c).
3. Presence score and selection (``fc``, ``generate``): s_c = w_s . E^I_c + b_s, and the image keeps
   S = TopK_c(s, K) (K = ``top_k``).
4. Selection loss on image-level labels y_c = [the image holds class c] (``language_loss``): the
   asymmetric loss (Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021) with
   p_c = sigmoid(s_c), the negatives' probability shifted by the clip m, p_m = max(p_c - m, 0):
       L_sel = -lambda * mean_images sum_c [ y_c (1 - p_c)^g+ log p_c + (1 - y_c) p_m^g- log(1 - p_m) ],
   the focusing weights taken without gradient (the official ``disable_torch_grad_focal_loss``).
   The official COCO config sets g+ = g- = 0 and m = 0: plain binary cross-entropy, our default
   (``selection_gamma_pos``, ``selection_gamma_neg``, ``selection_clip``); its V3Det config uses
   g- = 7, m = 0.05. The official COCO loss is 0.1 x the sum over the 2 images of a GPU's batch
   while the detection losses are per-box averages, i.e. 0.2 per image: ``selection_loss_weight``.
5. Classification of object query o_q against the selected categories (``text_feat_map`` and
   Grounding DINO's ContrastiveEmbed with log_scale "auto" and a learned bias):
       logit_qk = <o_q, W_t E^I_k> / sqrt(d) + b,   k in S,   b initialised to -log((1 - 0.01) / 0.01).
   A category outside S has no logit: no focal-loss term, no matching cost, score 0 at inference
   (the detector's ``class_mask``). The same scoring serves the encoder's proposals and every decoder
   layer (the official two-stage selection also scores encoder tokens against the selected categories).
6. Ground-truth categories are NOT forced into S during training (official code: an object whose class
   is not among the top K gets an all-zero positive map: it is still matched, by its box costs, and
   trains its box, but it is no positive for any category). The selection learns to keep them through
   L_sel alone.
7. Total: L = L_det (the detector's focal / L1 / GIoU losses over the K selected columns) + L_sel.

Left out at our scale (said here so that nobody mistakes it for the full model): the category queries
are learned from a random start (the official ones start from CLIP text embeddings of the class names;
we have no text encoder), the encoder's image-category fusion layers and the decoder's cross-attention
to the selected categories (the detector is shared with ``class_head``, so that the comparison isolates
the classification), the V3Det hierarchy tree (our 40 colour x garment classes have no tree; the COCO
variant's self-attention is used instead), the separately trained first stage of the official schedule
(the official runs load a "stage 1" checkpoint; here everything is trained jointly from scratch), and
the padding of the selected set with random categories (never needed: K <= C always).
K: the official COCO run keeps K = 30 of 80 classes (V3Det 100 of 13,204); ``top_k`` 15 of our 40 keeps
COCO's fraction (3/8).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.methods.dense_detector import QueryDetector, prior_bias
from classlab.methods.dense_learner import DenseTargets
from classlab.methods.registry import register_method

CQ_DEFAULTS = {"top_k": 15, "category_dim": 64, "selection_layers": 2, "selection_heads": 4,
               "selection_ffn_dim": 256, "selection_loss_weight": 0.2, "selection_gamma_pos": 0.0,
               "selection_gamma_neg": 0.0, "selection_clip": 0.0}


class CategoryCrossAttentionLayer(nn.Module):
    """One layer of the official tagging head: a BERT layer without self-attention (post-norm
    cross-attention of the category queries to the image tokens, then a GELU FFN)."""

    def __init__(self, dim: int, heads: int, ffn_dim: int):
        super().__init__()
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, categories: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
        categories = self.norm1(categories + self.cross_attn(categories, image_tokens, image_tokens,
                                                             need_weights=False)[0])
        return self.norm2(categories + self.ffn(categories))


def asymmetric_loss(logits: torch.Tensor, labels: torch.Tensor, gamma_pos: float, gamma_neg: float,
                    clip: float) -> torch.Tensor:
    """Eq. 4 per image and class (B, C), before the sum: ASL; binary cross-entropy when gamma_pos =
    gamma_neg = clip = 0."""
    log_pos = F.logsigmoid(logits)
    if clip > 0:
        # p_m = max(p - m, 0): 1 - p_m = min(1 - p + m, 1); a negative with p <= m costs nothing
        neg_prob = (torch.sigmoid(-logits) + clip).clamp(max=1)
        log_neg = neg_prob.log()
    else:
        neg_prob = torch.sigmoid(-logits)
        log_neg = F.logsigmoid(-logits)
    loss = labels * log_pos + (1 - labels) * log_neg
    if gamma_pos > 0 or gamma_neg > 0:
        with torch.no_grad():  # the official code takes the focusing weights as constants
            pt = labels * torch.sigmoid(logits) + (1 - labels) * neg_prob
            weight = (1 - pt).pow(gamma_pos * labels + gamma_neg * (1 - labels))
        loss = loss * weight
    return -loss


def image_labels(targets: DenseTargets, num_classes: int) -> torch.Tensor:
    """(B, C) float: 1 where the image holds at least one object of the class (the selection's target)."""
    labels = targets.labels
    onehot = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    onehot.scatter_(1, torch.where(labels >= 0, labels, num_classes), 1.0)  # padding goes to a spare column
    return onehot[:, :num_classes]


@register_method("dense", "cq_dino")
class CQDINO(QueryDetector):
    task = "detection"

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int,
                 image_shape: tuple[int, int, int] = (3, 84, 84)):
        super().__init__(model, {**CQ_DEFAULTS, **dict(hparams)}, num_classes, image_shape)

    def build_class_head(self, d: int) -> None:
        hp, num_classes = self.hparams, self.num_classes
        if int(hp["top_k"]) < 1:
            raise ConfigError(f"top_k: {hp['top_k']} (at least 1 category kept per image)")
        for key in ("category_dim", "selection_layers", "selection_heads", "selection_ffn_dim"):
            if int(hp[key]) < 1:
                raise ConfigError(f"{key}: {hp[key]} (at least 1)")
        if int(hp["category_dim"]) % int(hp["selection_heads"]):
            raise ConfigError(f"category_dim: {hp['category_dim']} is not a multiple of selection_heads "
                              f"({hp['selection_heads']})")
        for key in ("selection_loss_weight", "selection_gamma_pos", "selection_gamma_neg"):
            if float(hp[key]) < 0:
                raise ConfigError(f"{key}: {hp[key]} (0 or more)")
        if not 0 <= float(hp["selection_clip"]) < 1:
            raise ConfigError(f"selection_clip: {hp['selection_clip']} (in [0, 1))")
        self.top_k = min(int(hp["top_k"]), num_classes)  # a dataset with fewer classes keeps them all
        dc, heads = int(hp["category_dim"]), int(hp["selection_heads"])
        channels = self.feature_shape[0]
        self.category_queries = nn.Parameter(torch.randn(num_classes, dc))  # Q (Eq. 1), learned from scratch
        self.category_proj = nn.Linear(dc, dc)                                # W_p
        self.category_self_attn = nn.MultiheadAttention(dc, heads, batch_first=True)
        self.category_norm = nn.LayerNorm(dc)
        self.image_proj = nn.Linear(channels, dc)                              # W_i
        ffn_dim = int(hp["selection_ffn_dim"])
        self.selection_layers = nn.ModuleList(
            CategoryCrossAttentionLayer(dc, heads, ffn_dim) for _ in range(int(hp["selection_layers"])))
        self.presence_head = nn.Linear(dc, 1)                                  # w_s, b_s
        self.category_to_query = nn.Linear(dc, d)                              # W_t
        self.logit_bias = nn.Parameter(torch.tensor(prior_bias()))             # b

    def image_context(self, fmap: torch.Tensor) -> dict:
        b = fmap.shape[0]
        # Eq. 1: E = LN(E_0 + SelfAttn(E_0)), E_0 = ReLU(W_p Q)
        cats = F.relu(self.category_proj(self.category_queries))[None]
        cats = self.category_norm(cats + self.category_self_attn(cats, cats, cats, need_weights=False)[0])
        # Eq. 2: the categories attend to the image tokens [avgpool(F); F]
        tokens = fmap.flatten(2).transpose(1, 2)
        tokens = self.image_proj(torch.cat((tokens.mean(dim=1, keepdim=True), tokens), dim=1))
        cats = cats.expand(b, -1, -1)
        for layer in self.selection_layers:
            cats = layer(cats, tokens)
        # Eq. 3: presence score s_c and the top-K categories S of each image
        presence = self.presence_head(cats).squeeze(-1)  # (B, C)
        selected = presence.detach().topk(self.top_k, dim=1).indices  # (B, K)
        mask = torch.zeros_like(presence, dtype=torch.bool).scatter_(1, selected, True)
        # Eq. 5's keys W_t E^I_k, of the selected categories only
        keys = self.category_to_query(cats.gather(1, selected[..., None].expand(-1, -1, cats.shape[-1])))
        return {"class_mask": mask, "selected": selected, "category_keys": keys, "presence_logits": presence}

    def class_logits(self, embeddings: torch.Tensor, context: dict) -> torch.Tensor:
        keys, selected = context["category_keys"], context["selected"]
        # Eq. 5: logit_qk = <o_q, W_t E^I_k> / sqrt(d) + b over the K selected categories
        logits = torch.einsum("bnd,bkd->bnk", embeddings, keys.to(embeddings.dtype)) / math.sqrt(embeddings.shape[-1])
        logits = logits + self.logit_bias
        # placed in the C columns; the unselected ones stay 0 and are masked (no loss, score 0)
        full = logits.new_zeros(*logits.shape[:2], self.num_classes)
        return full.scatter(2, selected[:, None, :].expand(-1, logits.shape[1], -1), logits)

    def extra_loss(self, context: dict, targets: DenseTargets) -> tuple[torch.Tensor, dict]:
        presence = context["presence_logits"].float()
        labels = image_labels(targets, self.num_classes)
        hp = self.hparams
        # Eq. 4: L_sel = lambda * mean_images sum_c ASL(s_c, y_c) (BCE with the COCO defaults)
        per_image = asymmetric_loss(presence, labels, float(hp["selection_gamma_pos"]),
                                    float(hp["selection_gamma_neg"]), float(hp["selection_clip"])).sum(dim=1)
        loss = float(hp["selection_loss_weight"]) * per_image.mean()
        # how many of the images' categories the selection kept (Eq. 6: the others have no positive)
        kept = (labels * context["class_mask"].float()).sum() / labels.sum().clamp(min=1)
        return loss, {"loss_selection": float(per_image.mean().detach()), "selection_recall": float(kept)}
