"""Prompting a frozen timm VisionTransformer: prefix-tuning attention and a forward pass that
inserts prompts, shared by the prompt-based methods (OVOR, MVP, ...).

Prefix-tuning (Li & Liang, ACL 2021; as used by DualPrompt and OVOR): learnable key/value
prefixes P_K, P_V are prepended inside a block's attention,
    Attn(x) = softmax(Q [P_K; X W_K]^T / sqrt(d)) [P_V; X W_V].
With no prompts, ``vit_forward`` equals timm's own forward exactly.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn


def _check_vit(vit: nn.Module) -> None:
    from timm.models.vision_transformer import Block, VisionTransformer

    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"prompt methods need a timm VisionTransformer backbone (backbone: vit_tiny), "
                        f"got {type(vit).__name__}")
    if not all(type(b) is Block for b in vit.blocks):
        raise TypeError("prompt methods need timm's pre-norm Block in every layer")


def prefix_attention(attn: nn.Module, x: torch.Tensor, pk: torch.Tensor | None = None,
                     pv: torch.Tensor | None = None) -> torch.Tensor:
    """timm ``Attention`` with prefix-tuning: softmax(Q [P_K; K]^T / sqrt(d)) [P_V; V].

    ``pk``/``pv``: (B, L, C) prefixes in the embedding dimension, split into heads like K and V
    (they are not passed through W_K / W_V, as in the CODA-P/DualPrompt/OVOR code).
    """
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if pk is not None:
        # K' = [P_K ; X W_K],  V' = [P_V ; X W_V]  (per head)
        k = torch.cat([pk.reshape(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2), k], dim=2)
        v = torch.cat([pv.reshape(B, -1, attn.num_heads, attn.head_dim).transpose(1, 2), v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


def vit_forward(vit: nn.Module, x: torch.Tensor, prefixes: dict | None = None, tokens: dict | None = None,
                depth: int | None = None, pooled: bool = True) -> torch.Tensor:
    """A timm VisionTransformer forward with prompts.

    prefixes: {block index: (P_K, P_V)}, each (B, L, C): prefix-tuning of that block's attention.
    tokens:   {block index: (B, L, C)}: prompt-tuning; the tokens are appended to the sequence
              entering the block and dropped after it (deep prompts, as in L2P/MVP).
    depth:    run only the first ``depth`` blocks and return the token sequence (no final norm).
    With no prompts this is exactly ``vit(x)`` (``pooled``) or ``vit.forward_features(x)``.
    """
    prefixes, tokens = prefixes or {}, tokens or {}
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    n = h.shape[1]
    blocks = list(vit.blocks) if depth is None else list(vit.blocks)[:depth]
    for i, blk in enumerate(blocks):
        if i in tokens:
            h = torch.cat([h, tokens[i]], dim=1)
        if i in prefixes:
            pk, pv = prefixes[i]
            h = h + blk.drop_path1(blk.ls1(prefix_attention(blk.attn, blk.norm1(h), pk, pv)))
            h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
        else:
            h = blk(h)
        h = h[:, :n]
    if depth is not None:
        return h
    h = vit.norm(h)
    return vit.forward_head(h, pre_logits=True) if pooled else h


# --- virtual outliers (NPOS-style) and the VOR loss ----------------------------------------


def prompt_layers(hparams: dict, depth: int) -> tuple[list[int], list[int]]:
    """The blocks of the g-prompt (``g_layers``, default 0-1) and the e-prompts (``e_layers``,
    default 2-4), without the blocks a shallower ViT does not have."""
    g_layers = [i for i in hparams.get("g_layers", [0, 1]) if i < depth]
    e_layers = [i for i in hparams.get("e_layers", [2, 3, 4]) if i < depth]
    return g_layers, e_layers


def frozen_vit(model: nn.Module) -> nn.Module:
    """The classifier's timm ViT backbone, checked and frozen: prompt methods train only prompts
    and heads."""
    vit = model.backbone
    _check_vit(vit)
    vit.requires_grad_(False)
    return vit
