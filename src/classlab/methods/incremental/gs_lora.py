"""GS-LoRA and GS-LoRA++: continual forgetting with group-sparse LoRA on the FFN layers.

Zhao, Ni, Wang, Fan, Zhu, Wang, Chen, Meng, Zhang, "Continual Forgetting for Pre-trained
Vision Models", CVPR 2024 (GS-LoRA); Zhao, Zhu, Ni, Zhu, Meng, Zhang, "Practical Continual
Forgetting for Pre-trained Vision Models", arXiv 2501.09705, 2025 / T-PAMI (GS-LoRA++).

A model trained on all classes receives a sequence of forgetting tasks, each naming classes
to forget (protocol: ``classlab.protocols.forgetting``). Per task, a fresh LoRA adapter
(added through ``peft``) on the two FFN linears (``mlp.fc1``, ``mlp.fc2``) of every
Transformer block is trained, everything else frozen; after the task it is merged into the
FFN weights, W_t = W_{t-1} + (a/r) B_t A_t, so the inference cost never grows. The loss is

    L = L_retain + beta * L_forget + alpha * L_structure (+ L_pro for GS-LoRA++)
    L_retain    = CE(f(x_r), y_r)                              retained classes (replay)
    L_forget    = max(0, BND - CE(f(x_f), y_f))                 bounded forgetting loss
    L_structure = sum_{i=1}^{G} || theta_i ||_2                 group lasso, theta_i = all LoRA
                                                                parameters (A, B of fc1, fc2) of block i
    L_pro       = w_r * D(h(x_r), P_{y_r}) + w_f * max(0, BND_pro - D(h(x_f), P_{y_f}))

with h the backbone features, P_c the prototype (mean feature) of class c under the model at
the start of the task, and D(h, P) = KL(softmax(P) || softmax(h)) as in the authors' release
(``proto_distance: l2`` gives the squared Euclidean distance instead). ``prototype_reg: true``
turns on GS-LoRA++'s L_pro: retained features are pulled to their prototypes, forgotten
features pushed away from theirs.

Batches, as in the official code (bjzhb666/GS-LoRA, ``engine_cl.train_one_epoch``): every step
pairs one batch of the forget set with one batch of the retained replay, and L_forget and
L_retain are the means over their own batch. ``training_sources`` names the two sources for the
protocol's mixed loader (forget first, retain second; the batch's ``source`` tells them apart).
Where the official code runs an epoch over the retain loader and cycles the forget loader, here
the forget set defines the epoch and the small replay (``retain_per_class`` of each class)
cycles, so that an epoch still passes over every forget sample. Each source's batch has
``batch_size`` samples (the protocol's ``forget_batch_size`` / ``retain_batch_size`` default to
it), 48 + 48 a step as the official ``-b 48`` for each loader. Without a ``source`` in the batch
(one shuffled loader over both) the two are told apart by label.

beta per task: the official continual script (``scripts/run_cl_forget.sh``) passes ``--beta``
but its one-stage training (the default) uses ``cl_beta_list[task]`` instead: 0.2, 0.25, 0.25,
0.25 for GS-LoRA on CASIA-100's four tasks (0.2 0.25 0.25 0.2 with GS-LoRA++'s prototypes;
0.3 0.4 0.28 0.2 few-shot). ``beta_per_task`` holds that list; a task past its end uses its last
entry; an empty list uses the constant ``beta``.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner

ADAPTER = "default"
SOURCES = ("forget", "retain")  # the order of training_sources: batch["source"] holds these positions
# peft full-matches a regex against module names inside the backbone: the FFN linears of every block
FFN_TARGETS = r"blocks\.\d+\.mlp\.fc[12]"


def group_sparse_norm(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """L_structure = sum_i ||theta_i||_2: the L2 norm of each group's parameters, summed.

    ``vector_norm`` has a zero (sub)gradient at a group that is exactly zero.
    """
    # sum over groups of sqrt(sum of squares of all the group's entries)
    return torch.stack([torch.linalg.vector_norm(torch.cat([p.reshape(-1) for p in g])) for g in groups]).sum()


def bounded_forgetting_loss(logits: torch.Tensor, labels: torch.Tensor, bound: float) -> torch.Tensor:
    """L_forget = max(0, BND - CE(f(x_f), y_f)): raise the CE of forgotten classes up to BND, no further."""
    # ReLU(BND - mean cross-entropy on the forget batch)
    return F.relu(bound - F.cross_entropy(logits, labels))


def prototype_distance(features: torch.Tensor, prototypes: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """D(h, P), averaged over the batch: KL(softmax(P) || softmax(h)) ("kl") or ||h - P||^2 ("l2")."""
    if kind == "kl":
        # sum_d softmax(P)_d (log softmax(P)_d - log softmax(h)_d), mean over samples
        return F.kl_div(F.log_softmax(features, 1), F.log_softmax(prototypes, 1), reduction="batchmean",
                        log_target=True)
    if kind == "l2":
        return (features - prototypes).pow(2).sum(1).mean()
    raise ValueError(f"proto_distance: {kind!r} is not allowed; allowed values: ['kl', 'l2']")


@register_method("incremental", "gs_lora")
class GSLoRA(IncrementalLearner):
    """Group-sparse LoRA on the FFN layers, one adapter per forgetting task, merged after it.

    Protocol semantics: ``new_mask`` holds the classes to forget in the current task,
    ``forgotten_mask`` every class forgotten so far (this task's included); ``seen_mask`` is
    all True (the model knows every class from the start).
    """

    uses_memory = True  # L_retain replays a small subset of the retained classes

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        from peft import LoraConfig, inject_adapter_in_model

        if not hasattr(model.backbone, "blocks"):
            raise ValueError("gs_lora puts LoRA on the FFN of Transformer blocks; use the vit_tiny backbone")
        config = LoraConfig(r=int(hparams["lora_rank"]), lora_alpha=float(hparams["lora_alpha"]), lora_dropout=0.0,
                            target_modules=FFN_TARGETS, bias="none")
        inject_adapter_in_model(config, model.backbone, adapter_name=ADAPTER)
        for name, param in self.model.named_parameters():  # only the adapters train; head and base frozen
            param.requires_grad = ".lora_" in name
        self.seen_mask.fill_(True)
        self.register_buffer("forgotten_mask", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("prototypes", torch.zeros(num_classes, model.num_features))

    # --- the LoRA groups -----------------------------------------------------------------
    def lora_blocks(self) -> list[list]:
        """Per Transformer block, its LoRA-wrapped FFN linears (fc1, fc2)."""
        return [[block.mlp.fc1, block.mlp.fc2] for block in self.model.backbone.blocks]

    def lora_groups(self) -> list[list[torch.Tensor]]:
        """One group per block: A and B of fc1 and of fc2."""
        return [[p for layer in layers for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]
                for layers in self.lora_blocks()]

    @torch.no_grad()
    def merge_and_reset(self) -> None:
        """W <- W + (a/r) B A in every FFN linear; then a fresh adapter (A Kaiming-uniform, B = 0)."""
        for layers in self.lora_blocks():
            for layer in layers:
                layer.base_layer.weight += layer.get_delta_weight(ADAPTER)
                layer.reset_lora_parameters(ADAPTER, True)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain ``Classifier`` state dict with the current adapter merged (no LoRA keys)."""
        deltas = {}
        for i, layers in enumerate(self.lora_blocks()):
            for name, layer in zip(("fc1", "fc2"), layers):
                deltas[f"backbone.blocks.{i}.mlp.{name}.weight"] = layer.get_delta_weight(ADAPTER)
        out = {}
        for key, value in self.model.state_dict().items():
            if ".lora_" in key:
                continue
            key = key.replace(".base_layer.", ".")
            out[key] = (value + deltas[key] if key in deltas else value).detach().cpu().clone()
        return out

    # --- protocol hooks --------------------------------------------------------------------
    def begin_task(self, task_id: int, new_classes: list[int], seen_classes: list[int]) -> None:
        if task_id > 0:  # the previous task's adapter becomes part of the FFN weights
            self.merge_and_reset()
        super().begin_task(task_id, new_classes, list(range(self.num_classes)))
        self.forgotten_mask[torch.tensor(new_classes, dtype=torch.long)] = True

    @torch.no_grad()
    def prepare_task(self, task_id: int, context) -> None:
        """GS-LoRA++: class prototypes P_c (mean features under the model at the task's start)."""
        if not self.hparams.get("prototype_reg", False):
            return
        idx = context.task_indices
        feats = context.embed(idx).to(self.prototypes.device)
        labels = context.train_y[idx].to(self.prototypes.device)
        for c in labels.unique():
            self.prototypes[c] = feats[labels == c].mean(0)

    def training_sources(self, forget_idx: torch.Tensor, retained_idx: torch.Tensor,
                         replay_idx: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """One forget batch and one retain (replay) batch per step; the forget set defines the epoch."""
        return OrderedDict([(SOURCES[0], forget_idx), (SOURCES[1], replay_idx)])

    def task_beta(self) -> float:
        """beta of the current task: ``beta_per_task[t]`` (its last entry past its end), else ``beta``."""
        per_task = list(self.hparams.get("beta_per_task") or [])
        if per_task:
            return float(per_task[min(max(self.task_id, 0), len(per_task) - 1)])
        return float(self.hparams["beta"])

    def split_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean masks (forget, retain) over the batch: by ``batch["source"]`` when the loader
        mixes sources, else by label (classes to forget now / classes never forgotten)."""
        y = batch["y"]
        if "source" in batch:
            source = batch["source"].to(y.device)
            return source == SOURCES.index("forget"), source == SOURCES.index("retain")
        return self.new_mask[y], ~self.forgotten_mask[y]

    def training_step(self, batch):
        hp = self.hparams
        x, y = batch["x"], batch["y"]
        feats = self.model.features(x)
        logits = self.model.head(feats)
        forget, retain = self.split_batch(batch)
        zero = logits.sum() * 0.0
        # L_retain = CE on the retained classes' replay batch
        l_retain = F.cross_entropy(logits[retain], y[retain]) if retain.any() else zero
        # L_forget = max(0, BND - CE) on the forget batch
        l_forget = bounded_forgetting_loss(logits[forget], y[forget], float(hp["bound"])) if forget.any() else zero
        # L_structure = sum over blocks of ||LoRA parameters of the block||_2
        l_struct = group_sparse_norm(self.lora_groups())
        # L = L_retain + beta_t L_forget + alpha L_structure
        loss = l_retain + self.task_beta() * l_forget + float(hp["alpha"]) * l_struct
        if hp.get("prototype_reg", False):
            kind = hp.get("proto_distance", "kl")
            # L_pro = w_r D(h(x_r), P_{y_r}) + w_f max(0, BND_pro - D(h(x_f), P_{y_f}))
            if retain.any():
                loss = loss + float(hp["proto_retain_weight"]) * prototype_distance(
                    feats[retain], self.prototypes[y[retain]], kind)
            if forget.any():
                loss = loss + float(hp["proto_forget_weight"]) * F.relu(
                    float(hp["proto_bound"]) - prototype_distance(feats[forget], self.prototypes[y[forget]], kind))
        return loss, {"logits": logits.detach(), "retain": l_retain.detach(), "forget": l_forget.detach()}
