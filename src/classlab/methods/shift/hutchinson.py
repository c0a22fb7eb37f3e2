"""Hutchinson: ERM + alignment across domains of the head's gradients and Hessian diagonals.

Hemati, Zhang, Estiri and Chen, "Understanding Hessian Alignment for Domain Generalization",
ICCV 2023, the second method (official code: huawei-noah/Federated-Learning,
HessianAlignment/domainbed/algorithms.py, class Hutchinson).

Hutchinson's estimator of a Hessian's diagonal: for Rademacher probes z (entries +-1 with
probability 1/2), E[z * (H z)] = diag(H), so with S probes
    D = 1/S sum_s z_s * (H z_s),    H z = grad_theta (g . z)   (one Hessian-vector product each).
With theta the linear head (W, b), D_e the estimate for domain e's risk R_e and g_e its gradient,
    L = Rbar + 1/E sum_e [ alpha ||D_e - sg(Dbar)||^2 + beta ||g_e - sg(gbar)||^2 ],
alpha = ``hessian_weight`` (official ``penalty_alpha``), beta = ``grad_weight`` (``penalty_beta``),
S = ``hutchinson_probes`` (the official 300), the references detached as in HGP (see ``hgp``).

Two choices of ours, each giving the same expectation as the official code:
- One set of probes per step, shared by every domain, drawn from a generator seeded by
  ``global_step`` (so ``training_step`` is pure: a second call, e.g. SAM's closure, sees the same
  probes). Then the estimate for the mean risk is exactly 1/E sum_e D_e, used as Dbar (the
  official code draws separate probes for Dbar, which only adds noise to the difference).
- H_e z for all probes at once in closed form. For a linear head under the cross-entropy, with
  u_i = (f_i, 1) and A_i = diag(p_i) - p_i p_i^T for each of the n_e samples of domain e,
      H_e = 1/n_e sum_i A_i (x) u_i u_i^T,   so   (H_e z)[K x (d+1)] = 1/n_e sum_i A_i Z u_i u_i^T
  with Z the probe reshaped to [K, d+1] (W's rows, then b as the last column). This is the
  autograd Hessian-vector product written out (a test checks the two agree), differentiable
  through p and f, and S times cheaper than S double-backward passes on a CPU.
``hutchinson_diagonal`` is the generic autograd estimator, for any loss and parameters.
"""
from __future__ import annotations

from typing import Sequence

import torch

from classlab.methods.registry import register_method
from classlab.methods.shift.hgp import HGP


def rademacher(num: int, dim: int, generator: torch.Generator, device=None, dtype=torch.float32) -> torch.Tensor:
    """[num, dim] of +-1, drawn on the generator's device and moved to ``device``."""
    signs = torch.randint(0, 2, (num, dim), generator=generator, device=generator.device)
    return (signs * 2 - 1).to(device=device, dtype=dtype)


def hutchinson_diagonal(loss: torch.Tensor, params: Sequence[torch.Tensor], probes: int,
                        generator: torch.Generator, create_graph: bool = True) -> tuple[torch.Tensor, ...]:
    """diag(H) of ``loss`` w.r.t. ``params`` estimated as 1/S sum_s z_s * (H z_s) with S = ``probes``
    Rademacher vectors from ``generator`` (over the flattened parameters, in order); one tensor per
    parameter, differentiable when ``create_graph``."""
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])
    z = rademacher(probes, flat_grad.numel(), generator, flat_grad.device, flat_grad.dtype)
    # H z_s = grad (g . z_s) for every probe: one batched vector-Jacobian product of g
    hz = torch.autograd.grad(flat_grad, params, grad_outputs=z, is_grads_batched=True,
                             create_graph=create_graph, retain_graph=True)
    diag = (z * torch.cat([h.reshape(probes, -1) for h in hz], dim=1)).mean(0)
    return tuple(d.view_as(p) for d, p in zip(diag.split([p.numel() for p in params]), params))


def ce_linear_head_hvp(features: torch.Tensor, logits: torch.Tensor, z_weight: torch.Tensor,
                       z_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H z of the mean cross-entropy w.r.t. a linear head (W [K, d], b [K]) for a batch of probes
    z = (z_weight [S, K, d], z_bias [S, K]): returns (H z)'s W part [S, K, d] and b part [S, K].
    ``logits`` must be ``features @ W^T + b``; labels do not enter the Hessian of the CE."""
    n, d = features.shape
    p = logits.softmax(dim=1)  # [n, K]
    u = torch.cat([features, features.new_ones(n, 1)], dim=1)  # u_i = (f_i, 1): [n, d+1]
    zt = torch.cat([z_weight, z_bias.unsqueeze(2)], dim=2)  # Z: [S, K, d+1]
    v = torch.einsum("skf,nf->snk", zt, u)  # Z u_i
    av = p * v - p * (p * v).sum(dim=2, keepdim=True)  # A_i Z u_i = p*v - p (p . v)
    hz = torch.einsum("snk,nf->skf", av, u) / n  # 1/n sum_i A_i Z u_i u_i^T
    return hz[..., :d], hz[..., d]


@register_method("shift", "hutchinson")
class Hutchinson(HGP):
    def probe_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(1_000_003 + int(self.global_step))

    def curvature(self, parts, grads, params):
        """C_e = D_e (Hutchinson's diag(H_e)), C_ref = 1/E sum_e D_e (the estimate for Rbar)."""
        weight = self.model.head.weight
        k, d = weight.shape
        probes = int(self.hparams["hutchinson_probes"])
        z = rademacher(probes, k * d + k, self.probe_generator(), weight.device)  # (W row-major, b), as flatten()
        z_weight, z_bias = z[:, :k * d].view(probes, k, d), z[:, k * d:]
        per_domain = []
        for feats, logits, _ in parts:
            hz_w, hz_b = ce_linear_head_hvp(feats.float(), logits.float(), z_weight, z_bias)
            # D_e = 1/S sum_s z_s * (H_e z_s), flattened in the parameters' order (W, b)
            diag = torch.cat([(z_weight * hz_w).mean(0).reshape(-1), (z_bias * hz_b).mean(0)])
            per_domain.append(diag)
        return per_domain, torch.stack(per_domain).mean(0).detach()
