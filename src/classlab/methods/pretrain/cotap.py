"""CoTAP: dense self-supervised pretraining by explicit semantic concentration, no labels.

Peisong Wen, Qianqian Xu, Siran Dai, Runmin Cong and Qingming Huang, "Semantic Concentration for
Self-Supervised Dense Representations Learning", IEEE TPAMI 2025 (arXiv:2509.09429).

The paper's diagnosis: dense SSL "over-disperses" (patches of one instance or category scatter in
feature space). Its remedy, on top of a self-distillation (student / EMA teacher) architecture:

1. Correspondence distillation with a noise-tolerant ranking loss. The teacher's patch-to-patch
   similarities between two images (or views) are soft pseudo labels; the student learns to RANK
   the candidate patches of the other image in the teacher's order, by an Average Precision loss
   extended to continuous targets ("CoTAP", Continuous-Target AP). AP is decision-agnostic (no
   threshold turns a similarity into a positive) and adaptively focusing (its gradient
   concentrates on the positives ranked too low); a pair the teacher scores low (a likely wrong
   correspondence) weighs little, so the noisy, imbalanced pseudo labels mislead the student less
   than a hard-positive loss would.
2. An object-aware filter. Patch outputs are mapped to an object-based space: each patch is
   represented by learnable object prototypes through cross-attention, so similarities reflect
   which object a patch belongs to rather than low-level patterns shared by cluttered scenes.

Equations (as implemented here; see "What we could read" below). Let f be the backbone's dense map
(``classlab.models.backbones.dense_features``), g a projection MLP, p_1..p_K unit prototypes, and
z_i = g(f)_i / |g(f)_i| the output of patch i.

  Object-aware filter (cross-attention from the patch to the K prototypes plus a "no object"
  slot whose logit is the threshold delta):
      l_ik = <z_i, p_k>                                              (cosine to prototype k)
      o_i  = 1 - exp(delta/T) / (exp(delta/T) + sum_k exp(l_ik/T))   (objectness)           (F1)
      q_ik = softmax_k((l_ik - c_k) / T)                              (which object)         (F2)
      r_i  = o_i sum_k q_ik p_k                                      (filtered patch)       (F3)
  With c = 0 this is exactly one softmax attention over [no-object, p_1..p_K] whose no-object value
  is the zero vector. The teacher uses a sharper T_t and DINO's centring c (a running mean of its
  cosines, updated after each step), the student T_s and c = 0.

  Scores and soft labels between anchor patches i (view 1) and candidate patches j (view 2 of
  every image of the batch, so that concentration is both intra-instance and inter-image):
      s_ij = <r_i, r_j>            (student)         y_ij = clip(<r~_i, r~_j>, 0, 1)  (teacher) (S)

  Continuous-target AP of anchor i, H(x) = sigmoid(x / tau) the smoothed step of Smooth-AP:
      rank_ij   = 1 + sum_{k != j} H(s_ik - s_ij)
      rank+_ij  = y_ij + sum_{k != j} y_ik H(s_ik - s_ij)
      AP_i      = sum_j y_ij rank+_ij / rank_ij  /  sum_j y_ij                               (AP)
  For binary y this is Smooth-AP (Brown et al., ECCV 2020) exactly; a candidate counts as a
  positive in proportion to its soft label, both where it is ranked (the sum over j) and where it
  sits above another one (rank+).

  Loss: the anchors' 1 - AP weighted by the teacher's objectness (background and other
  no-object anchors drop out), plus an optional image-level term:
      L_dense = sum_i o~_i (1 - AP_i) / sum_i o~_i                                         (L1)
      L       = w_dense L_dense + w_global NT-Xent(pooled views)                           (L)

What we could read. The official code (github.com/KID-7391/CoTAP) was not reachable from here and
only the abstract and third-party summaries of the paper were: they fix the ingredients above
(teacher similarity maps as soft labels for the student, AP extended to continuous targets,
patches represented by learnable prototypes via cross-attention) but not every formula. So (F1)'s
explicit no-object slot and threshold delta, the soft label y = clip(<r~_i, r~_j>, 0, 1) and the
objectness weighting of (L1) are this implementation's reading, not the paper's verbatim
equations. The optional image-level term of (L) stands in for the image-level self-distillation
base the paper builds on (student / EMA teacher on ViTs): SimCLR's NT-Xent with SimCLR's
projection head (``global_weight`` > 0; with it pretrain/cotap is pretrain/simclr plus the dense
terms). Its default weight is 0, chosen on the val split of the CPU check (cotap.yaml): at that
budget the image-level term lowered the segmentation probe's val mIoU (0.074 against 0.092 without
it). Both views still get SimCLR's augmentation.

CPU scale (marked in cotap.yaml): the EMA teacher is kept (one extra forward without gradient)
but with a faster momentum for runs of ~100 steps; anchors and candidates are a few
sampled patches per image rather than every patch, and the AP's outer sum runs over each
anchor's ``ap_positives`` highest soft labels (the rest have small y_ij and so little weight).

Views and determinism. The loader gives two views per image (random translation, flip); the
method adds SimCLR's crop and brightness/contrast (``augmented_views``). No geometry is needed:
correspondences come from the teacher's similarities, as in the paper. The patch positions are
drawn from ``view_generator(batch, global_step, salt)``, so ``training_step`` is a pure function of
(batch, step, parameters); the teacher (its BatchNorm on batch statistics without tracking, so
a forward changes no buffer) and the centre change only in ``on_after_step``. Labels are never read. Heads, filter and
teacher are the method's: only ``method.model`` is saved, with an untrained classification head.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.methods.base import Method
from classlab.methods.pretrain.simclr import ProjectionHead, augmented_views, nt_xent, view_generator
from classlab.methods.registry import register_method
from classlab.models.backbones import dense_features

PATCH_SALT = 0xC07A  # view_generator salt of the patch sampling (salt 0 draws the views)


# --- the object-aware filter -------------------------------------------------------------------

class ObjectAwareFilter(nn.Module):
    """Patches represented by K learnable unit prototypes through cross-attention, with a
    no-object slot at cosine ``threshold`` (equations F1-F3 of the module docstring)."""

    def __init__(self, dim: int, num_prototypes: int, threshold: float):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, dim) / dim ** 0.5)
        self.threshold = float(threshold)

    def forward(self, z: torch.Tensor, temperature: float, center: torch.Tensor | None = None):
        """``z`` (N, dim) -> (r (N, dim) filtered patches, o (N,) objectness, l (N, K) cosines)."""
        z = F.normalize(z, dim=-1)  # a zero output stays zero: every cosine 0
        p = F.normalize(self.prototypes, dim=-1)
        cos = z @ p.T  # l_ik = <z_i, p_k>
        null = torch.full_like(cos[:, :1], self.threshold)
        # (F1) objectness: the attention not taken by the no-object slot (logit delta)
        o = 1.0 - torch.softmax(torch.cat([null, cos], dim=1) / temperature, dim=1)[:, 0]
        # (F2) which object: softmax over the prototypes (teacher: centred by c)
        q = torch.softmax((cos - center if center is not None else cos) / temperature, dim=1)
        # (F3) the patch in the object-based space
        r = o[:, None] * (q @ p)
        return r, o, cos


class DenseBranch(nn.Module):
    """Projection MLP g on patch features, then the object-aware filter."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, num_prototypes: int, threshold: float):
        super().__init__()
        self.head = ProjectionHead(in_dim, out_dim, hidden)
        self.filter = ObjectAwareFilter(out_dim, num_prototypes, threshold)

    def forward(self, feats: torch.Tensor, temperature: float, center: torch.Tensor | None = None):
        return self.filter(self.head(feats), temperature, center)


# --- the continuous-target AP loss ----------------------------------------------------------

def continuous_ap(scores: torch.Tensor, targets: torch.Tensor, temperature: float,
                  positives: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """AP_i of each anchor (row) with soft labels ``targets`` in [0, 1] (equation AP), and the
    label mass sum_j y_ij over the candidates the outer sum ran on.

    ``scores``, ``targets``: (A, C). ``positives`` > 0 restricts the outer sum over j to each row's
    ``positives`` highest labels (the ranks still count every candidate); 0 keeps them all.
    """
    if temperature <= 0:
        raise ValueError(f"continuous_ap: temperature must be > 0, got {temperature}")
    scores = scores.float() if scores.dtype != torch.float64 else scores
    targets = targets.to(scores.dtype).clamp(0.0, 1.0)
    n_anchors, n_cand = scores.shape
    if 0 < positives < n_cand:
        cols = targets.topk(positives, dim=1).indices  # (A, m): the candidates j of the outer sum
    else:
        cols = torch.arange(n_cand, device=scores.device).expand(n_anchors, n_cand)
    s_j = scores.gather(1, cols)
    y_j = targets.gather(1, cols)
    # H(s_ik - s_ij) for every j of the outer sum and every candidate k: (A, m, C)
    step = torch.sigmoid((scores[:, None, :] - s_j[:, :, None]) / temperature)
    step = step.masked_fill(F.one_hot(cols, n_cand).bool(), 0.0)  # k != j
    rank = 1.0 + step.sum(-1)                                  # rank_ij
    rank_pos = y_j + (step * targets[:, None, :]).sum(-1)      # rank+_ij
    mass = y_j.sum(1)
    ap = (y_j * rank_pos / rank).sum(1) / mass.clamp_min(1e-12)  # (AP)
    return ap, mass


def cotap_loss(scores: torch.Tensor, targets: torch.Tensor, temperature: float,
               weights: torch.Tensor | None = None, positives: int = 0, min_mass: float = 1e-6) -> torch.Tensor:
    """(L1): sum_i w_i (1 - AP_i) / sum_i w_i; anchors without soft positives (label mass below
    ``min_mass``) carry no AP and are left out. 0 (in the graph) when no anchor is left."""
    ap, mass = continuous_ap(scores, targets, temperature, positives)
    w = torch.ones_like(ap) if weights is None else weights.to(ap.dtype).detach()
    w = w * (mass > min_mass).to(ap.dtype)
    total = w.sum()
    if total <= 0:
        return scores.sum() * 0.0
    return (w * (1.0 - ap)).sum() / total


def sample_positions(n: int, hw: int, per_image: int, gen: torch.Generator, device) -> torch.Tensor:
    """``per_image`` distinct positions in [0, hw) for each of ``n`` images (all where hw is smaller)."""
    k = min(per_image, hw)
    return torch.rand(n, hw, generator=gen, device=device).argsort(dim=1)[:, :k]


def gather_patches(fmap: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) map and (B, k) flat positions -> (B * k, D) patch features, image-major."""
    b, d = fmap.shape[:2]
    flat = fmap.flatten(2)  # (B, D, hw)
    return flat.gather(2, pos[:, None, :].expand(b, d, pos.shape[1])).transpose(1, 2).reshape(-1, d)


def _check_feature_map(model) -> None:
    """Refuse, naming ``backbone``, a model that ``dense_features`` has no feature map for."""
    backbone = getattr(model, "backbone", None)
    first = next((m for m in (backbone.modules() if backbone is not None else []) if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ConfigError(f"pretrain/cotap: backbone {type(backbone).__name__} has no feature map (dense_features "
                          f"needs a convolutional or patch-token backbone: convnet, resnet18, vit_tiny)")
    size = getattr(getattr(backbone, "patch_embed", None), "img_size", None) or (32, 32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = dense_features(model, torch.zeros(1, first.in_channels, *tuple(size)))
    except TypeError as err:
        raise ConfigError(f"pretrain/cotap: backbone has no feature map: {err}") from err
    finally:
        model.train(was_training)
    if out.dim() != 4:
        raise ConfigError(f"pretrain/cotap: backbone's dense_features gave shape {tuple(out.shape)}, not (B, D, h, w)")


@register_method("pretrain", "cotap")
class CoTAP(Method):
    """NT-Xent on pooled views plus the continuous-target AP loss on patch correspondences
    distilled from an EMA teacher, in the object-based space of a prototype filter."""

    num_views = 2
    head_trained = False

    POSITIVE = ("temperature", "ap_temperature", "filter_temperature", "teacher_temperature")

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        for key in self.POSITIVE:
            value = float(hp.get(key, 0.1))
            if not value > 0:
                raise ConfigError(f"pretrain/cotap: {key} must be > 0, got {value}")
        for key in ("ema_momentum", "center_momentum"):
            value = float(hp.get(key, 0.9))
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"pretrain/cotap: {key} must be in [0, 1], got {value}")
        for key in ("anchors_per_image", "candidates_per_image", "num_prototypes", "dense_dim"):
            if int(hp.get(key, 1)) < 1:
                raise ConfigError(f"pretrain/cotap: {key} must be >= 1, got {hp.get(key)}")
        if not -1.0 <= float(hp.get("filter_threshold", 0.0)) <= 1.0:
            raise ConfigError(f"pretrain/cotap: filter_threshold is a cosine, in [-1, 1]; got {hp.get('filter_threshold')}")
        _check_feature_map(model)
        self.temperature = float(hp.get("temperature", 0.5))
        self.ap_temperature = float(hp.get("ap_temperature", 0.05))
        self.filter_temperature = float(hp.get("filter_temperature", 0.1))
        self.teacher_temperature = float(hp.get("teacher_temperature", 0.05))
        self.ema_momentum = float(hp.get("ema_momentum", 0.99))
        self.center_momentum = float(hp.get("center_momentum", 0.9))
        self.anchors_per_image = int(hp.get("anchors_per_image", 2))
        self.candidates_per_image = int(hp.get("candidates_per_image", 4))
        self.ap_positives = int(hp.get("ap_positives", 32))
        self.global_weight = float(hp.get("global_weight", 1.0))
        self.dense_weight = float(hp.get("dense_weight", 1.0))
        dim = model.num_features
        self.projector = ProjectionHead(dim, int(hp.get("proj_dim", 128)), int(hp.get("proj_hidden", 0)))
        num_prototypes = int(hp.get("num_prototypes", 64))
        self.dense = DenseBranch(dim, int(hp.get("dense_dim", 64)), int(hp.get("dense_hidden", 0)) or dim,
                                 num_prototypes, float(hp.get("filter_threshold", 0.2)))
        # the EMA teacher: backbone and dense branch (the classification head rides along unused)
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.teacher_dense = copy.deepcopy(self.dense).requires_grad_(False)
        for m in list(self.teacher.modules()) + list(self.teacher_dense.modules()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False  # batch statistics, and a forward changes no buffer (pure step)
        self.register_buffer("center", torch.zeros(num_prototypes))

    def param_groups(self):
        # backbone, image-level projector, dense head and prototypes; not the teacher nor the
        # classification head (no labels)
        projector = list(self.projector.parameters()) if self.global_weight > 0 else []
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + projector + list(self.dense.parameters())}]

    def training_step(self, batch):
        v1, v2 = augmented_views(self, batch)[:2]
        n = len(v1)
        x = torch.cat([v1, v2])  # one pass: BatchNorm sees both views together
        fmap = dense_features(self.model, x)  # (2n, D, h, w)
        # (L) image-level term: SimCLR's NT-Xent on the pooled map of the two views (off at weight 0)
        global_loss = fmap.new_zeros(())
        if self.global_weight > 0:
            z = self.projector(fmap.mean(dim=(2, 3)))
            global_loss = nt_xent(z[:n], z[n:], self.temperature)

        gen = view_generator(batch, self.global_step, PATCH_SALT)
        hw = fmap.shape[2] * fmap.shape[3]
        pos_a = sample_positions(n, hw, self.anchors_per_image, gen, fmap.device)     # anchors: view 1
        pos_c = sample_positions(n, hw, self.candidates_per_image, gen, fmap.device)  # candidates: view 2
        # (F1-F3) student: filtered anchor and candidate patches
        r_a, _, _ = self.dense(gather_patches(fmap[:n], pos_a), self.filter_temperature)
        r_c, _, _ = self.dense(gather_patches(fmap[n:], pos_c), self.filter_temperature)
        with torch.no_grad():
            tmap = dense_features(self.teacher, x)
            t_a, o_a, cos_a = self.teacher_dense(gather_patches(tmap[:n], pos_a), self.teacher_temperature, self.center)
            t_c, _, cos_c = self.teacher_dense(gather_patches(tmap[n:], pos_c), self.teacher_temperature, self.center)
            targets = (t_a @ t_c.T).clamp(0.0, 1.0)  # (S) soft labels y_ij from the teacher
        scores = r_a.float() @ r_c.float().T  # (S) student scores s_ij
        # (AP), (L1): continuous-target AP, anchors weighted by the teacher's objectness
        dense_loss = cotap_loss(scores, targets, self.ap_temperature, o_a, self.ap_positives)
        loss = self.global_weight * global_loss + self.dense_weight * dense_loss
        logs = {"nt_xent": global_loss.detach(), "cotap": dense_loss.detach(), "objectness": o_a.mean(),
                "teacher_cos_mean": torch.cat([cos_a, cos_c]).mean(dim=0)}
        return loss, logs

    @torch.no_grad()
    def on_after_step(self, batch, logs):
        # teacher <- m teacher + (1 - m) student; buffers (BN running statistics) copied
        m = self.ema_momentum
        for student, teacher in ((self.model, self.teacher), (self.dense, self.teacher_dense)):
            for ps, pt in zip(student.parameters(), teacher.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1.0 - m)
            for bs, bt in zip(student.buffers(), teacher.buffers()):
                bt.copy_(bs)
        # DINO's centre of the teacher's prototype logits (F2)
        mean = logs["teacher_cos_mean"].to(self.center.dtype)
        self.center.mul_(self.center_momentum).add_(mean, alpha=1.0 - self.center_momentum)
