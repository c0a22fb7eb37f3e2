"""Prompt-CAM: class-specific prompts in a frozen ViT, and their last-layer attention as saliency.

Chowdhury et al., "Prompt-CAM: Making Vision Transformers Interpretable for Fine-Grained
Analysis", CVPR 2025 (arXiv 2501.09333); official code github.com/Imageomics/Prompt_CAM
(``model/vpt.py``, ``model/vision_transformer.py``, ``model/attention.py``, ``experiment/build_model.py``,
``utils/visual_utils.py``, read at commit 7722fc2 for the details below).

Model (the released code's default, ``train_type: prompt_cam`` with ``vpt_mode: null``; our
``prompt_mode: deep``). The ViT f is frozen. For each block l = 1..L there are C learnable prompt
tokens P^l in R^{C x D}, C the number of classes. Before block l, the block's own prompts are put
in front of the running sequence:

    [z_1^l .. z_C^l, cls, x_1 .. x_N] = Block_l([P^l, cls^{l-1}, X^{l-1}])

and after every block but the last, the C prompt outputs are dropped (block l+1 gets fresh
prompts P^{l+1}). After the last block the prompt outputs z_c^L are kept. The released code puts
the prompts in front of the class token; since the blocks have no attention mask and every other
operation is per token, the token order changes nothing beyond a permutation. A shared scoring
head (one Linear(D, 1), the same for every class) scores each prompt's output after the
backbone's final LayerNorm:

    s_c(x) = w^T LN(z_c^L) + b,        logits = (s_1 .. s_C),        L = CE(logits, y)

so the class-c prompt must attend to what distinguishes class c. Only P and (w, b) are trained
(``TUNE_MODULES = ['vpt', 'head']``); the backbone, its final norm included, is frozen. Prompts
are initialised xavier-uniform as in VPT, U(-a, a) with a = sqrt(6 / (3 p^2 + D)) for p x p
patches, and pass through dropout (``vpt_dropout`` 0.1) when training. ``prompt_mode: shallow``
(the paper's Prompt-CAM-Shallow variant; the released code's shallow branch cannot run with
``train_type: prompt_cam``) instead puts one set of C prompts in front of the input sequence and
carries them through every block. The C prompts of a block attend to each other (no mask), as
in the released code.

Differences from the released code: the frozen backbone is kept in eval mode (their model.train()
also runs the backbone's drop-path, rate 0.1, while only prompts and head learn), so the only
randomness in training is the prompt dropout. The greedy head ranking ("traits": blurring one head
at a time) is not implemented. For the model-randomisation check the prompts are a module
(``ClassPrompts``) whose ``reset_parameters`` redraws their init, so the cascade's first step
("head": the scoring head and the prompts) turns the model back into an untrained Prompt-CAM.

Saliency (``utils/visual_utils.py``): the post-softmax attention of the LAST block, row = the query
of prompt c, columns = the patch keys (prompts and class token dropped), per head:

    A^h = softmax(q^h k^{hT} * d_h^{-1/2})   (B, heads, T, T),    M_c^h = A^h[c, patches] -> (h, w)

The paper keeps each head's map (a "trait"); ``attention_maps`` returns them per head and
``attribute`` averages them over heads. A row of A sums to 1 over all T keys, so each map sums to at
most 1 over the patches. The weights are recomputed here from the block's fused qkv projection (with
its q/k norms), not read from timm internals.
"""
from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method
from classlab.methods.saliency_method import INPUT, check_classes, untouched, upsample

PROMPT_MODES = ("deep", "shallow")


def attention_weights(attn: nn.Module, u: torch.Tensor) -> torch.Tensor:
    """Post-softmax attention (B, heads, T, T) of a timm ``Attention`` module on its input ``u``
    (B, T, D), i.e. the block's ``norm1`` output: A = softmax(q k^T * scale), q and k from the fused
    qkv projection, after the module's q_norm / k_norm."""
    for name in ("qkv", "num_heads", "head_dim", "scale"):
        if not hasattr(attn, name):
            raise TypeError(f"Prompt-CAM reads timm's Attention (fused qkv, num_heads, head_dim, scale); "
                            f"{type(attn).__name__} has no {name!r}")
    b, t, _ = u.shape
    qkv = attn.qkv(u).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def attention_output(attn: nn.Module, u: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """What the ``Attention`` module returns (eval mode) for attention ``weights`` on input ``u``:
    proj(norm(concat_h A^h v^h)) (times the sigmoid gate where the module has one). Used to check that
    ``attention_weights`` are the module's own."""
    b, t, _ = u.shape
    v = attn.qkv(u).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)[2]
    out = (weights @ v).transpose(1, 2).reshape(b, t, attn.num_heads * attn.head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(u).sigmoid()
    return attn.proj(out)


class ClassPrompts(nn.Module):
    """The prompt tokens, (layers, C, D): one set of C per prompted block. ``reset_parameters`` draws
    VPT's xavier-uniform init U(-a, a), a = sqrt(6 / (3 p_h p_w + D)) (their ``val``), so the
    model-randomisation check re-initialises the prompts as a fresh run would."""

    def __init__(self, layers: int, num_classes: int, dim: int, patch_size: tuple[int, int]):
        super().__init__()
        self.bound = math.sqrt(6.0 / (3 * patch_size[0] * patch_size[1] + dim))
        self.embeddings = nn.Parameter(torch.empty(layers, num_classes, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.embeddings.uniform_(-self.bound, self.bound)

    def forward(self, layer: int) -> torch.Tensor:
        return self.embeddings[layer]


@register_method("explain", "promptcam")
class PromptCAM(Method):
    evaluate_with_method = True  # logits are the prompts' scores: evaluation calls method(x)
    head_trained = False         # the Classifier's linear head is unused (and left as it was)
    layered = False              # saliency interface: one map at the patch grid, layer "input"

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        vit = getattr(model, "backbone", None)
        if not isinstance(vit, timm.models.vision_transformer.VisionTransformer):
            raise ValueError(f"Prompt-CAM needs a ViT backbone (vit_tiny); got {type(vit).__name__}")
        mode = self.hparams.get("prompt_mode", "deep")
        if mode not in PROMPT_MODES:
            raise ValueError(f"promptcam prompt_mode: {mode!r} is not allowed; allowed values: {list(PROMPT_MODES)}")
        rate = float(self.hparams.get("prompt_dropout", 0.1))
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"promptcam prompt_dropout: {rate} must lie in [0, 1)")
        self.prompt_mode = mode
        for p in self.model.parameters():  # frozen: the ViT, its final norm, and the unused head
            p.requires_grad_(False)
        dim, depth = int(vit.embed_dim), len(vit.blocks)
        self.prompts = ClassPrompts(depth if mode == "deep" else 1, num_classes, dim, vit.patch_embed.patch_size)
        self.prompt_dropout = nn.Dropout(rate)
        self.score = nn.Linear(dim, 1)  # the shared scoring head: s_c = w^T LN(z_c^L) + b

    # --- training -------------------------------------------------------------------------
    def param_groups(self):
        return [{"params": [*self.prompts.parameters(), *self.score.parameters()]}]

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.eval()  # the frozen ViT never trains: no dropout or drop-path in it
        return self

    def training_step(self, batch):
        logits = self(batch["x"])
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}  # L = CE((s_1..s_C), y)

    # --- the prompted forward pass --------------------------------------------------------
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the final normed sequence (B, T, D) with the C prompt outputs first, the input of the last
        block (B, T, D) with the same token order)."""
        vit, c = self.model.backbone, self.num_classes
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))  # [cls, patches] + position
        batch = x.shape[0]
        last = len(vit.blocks) - 1
        for l, block in enumerate(vit.blocks):
            if self.prompt_mode == "deep" or l == 0:
                prompts = self.prompt_dropout(self.prompts(l if self.prompt_mode == "deep" else 0))
                tokens = torch.cat([prompts.expand(batch, -1, -1), tokens], dim=1)  # [P^l, cls, X^{l-1}]
            block_input = tokens
            tokens = block(tokens)
            if self.prompt_mode == "deep" and l < last:
                tokens = tokens[:, c:]  # deep: block l's prompt outputs are dropped, l+1 gets its own
        return vit.norm(tokens), block_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        final, _ = self._run(x)
        return self.score(final[:, :self.num_classes]).squeeze(-1)  # logits[c] = w^T LN(z_c^L) + b

    # --- saliency --------------------------------------------------------------------------
    def attention_maps(self, x: torch.Tensor, classes) -> torch.Tensor:
        """Per-head maps (B, heads, h, w): the last block's attention from prompt ``classes[b]`` to the
        patches, on the patch grid. No gradients; modes, flags and parameters are left as they were."""
        classes = check_classes(self, x, classes)  # ValueError naming the number of classes
        vit = self.model.backbone
        with untouched(self), torch.no_grad():  # eval mode: no prompt dropout
            _, block_input = self._run(x)
            block = vit.blocks[-1]
            weights = attention_weights(block.attn, block.norm1(block_input))  # (B, heads, T, T)
        # prompt c is the query at token c (prompts come first); the patch keys follow the prompts,
        # the class token and any register tokens
        first_patch = self.num_classes + int(vit.num_prefix_tokens)
        rows = weights[torch.arange(x.shape[0], device=x.device), :, classes]  # (B, heads, T)
        patches = rows[..., first_patch:]
        ph, pw = vit.patch_embed.patch_size
        h, w = x.shape[-2] // ph, x.shape[-1] // pw
        if patches.shape[-1] != h * w:
            raise ValueError(f"{patches.shape[-1]} patch tokens do not form the {h}x{w} grid of a "
                             f"{tuple(x.shape[-2:])} input with {ph}x{pw} patches")
        return patches.reshape(x.shape[0], patches.shape[1], h, w).float()

    def attribute(self, model: "PromptCAM", x: torch.Tensor, classes, layer: str | None = INPUT) -> torch.Tensor:
        """The saliency interface: (B, h, w), the head-average of ``model.attention_maps``; ``model``
        is a loaded PromptCAM (this one, or a copy such as the randomisation check's). Not layered:
        ``layer`` is None or "input"."""
        if not isinstance(model, PromptCAM):
            raise TypeError(f"promptcam explains a trained Prompt-CAM model (its model.pt through "
                            f"classlab.train.load_predictor), not a {type(model).__name__}")
        if layer not in (None, INPUT):
            raise ValueError(f"promptcam is not layered: its map is the last block's prompt attention; pass "
                             f"layer None or {INPUT!r}, not {layer!r}")
        return model.attention_maps(x, classes).mean(dim=1)  # mean over heads of M_c^h

    def explain(self, model: "PromptCAM", x: torch.Tensor, classes, layer: str | None = INPUT) -> torch.Tensor:
        """``attribute`` upsampled (bilinear, align_corners=False) to the input size: (B, H, W) float32."""
        return upsample(self.attribute(model, x, classes, layer), x.shape[-2:])
