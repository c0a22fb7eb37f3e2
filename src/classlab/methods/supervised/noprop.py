"""NoProp-DT: T blocks, each trained on its own to denoise a noisy label embedding given the image.

Li, Teh, Pascanu, "NoProp: Training Neural Networks without Back-propagation or
Forward-propagation", arXiv:2503.24322, 2025 (the discrete-time variant, NoProp-DT).

Notation of the paper: time runs from noise to label. Class embeddings u_k (rows of W_embed);
z_0 ~ N(0, I) is pure noise and the fixed variational posterior is
    q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I),   abar_0 ~ 0 < abar_1 < ... < abar_T < 1,
here with a cosine schedule abar_t = cos^2(pi/2 (1 - t/T + s) / (1 + s)), s = 0.008.
Block t (t = 1..T) is u_hat_t(z_{t-1}, x): an image encoder (a small CNN) and a path for the noisy
embedding, joined by an MLP into class probabilities; its prediction of the clean embedding is
the probability-weighted mean of the class embeddings. The training loss (the paper's Eq. 8) is
    L = E_q(z_T|y)[-log softmax(W_out z_T + b_out)_y]                     (classifier)
      + KL(q(z_0 | y) || N(0, I))                                          (prior)
      + eta T/2 E_{t ~ U{1..T}} E_q(z_{t-1}|y) [(SNR(t) - SNR(t-1)) ||u_hat_t(z_{t-1}, x) - u_y||^2]
with SNR(t) = abar_t / (1 - abar_t). Here every block is trained on every batch, so the last term
is eta/2 sum_t (SNR(t) - SNR(t-1)) ||.||^2 (the expectation over t, times T). Each block's input
z_{t-1} is drawn from q and detached, and blocks share no parameters, so one backward of the sum
gives each block exactly the gradient of its own term: no gradient crosses blocks (tested). The
class embeddings and the classifier are shared (the embeddings fixed unless ``learn_embed``).

Inference runs the chain z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} (+ sqrt(c_t) eps), the mean
of the Gaussian q(z_t | z_{t-1}, y) with u_y replaced by the block's prediction:
    a_t = sqrt(abar_t) (1 - alpha_{t-1}) / (1 - abar_{t-1}),
    b_t = sqrt(alpha_{t-1}) (1 - abar_t) / (1 - abar_{t-1}),
    c_t = (1 - abar_t)(1 - alpha_{t-1}) / (1 - abar_{t-1}),   alpha_{t-1} = abar_{t-1} / abar_t,
and classifies z_T with the linear head. ``forward`` (evaluation) runs the deterministic mean chain
from z_0 = 0 (the prior's mean) with no noise, unless ``eval_noise``: then z_0 and the step noise
come from a generator seeded with 0, the same draws on every call.

The model the engine builds (``self.model``) is not trained and not used for prediction: NoProp's
blocks carry their own encoders (``evaluate_with_method``); only its input channel count is read.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method


def cosine_alpha_bar(T: int, s: float = 0.008) -> torch.Tensor:
    """abar_t for t = 0..T, increasing from 0 (pure noise) to just below 1 (the label embedding)."""
    t = torch.arange(T + 1, dtype=torch.float64)
    return torch.cos(math.pi / 2 * (1 - t / T + s) / (1 + s)).pow(2).clamp(0.0, 1.0)


def chain_coefficients(alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """a_t, b_t, c_t for t = 1..T (index t - 1) from abar_0..abar_T."""
    prev, cur = alpha_bar[:-1], alpha_bar[1:]
    alpha_prev = prev / cur                               # alpha_{t-1} = abar_{t-1} / abar_t
    a = cur.sqrt() * (1 - alpha_prev) / (1 - prev)
    b = alpha_prev.sqrt() * (1 - cur) / (1 - prev)
    c = (1 - cur) * (1 - alpha_prev) / (1 - prev)
    return a, b, c.clamp_min(0.0)


def image_encoder(in_chans: int, widths, hidden: int) -> nn.Sequential:
    """A block's image path: per width a 3x3 conv, GroupNorm, ReLU and 2x2 max-pool, then a
    2x2 average pool and a linear layer to ``hidden`` features."""
    layers, prev = [], in_chans
    for w in widths:
        layers += [nn.Conv2d(prev, w, 3, padding=1), nn.GroupNorm(1, w), nn.ReLU(), nn.MaxPool2d(2)]
        prev = w
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * prev, hidden), nn.ReLU()]
    return nn.Sequential(*layers)


class DenoiseBlock(nn.Module):
    """u_hat_t(z, x): a CNN on the image and an MLP on the noisy embedding, joined by an MLP into
    class logits. No BatchNorm, so a forward pass changes no state."""

    def __init__(self, in_chans: int, embed_dim: int, num_classes: int, widths, hidden: int):
        super().__init__()
        self.image = image_encoder(in_chans, widths, hidden)
        self.label = nn.Sequential(nn.Linear(embed_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.joint = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.image(x)

    def logits(self, h_x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.joint(torch.cat([h_x, self.label(z)], dim=1))


def block_shape(hp: dict, method: str) -> tuple[int, list[int], int]:
    """(T, block_widths, hidden) of a NoProp-shaped network, T checked (also by the schema)."""
    T = int(hp["T"])
    if T < 1:
        raise ValueError(f"supervised/{method}: T (number of blocks) must be >= 1, got {T}")
    return T, [int(w) for w in hp.get("block_widths", [16, 32])], int(hp.get("hidden", 128))


def _in_chans(model: nn.Module, default: int = 1) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return int(module.in_channels)
    return default


@register_method("supervised", "noprop")
class NoPropDT(Method):
    evaluate_with_method = True

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        self.T, widths, hidden = block_shape(hp, "noprop")
        dim = int(hp.get("embed_dim") or 0) or num_classes
        self.blocks = nn.ModuleList(DenoiseBlock(_in_chans(model), dim, num_classes, widths, hidden)
                                    for _ in range(self.T))
        embed = torch.empty(num_classes, dim)
        nn.init.orthogonal_(embed)  # unit-norm class embeddings, orthogonal where dim >= K
        self.embed = nn.Parameter(embed, requires_grad=bool(hp.get("learn_embed", False)))
        self.head = nn.Linear(dim, num_classes)
        alpha_bar = cosine_alpha_bar(self.T)
        snr = alpha_bar / (1 - alpha_bar)                 # SNR(t) = abar_t / (1 - abar_t)
        a, b, c = chain_coefficients(alpha_bar)
        self.register_buffer("alpha_bar", alpha_bar.float())
        self.register_buffer("snr_weight", (snr[1:] - snr[:-1]).float())   # SNR(t) - SNR(t-1), t = 1..T
        self.register_buffer("coef_a", a.float())
        self.register_buffer("coef_b", b.float())
        self.register_buffer("coef_c", c.float())
        for p in self.model.parameters():  # the engine's model is not part of NoProp
            p.requires_grad_(False)

    # --- what is trained: one parameter group per block, one for the shared embedding and head
    def param_groups(self) -> list[dict]:
        groups = [{"params": list(block.parameters())} for block in self.blocks]
        shared = [p for p in [self.embed, *self.head.parameters()] if p.requires_grad]
        return groups + [{"params": shared}]

    def _noisy(self, u: torch.Tensor, t: int) -> torch.Tensor:
        """A draw of z_t ~ q(z_t | y) = N(sqrt(abar_t) u_y, (1 - abar_t) I)."""
        ab = self.alpha_bar[t]
        return ab.sqrt() * u + (1 - ab).sqrt() * torch.randn_like(u)

    def block_loss(self, t: int, h_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """eta/2 (SNR(t) - SNR(t-1)) ||u_hat_t(z_{t-1}, x) - u_y||^2, batch mean, t = 1..T."""
        z_prev = self._noisy(u, t - 1).detach()            # the block's input carries no gradient
        probs = F.softmax(self.blocks[t - 1].logits(h_x, z_prev).float(), dim=1)
        u_hat = probs @ self.embed.float()                  # the predicted clean embedding
        eta = float(self.hparams["eta"])
        return 0.5 * eta * self.snr_weight[t - 1] * (u_hat - u).pow(2).sum(dim=1).mean()

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        u = self.embed[y].float()                           # u_y
        h = [block.encode(x) for block in self.blocks]
        denoise = [self.block_loss(t, h[t - 1], u) for t in range(1, self.T + 1)]
        # classifier: -log p(y | z_T), z_T ~ q(z_T | y)
        ce = F.cross_entropy(self.head(self._noisy(u, self.T)).float(), y)
        # KL(N(sqrt(abar_0) u, (1 - abar_0) I) || N(0, I)) = 1/2 (abar_0 |u|^2 + d (1 - abar_0) - d - d log(1 - abar_0))
        ab0, d = self.alpha_bar[0], u.shape[1]
        kl = 0.5 * (ab0 * u.pow(2).sum(dim=1) - d * ab0 - d * torch.log1p(-ab0)).mean()
        loss = ce + kl + torch.stack(denoise).sum()
        with torch.no_grad():  # the inference chain on the same image features: train accuracy, cheaply
            logits = self._chain([f.detach() for f in h], noise=False)
        return loss, {"logits": logits, "block_losses": torch.stack(denoise).detach()}

    def _chain(self, h: list[torch.Tensor], noise: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        n, d = h[0].shape[0], self.embed.shape[1]
        device = h[0].device
        if noise:
            z = torch.randn(n, d, generator=generator, device=device)
        else:
            z = torch.zeros(n, d, device=device)
        for t in range(1, self.T + 1):
            u_hat = F.softmax(self.blocks[t - 1].logits(h[t - 1], z).float(), dim=1) @ self.embed.float()
            # z_t = a_t u_hat_t(z_{t-1}, x) + b_t z_{t-1} (+ sqrt(c_t) eps)
            z = self.coef_a[t - 1] * u_hat + self.coef_b[t - 1] * z
            if noise:
                z = z + self.coef_c[t - 1].sqrt() * torch.randn(n, d, generator=generator, device=device)
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the inference chain (see the module docstring for which chain)."""
        h = [block.encode(x) for block in self.blocks]
        if self.hparams.get("eval_noise", False):
            generator = torch.Generator(device=x.device).manual_seed(0)
            return self._chain(h, noise=True, generator=generator)
        return self._chain(h, noise=False)
