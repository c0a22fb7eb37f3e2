"""BN adaptation: Schneider et al., "Improving robustness against common corruptions by
covariate shift adaptation", NeurIPS 2020.

Every BatchNorm layer normalises with statistics of the test batch instead of the running
statistics of the source training set; no parameter is updated. With ``source_prior`` N > 0 the
statistics are the paper's prior-weighted mix of source (s) and test-batch (t) statistics, n the
number of samples in the test batch:

    mu    = N / (N + n) mu_s      + n / (N + n) mu_t
    sigma^2 = N / (N + n) sigma_s^2 + n / (N + n) sigma_t^2

N = 0 (the default) is pure test-batch statistics, TENT's "BN" baseline (Wang et al., ICLR 2021).
The prediction is the output of that single forward pass.

This module also holds the BatchNorm helpers the other test-time methods use (TENT, CAFA).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from classlab.methods.registry import register_method
from classlab.methods.shift_learner import TestTimeMethod


# --- BatchNorm helpers ------------------------------------------------------------------------

def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def require_batchnorm(model: nn.Module, method: str) -> list[_BatchNorm]:
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"method shift/{method} adapts BatchNorm layers, and the model "
                         f"({type(getattr(model, 'backbone', model)).__name__}) has none; use a BN backbone "
                         f"(convnet, resnet18)")
    return layers


def use_batch_statistics(model: nn.Module) -> None:
    """Eval mode everywhere (dropout off), except that every BN layer normalises with the
    statistics of the current batch and leaves its running statistics untouched (train mode
    with ``track_running_stats`` off: the buffers stay, so ``state_dict`` keeps its keys)."""
    model.eval()
    for layer in batchnorm_layers(model):
        layer.train()
        layer.track_running_stats = False


def use_source_statistics(model: nn.Module) -> None:
    """Eval mode: every BN layer normalises with its running (source) statistics."""
    model.eval()
    for layer in batchnorm_layers(model):
        layer.track_running_stats = layer.running_mean is not None


def bn_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The scale (weight) and shift (bias) of every affine BN layer."""
    return [p for layer in batchnorm_layers(model) if layer.affine for p in (layer.weight, layer.bias)]


def _prior_mixing_hook(source_prior: float):
    def hook(layer: _BatchNorm, inputs, _output):
        x = inputs[0]
        dims = [0] + list(range(2, x.ndim))
        n = x.shape[0]
        w_source = source_prior / (source_prior + n)  # N / (N + n)
        # mu = N/(N+n) mu_s + n/(N+n) mu_t;  sigma^2 = N/(N+n) sigma_s^2 + n/(N+n) sigma_t^2
        mean = w_source * layer.running_mean + (1 - w_source) * x.mean(dims)
        var = w_source * layer.running_var + (1 - w_source) * x.var(dims, unbiased=False)
        return F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0, layer.eps)
    return hook


# --- the method -------------------------------------------------------------------------------

@register_method("shift", "bn_adapt")
class BNAdapt(TestTimeMethod):
    """Test-batch BN statistics (optionally mixed with the source's), no parameter update."""

    def setup(self) -> None:
        for handle in getattr(self, "_hooks", []):
            handle.remove()
        self._hooks = []
        self.model.requires_grad_(False)
        layers = require_batchnorm(self.model, self.name)
        prior = float(self.hparams.get("source_prior", 0.0))
        if prior < 0:
            raise ValueError(f"source_prior: {prior} must be >= 0")
        if prior == 0:
            use_batch_statistics(self.model)
        else:
            # eval-mode BN, its output replaced by the normalisation with the mixed statistics
            use_source_statistics(self.model)
            self._hooks = [layer.register_forward_hook(_prior_mixing_hook(prior)) for layer in layers]

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)
