"""TrAct: training the first layer's activations instead of its weights.

Petersen, Borgelt, Ermon, "TrAct: Making First-layer Pre-Activations Trainable", NeurIPS 2024.

The first layer (a Linear, or a Conv2d seen as a Linear on its unfolded patches) computes
Z = A W^T from its input rows A (m x d: the batch rows, or batch x positions patches for a conv).
Its ordinary weight gradient is G^T A with G = dL/dZ, so pixels' scale sets the size of the
update. TrAct takes a gradient step on the activations Z instead and finds the weights whose
activations come closest to it (ridge regression with strength lambda), which replaces the weight
gradient by
    dW = G^T A (A^T A / m + lambda I)^{-1}                 (direct: a d x d system)
       = (1 / lambda) (G^T A - G^T A A^T (A A^T + m lambda I)^{-1} A)   (Woodbury: m x m)
with lambda = 0.1. As lambda grows, lambda dW tends to the ordinary gradient G^T A. The bias
gradient and every other layer's gradient are unchanged; the loss is ERM's cross-entropy.

Here the first layer's inputs are recorded by a forward hook that exists only while
``training_step`` runs with gradients enabled (evaluation never sees it), and the recorded rows
turn the first layer's ordinary weight gradient into TrAct's after ``loss.backward()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.supervised.erm import ERM


def first_layer_name(model: nn.Module) -> str:
    """The name of the first Linear or Conv2d of ``model`` (in module registration order)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return name
    raise ValueError("tract needs a model whose first layer is an nn.Linear or nn.Conv2d")


def layer_rows(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The rows A (m x d) the layer multiplies its weight with: Z = A W^T (W flattened to out x d)."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, layer.in_features)
    same = isinstance(layer.padding, str) and layer.padding != "valid"  # "same": padding unknown to unfold
    if layer.groups != 1 or layer.padding_mode != "zeros" or same:
        raise ValueError("tract supports a first Conv2d with groups=1 and numeric zero padding")
    padding = 0 if isinstance(layer.padding, str) else layer.padding
    patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (B * positions) x (C k k)


def tract_gradient(grad: torch.Tensor, rows: torch.Tensor, lam: float, form: str = "auto") -> torch.Tensor:
    """TrAct's weight gradient from the ordinary one ``grad`` = G^T A (out x d) and the rows A (m x d).

    form "direct" solves the d x d system, "woodbury" the m x m one; "auto" picks the smaller.
    """
    m, d = rows.shape
    if form == "auto":
        form = "direct" if d <= m else "woodbury"
    if form == "direct":
        # dW = G^T A (A^T A / m + lambda I)^{-1}
        system = rows.T @ rows / m + lam * torch.eye(d, dtype=rows.dtype, device=rows.device)
        chol = torch.linalg.cholesky(system)
        return torch.cholesky_solve(grad.T, chol).T
    if form == "woodbury":
        # dW = (1 / lambda) (G^T A - G^T A A^T (A A^T + m lambda I)^{-1} A)
        system = rows @ rows.T + m * lam * torch.eye(m, dtype=rows.dtype, device=rows.device)
        chol = torch.linalg.cholesky(system)
        return (grad - (grad @ rows.T) @ torch.cholesky_solve(rows, chol)) / lam
    raise ValueError(f"unknown form {form!r}; use direct, woodbury or auto")


@register_method("supervised", "tract")
class TrAct(ERM):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.first_layer = first_layer_name(model)
        self._inputs: list[torch.Tensor] = []  # scratch: the first layer's inputs of the current batch

    def _layer(self) -> nn.Module:
        return self.model.get_submodule(self.first_layer)

    def training_step(self, batch):
        inputs: list[torch.Tensor] = []
        handle = None
        if torch.is_grad_enabled() and self.training:
            handle = self._layer().register_forward_hook(lambda _m, args, _out: inputs.append(args[0].detach()))
        try:
            loss, logs = super().training_step(batch)
        finally:
            if handle is not None:
                handle.remove()
        self._inputs = inputs  # what the next backward's first-layer gradient was computed from
        return loss, logs

    def optimizer_step(self, loss, optimizer, closure):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        layer = self._layer()
        weight = layer.weight
        if weight.grad is not None and self._inputs:
            rows = torch.cat([layer_rows(layer, x.float()) for x in self._inputs])
            grad = weight.grad.reshape(weight.shape[0], -1).float()
            # dW = G^T A (A^T A / m + lambda I)^{-1}, from the ordinary G^T A
            new = tract_gradient(grad, rows, float(self.hparams.get("tract_lambda", 0.1)))
            weight.grad.copy_(new.reshape(weight.shape).to(weight.grad.dtype))
        self._inputs = []
        if self.hparams.get("grad_clip", 0) > 0:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                           self.hparams["grad_clip"])
        optimizer.step()
