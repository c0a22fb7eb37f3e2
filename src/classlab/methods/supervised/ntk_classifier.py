"""The classifiers of infinitely wide and deep networks: singular kernel, 1-NN, majority vote.

Radhakrishnan, Belkin and Uhler, "Wide and Deep Neural Networks Achieve Consistency for
Classification" (arXiv 2204.14126, "... Achieve Optimality ..."), PNAS 2023.

An infinitely wide network trained to convergence is kernel regression with its NTK (or NNGP
kernel). On inputs on the unit sphere these kernels are functions of rho = <x, z>, built by
iterating the activation's dual xi (xi(1) = 1) once per layer. As the depth L grows, the
classifier sign(sum_i alpha_i K_L(x, x_i)) tends to one of three rules, depending on xi:

- **majority vote** (every input gets the most frequent training label). The ReLU NTK is of this
  kind: its dual has xi'(1) = 1, every off-diagonal rho is driven to 1 and the normalised kernel
  matrix to the all-ones matrix (the official code needs depth > 50,000 to see it for 1,000
  samples). ``kernel: majority`` is therefore the infinite-depth ReLU limit itself;
  ``kernel: relu_ntk`` is the ReLU NTK at a finite ``depth`` (kernel regression, interpolating),
  to watch it approach that limit.
- **1-nearest neighbour**: activations with xi'(0) = 0 (e.g. xi(rho) = rho^2): xi^L(rho) = rho^(2^L)
  makes the largest rho, the nearest training point, dominate every other.
- **singular kernel classifiers**, for activations with 0 < xi'(0) < 1 < xi'(1): the off-diagonal
  entries go to 0 at the rate xi'(0)^L times a function h(rho) that obeys
  h(xi(rho)) = xi'(0) h(rho); near rho = 1 that makes h(rho) ~ (1 - rho)^(-beta) with
  beta = ln(1/xi'(0)) / ln(xi'(1)), and since ||x - z||^2 = 2 (1 - rho) on the sphere the limit
  is the Hilbert-kernel rule of Devroye et al.:

      y_hat(x) = argmax_c  sum_{i: y_i = c} ||x - x_i||^(-alpha),    alpha = 2 beta.

  It is consistent (its risk tends to the Bayes risk) when alpha = d, the dimension of the
  sphere S^d the data lie on (data in R^(d+1)); the paper's activations are chosen for that (e.g.
  xi(rho) = rho^3/2 + rho/2 on S^2: xi'(0) = 1/2, xi'(1) = 2, alpha = 2 = d). ``alpha: 0`` uses
  alpha = d = D - 1 for D-dimensional inputs, the consistent choice.

The three limits are computed directly here (``kernel: singular | one_nn | majority``), not by
iterating a dual activation to a large depth. There is no gradient training (``epochs: 0``):
``on_train_start`` stores the training set on the sphere (flattened normalised pixels, or the
backbone's pooled features with ``representation: features``) as buffers, and prediction is
``forward(x)``, hence ``evaluate_with_method``.

Scores: ``singular``, ``one_nn`` and ``majority`` return the log of each class's share of the
kernel mass (1-NN: the alpha -> infinity limit, all mass on the nearest point; majority: the
alpha -> 0 limit, the class frequencies), floored at log(1e-6) so that NLL stays finite; they are
vote shares, not calibrated probabilities. ``relu_ntk`` returns the kernel regression outputs
K(x, X) K(X, X)^-1 Y (one-hot Y). The argmax of either is the prediction.

In very high dimension (D = 784 pixels, or 128 features) alpha = D - 1 is so large that the
singular kernel is 1-NN in all but name; the separation from 1-NN shows on low-dimensional
data, e.g. ``classlab.data.synthetic.sphere_xor`` (Bayes error known in closed form), on which
``synthetic_benchmark`` runs every rule.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method

KERNELS = ("singular", "one_nn", "majority", "relu_ntk")
LOG_FLOOR = math.log(1e-6)  # floor of the log vote shares (finite NLL)
_CHUNK = 128                # test points scored at once (memory: _CHUNK x n_train)


def to_sphere(x: torch.Tensor) -> torch.Tensor:
    """Flatten and project each sample onto the unit sphere (the paper's input domain)."""
    x = x.flatten(1)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _class_log_mass(log_w: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log sum_{i: y_i = c} exp(log_w[:, i]) for every class c, stably: (B, n) -> (B, K)."""
    top = log_w.max(dim=1, keepdim=True).values
    mass = torch.exp(log_w - top) @ F.one_hot(y, num_classes).to(log_w.dtype)
    return torch.log(mass) + top


def _log_shares(log_mass: torch.Tensor) -> torch.Tensor:
    return (log_mass - torch.logsumexp(log_mass, dim=1, keepdim=True)).clamp_min(LOG_FLOOR)


def singular_scores(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, num_classes: int,
                    alpha: float) -> torch.Tensor:
    """Log vote shares of the singular kernel K(x, z) = ||x - z||^(-alpha); inputs on the sphere."""
    # ||x - z||^2 = 2 - 2 <x, z> on the sphere; a training point at distance 0 takes all the mass
    sq = (2.0 - 2.0 * (x @ train_x.T)).clamp_min(1e-24)
    log_w = -0.5 * alpha * torch.log(sq)  # log K(x, x_i) = -alpha log ||x - x_i||
    return _log_shares(_class_log_mass(log_w, train_y, num_classes))


def one_nn_scores(train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Log vote shares of 1-NN: all the mass on the nearest training point (largest <x, x_i>)."""
    nearest = (x @ train_x.T).argmax(dim=1)
    onehot = F.one_hot(train_y[nearest], num_classes).to(x.dtype)
    return torch.where(onehot > 0, torch.zeros_like(onehot), torch.full_like(onehot, LOG_FLOOR))


def majority_scores(class_prior: torch.Tensor, n: int) -> torch.Tensor:
    """Log vote shares of the majority vote: the training class frequencies for every input."""
    return torch.log(class_prior.clamp_min(1e-30)).clamp_min(LOG_FLOOR).expand(n, -1)


def relu_ntk(a: torch.Tensor, b: torch.Tensor, depth: int) -> torch.Tensor:
    """NTK of a bias-free ReLU network with ``depth`` hidden layers (He scaling) on sphere inputs.

    With the normalised arc-cosine dual xi(rho) = (rho (pi - arccos rho) + sqrt(1 - rho^2)) / pi and
    its derivative xi'(rho) = (pi - arccos rho) / pi:  Sigma_0 = Theta_0 = rho,
    Sigma_{l+1} = xi(Sigma_l),  Theta_{l+1} = Sigma_{l+1} + Theta_l xi'(Sigma_l).
    """
    rho = (a.double() @ b.double().T).clamp(-1.0, 1.0)
    theta = rho.clone()
    for _ in range(depth):
        arc = torch.arccos(rho)
        nxt = (rho * (math.pi - arc) + torch.sqrt((1.0 - rho * rho).clamp_min(0.0))) / math.pi
        theta = nxt + theta * (math.pi - arc) / math.pi
        rho = nxt.clamp(-1.0, 1.0)
    return theta


def relu_ntk_fit(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, depth: int,
                 ridge: float = 0.0) -> torch.Tensor:
    """Kernel regression coefficients K(X, X)^-1 Y (one-hot Y), as an infinitely wide network
    trained to convergence on the squared loss interpolates (``ridge`` > 0 regularises)."""
    k = relu_ntk(train_x, train_x, depth)
    if ridge > 0:
        k = k + ridge * torch.eye(len(k), dtype=k.dtype, device=k.device)
    target = F.one_hot(train_y, num_classes).double()
    return torch.linalg.lstsq(k, target).solution if ridge == 0 else torch.linalg.solve(k, target)


def kernel_scores(kernel: str, train_x: torch.Tensor, train_y: torch.Tensor, x: torch.Tensor, num_classes: int, *,
                  alpha: float = 0.0, depth: int = 1, coef: torch.Tensor | None = None,
                  class_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Class scores of ``kernel`` for sphere inputs ``x`` (B, D) given the stored training set."""
    if kernel == "majority":
        if class_prior is None:
            class_prior = torch.bincount(train_y, minlength=num_classes).float() / max(len(train_y), 1)
        return majority_scores(class_prior.to(x.device), len(x))
    out = []
    for part in x.split(_CHUNK):
        if kernel == "singular":
            a = alpha if alpha > 0 else float(train_x.shape[1] - 1)
            out.append(singular_scores(train_x, train_y, part, num_classes, a))
        elif kernel == "one_nn":
            out.append(one_nn_scores(train_x, train_y, part, num_classes))
        elif kernel == "relu_ntk":
            if coef is None:
                raise ValueError("relu_ntk needs the regression coefficients (relu_ntk_fit)")
            out.append((relu_ntk(part, train_x, depth) @ coef).float())  # K(x, X) K(X, X)^-1 Y
        else:
            raise ValueError(f"kernel {kernel!r} is not one of {KERNELS}")
    return torch.cat(out)


@register_method("supervised", "ntk_classifier")
class NTKClassifier(Method):
    """Stores the training set at ``on_train_start``; predicts with the chosen limit classifier."""

    evaluate_with_method = True
    augment = False
    _RUNTIME_SIZED = ("train_x", "train_y", "coef", "class_prior")

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.kernel = str(hparams.get("kernel", "singular"))
        if self.kernel not in KERNELS:
            raise ValueError(f"supervised/{self.name}: kernel {self.kernel!r} is not one of {KERNELS}")
        self.representation = str(hparams.get("representation", "features"))
        if self.representation not in ("features", "pixels"):
            raise ValueError(f"supervised/{self.name}: representation must be features or pixels")
        self.alpha = float(hparams.get("alpha", 0.0))
        self.depth = int(hparams.get("depth", 100))
        self.ridge = float(hparams.get("ridge", 0.0))
        self.max_train = int(hparams.get("max_train", 0))
        # sized at run time; empty here so that a freshly built method can load a saved state
        self.register_buffer("train_x", torch.zeros(0, 0))
        self.register_buffer("train_y", torch.zeros(0, dtype=torch.long))
        self.register_buffer("coef", torch.zeros(0, 0, dtype=torch.float64))
        self.register_buffer("class_prior", torch.zeros(0))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._RUNTIME_SIZED:
            key = prefix + name
            if key in state_dict:
                saved = state_dict[key]
                self._buffers[name] = torch.empty(saved.shape, dtype=saved.dtype, device=self._buffers[name].device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _represent(self, x: torch.Tensor) -> torch.Tensor:
        if self.representation == "pixels":
            return to_sphere(x.float())
        was = self.model.training
        self.model.eval()  # BatchNorm running statistics: a fixed map, the same at train and test time
        try:
            return to_sphere(self.model.features(x).float())
        finally:
            self.model.train(was)

    @torch.no_grad()
    def on_train_start(self, loader) -> None:
        n = len(loader.y)
        keep = torch.arange(n, device=loader.y.device)
        if 0 < self.max_train < n:  # a seeded subset (the run's loader seed): the O(n^2) kernels need it
            gen = torch.Generator().manual_seed(int(getattr(loader, "seed", 0)) * 7919 + 17)
            keep = torch.sort(torch.randperm(n, generator=gen)[: self.max_train]).values.to(keep.device)
        feats = [self._represent(loader.normalize(loader.x[part])) for part in keep.split(1024)]
        self.train_x = torch.cat(feats)
        self.train_y = loader.y[keep].long()
        self.class_prior = torch.bincount(self.train_y, minlength=self.num_classes).float() / len(keep)
        if self.kernel == "relu_ntk":
            self.coef = relu_ntk_fit(self.train_x, self.train_y, self.num_classes, self.depth, self.ridge)

    def training_step(self, batch):
        raise RuntimeError(f"supervised/{self.name} has no gradient training: set epochs: 0")

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.train_y) == 0:
            raise RuntimeError(f"supervised/{self.name}: no training set stored (on_train_start never ran)")
        with torch.autocast(device_type=x.device.type, enabled=False):
            z = self._represent(x.float())
            return kernel_scores(self.kernel, self.train_x, self.train_y, z, self.num_classes, alpha=self.alpha,
                                 depth=self.depth, coef=self.coef, class_prior=self.class_prior)


def synthetic_benchmark(kind: str = "sphere_xor", sizes=(100, 1000, 4000), n_test: int = 2000, seed: int = 0,
                        kernels=("singular", "one_nn", "majority", "relu_ntk"), alpha: float = 0.0,
                        depth: int = 100, relu_max_train: int = 2000, **params) -> list[dict]:
    """Test error of each limit classifier on held-out synthetic data with a known Bayes error.

    Rows: {kind, n_train, kernel, error, bayes_error}. ``relu_ntk`` uses at most ``relu_max_train``
    training points (an n x n solve).
    """
    from classlab.data.synthetic import make_synthetic

    data = make_synthetic(kind, max(sizes) + n_test, seed=seed, **params)
    train, test = data.split(max(sizes))
    test_x = to_sphere(test.x)
    rows = []
    for n in sizes:
        tx, ty = to_sphere(train.x[:n]), train.y[:n]
        for kernel in kernels:
            if kernel == "relu_ntk" and n > relu_max_train:
                continue
            coef = relu_ntk_fit(tx, ty, 2, depth) if kernel == "relu_ntk" else None
            pred = kernel_scores(kernel, tx, ty, test_x, 2, alpha=alpha, depth=depth, coef=coef).argmax(1)
            rows.append({"kind": kind, "n_train": n, "kernel": kernel, "error": float((pred != test.y).float().mean()),
                         "bayes_error": data.bayes_error})
    return rows
