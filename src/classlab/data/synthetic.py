"""Synthetic classification data whose Bayes error is known in closed form.

Used to check classifiers that claim consistency (the risk of the rule tends to the Bayes risk
as n grows), e.g. the infinitely wide and deep network classifiers of Radhakrishnan, Belkin and
Uhler, "Wide and Deep Neural Networks Achieve Consistency for Classification", PNAS 2023
(``classlab.methods.supervised.ntk_classifier``). That paper studies data on the unit sphere, so
two of the generators here put x on the sphere S^{D-1} (uniformly) and draw the label from a
known regression function eta(x) = P(y = 1 | x); the Bayes error is E[min(eta, 1 - eta)].

- ``sphere_xor``: eta(x) = p where x_1 x_2 > 0, 1 - p elsewhere (a non-linear, quadrant-shaped
  Bayes boundary). Bayes error = 1 - p for p >= 1/2, in every dimension D >= 2; the asymptotic
  1-NN error is 2 p (1 - p) (Cover and Hart), strictly worse whenever 1/2 < p < 1.
- ``sphere_linear``: eta(x) = (1 + a x_1) / 2. Bayes error = 1/2 - (a/2) E|x_1|, with
  E|x_1| = Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2)) for x uniform on S^{D-1}.
- ``gaussian_pair``: two isotropic Gaussians N(+-(delta/2) e_1, I_D) with priors (pi_1, pi_2),
  in R^D (not on the sphere). Bayes error = pi_1 Phi(c - delta/2) + pi_2 Phi(-c - delta/2) with
  c = ln(pi_2 / pi_1) / delta.

Every generator is seeded and returns float32 ``x`` (n, D), long ``y`` (n,) in {0, 1}, and the
closed-form Bayes error; ``bayes_predict`` gives the Bayes rule's labels, so the closed form can
be checked by Monte Carlo.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SyntheticData:
    x: torch.Tensor            # (n, D) float32
    y: torch.Tensor            # (n,) long, labels 0/1
    bayes_error: float         # the closed-form Bayes risk of the distribution drawn from
    kind: str
    params: dict

    def split(self, n_train: int) -> tuple["SyntheticData", "SyntheticData"]:
        """The first ``n_train`` samples and the rest (the draws are i.i.d., so this is a random split)."""
        head = SyntheticData(self.x[:n_train], self.y[:n_train], self.bayes_error, self.kind, self.params)
        tail = SyntheticData(self.x[n_train:], self.y[n_train:], self.bayes_error, self.kind, self.params)
        return head, tail


def _uniform_sphere(n: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    g = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return g / g.norm(dim=1, keepdim=True)


def _labels(eta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(len(eta), generator=gen, dtype=torch.float64) < eta).long()


def sphere_xor(n: int, dim: int = 3, p: float = 0.8, seed: int = 0) -> SyntheticData:
    """x uniform on S^{dim-1}; P(y = 1 | x) = p if x_1 x_2 > 0 else 1 - p. Bayes error 1 - p."""
    if dim < 2 or not 0.5 <= p <= 1.0:
        raise ValueError(f"sphere_xor needs dim >= 2 and 1/2 <= p <= 1, got dim={dim}, p={p}")
    gen = torch.Generator().manual_seed(seed)
    x = _uniform_sphere(n, dim, gen)
    eta = torch.where(x[:, 0] * x[:, 1] > 0, p, 1.0 - p)
    return SyntheticData(x.float(), _labels(eta, gen), 1.0 - p, "sphere_xor", {"dim": dim, "p": p})


def mean_abs_coordinate(dim: int) -> float:
    """E|x_1| for x uniform on the sphere S^{dim-1} in R^dim: Gamma(D/2) / (sqrt(pi) Gamma((D+1)/2))."""
    return math.exp(math.lgamma(dim / 2) - math.lgamma((dim + 1) / 2)) / math.sqrt(math.pi)


def sphere_linear(n: int, dim: int = 3, a: float = 0.8, seed: int = 0) -> SyntheticData:
    """x uniform on S^{dim-1}; P(y = 1 | x) = (1 + a x_1) / 2. Bayes error 1/2 - (a/2) E|x_1|."""
    if dim < 1 or not 0.0 <= a <= 1.0:
        raise ValueError(f"sphere_linear needs dim >= 1 and 0 <= a <= 1, got dim={dim}, a={a}")
    gen = torch.Generator().manual_seed(seed)
    x = _uniform_sphere(n, dim, gen)
    eta = (1.0 + a * x[:, 0]) / 2.0
    # E[min(eta, 1 - eta)] = E[(1 - a |x_1|) / 2]
    bayes = 0.5 - 0.5 * a * mean_abs_coordinate(dim)
    return SyntheticData(x.float(), _labels(eta, gen), bayes, "sphere_linear", {"dim": dim, "a": a})


def _phi(t: float) -> float:
    return 0.5 * math.erfc(-t / math.sqrt(2.0))


def gaussian_pair(n: int, dim: int = 2, delta: float = 2.0, prior: float = 0.5, seed: int = 0) -> SyntheticData:
    """Class 1 ~ N(+(delta/2) e_1, I), class 0 ~ N(-(delta/2) e_1, I), P(y = 1) = ``prior``.

    The Bayes rule thresholds x_1 at c = ln((1 - prior) / prior) / delta; its error is
    prior Phi(c - delta/2) + (1 - prior) Phi(-c - delta/2).
    """
    if dim < 1 or delta <= 0 or not 0.0 < prior < 1.0:
        raise ValueError(f"gaussian_pair needs dim >= 1, delta > 0, 0 < prior < 1; got {dim}, {delta}, {prior}")
    gen = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=gen, dtype=torch.float64) < prior).long()
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    x[:, 0] += (y.double() * 2 - 1) * delta / 2
    c = math.log((1 - prior) / prior) / delta
    bayes = prior * _phi(c - delta / 2) + (1 - prior) * _phi(-c - delta / 2)
    return SyntheticData(x.float(), y, bayes, "gaussian_pair", {"dim": dim, "delta": delta, "prior": prior})


GENERATORS = {"sphere_xor": sphere_xor, "sphere_linear": sphere_linear, "gaussian_pair": gaussian_pair}


def make_synthetic(kind: str, n: int, seed: int = 0, **params) -> SyntheticData:
    if kind not in GENERATORS:
        raise KeyError(f"unknown synthetic data {kind!r}; known: {sorted(GENERATORS)}")
    return GENERATORS[kind](n, seed=seed, **params)


def bayes_predict(data: SyntheticData, x: torch.Tensor | None = None) -> torch.Tensor:
    """The Bayes rule's labels on ``x`` (default: ``data.x``) for the distribution ``data`` was drawn from."""
    x = data.x if x is None else x
    x = x.double()
    if data.kind == "sphere_xor":
        return (x[:, 0] * x[:, 1] > 0).long() if data.params["p"] > 0.5 else torch.zeros(len(x), dtype=torch.long)
    if data.kind == "sphere_linear":
        return (x[:, 0] > 0).long()
    if data.kind == "gaussian_pair":
        prior, delta = data.params["prior"], data.params["delta"]
        return (x[:, 0] > math.log((1 - prior) / prior) / delta).long()
    raise KeyError(f"no Bayes rule for {data.kind!r}")
