"""CAPro: text-anchored visual prototypes and collective bootstrapping against label noise.

Qin, Chen, Shen, Fu, Gu, Li, Sun and Ji, "CAPro: Webly Supervised Learning with Cross-Modality Aligned
Prototypes", NeurIPS 2023 (official code: github.com/yuleiqin/capro, ``model.py`` / ``train.py``, read
for the equations below). This is not a prompt method: it trains an image classifier from scratch on
noisily labelled images; the text side only supplies one embedding per class (its textual prototype).
The protocol (``classlab.protocols.label_noise``) hands them over with ``build(class_names,
text_features)``: (K, 384) MiniLM embeddings of each class's name prompt and shipped descriptions (the
paper's textual prototypes embed each class's concept definition; MiniLM is one of the text encoders of
its released runs).

With h = f(x) the backbone features, the classifier's logits are W h; the visual embedding is
z = normalize(g(h)) (g: a two-layer MLP to ``low_dim``, the paper's projection) and a low-dim classifier
reads z. With prototypes P (K, low_dim, unit rows) and temperature T:

1. Text-anchored prototypes (at epoch ``init_proto_epoch``, 0-based). The paper text-matches each web
   image's own text (title, tags) against the class's textual prototype, first enhancing each text by
   its images' visual neighbours (kNN smoothing and re-ranking), and takes the top-K matches of each
   class (``topk`` 50) as clean anchors; the prototype is the mean of the anchors' embeddings,
   renormalised. Our images have no text of their own, so (our reading) each image's text-side
   embedding is u = normalize(A z), a linear map into the MiniLM space trained with the alignment loss
   L_text = CE(u . t_c / T_text, y) (a CLIP-style head against the frozen class texts t_c); the
   enhancement replaces u_i by the normalised mean of u_j over the ``text_enhance_k`` visual nearest
   neighbours j of i (itself included); the anchors of class c are the ``anchors_per_class`` samples
   labelled c with the largest u'_i . t_c (``select_text_anchors``); p_c = normalize(mean of their z).
   Anchors play the paper's "pseudo few-shot" samples: never relabelled, never dropped.
2. Momentum prototypes: after each step, for every kept sample i (batch order) with cleaned label c,
   p_c <- m p_c + (1 - m) z_i, then every p_c is renormalised (m = ``proto_momentum``, 0.999).
3. Noise cleaning (from ``start_clean_epoch``): s_i = alpha softmax(W h_i) + (1 - alpha) softmax(z_i P^T / T).
   The label y_i is kept where s_i[y_i] >= 1/K; it is replaced by argmax s_i where max s_i >= ``pseudo_threshold``
   (0.6); a sample meeting neither is dropped from every loss of the step (``clean_labels``).
4. Instance contrast (MoCo, as the paper's code): a momentum copy of the backbone and projection embeds a
   second augmented view into a key k_i (copy weights theta_k <- m_k theta_k + (1 - m_k) theta_q after
   each step, m_k = ``key_momentum``); L_inst = CE([z_i . k_i, z_i . Q] / T, 0) against a queue Q of the
   last ``queue_size`` keys. A reconstruction head maps z back to h: L_recn = ||r(z) - h||^2 (mean), its
   gradient reaching the projection only until the prototypes exist, as in the code.
5. Collective bootstrapping (the paper's dictionary look-up, ``use_soft_label`` 7/9 in its code): over
   the same queue, w_ij = clamp(z_i . q_j, 0, 1) + 1e-7, normalised over j; each key's soft label
   r_j = alpha softmax(lowdim(q_j)) + (1 - alpha) softmax(q_j P^T / T) (before the prototypes exist:
   softmax(lowdim(q_j)), our choice); the neighbours' target is t_i = sum_j w_ij r_j (clamped,
   renormalised) and the classifier learns the mix  y~_i = (1 - beta) onehot(ŷ_i) + beta t_i  (beta 0.1):
   L_cls = -sum_k y~_ik log softmax(W h_i)_k (``bootstrapped_target``; the code's option 9 puts it on
   the classifier, option 7 on the low-dim one).
6. Loss on the kept samples with their cleaned labels ŷ:
   L = L_cls + w_lowdim CE(lowdim(z), ŷ) + w_proto CE(z P^T / T, ŷ) + w_inst L_inst + w_recn L_recn + w_text L_text,
   the prototype term once the prototypes exist.

Left out (CPU scale): the shuffled BatchNorm of the key encoder (one device here), the relation module,
and the paper's second stage (retraining the classifier on the saved pseudo-labels with mixup).

``cleaned_labels(loader)`` applies rule 3 with the final model to every training sample (-1: dropped),
so the protocol can report how many flipped labels were corrected.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method

TEXT_DIM = 384  # MiniLM sentence embeddings (classlab.models.text)


# --- the method's equations on plain tensors ------------------------------------------------------
def enhance_text_embeddings(text_space: torch.Tensor, visual: torch.Tensor, k: int, chunk: int = 512) -> torch.Tensor:
    """Each row of ``text_space`` (N, D) replaced by the normalised mean of the rows of its ``k`` nearest
    neighbours in ``visual`` (N, d) by cosine (itself included); k <= 1 returns the rows unchanged."""
    if k <= 1 or len(text_space) <= 1:
        return F.normalize(text_space, dim=1)
    k = min(int(k), len(visual))
    v = F.normalize(visual, dim=1)
    out = torch.empty_like(text_space)
    for start in range(0, len(v), chunk):
        sims = v[start:start + chunk] @ v.T
        neighbours = sims.topk(k, dim=1).indices          # (b, k)
        out[start:start + chunk] = text_space[neighbours].mean(1)
    return F.normalize(out, dim=1)


def select_text_anchors(text_space: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor,
                        k: int) -> torch.Tensor:
    """Bool (N,): for each class c, the ``k`` samples labelled c whose text-side embedding is nearest
    (largest dot product) to the class's text embedding t_c (all of them where fewer than k)."""
    scores = (text_space * text_features[labels]).sum(1)
    mask = torch.zeros(len(labels), dtype=torch.bool, device=labels.device)
    for c in labels.unique().tolist():
        members = torch.nonzero(labels == c).flatten()
        top = scores[members].topk(min(int(k), len(members))).indices
        mask[members[top]] = True
    return mask


def prototypes_from_anchors(visual: torch.Tensor, labels: torch.Tensor, anchors: torch.Tensor,
                            num_classes: int) -> torch.Tensor:
    """(K, d): each class's prototype, the normalised mean of its anchors' embeddings (zero without any)."""
    protos = torch.zeros(num_classes, visual.shape[1], dtype=visual.dtype, device=visual.device)
    protos.index_add_(0, labels[anchors], visual[anchors])
    return F.normalize(protos, dim=1)


def momentum_update_prototypes(prototypes: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                               momentum: float) -> torch.Tensor:
    """p_c <- m p_c + (1 - m) z_i for each sample i in order, then every row renormalised; a class
    with n samples z_1..z_n in the batch gets m^n p_c + (1 - m) sum_j m^(n - j) z_j."""
    out = prototypes.clone()
    m = float(momentum)
    for c in labels.unique().tolist():
        zc = z[labels == c]
        n = len(zc)
        powers = m ** torch.arange(n - 1, -1, -1, dtype=z.dtype, device=z.device)
        out[c] = (m ** n) * out[c] + ((1.0 - m) * powers[:, None] * zc).sum(0)
    return F.normalize(out, dim=1)


def clean_labels(cls_logits: torch.Tensor, proto_logits: torch.Tensor, labels: torch.Tensor, alpha: float,
                 threshold: float, protected: torch.Tensor | None = None):
    """CAPro's noise cleaning. s = alpha softmax(cls) + (1 - alpha) softmax(proto); keep y where
    s[y] >= 1/K; relabel to argmax s where max s >= threshold; drop the rest. Protected samples (the
    text anchors) keep their label. Returns (targets with -1 for dropped, kept mask, relabelled mask:
    the label changed)."""
    k = cls_logits.shape[1]
    soft = alpha * cls_logits.softmax(1) + (1.0 - alpha) * proto_logits.softmax(1)
    keep = soft.gather(1, labels[:, None]).squeeze(1) >= 1.0 / k
    best, hard = soft.max(1)
    correct = best >= threshold
    if protected is not None:
        keep = keep | protected
        correct = correct & ~protected
    kept = keep | correct
    targets = torch.where(correct, hard, labels)
    targets = torch.where(kept, targets, torch.full_like(labels, -1))
    return targets, kept, correct & (hard != labels)


def collective_bootstrap_target(z: torch.Tensor, queue: torch.Tensor, queue_soft: torch.Tensor) -> torch.Tensor:
    """(B, K): t_i = sum_j w_ij r_j with w_ij = (clamp(z_i . q_j, 0, 1) + 1e-7) / sum_j' (...), the
    neighbours' soft labels r (M, K) weighted by similarity; clamped to [0, 1] and renormalised."""
    w = (z @ queue.T).clamp(0.0, 1.0) + 1e-7
    w = w / w.sum(1, keepdim=True)
    t = (w @ queue_soft).clamp(0.0, 1.0)
    return t / t.sum(1, keepdim=True)


def bootstrapped_target(labels: torch.Tensor, neighbour_target: torch.Tensor, beta: float) -> torch.Tensor:
    """The classifier's target: (1 - beta) onehot(label) + beta * the neighbours' target."""
    onehot = F.one_hot(labels, neighbour_target.shape[1]).to(neighbour_target.dtype)
    return (1.0 - beta) * onehot + beta * neighbour_target


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def ordered_batches(loader, batch_size: int = 512):
    """(x, y, index) over every sample of a ``TensorLoader`` in order, normalised, unaugmented."""
    for start in range(0, len(loader.y), batch_size):
        xb = loader.normalize(loader.x[start:start + batch_size])
        yield xb, loader.y[start:start + batch_size], loader.source_index[start:start + batch_size]


@register_method("vlm", "capro")
class CAPro(Method):
    trains_on_noisy_labels = True  # a label-noise method (classlab.protocols.label_noise), not a prompt method

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        features, low = int(model.num_features), int(hp.get("low_dim", 128))
        hidden = int(hp.get("proj_hidden", 2048))
        self.projection = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, low))
        self.lowdim_head = nn.Linear(low, num_classes)
        self.text_projection = nn.Linear(low, TEXT_DIM)   # A: visual embedding -> MiniLM space (our reading)
        self.reconstruction = nn.Sequential(nn.Linear(low, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, features))
        # the momentum key encoder (backbone + projection) of the instance contrast
        self.key_backbone = copy.deepcopy(model.backbone).requires_grad_(False)
        self.key_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.num_views = 2 if float(hp.get("w_inst", 1.0)) > 0 else 1
        self.register_buffer("text_features", torch.zeros(num_classes, TEXT_DIM))
        self.register_buffer("prototypes", torch.zeros(num_classes, low))
        self.register_buffer("proto_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("queue", torch.zeros(int(hp.get("queue_size", 1024)), low))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("anchors", torch.zeros(0, dtype=torch.bool))  # train-split positions of the anchors
        self.epoch = 0
        self._loader = None

    # --- the text side (the protocol calls this before training) ----------------------------
    def build(self, class_names: list[str], text_features: torch.Tensor) -> None:
        """The classes' names and their (K, 384) text embeddings (the textual prototypes)."""
        text = torch.as_tensor(text_features, dtype=torch.float32)
        if text.shape != (self.num_classes, TEXT_DIM):
            raise ValueError(f"capro: text_features of shape {tuple(text.shape)}, "
                             f"expected ({self.num_classes}, {TEXT_DIM})")
        self.class_names = list(class_names)
        self.text_features.copy_(F.normalize(text, dim=1).to(self.text_features.device))

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # --- forward pieces -----------------------------------------------------------------------
    def embed(self, x: torch.Tensor):
        """(classifier logits, z, u): the visual embedding z and its text-side map u, both unit-norm."""
        h = self.model.features(x)
        z = F.normalize(self.projection(h), dim=1)
        return self.model.head(h), z, F.normalize(self.text_projection(z), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projection(self.key_backbone(x)), dim=1)

    def proto_logits(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.prototypes.T / float(self.hparams.get("temperature", 0.1))

    def _cleaning_on(self) -> bool:
        return bool(self.proto_ready) and self.epoch >= int(self.hparams.get("start_clean_epoch", 0))

    @torch.no_grad()
    def neighbour_target(self, z: torch.Tensor) -> torch.Tensor | None:
        """The collective bootstrapping target of each row of ``z`` from the queue (None while empty)."""
        n = int(self.queue_count)
        if n == 0:
            return None
        q = self.queue[:n]
        alpha = float(self.hparams.get("alpha", 0.5))
        soft = self.lowdim_head(q).softmax(1)
        if bool(self.proto_ready):
            soft = alpha * soft + (1.0 - alpha) * self.proto_logits(q).softmax(1)
        return collective_bootstrap_target(z, q, soft)

    # --- one step -----------------------------------------------------------------------------
    def training_step(self, batch: dict):
        hp = self.hparams
        x, y = batch["x"], batch["y"]
        h = self.model.features(x)
        z = F.normalize(self.projection(h), dim=1)
        logits, u = self.model.head(h), F.normalize(self.text_projection(z), dim=1)
        ready = bool(self.proto_ready)
        proto = self.proto_logits(z) if ready else None
        targets, kept = y, torch.ones_like(y, dtype=torch.bool)
        relabelled = torch.zeros_like(kept)
        if self._cleaning_on():
            protected = self.anchors[batch["index"]] if self.anchors.numel() else None
            with torch.no_grad():
                targets, kept, relabelled = clean_labels(logits.detach(), proto.detach(), y,
                                                         float(hp.get("alpha", 0.5)),
                                                         float(hp.get("pseudo_threshold", 0.6)), protected)
        neighbours = self.neighbour_target(z.detach())
        temperature = float(hp.get("temperature", 0.1))
        views = batch.get("views")
        keys = self.keys(views[1]) if views is not None and len(views) > 1 and self.num_views > 1 else None
        logs = {"logits": logits.detach(), "z": z.detach(), "keys": keys, "targets": targets, "kept": kept,
                "relabelled": relabelled}
        if not bool(kept.any()):  # every sample dropped: no gradient this step
            return 0.0 * (logits.sum() + z.sum() + u.sum() + self.reconstruction(z).sum()), logs
        t, lg, zk, uk = targets[kept], logits[kept], z[kept], u[kept]
        if neighbours is not None:
            loss_cls = soft_cross_entropy(lg, bootstrapped_target(t, neighbours[kept], float(hp.get("beta", 0.1))))
        else:
            loss_cls = F.cross_entropy(lg, t)
        loss_low = F.cross_entropy(self.lowdim_head(zk), t)
        loss_text = F.cross_entropy(uk @ self.text_features.T / float(hp.get("text_temperature", 0.1)), t)
        loss = loss_cls + float(hp.get("w_lowdim", 1.0)) * loss_low + float(hp.get("w_text", 1.0)) * loss_text
        # reconstruction of h from z: trains the projection only until the prototypes exist (the code's schedule)
        recn = self.reconstruction(zk.detach() if ready else zk)
        loss = loss + float(hp.get("w_recn", 1.0)) * F.mse_loss(recn, h[kept].detach())
        if keys is not None:
            n = int(self.queue_count)
            inst = torch.cat([(zk * keys[kept]).sum(1, keepdim=True), zk @ self.queue[:n].T], dim=1) / temperature
            loss_inst = F.cross_entropy(inst, torch.zeros(len(inst), dtype=torch.long, device=inst.device))
            loss = loss + float(hp.get("w_inst", 1.0)) * loss_inst
            logs["loss_inst"] = float(loss_inst.detach())
        if ready:
            loss_proto = F.cross_entropy(proto[kept], t)
            loss = loss + float(hp.get("w_proto", 1.0)) * loss_proto
            logs["loss_proto"] = float(loss_proto.detach())
        logs.update(loss_cls=float(loss_cls.detach()), loss_text=float(loss_text.detach()))
        return loss, logs

    @torch.no_grad()
    def on_after_step(self, batch: dict, logs: dict) -> None:
        z = logs["z"].to(self.prototypes.dtype)
        if bool(self.proto_ready):
            kept = logs["kept"]
            self.prototypes.copy_(momentum_update_prototypes(self.prototypes, z[kept], logs["targets"][kept],
                                                             float(self.hparams.get("proto_momentum", 0.999))))
        if logs.get("keys") is not None:  # the queue holds the key encoder's embeddings, as MoCo's
            z = logs["keys"].to(self.queue.dtype)
            m = float(self.hparams.get("key_momentum", 0.999))
            for online, key in ((self.model.backbone, self.key_backbone), (self.projection, self.key_projection)):
                for p_q, p_k in zip(online.parameters(), key.parameters()):
                    p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)
        size = self.queue.shape[0]
        z = z[-size:]
        slots = (int(self.queue_ptr) + torch.arange(len(z), device=z.device)) % size
        self.queue[slots] = z.to(self.queue.dtype)
        self.queue_ptr.fill_((int(self.queue_ptr) + len(z)) % size)
        self.queue_count.fill_(min(int(self.queue_count) + len(z), size))

    # --- run and epoch boundaries -------------------------------------------------------------
    def on_train_start(self, loader) -> None:
        self._loader = loader
        n = int(getattr(loader, "num_train_samples", len(loader.y)))
        if self.anchors.numel() != n:
            self.anchors = torch.zeros(n, dtype=torch.bool, device=self.prototypes.device)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)
        due = epoch >= int(self.hparams.get("init_proto_epoch", 0))
        if due and not bool(self.proto_ready) and self._loader is not None:
            self.initialise_prototypes(self._loader)

    @torch.no_grad()
    def _pass(self, loader):
        was_training = self.training
        self.eval()
        rows = [(*self.embed(xb), yb, ib) for xb, yb, ib in ordered_batches(loader)]
        self.train(was_training)
        return [torch.cat(part) for part in zip(*rows)]

    @torch.no_grad()
    def initialise_prototypes(self, loader) -> None:
        """Rule 1: text-enhanced matching picks each class's anchors; their mean embedding is its prototype."""
        _, z, u, y, index = self._pass(loader)
        enhanced = enhance_text_embeddings(u, z, int(self.hparams.get("text_enhance_k", 10)))
        anchors = select_text_anchors(enhanced, y, self.text_features, int(self.hparams.get("anchors_per_class", 50)))
        self.prototypes.copy_(prototypes_from_anchors(z, y, anchors, self.num_classes))
        self.anchors.zero_()
        self.anchors[index[anchors]] = True
        self.proto_ready.fill_(True)

    @torch.no_grad()
    def cleaned_labels(self, loader) -> torch.Tensor | None:
        """Rule 3 applied by the current model to every sample of ``loader`` (its labels the noisy ones):
        a (num_train_samples,) long tensor of cleaned labels, -1 for dropped (and for samples outside the
        loader); None where the prototypes were never built (no cleaning ran)."""
        if not bool(self.proto_ready):
            return None
        logits, z, _, y, index = self._pass(loader)
        protected = self.anchors[index] if self.anchors.numel() else None
        targets, _, _ = clean_labels(logits, self.proto_logits(z), y, float(self.hparams.get("alpha", 0.5)),
                                     float(self.hparams.get("pseudo_threshold", 0.6)), protected)
        out = torch.full((int(getattr(loader, "num_train_samples", len(y))),), -1, dtype=torch.long, device=y.device)
        out[index] = targets
        return out.cpu()
