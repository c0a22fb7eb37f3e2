"""Fishr: ERM + matching across domains the variances of the classifier head's per-sample gradients.

Rame, Dancette and Cord, "Fishr: Invariant Gradient Variances for Out-of-Distribution
Generalization", ICML 2022; as implemented in DomainBed (whose Fishr uses BackPACK; here the
per-sample gradients of the linear head are written out analytically).

For sample i with penultimate features f_i, logits z_i = W f_i + b, p_i = softmax(z_i) and
one-hot label y_i, the gradient of its own cross-entropy w.r.t. the head is
    dCE_i/dW = (p_i - y_i) f_i^T,     dCE_i/db = p_i - y_i.
Flattening both into g_i (K*d + K entries), domain e's gradient variance is per entry
    v_e = 1/n_e sum_{i in e} (g_i - gbar_e)^2,
smoothed by an exponential moving average across steps (DomainBed's, with the 1/(1 - ema)
correction so that the backpropagated amplitude does not depend on ema):
    m_e(t) = ema * m_e(t-1) + (1 - ema) * v_e(t),    vt_e = m_e(t) / (1 - ema),   m_e(-1) = 0,
    penalty = 1/E sum_e mean_k (vt_e - 1/E sum_e' vt_e')_k^2
(a mean over the entries, as DomainBed's ``l2_between_dicts``, not a sum), and
    L = CE over the batch + lambda(t) * penalty,
lambda(t) = 0 before ``penalty_anneal_iters`` steps and ``fishr_lambda`` after (DomainBed's Fishr
warms up with no penalty at all, unlike IRM and V-REx), Adam reset at the switch.

``training_step`` reads m(t-1) and the batch only (it is pure); m(t) leaves it, detached, in
``logs["fishr_ema"]`` and ``on_after_step`` stores it in the ``grad_var_ema`` buffer, so the EMA
advances once per optimizer step and is part of the checkpoint.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.shift.erm import AnnealedPenaltyERM


def per_sample_head_grads(features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, K*d + K]: per sample, d CE(z_i, y_i) / d(W, b) of a linear head z = W f + b, flattened
    as (W row-major, then b) -- the order of ``torch.cat([W.grad.flatten(), b.grad])``."""
    residual = logits.softmax(dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)  # p_i - y_i
    grad_w = residual.unsqueeze(2) * features.unsqueeze(1)  # (p_i - y_i) f_i^T: [N, K, d]
    return torch.cat([grad_w.flatten(1), residual], dim=1)


def gradient_variance(grads: torch.Tensor) -> torch.Tensor:
    """Per-entry variance over the rows (the biased 1/n form DomainBed uses)."""
    return (grads - grads.mean(0, keepdim=True)).pow(2).mean(0)


def fishr_penalty(variances: torch.Tensor) -> torch.Tensor:
    """[E, P] -> 1/E sum_e mean_k (v_e - mean_e v)_k^2."""
    return (variances - variances.mean(0, keepdim=True)).pow(2).mean(1).mean(0)


@register_method("shift", "fishr")
class Fishr(AnnealedPenaltyERM):
    lambda_key = "fishr_lambda"
    warmup_weight = 0.0

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        # m_e(t-1) per domain, [E, P]; empty until the first step (num_domains is set later)
        self.register_buffer("grad_var_ema", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "grad_var_ema")
        if stored is not None and stored.shape != self.grad_var_ema.shape:
            self.grad_var_ema = torch.zeros_like(stored, device=self.grad_var_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def penalty(self, batch):
        feats, logits = self.features_and_logits(batch["x"])
        nll = F.cross_entropy(logits, batch["y"])
        grads = per_sample_head_grads(feats.float(), logits.float(), batch["y"])
        variances = torch.stack([gradient_variance(g) for (g,) in self.split_by_domain(batch, grads)])
        ema = float(self.hparams["fishr_ema"])
        previous = self.grad_var_ema
        if previous.shape != variances.shape:  # the first step: m(-1) = 0
            previous = torch.zeros_like(variances)
        current = ema * previous.to(variances) + (1.0 - ema) * variances  # m(t)
        penalty = fishr_penalty(current / (1.0 - ema))
        return nll, penalty, logits, {"fishr_ema": current.detach()}

    def on_after_step(self, batch, logs):
        self.grad_var_ema = logs["fishr_ema"].detach().clone()
