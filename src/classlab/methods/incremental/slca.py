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

Switches (the paper's baselines are variants of this file, ``extends: slca`` in their YAMLs):

- ``backbone_lr_scale``: the slow learner's multiplier. 1.0 trains every layer at the head's
  (fast) learning rate: the paper's Seq FT, the same pipeline without the slow learner
  (``slca_seqft``; the official code's ``bcb_lrscale``).
- ``classifier_alignment``: false skips the alignment after each task (``slca_no_ca``: the slow
  learner alone; ``slca_seqft``: neither). The class statistics are still stored.

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

import hashlib
import math

import torch
import torch.nn.functional as F

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

    def param_groups(self):
        return slow_learner_groups(self.model, float(self.hparams["lr"]), float(self.hparams["backbone_lr_scale"]))

    def on_epoch_start(self, epoch: int) -> None:
        # BN statistics are estimated in task 0 and frozen from task 1 on (the engine has just put
        # the learner in training mode; eval mode makes BN use and keep its running statistics)
        if self.hparams.get("freeze_bn_stats", False) and self.task_id > 0:
            for m in self.model.backbone.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def training_step(self, batch):
        # L_t = CE over the current task's classes only (each task trains its own head)
        logits = self.model(batch["x"]).masked_fill(~self.new_mask, float("-inf"))
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}

    def end_task(self, task_id: int, context: TaskContext) -> None:
        feats = context.embed(context.task_indices).to(self.class_means.device)
        labels = context.train_y[context.task_indices].to(self.class_means.device)
        eps = float(self.hparams.get("cov_eps", 1e-4))
        for c in context.new_classes:
            mu, cov = gaussian_statistics(feats[labels == c], eps)
            self.class_means[c], self.class_covs[c] = mu, cov
        align = self.hparams.get("classifier_alignment", True) and int(self.hparams.get("ca_epochs", 0)) > 0
        if task_id > 0 and align:
            self.align_classifier(task_id)

    @torch.enable_grad()
    def align_classifier(self, task_id: int) -> None:
        """Retrain the head of all seen classes on features sampled from their Gaussians."""
        hp = self.hparams
        head = self.model.head
        seen = torch.nonzero(self.seen_mask).flatten()
        groups = [torch.nonzero(self.class_task == i).flatten() for i in range(task_id + 1)]
        pos = {int(c): i for i, c in enumerate(seen.tolist())}
        groups = [torch.tensor([pos[int(c)] for c in g], dtype=torch.long, device=seen.device) for g in groups]
        epochs, per_class = int(hp["ca_epochs"]), int(hp.get("ca_samples_per_class", 256))
        batch_size, tau = int(hp.get("ca_batch_size", 256)), float(hp.get("ca_logit_norm", 0.0))
        lr = float(hp.get("ca_lr", hp["lr"]))
        optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=float(hp.get("momentum", 0.9)),
                                    weight_decay=float(hp.get("weight_decay", 0.0)))
        # the samples' seed is a function of the stored statistics (which the run's seed and data
        # determine), so a run resumed just before end_task draws the same samples
        digest = hashlib.sha256(self.class_means.detach().cpu().numpy().tobytes()).digest()
        generator = torch.Generator(device=self.class_means.device)
        generator.manual_seed(int.from_bytes(digest[:7], "little") + task_id)
        was_training = self.training
        self.eval()
        for epoch in range(epochs):
            for group in optimizer.param_groups:  # cosine annealing per CA epoch
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            # F_hat ~ N(mu_c, Sigma_c) for every seen class c
            x = torch.cat([sample_gaussian(self.class_means[c], self.class_covs[c], per_class, generator)
                           for c in seen.tolist()]).float()
            y = torch.arange(len(seen), device=x.device).repeat_interleave(per_class)
            order = torch.randperm(len(y), generator=generator, device=x.device)
            for lo in range(0, len(y), batch_size):
                idx = order[lo:lo + batch_size]
                logits = head(x[idx])[:, seen]  # h = W F_hat + b over the seen classes
                if tau > 0:
                    loss = logit_norm_loss(logits, y[idx], groups, tau)
                else:
                    loss = F.cross_entropy(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        self.train(was_training)
