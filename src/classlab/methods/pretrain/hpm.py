"""HPM: masked image modelling whose masks hide the patches a loss predictor expects to be hard.

Haochen Wang, Kaiyou Song, Junsong Fan, Yuxi Wang, Jin Xie and Zhaoxiang Zhang, "Hard Patches
Mining for Masked Image Modeling", CVPR 2023 (official code: github.com/Haochen-Wang409/HPM).

The model is MAE (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022), on
which HPM is built. An image is cut into L patches; a mask m in {0, 1}^L hides N = round(r L)
of them (r = ``mask_ratio``, 0.75). The encoder is ``method.model.backbone`` (a timm
VisionTransformer) run MAE-style on the L - N VISIBLE patches only: patch embedding, the
backbone's own positional embedding (added before the masked tokens are dropped), gather of the
visible tokens, the class token, the blocks and the final norm. MAE-style rather than SimMIM's
learnable mask token in the encoder because HPM is MAE plus a loss predictor (the paper's and
the repository's encoder sees no mask tokens), the saved backbone then never meets a token it
will not see when probed, and the encoder runs on a quarter of the tokens (cheaper on a CPU).
A small decoder on the method (``decoder_depth`` transformer blocks of width ``decoder_dim``,
with a shared mask token and fixed 2-D sin-cos positions) reconstructs every patch.

Reconstruction (MAE). With t_i the pixels of patch i, normalised per patch when
``norm_pix_loss`` (t_i <- (t_i - mean(t_i)) / sqrt(var(t_i) + 1e-6)), and x_hat_i the decoder's
prediction, the per-patch loss and the objective are

    l_i = mean_k (x_hat_ik - t_ik)^2,      L_rec = sum_i m_i l_i / sum_i m_i            (1)

(only the masked patches count).

Loss predictor (HPM). A second decoder branch of ``predictor_depth`` blocks on the same input
gives one score s_i per patch, trained on the stop-gradient losses of the masked patches with
the paper's relative objective: for masked i != j of one image,

    L_pred = -1/|V| sum_{(i,j) in V} [ 1(l_i > l_j) log sigma(s_i - s_j)
                                       + 1(l_i < l_j) log(1 - sigma(s_i - s_j)) ]        (2)

V the ordered pairs of masked patches of the same image with l_i != l_j: a binary
classification of which of two patches is harder, so only the ORDER of the losses is learnt, not
their values. The objective is L = L_rec + lambda L_pred (lambda = ``pred_loss_weight`` = 1 in
the paper); L_pred's gradient reaches the encoder too (the paper finds that part alone helps).

Mask generation, easy to hard. A copy of the encoder and predictor whose weights are an
exponential moving average of the trained ones (as the official code: ``ema_decay`` ramped to
``ema_decay_end`` over the first ``ema_ramp_frac`` of the run; ``ema_decay: 0`` reads the trained
weights themselves) scores every patch of the UNMASKED image. At training progress t / T a
fraction alpha_t of the N masked patches are the highest-scoring ones, the rest uniformly random
among the others:

    alpha_t = alpha_0 + (t / (T - 1)) (alpha_T - alpha_0)                                  (3)
    N_hard = floor(alpha_t N),   mask = top-N_hard(s)  U  random (N - N_hard) of the rest      (4)

alpha_0 = ``alpha_start`` = 0, alpha_T = ``alpha_end`` = 0.5 (the paper's defaults; the official
code ramps per epoch, here per step, t = ``global_step``, T the run's planned steps, read from the
loader in ``on_train_start``: epochs x batches per epoch).

``mim_random`` (config/methods/pretrain/mim_random.yaml) is this class with ``learn_loss: false``
and alpha_0 = alpha_T = 0: MAE's uniformly random masks, the same encoder, decoder, loss (1) and
budget; the predictor is neither built nor trained.

Determinism: every random draw (the random part of each mask) comes from
``view_generator(batch, global_step, salt)``, so ``training_step`` is a pure function of the
batch, the step and the parameters; the moving-average copy changes only in ``on_after_step`` and
is a submodule, so a resumed run is bit-identical. Only ``method.model`` is saved; its head is
left untrained (``head_trained = False``). Labels are never read.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError, check_hparams
from classlab.methods.base import Method
from classlab.methods.pretrain.simclr import view_generator
from classlab.methods.registry import register_method

MASK_SALT = 0x48504D  # "HPM": the view_generator salt of the masks' random draws


# --- the MAE pieces ----------------------------------------------------------------------------
def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions (MAE's decoder positions), (h w, dim), row-major: half of
    the channels encode the row, half the column, each as sin/cos of pos * 10000^(-k / (dim/4))."""
    if dim % 4:
        raise ConfigError(f"decoder_dim: {dim} must be a multiple of 4 (2-D sin-cos positions)")
    h, w = grid
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angle = pos[:, None] * omega[None, :]
        parts += [torch.sin(angle), torch.cos(angle)]
    return torch.cat(parts, dim=1).float()


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p p C), patches in the ViT's token order (row-major over the grid)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def patch_targets(x: torch.Tensor, p: int, norm_pix: bool) -> torch.Tensor:
    """The reconstruction targets t_i of eq. (1): each patch's pixels, normalised per patch when
    ``norm_pix`` (MAE's target: (t - mean) / sqrt(var + 1e-6), unbiased variance as MAE)."""
    t = patchify(x.float(), p)
    if norm_pix:
        t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    return t


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """The positions of the visible patches (mask False) of each row, ascending, (B, L - N)."""
    keep = int((~mask[0]).sum())
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible (0) first, in position order
    return order[:, :keep]


def encode(backbone: nn.Module, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """MAE's encoder on a timm VisionTransformer: patch embedding and the backbone's positional
    embedding (timm's ``_pos_embed``, which also prepends the class/register tokens), then only the
    patch tokens at ``keep`` (B, K) (all when None), then the blocks and the final norm.
    Returns (B, P + K, D), the P prefix tokens first."""
    tokens = backbone._pos_embed(backbone.patch_embed(x))  # positions are added per token: dropping after is MAE's order
    prefix = backbone.num_prefix_tokens
    if keep is not None:
        patches = tokens[:, prefix:]
        patches = torch.gather(patches, 1, keep[:, :, None].expand(-1, -1, patches.shape[-1]))
        tokens = torch.cat([tokens[:, :prefix], patches], dim=1)
    tokens = backbone.norm_pre(backbone.patch_drop(tokens))
    return backbone.norm(backbone.blocks(tokens))


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.Sequential:
    from timm.models.vision_transformer import Block

    return nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm) for _ in range(depth)])


class MIMHeads(nn.Module):
    """MAE's decoder (reconstructor) and HPM's loss predictor, sharing the embedding of the encoder's
    tokens into decoder width, the mask token and the fixed decoder positions (as the official code)."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch_dim: int, dim: int, depth: int, heads: int,
                 predictor_depth: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", sincos_2d(dim, grid)[None], persistent=False)
        self.decoder = _blocks(dim, depth, heads, mlp_ratio)
        self.decoder_norm = nn.LayerNorm(dim)
        self.decoder_pred = nn.Linear(dim, patch_dim)
        self.predictor = None
        if predictor_depth > 0:
            self.predictor = _blocks(dim, predictor_depth, heads, mlp_ratio)
            self.predictor_norm = nn.LayerNorm(dim)
            self.predictor_head = nn.Linear(dim, 1)  # one score s_i per patch (the official head's mean over pixels)
        for module in self.modules():  # MAE's initialisation of the decoder
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def sequence(self, latent: torch.Tensor, keep: torch.Tensor | None, prefix: int) -> torch.Tensor:
        """The decoder input: the prefix tokens, then all L positions (the visible patches' encodings
        back at their places, the mask token elsewhere), each patch position plus its sin-cos position."""
        z = self.embed(latent)
        b, d = z.shape[0], z.shape[-1]
        patches = z[:, prefix:]
        if keep is not None:
            full = self.mask_token.to(z.dtype).expand(b, self.pos.shape[1], d)
            patches = full.scatter(1, keep[:, :, None].expand(-1, -1, d), patches)
        return torch.cat([z[:, :prefix], patches + self.pos.to(z.dtype)], dim=1)

    def reconstruct(self, seq: torch.Tensor, prefix: int) -> torch.Tensor:
        """x_hat: (B, L, p p C)."""
        return self.decoder_pred(self.decoder_norm(self.decoder(seq)))[:, prefix:]

    def predict_loss(self, seq: torch.Tensor, prefix: int) -> torch.Tensor:
        """The loss predictor's scores s: (B, L)."""
        return self.predictor_head(self.predictor_norm(self.predictor(seq)))[:, prefix:, 0]


# --- the equations -----------------------------------------------------------------------------
def reconstruction_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (1): (L_rec, the per-patch losses l (B, L)); only masked patches (mask True) count."""
    per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)  # l_i = mean_k (x_hat_ik - t_ik)^2
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp(min=1), per_patch  # sum_i m_i l_i / sum_i m_i


def relative_loss(scores: torch.Tensor, losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. (2), HPM's relative objective: BCE on sigma(s_i - s_j) with label 1(l_i > l_j) over the
    ordered pairs of distinct masked patches of one image whose losses differ. ``losses`` are taken
    as given (the caller detaches them: the targets carry no gradient)."""
    s = scores.float()
    l = losses.float()
    diff = s[:, :, None] - s[:, None, :]  # d_ij = s_i - s_j
    both = mask[:, :, None] & mask[:, None, :]  # i and j masked (i == j never differs in l, so never counted)
    harder = (l[:, :, None] > l[:, None, :]) & both  # 1(l_i > l_j)
    easier = (l[:, :, None] < l[:, None, :]) & both  # 1(l_i < l_j)
    # -[1(l_i > l_j) log sigma(d_ij) + 1(l_i < l_j) log(1 - sigma(d_ij))], log(1 - sigma(d)) = log sigma(-d)
    terms = -(harder * F.logsigmoid(diff) + easier * F.logsigmoid(-diff))
    return terms.sum() / (harder | easier).sum().clamp(min=1)  # mean over V


def easy_to_hard_alpha(step: int, total_steps: int, alpha_start: float, alpha_end: float) -> float:
    """Eq. (3): alpha_t = alpha_0 + t / (T - 1) (alpha_T - alpha_0), alpha_0 at the first step and
    alpha_T at the last (held there past it)."""
    progress = 1.0 if total_steps <= 1 else min(max(step, 0) / (total_steps - 1), 1.0)
    return alpha_start + progress * (alpha_end - alpha_start)


def num_masked(mask_ratio: float, num_patches: int) -> int:
    """N = round(r L), the number of masked patches."""
    return int(round(mask_ratio * num_patches))


def select_mask(scores: torch.Tensor | None, batch: int, num_patches: int, n_mask: int, n_hard: int,
                gen: torch.Generator, device=None) -> torch.Tensor:
    """Eq. (4): a (B, L) boolean mask (True = masked) of exactly ``n_mask`` patches a row: the
    ``n_hard`` highest ``scores`` (predicted losses), then uniformly random ones among the rest.
    ``scores`` may be None when ``n_hard`` is 0 (MAE's uniform masks)."""
    device = device if device is not None else (scores.device if scores is not None else None)
    noise = torch.rand(batch, num_patches, generator=gen, device=gen.device).to(device)  # U(0, 1): random order
    if n_hard > 0:
        hard = torch.topk(scores.float(), n_hard, dim=1).indices  # the n_hard hardest predicted patches
        noise = noise.scatter(1, hard, 2.0)  # ranked above every random draw
    chosen = torch.topk(noise, n_mask, dim=1).indices
    return torch.zeros(batch, num_patches, dtype=torch.bool, device=device).scatter(1, chosen, True)


# --- the method --------------------------------------------------------------------------------
def _vit(backbone: nn.Module, method: str) -> None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(backbone, VisionTransformer):
        raise ConfigError(f"backbone: pretrain/{method} is masked image modelling on a ViT's patch tokens and needs "
                          f"the vit_tiny backbone, not a {type(backbone).__name__}")
    if getattr(backbone, "dynamic_img_size", False) or backbone.pos_embed is None:
        raise ConfigError(f"backbone: pretrain/{method} needs a ViT with a fixed grid and absolute positions")


@register_method("pretrain", "hpm")
class HPM(Method):
    """MAE with HPM's loss predictor and easy-to-hard hard-patch masks (see the module docstring)."""

    num_views = 1
    head_trained = False

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        problems = check_hparams("pretrain", self.name, self.hparams)  # types and ranges, each named
        if problems:
            raise ConfigError("; ".join(problems))
        hp = self.hparams
        backbone = model.backbone
        _vit(backbone, self.name)
        self.mask_ratio = float(hp["mask_ratio"])
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio: must lie in (0, 1), got {self.mask_ratio}")
        grid = tuple(int(g) for g in backbone.patch_embed.grid_size)
        self.patch = int(backbone.patch_embed.patch_size[0])
        self.num_patches = grid[0] * grid[1]
        self.n_mask = num_masked(self.mask_ratio, self.num_patches)
        if not 1 <= self.n_mask <= self.num_patches - 1:
            raise ConfigError(f"mask_ratio: {self.mask_ratio} masks {self.n_mask} of {self.num_patches} patches; at "
                              f"least one must be masked and one visible")
        self.learn_loss = bool(hp["learn_loss"])
        self.alpha_start, self.alpha_end = float(hp["alpha_start"]), float(hp["alpha_end"])
        if not self.learn_loss and max(self.alpha_start, self.alpha_end) > 0:
            key = "alpha_end" if self.alpha_end > 0 else "alpha_start"
            raise ConfigError(f"{key}: {hp[key]} masks patches by predicted loss, which needs learn_loss: true "
                              f"(an untrained predictor would choose them)")
        if int(hp["decoder_dim"]) % int(hp["decoder_heads"]):
            raise ConfigError(f"decoder_heads: {hp['decoder_heads']} must divide decoder_dim {hp['decoder_dim']}")
        self.norm_pix = bool(hp["norm_pix_loss"])
        self.pred_weight = float(hp["pred_loss_weight"])
        in_chans = int(backbone.patch_embed.proj.in_channels)
        self.heads = MIMHeads(int(backbone.embed_dim), grid, self.patch * self.patch * in_chans,
                              int(hp["decoder_dim"]), int(hp["decoder_depth"]), int(hp["decoder_heads"]),
                              int(hp["predictor_depth"]) if self.learn_loss else 0, float(hp["decoder_mlp_ratio"]))
        self.ema_decay, self.ema_decay_end = float(hp["ema_decay"]), float(hp["ema_decay_end"])
        self.ema_ramp = float(hp["ema_ramp_frac"])
        self.mines = self.learn_loss and max(self.alpha_start, self.alpha_end) > 0
        self.teacher = None
        if self.mines and self.ema_decay > 0:
            # the moving-average copy that scores the patches (eq. 4); never trained by gradient
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "heads": copy.deepcopy(self.heads)})
            self.teacher.requires_grad_(False)
        self.total_steps = 0  # T of eq. (3): set in on_train_start

    # --- what is trained -----------------------------------------------------------------
    def param_groups(self):
        # encoder and heads; no weight decay on biases, norms, positions and tokens (MAE, timm)
        decay, no_decay = [], []
        named = [(f"backbone.{n}", p) for n, p in self.model.backbone.named_parameters()] + \
                [(f"heads.{n}", p) for n, p in self.heads.named_parameters()]
        for name, p in named:
            if not p.requires_grad:
                continue
            flat = p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token", "mask_token"))
            (no_decay if flat else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # --- the schedule ----------------------------------------------------------------------
    def on_train_start(self, loader) -> None:
        # T: the planned optimizer steps of this run (the engine's own count: epochs x steps per epoch)
        self.total_steps = int(self.hparams["epochs"]) * len(loader) * max(int(self.hparams.get("online_iter", 1)), 1)

    def alpha(self, step: int) -> float:
        if self.alpha_start == self.alpha_end:
            return self.alpha_start
        if self.total_steps <= 0:
            raise RuntimeError(f"pretrain/{self.name}: the easy-to-hard schedule needs the run's length; the engine "
                               f"sets it in on_train_start(loader) (or set method.total_steps)")
        return easy_to_hard_alpha(step, self.total_steps, self.alpha_start, self.alpha_end)

    # --- one batch ---------------------------------------------------------------------------
    @torch.no_grad()
    def predicted_losses(self, x: torch.Tensor) -> torch.Tensor:
        """The scores s (B, L) of every patch of the unmasked images, by the moving-average copy."""
        backbone, heads = (self.teacher["backbone"], self.teacher["heads"]) if self.teacher is not None \
            else (self.model.backbone, self.heads)
        prefix = backbone.num_prefix_tokens
        return heads.predict_loss(heads.sequence(encode(backbone, x), None, prefix), prefix)

    def make_mask(self, batch: dict) -> tuple[torch.Tensor, float]:
        x = batch["x"]
        alpha = self.alpha(self.global_step) if self.mines else 0.0
        n_hard = int(math.floor(alpha * self.n_mask + 1e-9))  # eq. (4): N_hard = floor(alpha_t N)
        scores = self.predicted_losses(x) if n_hard > 0 else None
        gen = view_generator(batch, self.global_step, MASK_SALT)
        return select_mask(scores, len(x), self.num_patches, self.n_mask, n_hard, gen, x.device), alpha

    def training_step(self, batch):
        x = batch["x"]
        mask, alpha = self.make_mask(batch)
        keep = visible_indices(mask)
        backbone = self.model.backbone
        prefix = backbone.num_prefix_tokens
        seq = self.heads.sequence(encode(backbone, x, keep), keep, prefix)
        target = patch_targets(x, self.patch, self.norm_pix)
        rec, per_patch = reconstruction_loss(self.heads.reconstruct(seq, prefix), target, mask)  # eq. (1)
        loss = rec
        logs = {"rec_loss": rec.detach(), "alpha": torch.tensor(alpha)}
        if self.learn_loss:
            pred_loss = relative_loss(self.heads.predict_loss(seq, prefix), per_patch.detach(), mask)  # eq. (2)
            loss = rec + self.pred_weight * pred_loss  # L = L_rec + lambda L_pred
            logs["pred_loss"] = pred_loss.detach()
        return loss, logs

    @torch.no_grad()
    def on_after_step(self, batch, logs) -> None:
        if self.teacher is None:
            return
        # the moving average: theta' <- d theta' + (1 - d) theta, d ramped from ema_decay to ema_decay_end
        ramp = self.ema_ramp * max(self.total_steps, 1)
        progress = 1.0 if ramp <= 0 else min(self.global_step / ramp, 1.0)
        d = self.ema_decay + progress * (self.ema_decay_end - self.ema_decay)
        for online, avg in ((self.model.backbone, self.teacher["backbone"]), (self.heads, self.teacher["heads"])):
            for p, q in zip(online.parameters(), avg.parameters()):
                q.mul_(d).add_(p.detach(), alpha=1.0 - d)
