"""LegoGCD: SimGCD plus Local Entropy Regularisation (LER) and a Dual-views KL constraint (DKL).

Cao, Zheng, Wang, Yu, Shen, Li, Lu and Tian, "Solving the Catastrophic Forgetting Problem in
Generalized Category Discovery", CVPR 2024 (official code: github.com/Cliffia123/LegoGCD).

SimGCD's mean-entropy regulariser pulls predictions towards the novel clusters, and the known
classes are partly forgotten. LegoGCD adds two terms to SimGCD (``classlab.methods.discovery.simgcd``),
with p = softmax(s / tau_s), tau_s = 0.1, the student's prediction over the K cosine prototypes:

LER (Sec. 3.3). Potential known samples are unlabelled samples predicted confidently as a known
class (Eqs. 6-8, per view):

    o_i = 1[m_i = 0] * 1[max_k p_ik >= delta] * 1[argmax_k p_ik in Y_l]

(m_i = 1 for a labelled sample; Y_l the label indices of the known classes). On them, an entropy
term with a margin (the "Margin-aware Pattern", Eq. 10) keeps the known classes' predictions sharp:

    L_LER = 1/B sum_i o_i * H( softmax(s_i / tau_o), s_i / tau_o - Delta ),  Delta_j = tau_ler log(1 / p~_j)

H(a, b) = -sum_k a_k log softmax(b)_k (the cross-entropy between the sharpened prediction and the
same logits shifted by the margin; with gradient through both, as in the official code, so it is
an entropy minimisation), tau_o = 0.05, tau_ler = 0.4, p~ an exponential moving average of the batch's
mean prediction (updated once per optimizer step, after it), B the number of rows of the batch (both
views; rows that are not selected count as zeros, as in the code's masked mean).

DKL (Sec. 3.4, Eq. 11): the two views of one image should give the same prediction,

    D_KL(p || p') = 1/(B/2) sum_i sum_k p_ik log(p_ik / p'_ik)

with p from the first view and p' from the second, detached (the paper's Algorithm 1). It enters the
unsupervised classification loss (Eq. 12), so it is weighted by (1 - lambda) with SimGCD's terms:

    L_cls = (1 - lambda)(L_cls_u - eps H(mean p) + D_KL) + lambda L_cls_s
    L     = alpha (L_rep + L_cls) + beta L_LER                               (Eq. 13, alpha = 1)

Differences from the official code, on purpose: its DKL applies ``log_softmax`` to probabilities
(a double softmax) and detaches neither view; here it is Eq. 11 as written, with Algorithm 1's
detach (``dkl_detach_second_view``). The prior p~ is the softmax of the raw cosine scores (the code's
temperature 1; ``ler_prior_temperature``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.discovery.simgcd import SimGCD
from classlab.methods.registry import register_method


def potential_known_mask(logits: torch.Tensor, labelled: torch.Tensor, num_known: int, threshold: float,
                         temperature: float) -> torch.Tensor:
    """o_i of Eq. 8: unlabelled, max_k softmax(s_i / tau)_k >= threshold, and argmax a known class (< num_known)."""
    p = F.softmax(logits.detach().float() / temperature, dim=1)
    confidence, cluster = p.max(dim=1)
    # o_i = 1[m_i = 0] * 1[s_i = 1] * 1[y_i in Y_l]
    return (~labelled) & (confidence >= threshold) & (cluster < num_known)


def local_entropy_regularisation(logits: torch.Tensor, labelled: torch.Tensor, num_known: int, prior: torch.Tensor,
                                 threshold: float, select_temperature: float = 0.1, entropy_temperature: float = 0.05,
                                 margin_weight: float = 0.4) -> tuple[torch.Tensor, torch.Tensor]:
    """L_LER of Eq. 10 over the rows of ``logits`` ([B, K] cosine scores, both views stacked); ``labelled``
    [B] bool; ``prior`` [K] the running mean prediction p~. Returns (loss, the selected rows o_i)."""
    selected = potential_known_mask(logits, labelled, num_known, threshold, select_temperature)
    sharp = logits.float() / entropy_temperature
    target = F.softmax(sharp, dim=1)
    # s / tau_o - Delta, Delta_j = tau_ler log(1 / p~_j) = -tau_ler log p~_j
    shifted = sharp + margin_weight * torch.log(prior.to(sharp).clamp_min(1e-12))
    per_row = -(target * F.log_softmax(shifted, dim=1)).sum(dim=1)
    # L_LER = 1/B sum_i o_i H(softmax(s_i / tau_o), s_i / tau_o - Delta)
    return (per_row * selected.float()).sum() / max(len(per_row), 1), selected


def dual_view_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float,
                 detach_b: bool = True) -> torch.Tensor:
    """Eq. 11: mean_i KL(p_i || p'_i), p = softmax(logits_a / tau), p' = softmax(logits_b / tau); zero for
    identical views, not symmetric (the paper's direction: the first view against the second)."""
    b = logits_b.detach() if detach_b else logits_b
    log_p = F.log_softmax(logits_a.float() / temperature, dim=1)
    log_q = F.log_softmax(b.float() / temperature, dim=1)
    # D_KL(p || p') = 1/(B/2) sum_i sum_k p_ik (log p_ik - log p'_ik)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def _check_range(name: str, value: float, low: float, high: float, low_open: bool = True, high_open: bool = False):
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if below or above:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"discovery/legogcd: {name} must be in {lo}{low}, {high}{hi}, got {value}")


@register_method("discovery", "legogcd")
class LegoGCD(SimGCD):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        self.ler_weight = float(hp.get("ler_weight", 2.0))
        self.ler_threshold = float(hp.get("ler_threshold", 0.85))
        self.ler_temperature = float(hp.get("ler_temperature", 0.05))
        self.ler_margin_weight = float(hp.get("ler_margin_weight", 0.4))
        self.ler_prior_momentum = float(hp.get("ler_prior_momentum", 0.999))
        self.ler_prior_temperature = float(hp.get("ler_prior_temperature", 1.0))
        self.dkl_weight = float(hp.get("dkl_weight", 1.0))
        self.dkl_detach = bool(hp.get("dkl_detach_second_view", True))
        _check_range("ler_threshold", self.ler_threshold, 0.0, 1.0)
        _check_range("ler_prior_momentum", self.ler_prior_momentum, 0.0, 1.0, low_open=False, high_open=True)
        for name in ("ler_weight", "ler_margin_weight", "dkl_weight"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"discovery/legogcd: {name} must be >= 0, got {getattr(self, name)}")
        for name in ("ler_temperature", "ler_prior_temperature"):
            if float(getattr(self, name)) <= 0:
                raise ValueError(f"discovery/legogcd: {name} must be > 0, got {getattr(self, name)}")
        # p~: the running mean prediction (uniform before the first step, as the code's initial q-hat)
        self.register_buffer("class_prior", torch.full((num_classes,), 1.0 / num_classes))

    def cluster_loss(self, logits, batch):
        """SimGCD's L_cls_u plus D_KL (Eq. 12: inside the (1 - lambda) factor)."""
        loss, logs = super().cluster_loss(logits, batch)
        dkl = dual_view_kl(logits[0], logits[1], self.tau_s, self.dkl_detach)
        logs["dkl"] = dkl.detach()
        return loss + self.dkl_weight * dkl, logs

    def extra_loss(self, logits, h, batch):
        """beta L_LER (Eq. 13), and the batch's mean prediction for the prior's update after the step."""
        rows = torch.cat(logits)
        labelled = (batch["y"] >= 0).repeat(len(logits))
        k = rows.shape[1]
        prior = self.class_prior[:k] / self.class_prior[:k].sum()
        ler, selected = local_entropy_regularisation(rows, labelled, int(self.task_info.num_label_indices), prior,
                                                     self.ler_threshold, self.tau_s, self.ler_temperature,
                                                     self.ler_margin_weight)
        batch_prior = F.softmax(rows.detach().float() / self.ler_prior_temperature, dim=1).mean(0)
        return self.ler_weight * ler, {"ler": ler.detach(), "ler_selected": selected.sum().detach(),
                                       "ler_batch_prior": batch_prior}

    def on_after_step(self, batch, logs) -> None:
        # p~ <- m p~ + (1 - m) mean_i p_i, once per optimizer step (training_step stays pure)
        batch_prior = logs.get("ler_batch_prior")
        if batch_prior is None:
            return
        k = len(batch_prior)
        m = self.ler_prior_momentum
        self.class_prior[:k] = m * self.class_prior[:k] + (1 - m) * batch_prior.to(self.class_prior)
