"""SLCA: Slow Learner with Classifier Alignment, sequential fine-tuning of a pre-trained model.

Zhang, Wang, Kang, Chen and Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023 (arXiv 2303.05118).

Slow learner (SL): the whole model is fine-tuned on each task, but the backbone's learning rate
is a small fraction of the classifier's,

    lr_backbone = backbone_lr_scale * lr,  lr_head = lr      (paper: 1e-4 vs 1e-2, scale 0.01),

and each task's cross-entropy is over that task's classes only (its own classification head,
"H_t is the logit of predicting the current training data in D_t").

Classifier alignment (CA): after task t the features of each new class c are summarised by a
Gaussian, mu_c = mean, Sigma_c = sample covariance (+ eps I); then features are sampled from
the Gaussians of all seen classes, F_hat ~ N(mu_c, Sigma_c), and the classification layer of all
seen classes is retrained on them with logit normalisation (temperature tau):

    L_CA = -log( exp(h_y / (tau ||h||)) / sum_j exp(h_j / (tau ||h||)) ),
    h = W F_hat + b,  ||h|| = mean over tasks i <= t of ||h_{classes of task i}||_2.

The statistics of a class are computed once, with the backbone right after its task (the slow
backbone drifts little), and kept as buffers [num_classes, D] and [num_classes, D, D].

CA is an engine phase. A task t > 0 with alignment on is two phases, ``["train", "align"]``
(``task_phases``); the protocol checkpoints after "train", and the align phase has its own epoch
(and mid-epoch) checkpoints, so a job killed during the alignment resumes inside it. The align
phase's loader (``phase_loader``) first stores the new classes' statistics (in ``end_task``
instead for a task without an align phase: each task's statistics are computed exactly once),
then draws ``ca_samples_per_class * ca_epochs`` features per seen class, once, from a generator
seeded by the run's task seed (the same draws on resume), and the engine trains ONE epoch over
them with a cosine schedule: SGD with momentum (not Nesterov, as the official
``torch.optim.SGD``) on the head only, lr ``ca_lr``, batches of ``ca_batch_size``. The paper
draws ``ca_samples_per_class`` fresh samples per class in each of ``ca_epochs`` epochs; since
every sample is an independent draw from the same Gaussians, one shuffled pass over
``ca_epochs`` times as many draws has the same distribution of batches and the same number of
steps. The cosine decays per step to 0 (the paper: per CA epoch). The head sees the sampled
features as it sees the backbone's (``model.head`` applied to them); the backbone is never run
in this phase and stays in eval mode, so its BatchNorm statistics cannot move.

Switches (the paper's baselines are variants of this file, ``extends: slca`` in their YAMLs):

- ``backbone_lr_scale``: the slow learner's multiplier. 1.0 trains every layer at the head's
  (fast) learning rate: the paper's Seq FT, the same pipeline without the slow learner
  (``slca_seqft``; the official code's ``bcb_lrscale``).
- ``classifier_alignment``: false skips the align phase after each task (``slca_no_ca``: the slow
  learner alone; ``slca_seqft``: neither). The class statistics are still stored (in ``end_task``).

BatchNorm (``freeze_bn_stats``), an adaptation: the paper's backbones are ViTs, which have no
BatchNorm, and the official code (GengDavid/SLCA, ``models/slca.py``) simply puts the network in
training mode in every epoch of every task, so with a BN backbone its running statistics would
follow every task. Here they are estimated in task 0 (from the initial values of a scratch
backbone, or from the pretrained ones) and frozen from task 1 on: in later tasks the statistics
would move at full speed whatever the learning rate, which defeats the slow learner and moves
old classes' features away from their stored Gaussians. ``freeze_bn_stats: false`` follows the
official code (statistics updated in every task).

Not done: the official code also scales sampled means by a task-dependent factor and restores
the pre-alignment head before the next task; neither is in the paper, so the next task starts
from the aligned head.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.data.loader import TensorLoader, mix_seed
from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner, TaskContext


def slow_learner_groups(model, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Two parameter groups: the backbone at ``backbone_lr_scale * lr``, the head at ``lr``."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    # lr_backbone = scale * lr (slow learner); lr_head = lr
    return [{"params": backbone, "lr": lr * backbone_lr_scale, "name": "backbone"},
            {"params": head, "lr": lr, "name": "head"}]


def gaussian_statistics(features: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """mu = sample mean, Sigma = unbiased sample covariance + eps I (float64)."""
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    # Sigma = 1/(n-1) sum_i (x_i - mu)(x_i - mu)^T + eps I
    cov = centred.T @ centred / max(len(x) - 1, 1)
    return mu, cov + eps * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)


def sample_gaussian(mu: torch.Tensor, cov: torch.Tensor, n: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """n samples of N(mu, cov): mu + z L^T with L L^T = cov (jitter added until Cholesky succeeds)."""
    eye = torch.eye(len(mu), dtype=cov.dtype, device=cov.device)
    jitter = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(cov + jitter * eye)
        if int(info) == 0:
            break
        jitter = max(jitter * 10, 1e-6 * float(cov.diagonal().abs().mean()) + 1e-8)
    else:
        raise ValueError("class covariance is not positive definite even with jitter; raise cov_eps")
    z = torch.randn(n, len(mu), dtype=cov.dtype, device=cov.device, generator=generator)
    return mu + z @ chol.T


def logit_norm_loss(logits: torch.Tensor, targets: torch.Tensor, groups: list[torch.Tensor],
                    tau: float) -> torch.Tensor:
    """CE(h / (tau ||h||)) with ||h|| the mean over task groups of the groups' logit norms."""
    # ||h|| = 1/T sum_t ||h_{T_t}||_2
    norms = torch.stack([logits[:, g].norm(p=2, dim=1) for g in groups], dim=1).mean(1, keepdim=True) + 1e-7
    return F.cross_entropy(logits / norms / tau, targets)


_ALIGN_DRAWS = 0xCA  # the stream of the generator that samples the align phase's features


@register_method("incremental", "slca")
class SLCA(IncrementalLearner):

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        d = model.num_features
        self.register_buffer("class_means", torch.zeros(num_classes, d, dtype=torch.float64))
        self.register_buffer("class_covs", torch.zeros(num_classes, d, d, dtype=torch.float64))
        self.register_buffer("class_task", torch.full((num_classes,), -1, dtype=torch.long))

    def begin_task(self, task_id, new_classes, seen_classes):
        super().begin_task(task_id, new_classes, seen_classes)
        self.class_task[torch.tensor(new_classes, dtype=torch.long)] = task_id

    # --- phases ---------------------------------------------------------------------------
    def aligns(self, task_id: int) -> bool:
        return task_id > 0 and bool(self.hparams.get("classifier_alignment", True)) \
            and int(self.hparams.get("ca_epochs", 0)) > 0

    def task_phases(self, task_id: int) -> list[str]:
        return ["train", "align"] if self.aligns(task_id) else ["train"]

    def phase_hparams(self, phase: str) -> dict:
        if phase != "align":
            return {}
        hp = self.hparams
        # one epoch over ca_epochs x ca_samples_per_class draws per class (see the module docstring)
        return {"epochs": 1, "lr": float(hp.get("ca_lr", hp["lr"])), "batch_size": int(hp.get("ca_batch_size", 256)),
                "schedule": "cosine", "warmup_frac": 0.0, "optimizer": "momentum", "optimizer_kwargs": {},
                "momentum": float(hp.get("momentum", 0.9)), "weight_decay": float(hp.get("weight_decay", 0.0)),
                "augment_pad": 0, "augment_hflip": False, "grad_clip": 0.0, "online_iter": 1}

    def phase_loader(self, phase: str, context: TaskContext, trainer):
        if phase != "align":
            return None
        self.store_statistics(context)
        hp = self.hparams
        per_class = int(hp.get("ca_samples_per_class", 256)) * int(hp["ca_epochs"])
        seen = torch.nonzero(self.seen_mask).flatten().cpu().tolist()
        means, covs = self.class_means.cpu(), self.class_covs.cpu()
        # drawn once, on the CPU, from the run's task seed: the same features on resume and on any device
        generator = torch.Generator().manual_seed(mix_seed(trainer.seed, _ALIGN_DRAWS))
        # F_hat ~ N(mu_c, Sigma_c) for every seen class c
        x = torch.cat([sample_gaussian(means[c], covs[c], per_class, generator) for c in seen]).float()
        y = torch.arange(len(seen)).repeat_interleave(per_class)  # targets: positions among the seen classes
        return TensorLoader(x, y, trainer.config.batch_size, device=trainer.device, mean=None, std=None,
                            shuffle=True, seed=trainer.seed, drop_last=False)

    def param_groups(self):
        if self.phase == "align":  # the classifier alone, at ca_lr (the phase's lr)
            return [{"params": list(self.model.head.parameters()), "lr": float(self.hparams["lr"]), "name": "head"}]
        return slow_learner_groups(self.model, float(self.hparams["lr"]), float(self.hparams["backbone_lr_scale"]))

    def on_epoch_start(self, epoch: int) -> None:
        if self.phase == "align":
            # the engine has just put the learner in training mode; the backbone is not run in this
            # phase, and eval mode keeps anything that might run it from moving BN statistics
            self.model.backbone.eval()
            return
        # BN statistics are estimated in task 0 and frozen from task 1 on (the engine has just put
        # the learner in training mode; eval mode makes BN use and keep its running statistics)
        if self.hparams.get("freeze_bn_stats", False) and self.task_id > 0:
            for m in self.model.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    # --- one batch ------------------------------------------------------------------------
    def training_step(self, batch):
        if self.phase == "align":
            return self.align_step(batch)
        # L_t = CE over the current task's classes only (each task trains its own head)
        logits = self.model(batch["x"]).masked_fill(~self.new_mask, float("-inf"))
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}

    def task_groups(self) -> list[torch.Tensor]:
        """Positions, among the seen classes, of each task's classes (tasks 0..t): the groups of ||h||."""
        position = torch.cumsum(self.seen_mask.long(), 0) - 1
        groups = [position[(self.class_task == i) & self.seen_mask] for i in range(self.task_id + 1)]
        return [g for g in groups if len(g)]

    def align_step(self, batch):
        """L_CA on a batch of sampled features (targets are positions among the seen classes)."""
        seen = torch.nonzero(self.seen_mask).flatten()
        logits = self.model.head(batch["x"]).float()[:, seen]  # h = W F_hat + b over the seen classes
        tau = float(self.hparams.get("ca_logit_norm", 0.0))
        if tau > 0:
            loss = logit_norm_loss(logits, batch["y"], self.task_groups(), tau)
        else:
            loss = F.cross_entropy(logits, batch["y"])
        return loss, {"logits": logits.detach()}

    # --- statistics -----------------------------------------------------------------------
    def store_statistics(self, context: TaskContext) -> None:
        """(mu_c, Sigma_c) of each new class from the backbone as the task left it."""
        feats = context.embed(context.task_indices).to(self.class_means.device)
        labels = context.train_y[context.task_indices].to(self.class_means.device)
        eps = float(self.hparams.get("cov_eps", 1e-4))
        for c in context.new_classes:
            mu, cov = gaussian_statistics(feats[labels == c], eps)
            self.class_means[c], self.class_covs[c] = mu, cov

    def end_task(self, task_id: int, context: TaskContext) -> None:
        if not self.aligns(task_id):  # with an align phase, its loader has stored them already
            self.store_statistics(context)
