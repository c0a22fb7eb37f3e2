"""diffusion_classifier: classify an image by each class's denoising error under a trained conditional DDPM.

Papers: Alexander C. Li, Mihir Prabhudesai, Shivam Duggal, Ellis Brown and Deepak Pathak, "Your Diffusion
Model is Secretly a Zero-Shot Classifier", ICCV 2023 (the classifier); Yujin Jeong, Arnas Uselis, Seong
Joon Oh and Anna Rohrbach, "Diffusion Classifiers Understand Compositionality, but Conditions Apply",
NeurIPS 2025 Datasets and Benchmarks (arXiv 2505.17955; the timestep weighting).

The classifier (Li et al.) replaces log p(x | c) by its ELBO, a weighted denoising error, and predicts

    c_hat = argmin_c  (1/K) sum_k  w(t_k) * (1/R) sum_r || eps_{k,r} - eps_theta(x_{t_k}, t_k, c) ||^2,
    x_{t_k} = sqrt(abar_{t_k}) x + sqrt(1 - abar_{t_k}) eps_{k,r},

with the SAME draws (t_k, eps_{k,r}) for every candidate class c: the difference between two classes'
errors then has far less variance than two independent Monte Carlo estimates. Li et al. take K timesteps
evenly spaced over [0, T) (t_k = floor((2k + 1) T / 2K)) with one noise each, and weight them uniformly,
w(t) = 1 (the weighting of the training loss L_simple, not the ELBO's). Errors here are means over pixels
(the same ordering of classes as sums).

Timestep weighting (Jeong et al., Sec. "timestep weighting"): the timesteps that separate classes depend
on the domain gap between the model's training images and the test images, and a weighting fitted on a
few labelled examples recovers much of what uniform weighting loses. Their released code parameterises
w over the K evaluated timesteps as a positive polynomial of the normalised timestep tau_k in [-1, 1],

    w(tau) = exp( sum_{i=0}^{d} a_i tau^i ),   d = 3,  a = (1, 0, ..., 0) at the start,

and fits a by Adam on the cross-entropy of softmax_c( -(1/K) sum_k w_k e_{c,k} ) against the labels.
Options (``weightings``; each uses the same error tensor, so they differ only in w):

- ``uniform``: w = 1 (Li et al.).
- ``learned``: the fitted polynomial (Jeong et al.). Fitted here on the val split (seen pairs only, every
  pair a candidate), never on test: ``learned_select_share`` of those images (seeded) is held out to keep
  the step with the best accuracy on them, as the released code keeps its best validation step (the fit
  starts at uniform weights, so the kept weighting is never worse than uniform on that held-out part).
- ``elbo``: the variational bound's weights for epsilon prediction (Ho et al. 2020, Eq. 12 with
  sigma_t^2 = beta_t): w(t) = beta_t / (2 alpha_t (1 - abar_t)), scaled to mean 1, a third reference point.

The method is evaluation-only: it wraps a trained ``generative/ddpm`` denoiser and trains nothing.
Compositional classification needs a condition for every pair of the grid, held-out pairs included:
the denoiser's word condition gives one (``ConditionalDenoiser.pair_conditions``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.config import ConfigError
from classlab.data.loader import mix_seed
from classlab.methods.base import Method
from classlab.methods.generative.ddpm import ConditionalDenoiser, build_scheduler, check_step_counts
from classlab.methods.registry import register_method

WEIGHTINGS = ("uniform", "learned", "elbo")


def stratified_timesteps(num_train_timesteps: int, count: int) -> torch.Tensor:
    """K timesteps evenly spaced over 0..T-1, t_k = floor((2k + 1) T / 2K) (Li et al.'s evaluation set)."""
    check_step_counts({"timestep_samples": count, "num_train_timesteps": num_train_timesteps},
                      ("timestep_samples", "num_train_timesteps"))
    if count > num_train_timesteps:
        raise ConfigError(f"timestep_samples: {count} exceeds the model's {num_train_timesteps} training timesteps")
    k = torch.arange(count, dtype=torch.long)
    return torch.div((2 * k + 1) * num_train_timesteps, 2 * count, rounding_mode="floor")


def shared_noise(keys, draws: int, shape, seed: int, stream: int = 0) -> torch.Tensor:
    """(N, draws, *shape) standard normal noise, one generator per image key (seed, stream, key): an image's
    draws do not depend on which other images are classified, and every class reuses them."""
    out = torch.empty(len(keys), draws, *shape)
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(mix_seed(int(seed), int(stream), int(key)))
        out[i] = torch.randn((draws, *shape), generator=gen)
    return out


@torch.no_grad()
def class_errors(denoiser: ConditionalDenoiser, scheduler, x0: torch.Tensor, conditions: torch.Tensor,
                 timesteps: torch.Tensor, noise: torch.Tensor, batch_size: int = 400) -> torch.Tensor:
    """(N, P, K) denoising errors e[n, c, k] = mean_r mean_pixels (eps_{k,r} - eps_theta(x_{t_k}, t_k, c))^2.

    ``x0`` (N, C, H, W) in [-1, 1]; ``conditions`` (P, d) one per candidate; ``timesteps`` (K,);
    ``noise`` (N, K * R, C, H, W) with draw j = k * R + r at timestep t_k. Every candidate sees the same
    noised images x_{t_k} (the shared draws)."""
    n_images, n_classes, k = x0.shape[0], conditions.shape[0], len(timesteps)
    draws = noise.shape[1]
    if draws % k:
        raise ValueError(f"noise holds {draws} draws per image, not a multiple of the {k} timesteps")
    repeats = draws // k
    device = next(denoiser.parameters()).device
    t_draw = timesteps.repeat_interleave(repeats).to(device)                     # (K * R,)
    conditions = conditions.to(device)
    errors = torch.empty(n_images, n_classes, draws)
    pair_index = torch.arange(n_classes, device=device).repeat_interleave(draws)  # flat (class, draw) -> class
    draw_index = torch.arange(draws, device=device).repeat(n_classes)             # flat (class, draw) -> draw
    for n in range(n_images):
        eps = noise[n].to(device)
        # x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, the same x_t for every candidate class
        x_t = scheduler.add_noise(x0[n:n + 1].to(device).expand(draws, -1, -1, -1), eps, t_draw)
        flat = torch.empty(n_classes * draws, device=device)
        for start in range(0, n_classes * draws, batch_size):
            p, j = pair_index[start:start + batch_size], draw_index[start:start + batch_size]
            eps_hat = denoiser(x_t[j], t_draw[j], conditions[p])
            flat[start:start + len(p)] = ((eps[j] - eps_hat) ** 2).mean(dim=(1, 2, 3))
        errors[n] = flat.view(n_classes, draws).cpu()
    return errors.view(n_images, n_classes, k, repeats).mean(-1)


# --- timestep weightings ------------------------------------------------------------------------------

def uniform_weights(count: int) -> torch.Tensor:
    """Li et al.: w(t) = 1."""
    return torch.ones(count)


def elbo_weights(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The ELBO's weight of each timestep's epsilon error, beta_t / (2 alpha_t (1 - abar_t)) (Ho et al., Eq. 12
    with sigma_t^2 = beta_t), scaled to mean 1 (the argmin does not depend on the scale)."""
    beta = scheduler.betas[timesteps].double()
    alpha = scheduler.alphas[timesteps].double()
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    w = beta / (2.0 * alpha * (1.0 - alpha_bar))
    return (w / w.mean()).float()


def normalised_timesteps(count: int) -> torch.Tensor:
    """tau_k in [-1, 1], evenly spaced over the K evaluated timesteps in increasing t (0 where K = 1)."""
    return torch.linspace(-1.0, 1.0, count) if count > 1 else torch.zeros(1)


def polynomial_weights(coefficients: torch.Tensor, count: int, positive: bool = True) -> torch.Tensor:
    """Jeong et al.: w(tau) = exp(sum_i a_i tau^i) (``positive``), or the polynomial itself."""
    tau = normalised_timesteps(count).to(coefficients)
    powers = torch.stack([tau ** i for i in range(len(coefficients))], dim=1)  # (K, d + 1)
    poly = powers @ coefficients
    return poly.exp() if positive else poly


def weighted_scores(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, P) score_c = (1/K) sum_k w_k e[n, c, k]; the prediction is its argmin."""
    return (errors * weights.to(errors).view(1, 1, -1)).mean(-1)


def predict(errors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """c_hat = argmin_c (1/K) sum_k w_k e[n, c, k]."""
    return weighted_scores(errors, weights).argmin(dim=1)


def fit_timestep_weights(errors: torch.Tensor, labels: torch.Tensor, degree: int = 3, steps: int = 1000,
                         lr: float = 0.01, positive: bool = True, select_errors: torch.Tensor | None = None,
                         select_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(coefficients a (d + 1,), weights (K,)) minimising CE(softmax(-score), y) over ``errors`` (N, P, K)
    with Adam from a = (1, 0, ..., 0), i.e. uniform weights (Jeong et al.'s released fit). Where a selection
    set is given, the coefficients of the step (the start included) with the best accuracy on it are kept,
    the earliest of ties, as the released code keeps its best validation step; else the last step's.
    Deterministic (full batch)."""
    if degree < 0 or steps < 0:
        raise ConfigError(f"learned_degree / learned_steps: {degree} / {steps}; give integers >= 0")
    count = errors.shape[2]
    coefficients = torch.zeros(degree + 1, dtype=torch.float64)
    coefficients[0] = 1.0
    coefficients.requires_grad_(True)
    errors64, labels = errors.double(), labels.long()
    selecting = select_errors is not None and select_labels is not None and len(select_labels) > 0

    def select_accuracy() -> float:
        with torch.no_grad():
            w = polynomial_weights(coefficients, count, positive)
            return float((predict(select_errors.double(), w) == select_labels).double().mean())

    best, best_accuracy = coefficients.detach().clone(), select_accuracy() if selecting else None
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            w = polynomial_weights(coefficients, count, positive)
            # cross-entropy of softmax_c(-(1/K) sum_k w_k e_{c,k}) against the true pair
            loss = F.cross_entropy(-weighted_scores(errors64, w), labels)
            loss.backward()
            optimizer.step()
            if selecting:
                accuracy = select_accuracy()
                if accuracy > best_accuracy:
                    best, best_accuracy = coefficients.detach().clone(), accuracy
    if not selecting:
        best = coefficients.detach().clone()
    return best.float(), polynomial_weights(best, count, positive).float()


# --- the method -------------------------------------------------------------------------------------------

@register_method("generative", "diffusion_classifier")
class DiffusionClassifier(Method):
    """Evaluation-only: ``forward(x)`` gives logits -score_c over every pair of the grid; nothing is trained.

    ``model`` is a trained ``ConditionalDenoiser``; ``weights`` (a buffer, uniform until ``set_weights``)
    is the timestep weighting ``forward`` applies."""

    evaluate_with_method = True
    augment = False

    def __init__(self, model: ConditionalDenoiser, hparams: dict, num_classes: int):
        check_step_counts(hparams, ("timestep_samples", "noise_per_timestep"))
        super().__init__(model, hparams, num_classes)
        self.scheduler = build_scheduler(model.spec)
        self.register_buffer("timesteps", stratified_timesteps(int(model.spec["num_train_timesteps"]),
                                                               int(hparams["timestep_samples"])))
        self.register_buffer("weights", uniform_weights(len(self.timesteps)))
        self.noise_per_timestep = int(hparams.get("noise_per_timestep", 1))
        self.eval_batch_size = int(hparams.get("batch_size", 400))
        self.seed = 0  # the (t, eps) draws of ``forward``: keyed by (seed, row)

    def training_step(self, batch: dict):
        raise RuntimeError("generative/diffusion_classifier is evaluation-only: it classifies with a trained "
                           "generative/ddpm and trains nothing")

    def set_weights(self, weights: torch.Tensor) -> None:
        self.weights.copy_(weights.to(self.weights))

    def weighting(self, name: str, fit_errors: torch.Tensor | None = None,
                  fit_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """(weights (K,), details) of weighting ``name``; ``learned`` fits on (fit_errors, fit_labels)."""
        k = len(self.timesteps)
        if name == "uniform":
            return uniform_weights(k), {}
        if name == "elbo":
            return elbo_weights(self.scheduler, self.timesteps.cpu()), {}
        if name == "learned":
            if fit_errors is None or fit_labels is None or len(fit_labels) == 0:
                raise ConfigError("fit_per_pair: the learned weighting needs labelled fit images (val split)")
            # a seeded share of the fit images selects the step (Jeong et al. keep their best validation step)
            share = float(self.hparams.get("learned_select_share", 0.0))
            split_gen = torch.Generator().manual_seed(mix_seed(self.seed, 0x5E1))
            order = torch.randperm(len(fit_labels), generator=split_gen)
            n_select = int(round(share * len(fit_labels)))
            chosen, held = order[n_select:], order[:n_select]
            coefficients, weights = fit_timestep_weights(
                fit_errors[chosen], fit_labels[chosen], int(self.hparams["learned_degree"]),
                int(self.hparams["learned_steps"]), float(self.hparams["learned_lr"]),
                select_errors=fit_errors[held] if n_select else None,
                select_labels=fit_labels[held] if n_select else None)
            return weights, {"coefficients": coefficients.tolist(), "n_fit": int(len(chosen)), "n_select": n_select}
        raise ConfigError(f"weightings: {name!r}; allowed values: {list(WEIGHTINGS)}")

    def errors(self, x0: torch.Tensor, keys, seed: int, stream: int = 0) -> torch.Tensor:
        """(N, P, K) errors of images ``x0`` in [-1, 1] against every pair's condition, with each image's
        shared draws keyed by (seed, stream, key)."""
        draws = len(self.timesteps) * self.noise_per_timestep
        noise = shared_noise(list(keys), draws, tuple(x0.shape[1:]), seed, stream)
        conditions = self.model.pair_conditions().detach()
        return class_errors(self.model, self.scheduler, x0, conditions, self.timesteps.cpu(), noise,
                            self.eval_batch_size)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        errors = self.errors(x, range(len(x)), self.seed)
        return -weighted_scores(errors, self.weights.cpu())
