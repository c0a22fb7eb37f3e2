"""HGP: ERM + alignment across domains of the classifier head's gradients and Hessian-gradient products.

Hemati, Zhang, Estiri and Chen, "Understanding Hessian Alignment for Domain Generalization",
ICCV 2023 (arXiv 2308.11778); official code: github.com/huawei-noah/Federated-Learning,
HessianAlignment/domainbed/algorithms.py (class HGP), written on top of DomainBed.

With theta the parameters of the linear head (W, b), R_e domain e's mean cross-entropy,
g_e = grad_theta R_e, H_e = hess_theta R_e, Rbar = 1/E sum_e R_e, gbar = grad_theta Rbar =
1/E sum_e g_e and Hbar its Hessian, the loss is
    L = Rbar + 1/E sum_e [ alpha ||H_e g_e - sg(Hbar gbar)||^2 + beta ||g_e - sg(gbar)||^2 ],
where sg is stop-gradient. What this follows from the official code, term by term:
- alpha (``hessian_weight``, the official ``penalty_alpha``) weighs the Hessian-gradient term and
  beta (``grad_weight``, the official ``penalty_beta``) the gradient term; defaults 1e-4 and 5e-3
  and search ranges 10^U(-5,-3) and 10^U(-3,-1) from the official hparams registry.
- The reference of the Hessian term is the Hessian-gradient product of the mean loss, Hbar gbar,
  not the mean of the H_e g_e; both references are detached. Nothing else is: H_e g_e and g_e
  keep their graph, so the penalty's gradient reaches the head and the featurizer through them
  (third-order terms included).
- The per-domain terms are averaged over domains (the official sum / number of domains).
- The official code forms H_e g_e as ||g_e|| * grad_theta ||g_e||; that is
  grad_theta (1/2 g_e . g_e) = H_e g_e, which is what ``hessian_gradient_product`` computes (same
  value, same derivative, without the 1e-16 the norm needs at g_e = 0).
- No anneal and no optimizer reset (the official HGP has none).
Where this differs: the official code runs the featurizer once per domain; here one forward pass
over the mixed batch (as ERM, so BatchNorm sees the mixed batch; DomainBed's MNIST network uses
GroupNorm, where the two are the same) and the outputs are split by domain.

``Hutchinson`` (the paper's second method) replaces H_e g_e by a Hutchinson estimate of diag(H_e).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.shift.erm import ERM


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def hessian_gradient_product_from_grads(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                                        create_graph: bool = True) -> tuple[torch.Tensor, ...]:
    """H g from g = grad_params(loss) built with create_graph: grad_params (1/2 g . g) = H g, g not
    detached (so with create_graph the result is differentiable through both factors)."""
    half_sq_norm = 0.5 * sum((g * g).sum() for g in grads)
    return torch.autograd.grad(half_sq_norm, list(params), create_graph=create_graph, retain_graph=True)


def hessian_gradient_product(loss: torch.Tensor, params: Sequence[torch.Tensor],
                             create_graph: bool = True) -> tuple[torch.Tensor, ...]:
    """H g of ``loss`` w.r.t. ``params`` (H its Hessian, g its gradient) by double backprop, one
    tensor per parameter; differentiable when ``create_graph``."""
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    return hessian_gradient_product_from_grads(grads, params, create_graph=create_graph)


@register_method("shift", "hgp")
class HGP(ERM):
    def head_params(self) -> list[torch.Tensor]:
        return list(self.model.head.parameters())

    def curvature(self, parts: list[tuple[torch.Tensor, ...]], grads: list[tuple[torch.Tensor, ...]],
                  params: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per domain, the flattened curvature term C_e, and its detached reference C_ref.
        HGP: C_e = H_e g_e, C_ref = Hbar gbar."""
        per_domain = [flatten(hessian_gradient_product_from_grads(g, params)) for g in grads]
        mean_grad = [torch.stack([g[i] for g in grads]).mean(0) for i in range(len(params))]  # gbar
        reference = flatten(hessian_gradient_product_from_grads(mean_grad, params, create_graph=False))
        return per_domain, reference.detach()

    def training_step(self, batch):
        feats, logits = self.features_and_logits(batch["x"])
        parts = self.split_by_domain(batch, feats, logits, batch["y"])
        params = self.head_params()
        risks = [F.cross_entropy(z, y) for _, z, y in parts]  # R_e
        grads = [torch.autograd.grad(r, params, create_graph=True) for r in risks]  # g_e
        nll = torch.stack(risks).mean()  # Rbar
        flat = [flatten(g) for g in grads]
        mean_grad = torch.stack(flat).mean(0).detach()  # sg(gbar)
        # 1/E sum_e ||g_e - sg(gbar)||^2
        grad_align = torch.stack([(g - mean_grad).pow(2).sum() for g in flat]).mean()
        curv, reference = self.curvature(parts, grads, params)
        # 1/E sum_e ||C_e - sg(C_ref)||^2
        curv_align = torch.stack([(c - reference).pow(2).sum() for c in curv]).mean()
        penalty = float(self.hparams["hessian_weight"]) * curv_align + float(self.hparams["grad_weight"]) * grad_align
        loss = nll + penalty
        return loss, {"logits": logits.detach(), "nll": nll.detach(), "penalty": penalty.detach(),
                      "grad_align": grad_align.detach(), "hessian_align": curv_align.detach()}
