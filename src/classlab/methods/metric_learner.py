"""The metric family's learner: what every deep-metric-learning method shares (the retrieval protocol
is ``classlab.protocols.metric``; CFCD runs on its own, ``classlab.protocols.metric_scenes``).

A method is a ``MetricLearner``: the model (backbone + linear embedding head) gives L2-normalised
embeddings and ``training_step`` is the method's loss on them. The base losses (contrastive,
multi_similarity, proxy_anchor) come from pytorch-metric-learning; the regularisers (ecaml, metrix)
build their base method's loss with that method's own hyperparameters (``base_loss_hparams``), so a
regulariser and its base differ only in the regulariser.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import torch
import torch.nn.functional as F

from classlab.config import ConfigError, method_config_path, resolve_checked_hparams
from classlab.methods.base import Method, build_optimizer

FAMILY = "metric"
# the keys every method of the family shares, with the same value in every YAML (a fair comparison)
SHARED_KEYS = ("embedding_size", "samples_per_class", "eval_per_class", "val_classes", "optimizer", "lr",
               "weight_decay", "epochs", "batch_size", "schedule", "warmup_frac", "augment_pad", "augment_hflip")
# the methods of the retrieval protocol (cfcd runs on its own, metric_scenes)
METHODS = ("contrastive", "multi_similarity", "proxy_anchor", "ecaml", "metrix")


# --- the learner ---------------------------------------------------------------------------------

def method_class(name: str) -> type:
    """The registered class of metric method ``name``: its own module is imported (not the whole
    family), else the registry builds a YAML-only variant."""
    from classlab.methods.registry import METHODS as REGISTRY
    from classlab.methods.registry import get_method

    module = Path(__file__).resolve().parents[1] / "methods" / FAMILY / f"{name}.py"
    if module.exists():
        importlib.import_module(f"classlab.methods.{FAMILY}.{name}")
        return REGISTRY[(FAMILY, name)]
    if not method_config_path(FAMILY, name).exists():
        raise ConfigError(f"method: {name!r} is not a method of family {FAMILY!r}; the retrieval protocol runs "
                          f"{list(METHODS)}")
    return get_method(FAMILY, name)


def base_loss_hparams(base_loss: str, base_overrides: dict | None = None, field: str = "base_loss") -> dict:
    """The loss hyperparameters of base method ``base_loss`` (its YAML, then ``base_overrides``): only its
    ``loss_keys``. ConfigError naming ``field`` (or ``base_overrides.<key>``) when either is wrong."""
    if base_loss not in METHODS:
        raise ConfigError(f"{field}: {base_loss!r} is not a base loss of the metric family; allowed values: "
                          f"{[m for m in METHODS if m not in ('ecaml', 'metrix')]}")
    cls = method_class(base_loss)
    if not getattr(cls, "is_base_loss", False):
        raise ConfigError(f"{field}: {base_loss!r} is a regulariser, not a base loss")
    unknown = sorted(set(base_overrides or {}) - set(cls.loss_keys))
    if unknown:
        raise ConfigError(f"base_overrides.{unknown[0]}: not a loss hyperparameter of {base_loss} "
                          f"(known: {list(cls.loss_keys)})")
    try:
        hp = resolve_checked_hparams(FAMILY, base_loss, dict(base_overrides or {}))
    except ConfigError as exc:
        raise ConfigError(f"base_overrides: {exc}") from None
    return {key: hp[key] for key in cls.loss_keys}


class MetricLearner(Method):
    """The family's learner: the model (backbone + linear embedding head) gives L2-normalised embeddings;
    ``training_step`` is the loss built by ``make_loss`` on the batch's embeddings and labels.

    A base loss (contrastive, multi_similarity, proxy_anchor) sets ``is_base_loss = True``, lists its
    ``loss_keys`` and overrides ``make_loss``. A regulariser (ecaml, metrix) builds the base method's loss
    (``base_loss`` hyperparameter) from ``base_loss_hparams`` and adds its own term in ``training_step``.
    ``proxy_lr_mult`` (a loss hyperparameter where the loss has parameters, e.g. Proxy Anchor's proxies)
    scales the learning rate of the loss's parameters.
    """

    is_base_loss = False
    loss_keys: tuple[str, ...] = ()

    def __init__(self, model, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        self.embedding_size = int(hparams["embedding_size"])
        if self.is_base_loss:
            self.loss_hparams = {key: hparams[key] for key in self.loss_keys}
            builder = type(self)
        else:
            self.loss_hparams = base_loss_hparams(hparams["base_loss"], hparams.get("base_overrides"))
            builder = method_class(hparams["base_loss"])
        self.loss_fn, self.miner = builder.make_loss(self.loss_hparams, num_classes, self.embedding_size)

    @classmethod
    def make_loss(cls, loss_hparams: dict, num_classes: int, embedding_size: int):
        """(loss module, miner module or None) from the loss hyperparameters."""
        raise NotImplementedError

    # --- embeddings ----------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embedding (float32) of a batch of images."""
        return F.normalize(self.model(x).float(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def metric_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (base) loss on L2-normalised embeddings, mined pairs where the loss has a miner; computed in
        float32 outside autocast."""
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            indices = self.miner(embeddings, labels) if self.miner is not None else None
            return self.loss_fn(embeddings, labels, indices)

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss = self.metric_loss(self.embed(batch["x"]), batch["y"])
        return loss, {"loss_metric": loss.detach()}

    # --- what is trained -------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        groups = [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        if loss_params:  # proxies: their own, higher rate (Proxy Anchor: 100x)
            mult = float(self.loss_hparams.get("proxy_lr_mult", 1.0))
            groups.append({"params": loss_params, "lr": float(self.hparams["lr"]) * mult})
        return groups

    def configure_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.param_groups(), self.hparams, default="adamw")
