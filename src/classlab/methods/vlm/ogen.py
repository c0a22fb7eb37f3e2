"""OGEN: CoOp regularised by image features synthesised for unknown classes, and by a local-mean teacher.

Zang, Goh, Susskind and Huang, "Overcoming the Pitfalls of Vision-Language Model Finetuning for OOD
Generalization", ICLR 2024 (arXiv 2401.15914; official sample code apple/ml-ogen). Prompt learning left
long enough overfits the known (base) classes and loses accuracy on unknown ones. OGEN adds two things to
CoOp's prompt learner:

1. A class-conditional feature generator G that synthesises an image feature for a class from its
   text feature alone, by attending over the (text, image) feature pairs of related classes:

       x^ = G(q; K, V) = normalize( FFN(q) + MHA(q, K, V) ),

   q the text feature of the class to synthesise (the query), K the text features of its reference
   classes (keys), V their image features (values); MHA multi-head attention, FFN a two-layer MLP.
   It is trained on the known classes only, leaving one class out at a time: for a training image x
   of class y and y's k nearest known classes N(y) (by the cosine of their class-mean image features),

       x^_y = G(w_y; w_N(y), x~_N(y)),   x~_j = normalize(mu_j + z * sigma_j), z ~ N(0, I),
       x^_j = G(w_j; w_y, f(x))  for j in N(y),
       L_gen = ||x^_y - f(x)||^2 + (1/k) sum_j ||x^_j - x~_j||^2,

   mu_j, sigma_j the mean and standard deviation of class j's image features f over the shots. The
   generator then extrapolates features for the unknown classes u (the k classes outside the training
   ones whose text features are nearest to w_y): x^_u = G(w_u; w_y, f(x)). These synthesised unknowns
   enter the classification loss, so that the prompts must also separate classes never seen as images:

       L = L_gen + 1[t >= t_w] ( a CE(s f(x) W_b^T, y) + b CE(s x^_y W_b^T, y) + (b/k) CE(s x^_j W_b^T, j)
                                + (c/k) CE(s x^_u W_u^T, u) + lambda L_SD ),

   W_b and W_u the prompts' features of the known and unknown classes, s the temperature, t_w the end
   of a warm-up (the first 20% of training) in which only the generator learns (L_gen alone).
   a = 0.25, b = 0.25, c = 0.5, k = 3, the generator's shape (4 heads, a 2-layer FFN, no residual of the
   query) and the warm-up follow the official release (trainers/ogen.py). As there, w_y and w_N(y) enter
   G detached, the unknowns' text features do not (the prompt learns through the synthesis of unknowns),
   and the unknown classes are the dataset's other classes: their NAMES are used in training, never their
   images or labels (``synthesize_new: false`` drops that term, leaving only the known-class synthesis).

2. Adaptive self-distillation: a teacher made of earlier states of the learnable parts (the context
   and the generator) whose predictions the student is distilled towards,

       L_SD = T^2 [ KL(p_T(f(x)) || p_S(f(x))) + KL(p_T(x^_u) || p_S(x^_u)) ],

   p = softmax(logits / T) over the known classes for the real images and over the unknown classes for
   the synthesised features (each model synthesising with its own generator and prompts). The paper's
   teacher is an adaptive local mean of past model states, the window growing as training goes on (late
   states overfit more, so they are averaged over more). Here: the learnable parameters are snapshotted
   at the end of every epoch into a ring of ``sd_window`` (M) slots (the initial state is the first
   snapshot), and after each snapshot the teacher becomes the mean of the latest m_t of them,

       theta_T = (1/m_t) sum_{i < m_t} theta_{e - i},   m_t = 1 + floor(progress * (M - 1)),

   progress the fraction of training done. The release does not contain this part, so the window rule,
   M = 5, the KL form of L_SD, T = 1 and lambda = 1 are OUR READING of the paper's description. The teacher
   changes only in ``on_after_step`` (``training_step`` is a pure function of the batch, the parameters and
   ``global_step``); its parameters, the snapshot ring and the class statistics are submodules and
   buffers, so a checkpoint carries them.

Other choices of ours: the sampled known-class features x~ are put back on the unit sphere (the release
leaves mu + u sigma unnormalised and draws u ~ U(0, 1)); z comes from a generator seeded by (seed,
global_step), so the closure of a two-step optimizer sees the same draw; the generator's dropout is 0
(release: 0.1) for the same reason; the class statistics are computed in ``on_train_start`` from the
training loader's first pass (the release precomputes them from the training images).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from classlab.data.loader import mix_seed
from classlab.methods.registry import register_method
from classlab.methods.vlm.coop import CoOp


class FeatureGenerator(nn.Module):
    """x^ = normalize(FFN(q) + MHA(q, K, V)): image features for the queried classes' text features,
    attending over reference classes' (text, image) feature pairs."""

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"ogen: gen_heads {heads} must divide the joint-space width {dim}")
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(B, Q, E) queries, (B, N, E) keys and values -> (B, Q, E) unit-norm synthesised features."""
        attended, _ = self.attn(query, keys, values, need_weights=False)  # MHA(q, K, V)
        return F.normalize(self.ffn(query) + attended, dim=-1)           # normalize(FFN(q) + MHA(q, K, V))


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the rows."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean",
                    log_target=True) * t * t


@register_method("vlm", "ogen")
class OGEN(CoOp):
    def build(self, class_names):
        super().build(class_names)  # CoOp's context over every class (the unknowns' prompts share it)
        hp = self.hparams
        device = self.clip.logit_scale.device
        dim = self.clip.embed_dim
        self.base_classes = list(self.train_classes)
        base = set(self.base_classes)
        synthesize_new = bool(hp.get("synthesize_new", True))
        self.new_classes = [c for c in range(self.num_classes) if c not in base] if synthesize_new else []
        if len(self.base_classes) < 2:
            raise ValueError("ogen synthesises a known class from the others: it needs at least 2 training classes")
        self.k_base = min(int(hp["neighbours"]), len(self.base_classes) - 1)
        self.k_new = min(int(hp["neighbours"]), len(self.new_classes))
        self.generator = FeatureGenerator(dim, int(hp["gen_heads"]), float(hp.get("gen_dropout", 0.0))).to(device)
        # the teacher: copies of the learnable parts, never trained by the optimizer
        self.teacher_prompt = copy.deepcopy(self.prompt).requires_grad_(False)
        self.teacher_generator = copy.deepcopy(self.generator).requires_grad_(False)
        nb = len(self.base_classes)
        self.register_buffer("class_mean", torch.zeros(nb, dim, device=device))  # mu_j over the shots
        self.register_buffer("class_std", torch.zeros(nb, dim, device=device))   # sigma_j
        self.register_buffer("neighbours", torch.zeros(nb, self.k_base, dtype=torch.long, device=device))  # N(y)
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool, device=device))
        size = sum(p.numel() for p in self.student_parameters())
        self.register_buffer("snapshots", torch.zeros(int(hp["sd_window"]), size, device=device))
        self.register_buffer("snapshot_count", torch.zeros((), dtype=torch.long, device=device))
        self.steps_per_epoch: int | None = None
        self.snapshot(progress=0.0)  # the initial state is the first snapshot (the teacher equals the student)

    # --- the teacher ------------------------------------------------------------------------
    def student_parameters(self) -> list[torch.Tensor]:
        return [self.prompt.ctx, *self.generator.parameters()]

    def teacher_parameters(self) -> list[torch.Tensor]:
        return [self.teacher_prompt.ctx, *self.teacher_generator.parameters()]

    @torch.no_grad()
    def snapshot(self, progress: float) -> None:
        """Write the student's state into the ring, then theta_T = the mean of the latest m_t snapshots,
        m_t = 1 + floor(progress (M - 1)) (at most the number taken)."""
        slots = self.snapshots.shape[0]
        count = int(self.snapshot_count)
        self.snapshots[count % slots] = torch.cat([p.detach().reshape(-1) for p in self.student_parameters()])
        count += 1
        self.snapshot_count.fill_(count)
        window = min(1 + int(math.floor(min(max(progress, 0.0), 1.0) * (slots - 1))), count, slots)  # m_t
        rows = torch.tensor([(count - 1 - i) % slots for i in range(window)], device=self.snapshots.device)
        mean = self.snapshots[rows].mean(0)  # (1/m_t) sum of the latest m_t states
        offset = 0
        for p in self.teacher_parameters():
            p.copy_(mean[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def train(self, mode: bool = True):
        super().train(mode)
        if hasattr(self, "teacher_generator"):
            self.teacher_generator.eval()  # the teacher never drops out
        return self

    # --- class statistics of the known classes ---------------------------------------------------
    @torch.no_grad()
    def fit_class_statistics(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """mu_j, sigma_j of each training class's unit-norm image features, and N(j): the k known classes
        whose means are nearest to j's in cosine (j itself excluded)."""
        features = features.to(self.class_mean.device)
        labels = labels.to(self.class_mean.device)
        for position, c in enumerate(self.base_classes):
            rows = features[labels == c]
            if len(rows) == 0:
                raise ValueError(f"ogen: no training image of class {c} to estimate its feature statistics")
            self.class_mean[position] = rows.mean(0)
            self.class_std[position] = rows.std(0, unbiased=False)
        means = F.normalize(self.class_mean, dim=-1)
        cosine = means @ means.t()
        cosine.fill_diagonal_(-float("inf"))
        self.neighbours.copy_(cosine.topk(self.k_base, dim=1).indices)
        self.stats_ready.fill_(True)

    @torch.no_grad()
    def on_train_start(self, loader) -> None:
        self.steps_per_epoch = len(loader)
        features, labels = [], []
        for batch in loader:
            features.append(self.clip.encode_image(batch["x"]))
            labels.append(batch["y"])
        self.fit_class_statistics(torch.cat(features), torch.cat(labels))

    # --- one batch ------------------------------------------------------------------------------
    def progress(self, step: int | None = None) -> float:
        """The fraction of training done at ``step`` (``global_step`` by default); 1 if unknown."""
        if not self.steps_per_epoch or int(self.hparams.get("epochs", 0)) <= 0:
            return 1.0
        total = self.steps_per_epoch * int(self.hparams["epochs"])
        return min(float(self.global_step if step is None else step) / total, 1.0)

    def sample_neighbour_features(self, neighbours: torch.Tensor) -> torch.Tensor:
        """x~_j = normalize(mu_j + z sigma_j), z ~ N(0, I) drawn from (seed, global_step): (B, k, E)."""
        gen = torch.Generator().manual_seed(mix_seed(int(self.hparams.get("seed", 0)), int(self.global_step), 0x06E7))
        z = torch.randn(tuple(neighbours.shape) + (self.class_mean.shape[1],), generator=gen).to(self.class_mean.device)
        return F.normalize(self.class_mean[neighbours] + z * self.class_std[neighbours], dim=-1)

    def synthesis(self, prompt, generator, image, targets, sampled, new_pick=None) -> dict:
        """The logits and synthesised features of one model (student or teacher) for a batch."""
        nb = len(self.base_classes)
        text = self.clip.encode_text(prompt(classes=self.base_classes + self.new_classes))
        w_base, w_new = text[:nb], text[nb:]
        s = self.clip.scale()
        out = {"logits": s * image @ w_base.t()}                            # s f(x) W_b^T
        w_y = w_base[targets].detach().unsqueeze(1)                          # (B, 1, E)
        nbr = self.neighbours[targets]                                       # N(y): (B, k)
        w_nbr = w_base[nbr].detach()                                         # (B, k, E)
        out["syn_label"] = generator(w_y, w_nbr, sampled).squeeze(1)          # x^_y = G(w_y; w_N(y), x~_N(y))
        out["syn_neighbours"] = generator(w_nbr, w_y, image.unsqueeze(1))    # x^_j = G(w_j; w_y, f(x))
        out["logits_syn_label"] = s * out["syn_label"] @ w_base.t()
        out["logits_syn_neighbours"] = s * out["syn_neighbours"] @ w_base.t()  # (B, k, nb)
        if self.k_new > 0:
            if new_pick is None:  # the k unknown classes nearest to y in text space
                new_pick = (w_y.squeeze(1) @ w_new.detach().t()).topk(self.k_new, dim=1).indices
            out["new_pick"] = new_pick
            syn_new = generator(w_new[new_pick], w_y, image.unsqueeze(1))    # x^_u = G(w_u; w_y, f(x))
            out["logits_syn_new"] = s * syn_new @ w_new.t()                  # (B, k_new, n_new)
        return out

    def distillation(self, student: dict, teacher: dict) -> torch.Tensor:
        """L_SD = T^2 [KL(p_T || p_S) on the real images' known-class logits + on the unknowns' logits]."""
        t = float(self.hparams.get("sd_temperature", 1.0))
        loss = distillation_kl(student["logits"], teacher["logits"], t)
        if "logits_syn_new" in student:
            loss = loss + distillation_kl(student["logits_syn_new"].flatten(0, 1),
                                          teacher["logits_syn_new"].flatten(0, 1), t)
        return loss

    def training_step(self, batch):
        if not bool(self.stats_ready):
            raise RuntimeError("ogen: the known classes' feature statistics are unset (on_train_start, or "
                               "fit_class_statistics, runs before training)")
        hp = self.hparams
        x, y = batch["x"], batch["y"]
        targets = self.positions_among(y, self.base_classes)
        image = self.encode_image(x)
        nbr = self.neighbours[targets]                                               # N(y)
        sampled = self.sample_neighbour_features(nbr)                                # x~_N(y)
        out = self.synthesis(self.prompt, self.generator, image, targets, sampled)
        # L_gen = ||x^_y - f(x)||^2 + (1/k) sum_j ||x^_j - x~_j||^2  (mean over the batch)
        l_gen = ((out["syn_label"] - image).pow(2).sum(-1).mean()
                 + (out["syn_neighbours"] - sampled).pow(2).sum(-1).mean())
        ce = F.cross_entropy(out["logits"], targets)
        logs = {"gen": float(l_gen.detach()), "ce": float(ce.detach()),
                "train_acc": float((out["logits"].argmax(1) == targets).float().mean())}
        if self.progress() < float(hp["gen_warmup_frac"]):  # warm-up: the generator alone learns
            return l_gen, logs
        k = self.k_base
        syn_label = F.cross_entropy(out["logits_syn_label"], targets)                         # CE(s x^_y W_b^T, y)
        syn_nbr = F.cross_entropy(out["logits_syn_neighbours"].flatten(0, 1), nbr.flatten())  # CE(s x^_j W_b^T, j)
        # L = L_gen + a CE(real) + b CE(x^_y) + (b / k) CE(x^_j) [+ (c / k) CE(x^_u) + lambda L_SD below]
        loss = l_gen + float(hp["ce_weight"]) * ce + float(hp["syn_known_weight"]) * (syn_label + syn_nbr / k)
        if self.k_new > 0:
            # CE(s x^_u W_u^T, u)
            syn_new = F.cross_entropy(out["logits_syn_new"].flatten(0, 1), out["new_pick"].flatten())
            loss = loss + float(hp["syn_unknown_weight"]) / self.k_new * syn_new
            logs["syn_new"] = float(syn_new.detach())
        if float(hp["sd_weight"]) > 0:
            with torch.no_grad():
                teacher = self.synthesis(self.teacher_prompt, self.teacher_generator, image, targets, sampled,
                                         out.get("new_pick"))
            l_sd = self.distillation(out, teacher)
            loss = loss + float(hp["sd_weight"]) * l_sd                                             # + lambda L_SD
            logs["sd"] = float(l_sd.detach())
        logs.update(syn_label=float(syn_label.detach()), syn_neighbours=float(syn_nbr.detach()))
        return loss, logs

    def on_after_step(self, batch, logs):
        # the teacher moves once per epoch, at the epoch's last step: snapshot, then the local mean
        if self.steps_per_epoch and (int(self.global_step) + 1) % self.steps_per_epoch == 0:
            self.snapshot(self.progress(int(self.global_step) + 1))
