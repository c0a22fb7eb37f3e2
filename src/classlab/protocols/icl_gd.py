"""The icl_gd protocol (single_paper family, scenario kind ``icl_regression``): von Oswald et al., ICML 2023.

Data (``make_tasks``): synthetic linear-regression tasks drawn from a seed. A task is w ~ N(0, I_d);
its N context points x_i ~ U(-r, r)^d (r = ``x_range``, 1 in the paper's text) with y_i = w.x_i become
tokens e_i = (x_i, y_i), and its query x_q the token (x_q, 0) with target w.x_q. Three disjoint streams:
a training pool (``train_tasks``, drawn from the run's seed, iterated by the engine's TensorLoader), a
validation set (``val_tasks``, from the seed; the only data any choice reads: the GD step size) and a
test set (``test_tasks``, the same for every seed and method: every reported number).

One job is one (method, seed): the method's linear self-attention layer
(``classlab.methods.single_paper.icl_gd``) is trained by the shared engine with Adam on 1/2 squared
error; the construction of one GD step from w0 = 0 (Proposition 1) gets the step size eta that minimises
the validation loss (closed form: the loss is a quadratic in eta, so this is the exact minimiser a line
search looks for). On the same test tasks, as the paper's Fig. 2 does, it reports:

- ``loss_trained``, ``loss_gd``, ``loss_gap`` (trained - gd), ``loss_zero`` (predicting 0, for scale);
- ``pred_cosine``: cosine between the two prediction vectors over the test tasks;
- ``sensitivity_cosine``: the paper's "model cosine", the mean over test tasks of the cosine between
  d y_hat / d x_q of the two models (autograd), and ``sensitivity_gap`` (mean L2 distance);
- ``pred_gap``: the paper's "preds diff", mean over test tasks of |y_trained - y_gd|; ``pred_gap_rel``:
  ||y_trained - y_gd|| / ||y_gd|| over the test set;
- ``loss_interpolated`` and ``interpolated_gap`` (interpolated - gd): the paper's interpolated model,
  whose weights average the construction's and the trained ones, the trained ones first rescaled
  (W_KQ / s, W_PV s, s the mean of W_KQ's x-block diagonal, which leaves the layer unchanged);
- ``weights_cosine`` and ``weights_rel_gap``: the weight-level check. The literal product W_PV W_KQ of the
  construction is zero, so the comparison is between the effective weights T_abk = W_PV[y, a] W_KQ[b, k]
  (symmetrised in a, b) that the prediction is a function of (``effective_weights``); ``weights`` holds
  both models' rescaled W_KQ and W_PV for a figure;
- curves over training steps (lists of [step, value], step 0 the initial layer): ``loss_curve`` (test loss
  of the trained layer; ``loss_gd`` is the flat GD line), ``cosine_curve``, ``pred_gap_curve``,
  ``interpolated_curve``; ``history`` is the engine's per-epoch training loss.

Bad input (a non-positive dimension, context size, task count, zero epochs, a method that does not run on
``icl_regression``) raises ConfigError naming the key before anything is written. ``metrics.json`` is
written last; the engine's resume checkpoint ``last.pt`` is removed at the end.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.loader import mix_seed
from classlab.engine import Trainer, TrainConfig
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import make_fingerprint
from classlab.io import write_json
from classlab.methods.registry import get_method
from classlab.methods.single_paper.icl_gd import effective_weights, gd_construction, lsa_predict
from classlab.provenance import run_provenance

FAMILY = "single_paper"
KIND = "icl_regression"
PROTOCOL = "icl_gd"
DATA_VERSION = 1  # bump when make_tasks changes what a seed draws
# the streams of the task generator, kept apart so that no two sets share draws
TRAIN_STREAM, VAL_STREAM, TEST_STREAM = 0x1C1, 0x1C2, 0x1C3
POSITIVE_INTS = ("dim", "context_points", "train_tasks", "val_tasks", "test_tasks", "epochs", "batch_size",
                 "curve_every")


def dataset_name(dim: int, context_points: int) -> str:
    return f"linear_regression_d{int(dim)}_n{int(context_points)}"


def make_tasks(n_tasks: int, dim: int, context_points: int, x_range: float, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_tasks`` regression tasks from ``seed``: tokens (T, N+1, d+1), the last row the query (x_q, 0),
    and the query targets w.x_q (T,). w ~ N(0, I_d), x ~ U(-x_range, x_range)^d, y = w.x (no noise)."""
    gen = torch.Generator().manual_seed(int(seed))
    w = torch.randn(n_tasks, dim, generator=gen)
    x = (torch.rand(n_tasks, context_points + 1, dim, generator=gen) * 2.0 - 1.0) * float(x_range)
    y = torch.einsum("tnd,td->tn", x, w)
    targets = y[:, -1].clone()
    y[:, -1] = 0.0  # the query token carries (x_q, 0)
    return torch.cat([x, y[..., None]], dim=-1), targets


def half_mse(pred: torch.Tensor, target: torch.Tensor) -> float:
    return float(0.5 * (pred - target).pow(2).mean())


def fit_gd_eta(tokens: torch.Tensor, targets: torch.Tensor, dim: int) -> float:
    """The step size minimising the 1/2 squared loss of the one-step construction on these tasks.

    The construction's prediction is eta * g (g its prediction at eta = 1), so the loss is a quadratic in
    eta with its minimum at <g, y> / <g, g>: the point a line search over eta converges to."""
    w_kq, w_pv = gd_construction(dim, 1.0)
    with torch.no_grad():
        g = lsa_predict(tokens, w_kq.to(tokens.device), w_pv.to(tokens.device)).double()
    return float((g @ targets.double()) / (g @ g).clamp_min(1e-30))


def sensitivities(tokens: torch.Tensor, w_kq: torch.Tensor, w_pv: torch.Tensor) -> torch.Tensor:
    """d y_hat / d x_q for every task (T, d): the paper's sensitivity, by autograd. The tasks of a batch do
    not interact, so the gradient of the summed predictions with respect to each task's x_q is that task's
    own (the per-task ``torch.func.vmap(grad(...))`` of the paper's code, without importing torch._dynamo,
    which ``torch.func`` does on first use: seconds per process)."""
    x_query = tokens[:, -1, :-1].detach().clone().requires_grad_(True)
    with torch.enable_grad():
        query = torch.cat([x_query, tokens[:, -1, -1:].detach()], dim=1)
        full = torch.cat([tokens[:, :-1, :].detach(), query[:, None, :]], dim=1)
        pred = lsa_predict(full, w_kq.detach(), w_pv.detach())
        (sens,) = torch.autograd.grad(pred.sum(), x_query)
    return sens


def rescaled(w_kq: torch.Tensor, w_pv: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(W_KQ / s, W_PV s) with s the mean of W_KQ's x-block diagonal (1 for the construction): the same
    layer, on the construction's scale. None where s is (numerically) zero."""
    scale = torch.diagonal(w_kq[:dim, :dim]).mean()
    if not torch.isfinite(scale) or abs(float(scale)) < 1e-12:
        return None
    return w_kq / scale, w_pv * scale


def compare(w_kq: torch.Tensor, w_pv: torch.Tensor, gd: tuple[torch.Tensor, torch.Tensor], tokens: torch.Tensor,
            targets: torch.Tensor, dim: int) -> dict:
    """The trained layer (w_kq, w_pv) against the construction ``gd`` on the tasks (tokens, targets)."""
    w_kq, w_pv = w_kq.detach(), w_pv.detach()
    gd_kq, gd_pv = gd
    with torch.no_grad():
        pred = lsa_predict(tokens, w_kq, w_pv)
        pred_gd = lsa_predict(tokens, gd_kq, gd_pv)
    sens, sens_gd = sensitivities(tokens, w_kq, w_pv), sensitivities(tokens, gd_kq, gd_pv)
    diff = pred - pred_gd
    out = {"loss_trained": half_mse(pred, targets), "loss_gd": half_mse(pred_gd, targets),
           "pred_cosine": float(F.cosine_similarity(pred.double(), pred_gd.double(), dim=0, eps=1e-12)),
           "sensitivity_cosine": float(F.cosine_similarity(sens, sens_gd, dim=1, eps=1e-12).mean()),
           "sensitivity_gap": float((sens - sens_gd).norm(dim=1).mean()),
           "pred_gap": float(diff.abs().mean()),
           "pred_gap_rel": float(diff.norm() / pred_gd.norm().clamp_min(1e-30))}
    out["loss_gap"] = out["loss_trained"] - out["loss_gd"]
    # the interpolated model: the average of the rescaled trained weights and the construction's
    scaled = rescaled(w_kq, w_pv, dim)
    if scaled is None:
        out["loss_interpolated"] = None
    else:
        with torch.no_grad():
            pred_int = lsa_predict(tokens, (scaled[0] + gd_kq) / 2, (scaled[1] + gd_pv) / 2)
        out["loss_interpolated"] = half_mse(pred_int, targets)
    out["interpolated_gap"] = None if out["loss_interpolated"] is None else out["loss_interpolated"] - out["loss_gd"]
    t, t_gd = effective_weights(w_kq, w_pv, dim).flatten(), effective_weights(gd_kq, gd_pv, dim).flatten()
    out["weights_cosine"] = float(F.cosine_similarity(t, t_gd, dim=0, eps=1e-12))
    out["weights_rel_gap"] = float((t - t_gd).norm() / t_gd.norm().clamp_min(1e-30))
    return out


def _check(method: str, seed, overrides: dict | None) -> dict:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: {seed!r} must be an integer")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"overrides: {overrides!r} must be a mapping of hyperparameter -> value")
    hp = resolve_checked_hparams(FAMILY, method, overrides)  # types and ranges: the YAML's schema
    for key in POSITIVE_INTS:  # the same again, whatever a variant's schema says: no empty run
        value = hp.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: {value!r} must be a positive integer (icl_gd needs at least one "
                              f"{'training step' if key == 'epochs' else key.replace('_', ' ')})")
    for key in ("x_range", "init_std", "lr"):
        value = hp.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"{key}: {value!r} must be a positive number")
    try:
        cls = get_method(FAMILY, method)
    except KeyError as exc:
        raise ConfigError(f"method: {exc.args[0]}") from None
    if KIND not in tuple(getattr(cls, "scenario_kinds", ())):
        raise ConfigError(f"method: {FAMILY}/{method} runs on {list(getattr(cls, 'scenario_kinds', ()))}, "
                          f"not {KIND!r} (the icl_gd protocol)")
    return hp


def run_icl_gd(method: str, seed: int, out_dir: Path, overrides: dict | None = None, threads: int | None = None,
               device: str | None = None, progress: bool = False) -> dict:
    """Train ``method``'s LSA layer on regression tasks and compare it with one step of GD on the fixed
    test tasks (see the module docstring); returns (and writes to ``out_dir/metrics.json``) the metrics."""
    hp = _check(method, seed, overrides)  # bad input stops here, before anything is drawn or written
    cls = get_method(FAMILY, method)
    set_threads(threads)
    dim, n_ctx = int(hp["dim"]), int(hp["context_points"])
    dataset = dataset_name(dim, n_ctx)
    dev = pick_device(device)
    draw = dict(dim=dim, context_points=n_ctx, x_range=float(hp["x_range"]))
    train_tokens, train_targets = make_tasks(int(hp["train_tasks"]), seed=mix_seed(int(seed), TRAIN_STREAM), **draw)
    val_tokens, val_targets = make_tasks(int(hp["val_tasks"]), seed=mix_seed(int(seed), VAL_STREAM), **draw)
    test_tokens, test_targets = make_tasks(int(hp["test_tasks"]), seed=mix_seed(TEST_STREAM), **draw)
    val_tokens, val_targets = val_tokens.to(dev), val_targets.to(dev)
    test_tokens, test_targets = test_tokens.to(dev), test_targets.to(dev)

    # the construction: one GD step from w0 = 0, eta fitted on the validation tasks only
    eta = fit_gd_eta(val_tokens, val_targets, dim)
    gd = tuple(w.to(dev) for w in gd_construction(dim, eta))

    fingerprint = make_fingerprint(protocol=PROTOCOL, method=method, hparams=hp, seed=int(seed), dataset=dataset,
                                   data_version=DATA_VERSION)
    seed_everything(int(seed))
    learner = cls(cls.build_model(hp), hp, 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, int(seed), out_dir / "last.pt", progress,
                      fingerprint=fingerprint)
    model = learner.model
    every = int(hp["curve_every"])
    curve_keys = ("loss_trained", "sensitivity_cosine", "pred_gap", "loss_interpolated")

    def curve_point(step: int) -> list:
        scores = compare(model.w_kq, model.w_pv, gd, test_tokens, test_targets, dim)
        return [int(step)] + [scores[k] for k in curve_keys]

    start = curve_point(0)  # the initial layer (the same weights on a resumed run: seeded above)
    loader = trainer.make_loader(train_tokens, train_targets, None, None)
    total = int(hp["epochs"]) * len(loader)

    def on_step(steps: int, samples: int) -> None:
        if steps % every == 0 or steps == total:
            trainer.step_log.append(curve_point(steps))

    t0 = time.perf_counter()
    history = trainer.fit(loader, on_step=on_step)
    train_seconds = time.perf_counter() - t0
    learner.eval()
    rows = [start] + [list(r) for r in trainer.step_log]

    final = compare(model.w_kq, model.w_pv, gd, test_tokens, test_targets, dim)
    with torch.no_grad():
        val_loss = half_mse(learner(val_tokens), val_targets)
        val_loss_gd = half_mse(lsa_predict(val_tokens, *gd), val_targets)
    scaled = rescaled(model.w_kq.detach(), model.w_pv.detach(), dim)
    weights = {"gd_w_kq": gd[0].cpu().tolist(), "gd_w_pv": gd[1].cpu().tolist(),
               "trained_w_kq": (scaled[0] if scaled else model.w_kq.detach()).cpu().tolist(),
               "trained_w_pv": (scaled[1] if scaled else model.w_pv.detach()).cpu().tolist(),
               "trained_rescaled": scaled is not None}
    metrics = {"protocol": PROTOCOL, "method": method, "family": FAMILY, "scenario_kind": KIND, "seed": int(seed),
               "dataset": dataset, "dim": dim, "context_points": n_ctx, **final, "gd_eta": eta,
               "loss_zero": half_mse(torch.zeros_like(test_targets), test_targets),
               "val_loss_trained": val_loss, "val_loss_gd": val_loss_gd,
               "loss_curve": [[r[0], r[1]] for r in rows], "cosine_curve": [[r[0], r[2]] for r in rows],
               "pred_gap_curve": [[r[0], r[3]] for r in rows], "interpolated_curve": [[r[0], r[4]] for r in rows],
               "weights": weights, "train_steps": int(trainer.steps_done), "train_tasks": int(hp["train_tasks"]),
               "val_tasks": int(hp["val_tasks"]), "test_tasks": int(hp["test_tasks"]),
               "train_seconds": train_seconds, "history": history, "hparams": hp, "fingerprint": fingerprint,
               "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return metrics
