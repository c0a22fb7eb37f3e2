"""icl_gd: one linear self-attention layer trained in context vs one step of gradient descent.

Paper: J. von Oswald, E. Niklasson, E. Randazzo, J. Sacramento, A. Mordvintsev, A. Zhmoginov and
M. Vladymyrov, "Transformers Learn In-Context by Gradient Descent", ICML 2023 (PMLR 202).

Setting (the paper's Section 2-3). A task is a linear map w ~ N(0, I_d); its context holds N tokens
e_i = (x_i, y_i) with y_i = w.x_i, and the query token is e_{N+1} = (x_q, 0). A single linear
self-attention (LSA) layer, no softmax, no LayerNorm, with its residual connection, updates every
token j from the N context tokens (keys and values are the context only, as in the paper's
``include_query=False``):

    e_j <- e_j + (1/N) sum_{i=1..N} W_PV e_i (e_i^T W_KQ e_j)                       (LSA)

with the merged weights W_KQ = W_K^T W_Q and W_PV = P W_V ((d+1) x (d+1) each; the paper's separate
Q, K, V, P parametrisation computes the same family of functions). The prediction is read off the
query token's y entry after the layer, negated (the paper's convention): y_hat = -(e_{N+1})_y.

The construction (Proposition 1): with

    W_KQ = [[I_d, 0], [0, 0]],        W_PV = eta * [[0, 0], [w0^T, -1]]               (Prop. 1)

each token's y entry moves by -Delta_w . x_j, where Delta_w = -eta grad L(w0) is one gradient step on
the in-context loss L(w) = 1/(2N) sum_i (w.x_i - y_i)^2. A query token started at y = -w0.x_q thus
ends at -(w0 + Delta_w).x_q, and its negation is the prediction of w1 = w0 - eta grad L(w0). From
w0 = 0 that is y_hat = (eta/N) sum_i y_i x_i.x_q.

The trained layer is this module's ``LinearSelfAttention`` fitted with squared loss 1/2 (y_hat - y_q)^2
by Adam through the shared engine (``training_step``); the protocol (``classlab.protocols.icl_gd``)
compares it with the construction on the same test tasks.
"""
from __future__ import annotations

import torch
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method


def lsa_update(tokens: torch.Tensor, w_kq: torch.Tensor, w_pv: torch.Tensor) -> torch.Tensor:
    """One LSA layer with its residual on ``tokens`` (B, N+1, D), the last token the query.

    Keys and values are the N context tokens; every token (the query included) is updated."""
    context = tokens[:, :-1, :]
    n = context.shape[1]
    # (LSA): e_j + (1/N) sum_i W_PV e_i (e_i^T W_KQ e_j)
    scores = (context @ w_kq) @ tokens.transpose(1, 2)                  # e_i^T W_KQ e_j, (B, N, N+1)
    values = context @ w_pv.T                                           # W_PV e_i, (B, N, D)
    return tokens + scores.transpose(1, 2) @ values / n


def lsa_predict(tokens: torch.Tensor, w_kq: torch.Tensor, w_pv: torch.Tensor) -> torch.Tensor:
    """y_hat = -(e_{N+1})_y after the layer (the paper's sign convention), shape (B,).

    Only the query token's y entry of ``lsa_update`` is computed (the same number, a test checks it):
    (e_q)_y + (1/N) sum_i (W_PV e_i)_y (e_i^T W_KQ e_q)."""
    context, query = tokens[:, :-1, :], tokens[:, -1, :]
    n = context.shape[1]
    # (LSA) at j = N+1, y entry only; then y_hat = -(e_{N+1})_y
    scores = torch.einsum("bia,ba->bi", context, query @ w_kq.T)       # e_i^T W_KQ e_q, (B, N)
    values_y = context @ w_pv[-1]                                       # (W_PV e_i)_y, (B, N)
    return -(query[:, -1] + (scores * values_y).sum(1) / n)


def gd_construction(dim: int, eta: float, w0: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_KQ, W_PV) of Proposition 1: the LSA layer that performs one GD step of size ``eta`` from ``w0``
    (zero when None) on L(w) = 1/(2N) sum_i (w.x_i - y_i)^2, for tokens of size ``dim`` + 1."""
    size = dim + 1
    w_kq = torch.zeros(size, size, dtype=dtype)
    w_kq[:dim, :dim] = torch.eye(dim, dtype=dtype)                      # (Prop. 1) W_KQ = [[I, 0], [0, 0]]
    w_pv = torch.zeros(size, size, dtype=dtype)
    if w0 is not None:
        w_pv[dim, :dim] = eta * torch.as_tensor(w0, dtype=dtype)        # (Prop. 1) W_PV = eta [[0, 0], [w0^T, -1]]
    w_pv[dim, dim] = -eta
    return w_kq, w_pv


def query_start(x_query: torch.Tensor, w0: torch.Tensor | None = None) -> torch.Tensor:
    """The query token (x_q, -w0.x_q): (x_q, 0) from w0 = 0, shape (..., dim + 1)."""
    y0 = torch.zeros(x_query.shape[:-1] + (1,), dtype=x_query.dtype) if w0 is None else -(x_query @ w0)[..., None]
    return torch.cat([x_query, y0], dim=-1)


def gd_one_step_prediction(tokens: torch.Tensor, eta: float) -> torch.Tensor:
    """The same prediction computed directly: w1 = 0 - eta grad L(0) = (eta/N) sum_i y_i x_i; y_hat = w1.x_q."""
    x, y = tokens[:, :-1, :-1], tokens[:, :-1, -1]
    w1 = eta * torch.einsum("bi,bid->bd", y, x) / x.shape[1]
    return torch.einsum("bd,bd->b", w1, tokens[:, -1, :-1])


def effective_weights(w_kq: torch.Tensor, w_pv: torch.Tensor, dim: int) -> torch.Tensor:
    """What the prediction depends on: y_hat = -sum_{a,b,k} T_abk C_ab x_qk with C = (1/N) sum_i e_i e_i^T and
    T_abk = W_PV[y, a] W_KQ[b, k] (k over the x entries of the query; its y entry is 0). C is symmetric, so
    only the part of T symmetric in (a, b) matters: that part is returned, shape (D, D, dim). It is invariant
    to the rescaling (W_KQ c, W_PV / c) that leaves the layer unchanged."""
    t = torch.einsum("a,bk->abk", w_pv[-1, :], w_kq[:, :dim])
    return 0.5 * (t + t.transpose(0, 1))


class LinearSelfAttention(nn.Module):
    """One LSA layer (merged W_KQ, W_PV), initialised N(0, init_std^2) from the global RNG."""

    def __init__(self, dim: int, init_std: float):
        super().__init__()
        size = dim + 1
        self.dim = dim
        self.w_kq = nn.Parameter(torch.randn(size, size) * init_std)
        self.w_pv = nn.Parameter(torch.randn(size, size) * init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return lsa_predict(tokens, self.w_kq, self.w_pv)


@register_method("single_paper", "icl_gd")
class ICLGradientDescent(Method):
    """The trained side of the comparison: an LSA layer fitted on a stream of regression tasks."""

    augment = False
    evaluate_with_method = True

    @staticmethod
    def build_model(hparams: dict) -> LinearSelfAttention:
        return LinearSelfAttention(int(hparams["dim"]), float(hparams["init_std"]))

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        # batch["x"]: (B, N+1, d+1) tokens, the last the query (x_q, 0); batch["y"]: the query's target w.x_q
        pred = self.model(batch["x"])
        loss = 0.5 * (pred - batch["y"]).pow(2).mean()   # the paper's 1/2 squared error
        return loss, {}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)
