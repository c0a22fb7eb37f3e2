"""OVOR: OnePrompt with Virtual Outlier Regularization (rehearsal-free, prompt-based).

Wei-Cheng Huang, Chun-Fu (Richard) Chen, Hsiang Hsu, "OVOR: OnePrompt with Virtual Outlier
Regularization for Rehearsal-Free Class-Incremental Learning", ICLR 2024 (the authors as the
official repository, jpmorganchase/ovor, lists them).

OnePrompt: the pre-trained ViT is frozen; ONE prompt, shared by all tasks (no pool, no query,
no key matching), is inserted by prefix-tuning: in block l the attention keys and values get
learned prefixes, K'_l = [P^K_l ; X W_K], V'_l = [P^V_l ; X W_V] (the queries stay X W_Q). As in
the paper's code base (CODA-P / DualPrompt layout) a "g" part (length 10: 5 key + 5 value
tokens) sits in blocks 0-1 and an "e" part (length 40: 20 + 20) in blocks 2-4, both shared.
The prompt and the linear head are trained on task t with cross-entropy over the task's own
classes (logits of all other classes masked, the usual rehearsal-free CIL head):

    L_CE = CE( W f_P(x) + b |_{C_t}, y ).

Virtual outlier regularization (VOR), after the regular epochs of a task: on the features
z = f_P(x) of the task's samples, virtual outliers are synthesised as in NPOS (Tao et al.,
ICLR 2023): with z_hat = z / ||z||, the `select` ID points with the largest k-th nearest-
neighbour distance d_k(z_hat) are the boundary points; around each, `sample_from` candidates
v = z_b + sigma * eps, eps ~ N(0, I) are drawn and the `per_class * |C_t|` candidates with the
largest k-NN distance d_k(v_hat) to the ID set (lowest density) are kept. With the energy
E(z) = -logsumexp_{c in C_t} (W z + b)_c over the task's classes, the head is then trained for
`vor_epochs` on the fixed features with

    L = CE(z, y) + lambda * [ Huber( ReLU(E(z) - tau_id) ) + Huber( ReLU(tau_ood - E(v)) ) ],

which raises the logits of ID features (E <= tau_id) and pushes those of the outliers down
(E >= tau_ood), tightening each task's decision boundary so that a task's head does not claim
samples of other tasks' classes.

The VOR phase is an engine phase: a task is ``["train", "vor"]`` (``task_phases``) when
``vor_epochs`` > 0, checkpointed by the protocol after "train" and by the engine at every epoch
of "vor", so a killed job resumes inside it. Its loader (``phase_loader``) holds the task's
features, computed once without augmentation, and the outliers, synthesised once from a
generator seeded by the run's task seed (the same on resume): each step takes one batch of
``vor_batch_size`` features (the epoch: every feature once, the last batch ragged) and one batch
of ``len(outliers) // steps_per_epoch`` outliers (a ``MixedLoader``; both reshuffled every
epoch). The optimizer is Adam (betas ``(momentum, 0.999)``, no weight decay) on the head only,
at ``vor_lr`` with a cosine schedule to 0 over the phase.

``vor_lambda: 0`` keeps the same end-of-task phase (same epochs, batches, steps, optimizer and
schedule on the same fixed features) with the cross-entropy alone and synthesises no outliers:
the ``ovor_no_vor`` variant, the baseline that isolates what VOR adds at an equal step budget.

Simplified here (and why):
- the VOR phase has its own Adam and cosine from ``vor_lr`` to 0; the paper continues one cosine
  schedule over the 16 regular + 4 VOR epochs;
- outliers are centred on the boundary embeddings (z_b + sigma eps) as the paper and NPOS
  describe; the public code adds the noise to the origin (it never adds ``boundary_points``);
- k-NN is exact (torch.cdist) instead of faiss; K is clipped to the number of ID samples;
- the ViT is timm's VisionTransformer; prefixes are inserted by re-running the pre-norm blocks
  (``vit_forward`` below), which other prompt methods (MVP) import from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.data.loader import MixedLoader, TensorLoader, mix_seed
from classlab.methods.registry import register_method
from classlab.models.prompts import _check_vit, frozen_vit, prefix_attention, prompt_layers, vit_forward  # noqa: F401  (re-exported)
from classlab.methods.learner import IncrementalLearner, TaskContext


# --- prompting a timm VisionTransformer ---------------------------------------------------
def knn_distance(query: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``query`` to its k-th nearest row of ``bank`` (L2)."""
    k = max(1, min(k, len(bank)))
    d = torch.cdist(query, bank)
    return d.topk(k, dim=1, largest=False).values[:, -1]


def synthesize_outliers(feats: torch.Tensor, num_classes: int, k: int = 50, select: int = 50,
                        sample_from: int = 600, sigma: float = 0.1, per_class: int = 40,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """NPOS: boundary ID points (largest k-NN distance on the unit sphere), Gaussian candidates
    v = z_b + sigma * eps around them, keep the ``per_class * num_classes`` candidates of
    largest k-NN distance to the ID set (rejection sampling of the low-density region)."""
    feats = feats.float()
    normed = F.normalize(feats, dim=1)
    # boundary: b = argtop_select d_k(z_hat)
    boundary = knn_distance(normed, normed, k).topk(min(select, len(feats))).indices
    eps = torch.randn(len(boundary), sample_from, feats.shape[1], generator=generator)
    cand = (feats[boundary][:, None, :] + sigma * eps).reshape(-1, feats.shape[1])   # v = z_b + sigma eps
    dist = torch.cat([knn_distance(F.normalize(c, dim=1), normed, k) for c in cand.split(8192)])
    keep = dist.topk(min(per_class * num_classes, len(cand))).indices
    return cand[keep]


def energy(logits: torch.Tensor) -> torch.Tensor:
    """E(z) = -logsumexp_c logit_c."""
    return -torch.logsumexp(logits, dim=1)


def vor_loss(id_logits: torch.Tensor, ood_logits: torch.Tensor, tau_id: float = -15.0, tau_ood: float = -3.0,
             lam: float = 0.1) -> torch.Tensor:
    """lambda [ Huber(ReLU(E(x) - tau_id)) + Huber(ReLU(tau_ood - E(v))) ] (Huber delta 1, target 0)."""
    id_gap = F.relu(energy(id_logits) - tau_id)
    ood_gap = F.relu(tau_ood - energy(ood_logits))
    return lam * (F.huber_loss(id_gap, torch.zeros_like(id_gap)) + F.huber_loss(ood_gap, torch.zeros_like(ood_gap)))


_OUTLIER_DRAWS = 0x0D  # the stream of the generator that synthesises a task's outliers


@register_method("incremental", "ovor")
class OVOR(IncrementalLearner):
    """Frozen ViT + one shared prefix prompt + linear head; VOR on the head after each task."""

    vor_phase = True  # a subclass without the end-of-task head phase (OnePrompt) sets False

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        vit = frozen_vit(model)
        depth, dim = len(vit.blocks), vit.embed_dim
        self.g_layers, self.e_layers = prompt_layers(hparams, depth)
        self.g_len = int(hparams.get("g_length", 10)) if self.g_layers else 0
        self.e_len = int(hparams.get("e_length", 40)) if self.e_layers else 0
        for name, n, length in (("g", len(self.g_layers), self.g_len), ("e", len(self.e_layers), self.e_len)):
            if length % 2:
                raise ValueError(f"{name}_length: {length} must be even (half key, half value prefixes)")
        init = hparams.get("prompt_init", "uniform")
        # the paper's code initialises prompts uniform in [0, 1)
        self.g_prompt = nn.Parameter(self._init((len(self.g_layers), self.g_len, dim), init))
        self.e_prompt = nn.Parameter(self._init((len(self.e_layers), self.e_len, dim), init))

    @staticmethod
    def _init(shape, how: str) -> torch.Tensor:
        t = torch.empty(shape)
        if how == "uniform":
            nn.init.uniform_(t)
        elif how == "normal":
            nn.init.normal_(t, std=0.02)
        else:
            raise ValueError(f"prompt_init: {how!r}; use uniform or normal")
        return t

    # --- the prompted backbone ------------------------------------------------------------
    def prefixes(self, batch: int) -> dict:
        """{block: (P_K, P_V)}: g prompts in g_layers, e prompts in e_layers, concatenated where both."""
        out: dict[int, list] = {}
        for layers, prompt, length in ((self.e_layers, self.e_prompt, self.e_len),
                                       (self.g_layers, self.g_prompt, self.g_len)):
            if length == 0:
                continue
            half = length // 2
            for j, layer in enumerate(layers):
                p = prompt[j].unsqueeze(0).expand(batch, -1, -1)
                pk, pv = p[:, :half], p[:, half:]
                if layer in out:
                    out[layer] = [torch.cat([out[layer][0], pk], 1), torch.cat([out[layer][1], pv], 1)]
                else:
                    out[layer] = [pk, pv]
        return {k: tuple(v) for k, v in out.items()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return vit_forward(self.model.backbone, x, prefixes=self.prefixes(x.shape[0]))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.features(x))

    def param_groups(self) -> list[dict]:
        if self.phase == "vor":  # the head alone
            return [{"params": list(self.model.head.parameters())}]
        params = [p for p in (self.g_prompt, self.e_prompt) if p.numel()] + list(self.model.head.parameters())
        return [{"params": params}]

    # --- one batch: CE over the current task's classes ------------------------------------
    def task_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.masked_fill(~self.new_mask, float("-inf"))

    def training_step(self, batch):
        if self.phase == "vor":
            return self.vor_step(batch)
        logits = self.task_logits(self.predict(batch["x"]))
        # L_CE = CE(W f_P(x) + b |_{C_t}, y)
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}

    # --- virtual outlier regularization: an engine phase on fixed features ------------------
    def task_phases(self, task_id: int) -> list[str]:
        return ["train", "vor"] if self.vor_phase and int(self.hparams.get("vor_epochs", 0)) > 0 else ["train"]

    def phase_hparams(self, phase: str) -> dict:
        if phase != "vor":
            return {}
        hp = self.hparams
        return {"epochs": int(hp["vor_epochs"]), "lr": float(hp.get("vor_lr", hp.get("lr", 1e-3))),
                "batch_size": int(hp.get("vor_batch_size", hp.get("batch_size", 128))),
                "schedule": "cosine", "warmup_frac": 0.0, "optimizer": "adam", "optimizer_kwargs": {},
                "betas": [float(hp.get("momentum", 0.9)), 0.999], "eps": 1e-8, "weight_decay": 0.0,
                "augment_pad": 0, "augment_hflip": False, "grad_clip": 0.0, "online_iter": 1}

    def phase_loader(self, phase: str, context: TaskContext, trainer):
        if phase != "vor" or len(context.task_indices) == 0:
            return None
        feats = context.embed(context.task_indices).float().cpu()
        labels = context.train_y[context.task_indices].cpu()
        oods = None
        if float(self.hparams.get("vor_lambda", 0.1)) > 0:  # cross-entropy only needs no outliers
            hp = self.hparams
            # synthesised once, on the CPU, from the run's task seed: the same outliers on resume
            gen = torch.Generator().manual_seed(mix_seed(trainer.seed, _OUTLIER_DRAWS))
            oods = synthesize_outliers(feats, len(context.new_classes), k=int(hp.get("vor_k", 50)),
                                       select=int(hp.get("vor_select", 50)),
                                       sample_from=int(hp.get("vor_sample_from", 600)),
                                       sigma=float(hp.get("vor_sigma", 0.1)),
                                       per_class=int(hp.get("vor_per_class", 40)), generator=gen)
        return self.vor_loader(feats, labels, oods, trainer.config.batch_size, trainer.device, trainer.seed)

    @staticmethod
    def vor_loader(feats: torch.Tensor, labels: torch.Tensor, oods: torch.Tensor | None, batch_size: int,
                   device: torch.device, seed: int):
        """The VOR phase's loader over float features: an epoch is one pass over the ID features
        in batches of ``batch_size`` (the last one ragged); with outliers, each step also carries
        ``len(oods) // steps`` of them (``batch["source"]``: 0 ID, 1 outlier)."""
        ids = TensorLoader(feats, labels, batch_size, device=device, mean=None, std=None, shuffle=True, seed=seed,
                           drop_last=False)
        if oods is None or len(oods) == 0:
            return ids
        ood_batch = max(1, len(oods) // len(ids))
        outliers = TensorLoader(oods.float(), torch.full((len(oods),), -1, dtype=torch.long), ood_batch,
                                device=device, mean=None, std=None, shuffle=True, seed=seed, drop_last=True)
        return MixedLoader([ids, outliers], ["id", "ood"])

    def vor_step(self, batch):
        """CE on the batch's ID features, plus lambda x the energy terms of ID features and outliers."""
        x, y = batch["x"], batch["y"]
        source = batch.get("source")
        is_id = source == 0 if source is not None else torch.ones_like(y, dtype=torch.bool)
        head = self.model.head
        id_logits = self.task_logits(head(x[is_id]).float())
        loss = F.cross_entropy(id_logits, y[is_id])
        lam = float(self.hparams.get("vor_lambda", 0.1))
        if lam > 0 and source is not None:
            hp = self.hparams
            ood_logits = head(x[~is_id]).float()[:, self.new_mask]
            # L = CE + lambda [Huber(ReLU(E(z) - tau_id)) + Huber(ReLU(tau_ood - E(v)))]
            loss = loss + vor_loss(id_logits[:, self.new_mask], ood_logits, float(hp.get("vor_tau_id", -15.0)),
                                   float(hp.get("vor_tau_ood", -3.0)), lam)
        return loss, {"logits": id_logits.detach()}

    def on_epoch_start(self, epoch: int) -> None:
        if self.phase == "vor":  # the frozen backbone is not run in this phase; keep it in eval mode
            self.model.backbone.eval()
