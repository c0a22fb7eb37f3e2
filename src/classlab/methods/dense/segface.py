"""SegFace: learnable class tokens decoded by a light two-way transformer, for long-tail classes.

Narayan, VS and Patel, "SegFace: Face Segmentation of Long-Tail Classes", AAAI 2025 (arXiv 2412.08647;
official code github.com/Kartik-3004/SegFace).

A per-pixel head scores every class with one static vector, fitted mostly to the pixels of the head
classes. SegFace gives each class (background included) a learnable token T_c that is decoded against
the image's fused features, so that each class has its own image-conditioned query. Here:

- Z (B, d, h, w): the backbone map projected by the shared decoder (``PixelDecoder.project``; SegFace
  fuses its multi-scale features with an MLP into the same kind of map), plus a random-Fourier
  positional encoding P (SAM's ``PositionEmbeddingRandom``) in the attention keys.
- A two-way transformer (SAM's, as SegFace uses it), ``segface_depth`` blocks of
      T <- LN(T + SelfAttn(T + T0))                    (the first block: T <- LN(SelfAttn(T)), no PE)
      T <- LN(T + CrossAttn(q = T + T0, k = Z + P, v = Z))          tokens read the image
      T <- LN(T + MLP(T))
      Z <- LN(Z + CrossAttn(q = Z + P, k = T + T0, v = T))          the image reads the tokens
  then a last token-to-image attention T <- LN(T + CrossAttn(T + T0, Z + P, Z)). T0 are the initial
  tokens (their own positional encoding); cross-attentions project to d / 2 (downsample rate 2).
- The refined Z is brought to full resolution by the shared decoder (``upsample_fuse``: SegFace's
  "upscaled face tokens"), giving E (B, d, H, W), and each class's mask logits are the dot product of
  its token, through a 3-layer MLP, with every pixel's embedding:

      m_c(i) = MLP(T_c) . E(i)          (B, C + 1, H, W)

- Loss, as the official ``train.py``: L = 0.5 L_CE + 0.5 L_Dice, with the Dice loss of the official
  ``DiceLoss`` on the softmax p over the whole batch, averaged over the C + 1 classes:
      L_Dice = (1 / K) sum_c [1 - (2 sum_i p_c(i) t_c(i) + s) / (sum_i p_c(i)^2 + sum_i t_c(i)^2 + s)],  s = 1e-5.

The paper's depth is 2 with 8 heads and an MLP 8x the width (256 / 2048); here the width is the
shared ``decoder_dim`` and heads / MLP ratio are ``segface_heads`` / ``segface_mlp_ratio``. SegFace trains
everything at 1e-4 (AdamW, a pretrained backbone); the family's shared rate is tuned for a convnet from
scratch (5e-3), at which the token decoder did not train (its first self-attention has no residual, as
SAM's, and collapsed the tokens), so the tokens, transformer and token MLP train at ``segface_lr_scale``
times the shared rate (``param_groups``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.methods.dense_segmenter import IGNORE_INDEX, PixelSegmenter
from classlab.methods.registry import register_method

DICE_SMOOTH = 1e-5  # the official DiceLoss's smoothing term


class Attention(nn.Module):
    """Multi-head attention whose queries, keys and values are projected to dim / downsample (SAM)."""

    def __init__(self, dim: int, heads: int, downsample: int = 1):
        super().__init__()
        self.inner = dim // downsample
        if self.inner % heads:
            raise ConfigError(f"segface_heads: {heads} heads do not divide the attention width {self.inner} "
                              f"(decoder_dim {dim} / {downsample})")
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, self.inner) for _ in range(3))
        self.out_proj = nn.Linear(self.inner, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.inner // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        # softmax(q k^T / sqrt(d_head)) v per head
        out = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.inner))


class TwoWayBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, first: bool):
        super().__init__()
        self.first = first  # SAM: the first block's self-attention takes no positional encoding, no residual
        self.self_attn = Attention(dim, heads)
        self.token_to_image = Attention(dim, heads, downsample=2)
        self.image_to_token = Attention(dim, heads, downsample=2)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.ReLU(inplace=True), nn.Linear(mlp_dim, dim))
        self.norm1, self.norm2, self.norm3, self.norm4 = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens, image, token_pe, image_pe):
        if self.first:
            tokens = self.norm1(self.self_attn(tokens, tokens, tokens))
        else:
            q = tokens + token_pe
            tokens = self.norm1(tokens + self.self_attn(q, q, tokens))
        tokens = self.norm2(tokens + self.token_to_image(tokens + token_pe, image + image_pe, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        image = self.norm4(image + self.image_to_token(image + image_pe, tokens + token_pe, tokens))
        return tokens, image


class TwoWayDecoder(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, depth: int):
        super().__init__()
        self.blocks = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, first=(i == 0)) for i in range(depth))
        self.final_attn = Attention(dim, heads, downsample=2)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, tokens, image, image_pe):
        token_pe = tokens
        for block in self.blocks:
            tokens, image = block(tokens, image, token_pe, image_pe)
        tokens = self.final_norm(tokens + self.final_attn(tokens + token_pe, image + image_pe, image))
        return tokens, image


class RandomFourierPosition(nn.Module):
    """P(u) = [sin(2 pi u G), cos(2 pi u G)], u the cell centre in [-1, 1]^2, G ~ N(0, 1) (2, d/2), fixed."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(2, dim // 2))

    def forward(self, h: int, w: int) -> torch.Tensor:
        ys = (torch.arange(h, device=self.frequencies.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=self.frequencies.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1) * 2 - 1  # (h, w, 2): (x, y)
        angles = 2 * math.pi * grid @ self.frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(h * w, -1)  # (hw, d)


def dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1/K) sum_c [1 - (2 sum p_c t_c + s) / (sum p_c^2 + sum t_c^2 + s)] over the batch's labelled pixels."""
    num_classes = probs.shape[1]
    labelled = target != IGNORE_INDEX
    flat = probs.permute(0, 2, 3, 1)[labelled]  # (N, K) labelled pixels
    labels = target[labelled]
    # t is one-hot, so sum_i p_c t_c = the sum of p_{y_i}(i) over the pixels of class c and sum_i t_c^2 = their
    # count: no (N, K) one-hot tensor is built
    intersection = torch.zeros(num_classes, dtype=probs.dtype, device=probs.device).index_add_(
        0, labels, flat.gather(1, labels.unsqueeze(1)).squeeze(1))
    target_mass = torch.bincount(labels, minlength=num_classes).to(probs.dtype)
    dice = (2 * intersection + DICE_SMOOTH) / ((flat * flat).sum(0) + target_mass + DICE_SMOOTH)
    return (1 - dice).mean()


@register_method("dense", "segface")
class SegFace(PixelSegmenter):
    def __init__(self, model: nn.Module, hparams: dict, num_classes: int,
                 image_shape: tuple[int, int, int] = (3, 84, 84)):
        super().__init__(model, hparams, num_classes, image_shape=image_shape)
        dim = self.decoder.dim
        if dim % 2:
            raise ConfigError(f"decoder_dim: segface needs an even width (sin and cos halves of the positional "
                              f"encoding, attention at width / 2), got {dim}")
        depth = int(self.hparams.get("segface_depth", 2))
        heads = int(self.hparams.get("segface_heads", 2))
        mlp_ratio = float(self.hparams.get("segface_mlp_ratio", 8))
        if depth < 1:
            raise ConfigError(f"segface_depth: >= 1 expected, got {depth}")
        if heads < 1:
            raise ConfigError(f"segface_heads: >= 1 expected, got {heads}")
        self.token_lr_scale = float(self.hparams.get("segface_lr_scale", 1.0))
        if self.token_lr_scale <= 0:
            raise ConfigError(f"segface_lr_scale: > 0 expected, got {self.token_lr_scale}")
        self.ce_weight = float(self.hparams.get("ce_weight", 0.5))
        self.dice_weight = float(self.hparams.get("dice_weight", 0.5))
        if self.ce_weight < 0 or self.dice_weight < 0 or self.ce_weight + self.dice_weight == 0:
            raise ConfigError(f"ce_weight / dice_weight: >= 0 and not both 0 expected, got "
                              f"{self.ce_weight} / {self.dice_weight}")
        # one learnable token per output channel, background first (nn.Embedding's N(0, 1) init, as SAM's)
        self.class_tokens = nn.Parameter(torch.randn(self.num_outputs, dim))
        self.position = RandomFourierPosition(dim)
        self.transformer = TwoWayDecoder(dim, heads, max(1, int(round(mlp_ratio * dim))), depth)
        # the hypernetwork MLP of SAM / SegFace: 3 linear layers, ReLU between
        self.token_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim),
                                       nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def token_decoder_parameters(self) -> list[nn.Parameter]:
        """The class tokens, the two-way transformer and the token MLP: what the per-pixel head does not have."""
        return [*self.transformer.parameters(), *self.token_mlp.parameters(), self.class_tokens]

    def param_groups(self) -> list[dict]:
        # the transformer trains at segface_lr_scale x the shared rate (as DETR-style decoders run at a lower
        # rate than a convnet trained from scratch: SegFace's own rate is 1e-4)
        token_ids = {id(p) for p in self.token_decoder_parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in token_ids]
        lr = float(self.hparams["lr"])
        return [{"params": rest}, {"params": self.token_decoder_parameters(), "lr": lr * self.token_lr_scale}]

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the decoded class tokens (B, C + 1, d), the pixel embeddings E (B, d, H, W))."""
        coarse = self.decoder.project(self.features(x))  # Z (B, d, h, w)
        b, d, h, w = coarse.shape
        image = coarse.flatten(2).transpose(1, 2)  # (B, hw, d)
        tokens = self.class_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens, image = self.transformer(tokens, image, self.position(h, w).unsqueeze(0))
        embeddings = self.decoder.upsample_fuse(image.transpose(1, 2).reshape(b, d, h, w), x)
        return tokens, embeddings

    def logits_from(self, x: torch.Tensor) -> torch.Tensor:
        tokens, embeddings = self.decode(x)
        # m_c(i) = MLP(T_c) . E(i)
        return torch.einsum("bkd,bdhw->bkhw", self.token_mlp(tokens), embeddings)

    def pixel_loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        log_probs = F.log_softmax(logits, dim=1)  # one softmax for both terms
        ce = F.nll_loss(log_probs, target, ignore_index=IGNORE_INDEX)
        dice = dice_loss(log_probs.exp(), target)
        # L = 0.5 L_CE + 0.5 L_Dice (official train.py)
        return self.ce_weight * ce + self.dice_weight * dice, {"ce": ce.detach(), "dice": dice.detach()}
