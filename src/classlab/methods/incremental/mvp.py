"""MVP: Mask and Visual Prompt tuning for online CIL on Si-Blurry task boundaries.

Jun-Yeong Moon, Keon-Hee Park, Jung Uk Kim, Gyeong-Moon Park, "Online Class Incremental Learning
on Stochastic Blurry Task Boundary via Mask and Visual Prompt Tuning", ICCV 2023.

Base (L2P/DualPrompt): a frozen pre-trained ViT; a shared g-prompt (blocks 0-1, 5 tokens) and a
pool of P e-prompts (blocks 2-4, 20 tokens each) with keys k_i. The query q(x) is the [CLS]
token of the frozen ViT without prompts (all blocks but the last); each instance picks the key
s(x) = argmin_i mu_i d(q, k_i), with d = 1 - cos and mu_i = n_i + 1 (n_i: how often key i was
picked). Prompts are deep prompt tokens (appended to the block's input and dropped after it).
On top of it, MVP adds:

- instance-wise logit masking: each key owns a learnable class mask M_i in R^C, and classes not
  exposed yet in the stream are removed,  z = (W f + b) * 2 sigmoid(M_{s(x)}) + B,  B_c = 0 if
  class c has been seen in the stream so far, else -inf;
- contrastive visual prompt tuning loss (CVPT): the query is pulled to its key and the keys are
  pushed apart, each scaled by the key's usage mu,
      L_CVPT = -1/B sum_b log( N_b / (exp(d(q_b, k_s)/mu_s) + N_b) ),
      N_b = 1/P sum_j exp(d(k_s, k_j)/mu_s),  s = s(x_b);
- gradient-similarity focal loss (GSF): with g_b = dl_b/dW_{y_b} (the sample's gradient on its
  class row of the head) and G_{y_b} = d(1/B sum l)/dW_{y_b} (the batch's), the ignorance
  score is  s_b = 1 - cos(g_b, G_{y_b}); samples whose gradient disagrees with the batch's
  (minor / new classes) get more weight; for gamma = 0 it is plain cross-entropy. Two
  reductions, chosen by ``focal_reduction``:
    ``sample`` (the paper's equation, our default):  L_GSF = 1/B sum_b ((1 - alpha) + alpha s_b^gamma) l_b
    ``batch``  (the official code, methods/mvp.py ``loss_fn``, which weights the batch-mean
               cross-entropy):  L_GSF = ((1 - alpha) + alpha 1/B sum_b s_b^gamma) * (1/B sum_b l_b)
  The two agree when every s_b is equal; ``batch`` no longer gives a hard sample more weight
  than an easy one, it scales the whole batch's loss by its mean ignorance;
- adaptive feature scaling (AFS): the feature entering the loss is divided by
  c_b = 1 - cos(W_{y_b}, f_b) + margin (no gradient through c_b), which damps the logits of
  samples already close to their class weight and so limits the over-confidence of major classes;

    L = L_GSF( z(f / c) ) + L_CVPT.

Simplified here (and why):
- the per-sample gradients g_b and G_c are taken in closed form for the linear head,
  dl_b/dW_c = (p_bc - 1[c = y_b]) m_bc f_b, instead of one backward per sample;
- L_CVPT is averaged per instance (the public code averages numerator and denominator over the
  batch inside the log);
- selection size 1; no exemplar memory (the paper's MVP without "-R");
- online_iter (3 updates per incoming batch in the paper) is the engine's ``online_iter``: one
  pass over the stream (``epochs: 1``), each incoming batch trained on for 3 optimizer steps.

State and the engine's hooks: ``training_step`` is pure (a two-step optimizer calls it twice).
The classes of the incoming batch are exposed in ``on_before_step`` (the official code calls
``add_new_class`` before it trains on a batch); ``training_step`` masks with the exposed classes
and the batch's own labels, so it does not depend on that hook having run. The key-usage counts
n_i grow in ``on_after_step``, once per optimizer step, from the key choices that
``training_step`` returns in ``logs["picked"]``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.models.prompts import frozen_vit, prompt_layers, vit_forward
from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner


def masked_logits(raw: torch.Tensor, class_mask: torch.Tensor | None, exposed: torch.Tensor) -> torch.Tensor:
    """Instance-wise logit masking: z = raw * 2 sigmoid(M_s) (if ``class_mask`` is given), and -inf for
    the classes not exposed yet in the stream."""
    z = raw * (2.0 * torch.sigmoid(class_mask)) if class_mask is not None else raw
    return z.masked_fill(~exposed, float("-inf"))


def gsf_weights(feats: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, class_mask: torch.Tensor | None,
                alpha: float, gamma: float) -> torch.Tensor:
    """(1 - alpha) + alpha * s^gamma with s_b = 1 - cos(g_b, G_{y_b}) (closed-form head gradients)."""
    with torch.no_grad():
        p = torch.softmax(logits.float(), dim=1)
        m = 2.0 * torch.sigmoid(class_mask) if class_mask is not None else torch.ones_like(p)
        coef = (p - F.one_hot(y, p.shape[1]).float()) * m        # dl_b/dz'_bc * dz_bc/dz'_bc
        rows = torch.arange(len(y), device=y.device)
        g = coef[rows, y][:, None] * feats.float()                 # g_b = dl_b/dW_{y_b}
        big_g = (coef.t() @ feats.float()) / len(y)                # G_c = d(1/B sum l)/dW_c
        s = 1.0 - F.cosine_similarity(g, big_g[y], dim=1)
        return (1.0 - alpha) + alpha * s.clamp_min(0) ** gamma


def gsf_loss(ce: torch.Tensor, weights: torch.Tensor, reduction: str = "sample") -> torch.Tensor:
    """The gradient-similarity focal loss from per-sample cross-entropies ``ce`` and focal weights
    ``weights`` = (1 - alpha) + alpha s^gamma (``gsf_weights``).

    sample: 1/B sum_b w_b l_b                    (the paper's equation)
    batch:  (1/B sum_b w_b) (1/B sum_b l_b)      (the official code: the weights scale the batch-mean CE)
    """
    if reduction == "sample":
        return (weights * ce).mean()
    if reduction == "batch":
        return weights.mean() * ce.mean()
    raise ValueError(f"focal_reduction must be 'sample' or 'batch', got {reduction!r}")


def cvpt_loss(query: torch.Tensor, keys: torch.Tensor, picked: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """-1/B sum_b log( N_b / (exp(d(q_b, k_s)/mu_s) + N_b) ),  N_b = mean_j exp(d(k_s, k_j)/mu_s)."""
    qn, kn = F.normalize(query, dim=1), F.normalize(keys, dim=1)
    mu = mass[picked]
    pos = (1.0 - (qn * kn[picked]).sum(1)) / mu                    # d(q, k_s) / mu_s
    neg = torch.exp((1.0 - kn[picked] @ kn.t()) / mu[:, None]).mean(1)
    return -torch.log(neg / (torch.exp(pos) + neg) + 1e-6).mean()


@register_method("incremental", "mvp")
class MVP(IncrementalLearner):
    """Frozen ViT + g-prompt + e-prompt pool with keys and per-key class masks; GSF + AFS + CVPT losses."""


    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        vit = frozen_vit(model)
        depth, dim = len(vit.blocks), vit.embed_dim
        self.g_layers, self.e_layers = prompt_layers(hparams, depth)
        self.g_len, self.e_len = int(hparams.get("g_length", 5)), int(hparams.get("e_length", 20))
        pool = int(hparams.get("pool_size", 10))
        # as in the public code: prompts and keys N(0, 1), masks -1 (2 sigmoid(-1) = 0.54)
        self.g_prompt = nn.Parameter(torch.randn(len(self.g_layers), self.g_len, dim))
        self.e_prompt = nn.Parameter(torch.randn(pool, len(self.e_layers), self.e_len, dim))
        self.key = nn.Parameter(torch.randn(pool, dim))
        self.class_mask = nn.Parameter(torch.full((pool, num_classes), -1.0))
        self.register_buffer("count", torch.zeros(pool))
        self.register_buffer("exposed", torch.zeros(num_classes, dtype=torch.bool))

    def param_groups(self) -> list[dict]:
        params = [self.g_prompt, self.e_prompt, self.key, self.class_mask, *self.model.head.parameters()]
        return [{"params": [p for p in params if p.numel()]}]

    # --- prompt selection and the prompted backbone ---------------------------------------
    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.model.backbone
        depth = len(vit.blocks) if self.hparams.get("query_last_layer", False) else len(vit.blocks) - 1
        return vit_forward(vit, x, depth=max(depth, 1))[:, 0]

    def mass(self) -> torch.Tensor:
        return self.count + 1.0 if self.hparams.get("use_contrastive", True) else torch.ones_like(self.count)

    def select(self, q: torch.Tensor) -> torch.Tensor:
        """s(x) = argmin_i mu_i (1 - cos(q, k_i))."""
        dist = 1.0 - F.cosine_similarity(q[:, None, :], self.key[None, :, :], dim=-1)
        return (dist * self.mass()[None, :]).argmin(dim=1)

    def prompted_features(self, x: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        tokens: dict[int, torch.Tensor] = {}
        for j, layer in enumerate(self.g_layers):
            tokens[layer] = self.g_prompt[j].unsqueeze(0).expand(b, -1, -1)
        for j, layer in enumerate(self.e_layers):
            e = self.e_prompt[picked, j]
            tokens[layer] = torch.cat([tokens[layer], e], 1) if layer in tokens else e
        return vit_forward(self.model.backbone, x, tokens=tokens)

    def _class_mask(self, picked: torch.Tensor) -> torch.Tensor | None:
        return self.class_mask[picked] if self.hparams.get("use_mask", True) else None

    def _exposed(self) -> torch.Tensor:
        return self.exposed if bool(self.exposed.any()) else torch.ones_like(self.exposed)

    def _exposed_with(self, y: torch.Tensor) -> torch.Tensor:
        """The classes exposed so far together with the batch's own (pure: the buffer is not touched)."""
        return self.exposed | torch.bincount(y, minlength=len(self.exposed)).bool()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.prompted_features(x, self.select(self.query(x)))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        picked = self.select(self.query(x))
        f = self.prompted_features(x, picked)
        return masked_logits(self.model.head(f), self._class_mask(picked), self._exposed())

    # --- one online batch -----------------------------------------------------------------
    def on_before_step(self, batch) -> None:
        super().on_before_step(batch)  # the learner's seen classes (online: the stream's exposed ones)
        # classes are exposed as their first sample arrives, before the model trains on it
        self.exposed[batch["y"]] = True

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        exposed = self._exposed_with(y)
        hp = self.hparams
        q = self.query(x)
        picked = self.select(q)
        mass = self.mass()
        if hp.get("use_contrastive", True):
            prompt_loss = cvpt_loss(q, self.key, picked, mass)
        else:                                        # L2P's pull: mean d(q, k_s)
            prompt_loss = (1.0 - F.cosine_similarity(q, self.key[picked], dim=1)).mean()
        f = self.prompted_features(x, picked)
        cmask = self._class_mask(picked)
        head = self.model.head
        if hp.get("use_afs", True):
            # AFS: f / (1 - cos(W_y, f) + margin), the scale without gradient
            with torch.no_grad():
                scale = 1.0 - F.cosine_similarity(head.weight[y], f, dim=1) + float(hp.get("margin", 0.5))
            logits = masked_logits(head(f / scale[:, None]), cmask, exposed)
        else:
            logits = masked_logits(head(f), cmask, exposed)
        ce = F.cross_entropy(logits, y, reduction="none")
        if hp.get("use_gsf", True):
            plain = masked_logits(head(f.detach()), cmask, exposed)
            weights = gsf_weights(f.detach(), plain.detach(), y, None if cmask is None else cmask.detach(),
                                  float(hp.get("alpha", 0.5)), float(hp.get("gamma", 2.0)))
            # L_GSF = 1/B sum ((1 - alpha) + alpha s^gamma) l   (or the batch-reduced form, see gsf_loss)
            loss = gsf_loss(ce, weights, str(hp.get("focal_reduction", "sample")))
        else:
            loss = ce.mean()
        # L = L_GSF + L_CVPT
        loss = loss + float(hp.get("prompt_loss_weight", 1.0)) * prompt_loss
        return loss, {"logits": logits.detach(), "picked": picked.detach()}

    def on_after_step(self, batch, logs) -> None:
        # once per optimizer step: the batch's classes stay exposed and each key's usage n_i grows
        self.exposed[batch["y"]] = True
        self.count += torch.bincount(logs["picked"], minlength=len(self.count)).to(self.count.dtype)
