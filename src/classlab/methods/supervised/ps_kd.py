"""PS-KD: progressive self-knowledge distillation, the model's last-epoch predictions as soft targets.

Kim, Ji, Yoon, Hwang, "Self-Knowledge Distillation with Progressive Refinement of Targets",
ICCV 2021.

At epoch t (0-based) of T, sample x with label y is trained towards
    target_t(x) = (1 - a_t) onehot(y) + a_t p_{t-1}(x),     a_t = alpha_T (t + 1) / T,
with L = -sum_k target_t(x)_k log softmax(f(x))_k, where p_{t-1}(x) is the softmax the model gave x
while training on it during epoch t - 1 (the official code keeps these training-pass predictions,
augmented input included). In epoch 0 there is no past prediction: the target is the one-hot label
(plain cross-entropy), as the official code does by filling the memory with one-hot rows.

Memory, through the engine's hooks (``training_step`` stays pure, so SAM-style closures may call
it twice): two buffers [N, K] indexed by ``batch["index"]`` (the position in the full train split):
``prev`` holds last epoch's predictions and is only read; ``on_after_step`` writes this step's
softmax into ``cur``; ``on_epoch_end`` copies the rows written this epoch into ``prev``. A sample
that no batch of the last epoch held (``drop_last`` leaves out a ragged end) keeps its latest older
prediction, and one never predicted yet trains on its one-hot label. Both buffers are part of the
method's state, so the epoch and mid-epoch checkpoints restore the memory.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method


def alpha_schedule(epoch: int, epochs: int, alpha_T: float) -> float:
    """a_t = alpha_T (t + 1) / T for the 0-based epoch t of T."""
    return float(alpha_T) * (epoch + 1) / max(int(epochs), 1)


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a soft target: mean over the batch of -sum_k target_k log softmax_k."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@register_method("supervised", "ps_kd")
class PSKD(Method):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.epoch = 0
        # sized by on_train_start (the train split's size); 0 rows until then
        self.register_buffer("prev_probs", torch.zeros(0, num_classes))
        self.register_buffer("cur_probs", torch.zeros(0, num_classes))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a freshly built method (0 rows) takes whatever size the checkpoint's memory has
        for name in ("prev_probs", "cur_probs"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_start(self, loader) -> None:
        n = getattr(loader, "num_train_samples", None)
        if n is None:  # an older loader: the largest position it can yield bounds the split
            n = int(loader.source_index.max()) + 1
        device = self.prev_probs.device
        self.prev_probs = torch.zeros(int(n), self.num_classes, device=device)
        self.cur_probs = torch.zeros(int(n), self.num_classes, device=device)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def alpha_t(self) -> float:
        return alpha_schedule(self.epoch, int(self.hparams["epochs"]), float(self.hparams["alpha_T"]))

    def targets(self, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(1 - a_t) onehot(y) + a_t p_{t-1}(x); the one-hot label where no past prediction exists."""
        onehot = F.one_hot(y, self.num_classes).float()
        if self.epoch == 0 or len(self.prev_probs) == 0:
            return onehot
        prev = self.prev_probs[index]
        known = prev.sum(dim=1, keepdim=True) > 0
        prev = torch.where(known, prev, onehot)
        a_t = self.alpha_t()
        # target = (1 - a_t) onehot + a_t p_prev(x)
        return (1.0 - a_t) * onehot + a_t * prev

    def training_step(self, batch):
        logits = self.model(batch["x"])
        target = self.targets(batch["y"], batch["index"])
        loss = soft_target_loss(logits, target)
        return loss, {"logits": logits.detach(), "probs": F.softmax(logits.detach().float(), dim=1)}

    def on_after_step(self, batch, logs) -> None:
        if len(self.cur_probs):
            self.cur_probs[batch["index"]] = logs["probs"].to(self.cur_probs.dtype)

    def on_epoch_end(self, epoch: int) -> None:
        written = self.cur_probs.sum(dim=1) > 0
        self.prev_probs[written] = self.cur_probs[written]
        self.cur_probs.zero_()
