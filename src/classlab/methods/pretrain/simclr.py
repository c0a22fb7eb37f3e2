"""SimCLR: self-supervised contrastive pretraining on two augmented views, no labels.

Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020.

Each image gives two views x_{2k-1}, x_{2k}; the backbone f gives h = f(x) and a 2-layer MLP
projection head g gives z = g(h) = W2 ReLU(W1 h). With sim(u, v) = u.v / (|u| |v|), the NT-Xent
loss over the 2N views of a batch of N images is

    l(i, j) = -log  exp(sim(z_i, z_j) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau)
    L = 1/(2N) sum_k [ l(2k-1, 2k) + l(2k, 2k-1) ]

(the other 2(N-1) views are the negatives). The labels are never read. The projection head is
the method's, not the model's: ``train.py`` saves only ``method.model``, so the head is dropped
after pretraining, as in the paper (the representation h is what transfers). The model's
classification head is left untrained (``head_trained = False``), so fine-tuning starts a fresh
one.

Augmentation. The paper's strongest pair is random resized crop + colour distortion (jitter,
random grey), plus flips (and blur on ImageNet). The engine's loader gives each view an
independent random translation (``augment_pad``) and flip (``augment_hflip``); this method adds,
on each view in ``training_step``, a random resized crop (scale ``crop_scale_min``..1, aspect
3/4..4/3, bilinear resampling back to full size) and, with probability ``jitter_prob``, random
brightness and contrast of strength ``jitter_strength`` — the colour distortion reduced to what a
grey image has (no hue or saturation; random grey is the identity on grey images). No blur. Its
random draws come from a generator seeded by the step and the batch's sample positions, so
``training_step`` stays a pure function of the batch (a two-step optimizer re-evaluating it sees
the same views) and a resumed run draws the same views.

The helpers here (``ProjectionHead``, ``nt_xent``, ``contrastive_augment``, ``view_generator``)
are shared by the supervised family's contrastive methods (SupCon, SBCL, Core-tuning).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from classlab.data.loader import mix_seed
from classlab.methods.base import Method
from classlab.methods.registry import register_method


class ProjectionHead(nn.Sequential):
    """g(h) = W2 ReLU(W1 h): the paper's 2-layer MLP projection head (hidden width: the feature
    dimension unless ``hidden`` is given)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 0):
        hidden = hidden or in_dim
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def gram(z: torch.Tensor) -> torch.Tensor:
    """z z^T in at least float32, outside autocast (bf16 would blur similarities divided by a small tau)."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z if z.dtype == torch.float64 else z.float()
        return z @ z.T


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent of the paired views ``z1[k]`` <-> ``z2[k]`` (any scale: cosine similarity is used)."""
    z = torch.cat([z1, z2])
    z = F.normalize(z if z.dtype == torch.float64 else z.float(), dim=1)
    n = len(z1)
    logits = gram(z) / temperature  # sim(z_i, z_k) / tau
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    # l(i, j) = -log softmax_k(sim(z_i, z_k)/tau)[j], j = the other view of i; mean over the 2N anchors
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, partner)


def view_generator(batch: dict, step: int, salt: int = 0) -> torch.Generator:
    """A generator for a step's method-side augmentation: seeded by the step and the batch's sample
    positions, so the same batch at the same step always draws the same views."""
    index = batch["index"]
    seed = mix_seed(step, salt, int(index[0]), int(index[-1]), len(index))
    device = batch["x"].device
    return torch.Generator(device=device).manual_seed(seed)


def contrastive_augment(x: torch.Tensor, gen: torch.Generator, crop_scale_min: float = 0.2,
                        jitter_strength: float = 0.4, jitter_prob: float = 0.8) -> torch.Tensor:
    """Random resized crop, then random brightness/contrast, on a batch of normalised images."""
    n, _, h, w = x.shape
    dev, dt = x.device, x.dtype

    def uniform(lo, hi, size=(n,)):
        return lo + (hi - lo) * torch.rand(size, generator=gen, device=dev, dtype=dt)

    if crop_scale_min < 1.0:
        # area fraction s ~ U(smin, 1), aspect ratio r log-uniform in [3/4, 4/3]: the crop is
        # sqrt(s r) wide and sqrt(s / r) high (fractions of the image), placed uniformly inside it
        s = uniform(crop_scale_min, 1.0)
        r = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        cw = torch.sqrt(s * r).clamp(max=1.0)
        ch = torch.sqrt(s / r).clamp(max=1.0)
        cx = uniform(-1.0, 1.0) * (1.0 - cw)  # centre, in [-1, 1] grid units
        cy = uniform(-1.0, 1.0) * (1.0 - ch)
        theta = torch.zeros(n, 2, 3, device=dev, dtype=dt)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = cw, cx, ch, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if jitter_strength > 0 and jitter_prob > 0:
        apply = (torch.rand(n, generator=gen, device=dev, dtype=dt) < jitter_prob).to(dt)
        # contrast c scales the deviation from the image mean, brightness b shifts it (in units of
        # the normalised pixel scale); both identity where the jitter is not applied
        c = 1.0 + apply * uniform(-jitter_strength, jitter_strength)
        b = apply * uniform(-jitter_strength, jitter_strength)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c.view(n, 1, 1, 1) + mean + b.view(n, 1, 1, 1)
    return x


def augmented_views(method: Method, batch: dict) -> list[torch.Tensor]:
    """The batch's views with the method-side augmentation (``method_augment``) applied to each."""
    hp = method.hparams
    views = batch.get("views") or [batch["x"]]
    if not hp.get("method_augment", True):
        return list(views)
    gen = view_generator(batch, method.global_step)
    return [contrastive_augment(v, gen, float(hp.get("crop_scale_min", 0.2)), float(hp.get("jitter_strength", 0.4)),
                                float(hp.get("jitter_prob", 0.8))) for v in views]


@register_method("pretrain", "simclr")
class SimCLR(Method):
    """NT-Xent on two views through a projection head the method holds (dropped after pretraining)."""

    num_views = 2
    head_trained = False

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.temperature = float(hparams.get("temperature", 0.5))
        if self.temperature <= 0:
            raise ValueError(f"pretrain/simclr: temperature must be > 0, got {self.temperature}")
        self.projector = ProjectionHead(model.num_features, int(hparams.get("proj_dim", 128)),
                                        int(hparams.get("proj_hidden", 0)))

    def param_groups(self):
        # the backbone and the projection head; the classification head is not used (no labels)
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + list(self.projector.parameters())}]

    def training_step(self, batch):
        v1, v2 = augmented_views(self, batch)[:2]
        h = self.model.features(torch.cat([v1, v2]))  # one pass: BatchNorm sees both views together
        z = self.projector(h)
        n = len(v1)
        loss = nt_xent(z[:n], z[n:], self.temperature)
        return loss, {"nt_xent": loss.detach()}
