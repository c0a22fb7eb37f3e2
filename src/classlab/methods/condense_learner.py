"""What a dataset-condensation method is: the shared bi-level loop and its parts.

A condensation method learns ``ipc`` images per class (the synthetic set S) such that a network
trained on S does well on the real test set. The gradient-matching family (DC, DSA, DCC, and NRR-DD
built on them) alternates two levels around one network theta (Zhao, Mopuri and Bilen, "Dataset
Condensation with Gradient Matching", ICLR 2021, Algorithm 1; official code VICO-UoE/
DatasetCondensation, ``main.py`` and ``get_loops``):

    for it in 1 .. iterations:                      # a fresh, randomly initialised network theta
        for ol in 1 .. outer_loop:
            S <- S - lr_img * d/dS D(grad_theta L(S), grad_theta L(T))    # the outer (image) update
            if ol < outer_loop:
                theta <- theta - lr_net * grad_theta L(S), inner_loop epochs over S    # the inner loop

with D the layer-wise matching distance ``gradient_matching_distance`` and DC's schedule
(outer_loop, inner_loop) = (1, 1), (10, 50), (50, 10) for 1, 10, 50 images per class.

How it maps onto the engine (``classlab.engine.Trainer``). The trained parameter is the synthetic
set, ``CondensationMethod.images`` (normalised pixels), updated by SGD with momentum 0.5 (DC's
``optimizer_img``). **One engine step is one outer (image) update**; the loader yields one real batch
per class per step (a ``MixedLoader`` with one source per class, wrapped by ``StepLoader`` so that an
engine epoch is ``iterations_per_epoch`` networks, i.e. ``iterations_per_epoch * outer_loop`` steps).
``training_step`` computes the outer loss (a method's ``matching_loss``) with the current network on
the real batch; it changes nothing, so it is pure. ``optimizer_step`` backpropagates to the images
only (the network's weights get no ``.grad``) and lets a method mask that gradient (NRR-DD).
``on_after_step`` runs the ONE bi-level helper, ``bilevel_update``, for every method: at the last
image update of a network it re-initialises the network from a seed derived from the next iteration's
index; otherwise it trains the network ``inner_loop`` epochs on the updated, detached synthetic set
(plain SGD, ``lr_net``, batches of ``batch_train``; DSA's per-sample augmentation when the method uses
DSA). The network is a submodule and the images a parameter, so the engine's checkpoint holds the
whole state, and a resumed run continues exactly where it stopped: every random draw (real-batch
order, DSA parameters, inner-loop order, network seeds) comes from a generator seeded by
(seed, step), never from the global RNG.

Methods only say what differs: the matching loss (per class, DSA-augmented, summed over classes),
the initial synthetic set (random real images, herding, NRR-DD's critical patches) and, for NRR-DD, a
mask on the image gradient and a teacher for evaluation. Selections (``random``, ``herding``) set
``optimises = False``: the protocol skips the loop for them.

``evaluate_condensed`` is the shared evaluation: a fresh ``convnet_dc`` trained on S ``runs`` times
(DC's ``evaluate_synset``: SGD momentum 0.9, weight decay 5e-4, lr 0.01 divided by 10 after half of
the epochs, batch 256; DSA's per-sample augmentation for DSA/DCC), test accuracy of each run.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.data.loader import mix_seed
from classlab.methods.base import Method
from classlab.methods.condense_augment import DSA_STRATEGY, apply_dsa, dsa_augment, sample_dsa, strategy_families

# streams of random draws, kept apart: a seed is mix_seed(seed, STREAM, ...)
_NET_INIT, _INNER, _MATCH, _EVAL, _REFERENCE, _INIT, _CROPS = range(1, 8)

DC_LOOPS = {"1": [1, 1], "10": [10, 50], "20": [20, 25], "30": [30, 20], "40": [40, 15], "50": [50, 10]}


def resolve_loops(hparams: dict, ipc: int) -> tuple[int, int]:
    """(outer_loop, inner_loop): the hyperparameters where set, else the ``loops`` table at ``ipc``."""
    outer, inner = hparams.get("outer_loop"), hparams.get("inner_loop")
    if outer is None or inner is None:
        table = hparams.get("loops") or DC_LOOPS
        key = str(int(ipc))
        if key not in table:
            raise ConfigError(f"loops: no schedule for {ipc} images per class (known: {sorted(table, key=int)}); "
                              f"set outer_loop and inner_loop")
        outer = table[key][0] if outer is None else outer
        inner = table[key][1] if inner is None else inner
    return int(outer), int(inner)


def cpu_generator(*key: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(mix_seed(*key))
    return gen


# --- the matching distance -------------------------------------------------------------------

def gradient_matching_distance(grads_a: Sequence[torch.Tensor], grads_b: Sequence[torch.Tensor],
                               eps: float = 1e-6) -> torch.Tensor:
    """DC's layer-wise distance ('ours' in ``match_loss``/``distance_wb``):

        D(A, B) = sum over layers l with a >= 2-D gradient of
                  sum over output rows i of (1 - <A_l,i, B_l,i> / (|A_l,i| |B_l,i| + eps)),

    each gradient reshaped to (out_channels, -1) rows (a conv's filters, a linear layer's rows).
    1-D gradients (biases, normalisation scales and shifts) are ignored: DC returns 0 for them. Zero
    for equal gradients (up to eps), and invariant to scaling any row of either side by a positive
    factor."""
    if len(grads_a) != len(grads_b):
        raise ValueError(f"{len(grads_a)} gradients matched against {len(grads_b)}")
    total = None
    for ga, gb in zip(grads_a, grads_b):
        if ga.shape != gb.shape:
            raise ValueError(f"gradient shapes differ: {tuple(ga.shape)} vs {tuple(gb.shape)}")
        if ga.dim() <= 1:
            continue
        a = ga.reshape(ga.shape[0], -1)
        b = gb.reshape(gb.shape[0], -1)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)
        term = (1.0 - cos).sum()
        total = term if total is None else total + term
    if total is None:
        ref = grads_a[0] if len(grads_a) else torch.zeros(())
        return torch.zeros((), device=ref.device, dtype=ref.dtype)
    return total


# --- real data and seeded networks -----------------------------------------------------------

@dataclass
class RealData:
    """The real training images of a condensation run: uint8 (N, C, H, W) on the CPU, labels, and the
    per-channel statistics (in [0, 1] units) that map them to the normalised space of the synthetic set."""

    x: torch.Tensor
    y: torch.Tensor
    mean: Sequence[float]
    std: Sequence[float]
    num_classes: int

    def class_indices(self, c: int) -> torch.Tensor:
        return torch.nonzero(self.y == c).flatten()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 ``(x / 255 - mean) / std``."""
        shape = (1, -1, 1, 1)
        mean = torch.tensor(list(self.mean), dtype=torch.float32).view(shape).to(x.device)
        std = torch.tensor(list(self.std), dtype=torch.float32).view(shape).to(x.device)
        return (x.float() / 255.0 - mean) / std

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])


def seeded_reset(module: nn.Module, seed: int, template: nn.Module | None = None) -> None:
    """Re-initialise every parameter and buffer of ``module`` (its modules' ``reset_parameters``) as a
    fresh copy drawn on the CPU under ``seed`` would be: the same values on every device, and the
    global RNG left as it was. ``template`` is a CPU copy to draw into (made here when None)."""
    template = copy.deepcopy(module).cpu() if template is None else template
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed) % (2 ** 63))
        for m in template.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    with torch.no_grad():
        for target, source in zip(module.state_dict().values(), template.state_dict().values()):
            target.copy_(source)


def train_reference_network(model: nn.Module, data: RealData, seed: int, steps: int, batch_size: int,
                            lr: float, device: torch.device, momentum: float = 0.9,
                            weight_decay: float = 5e-4) -> nn.Module:
    """Train ``model`` (re-initialised from ``seed``) on random real batches for ``steps`` SGD steps and
    freeze it: the feature network of herding and the teacher of NRR-DD. Deterministic given the seed."""
    seeded_reset(model, mix_seed(seed, _REFERENCE, 0))
    model.to(device).train()
    model.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = cpu_generator(seed, _REFERENCE, 1)
    for _ in range(int(steps)):
        idx = torch.randint(len(data.y), (int(batch_size),), generator=gen)
        x = data.normalize(data.x[idx]).to(device)
        loss = F.cross_entropy(model(x), data.y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 512) -> torch.Tensor:
    """``model.features`` of normalised float images ``x``, on the CPU."""
    out = []
    for i in range(0, len(x), batch_size):
        out.append(model.features(x[i:i + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def class_activation_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The class activation map of class ``y`` at the backbone's last ReLU, LayerCAM's form (Jiang, Zhang,
    Hou, Cheng and Wei, "LayerCAM", IEEE TIP 2021; Grad-CAM with a weight per position instead of per
    channel): ``C = ReLU(sum_k ReLU(d logit_y / d A_k) * A_k)``, upsampled to the image and divided by its
    maximum, (B, H, W) in [0, 1] (all zero where nothing speaks for the class). DC's ConvNet flattens its
    last map into a linear head, so the per-channel mean gradient of Grad-CAM mixes the head's signs over
    positions and often cancels to an empty map; the per-position weights keep where the evidence is."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError("class_activation_map needs a network with a ReLU")
    store = {}
    handle = relus[-1].register_forward_hook(lambda _m, _i, out: store.__setitem__("a", out))
    try:
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)  # a graph even when the network is frozen
            logits = model(xx)
            act = store["a"]
            score = logits.gather(1, y.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, act)
    finally:
        handle.remove()
    cam = F.relu((F.relu(grad) * act).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)


# --- the loader: an engine epoch of a fixed number of steps ----------------------------------

class StepLoader:
    """``steps`` batches per epoch from ``loader`` (a ``MixedLoader``), read as one endless stream:
    step s of epoch e is batch g = e * steps + s of the stream, i.e. batch ``g % L`` of the underlying
    loader's epoch ``g // L`` (L its length). A batch depends on (seeds, g) alone, so ``iter_from``
    resumes mid-epoch exactly."""

    def __init__(self, loader, steps: int):
        if steps < 1:
            raise ValueError(f"StepLoader needs at least one step per epoch, got {steps}")
        self.loader, self.steps, self.epoch = loader, int(steps), 0
        self.device = loader.device

    @property
    def mean(self):
        return self.loader.mean

    @property
    def std(self):
        return self.loader.std

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def iter_from(self, start_batch: int = 0):
        if not 0 <= start_batch <= self.steps:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.steps}")
        epoch, length = self.epoch, len(self.loader)

        def batches():
            current, stream = None, None
            for s in range(start_batch, self.steps):
                e, b = divmod(epoch * self.steps + s, length)
                if current != (e, b):
                    self.loader.set_epoch(e)
                    stream = self.loader.iter_from(b)
                yield next(stream)
                current = (e, b + 1)
        return batches()

    def __iter__(self):
        return self.iter_from(0)


# --- the method base ---------------------------------------------------------------------------

class CondensationMethod(Method):
    """A learned synthetic set and the gradient-matching bi-level loop (see the module docstring).

    ``model`` is the network whose gradients are matched (a ``convnet_dc`` Classifier): method state,
    re-initialised per iteration, trained by the inner loop, never by the engine's optimizer.
    Subclasses override ``matching_loss`` (the outer loss), ``initialise`` (the initial set) and, where
    they need them, ``mask_image_grad`` and ``evaluation_teacher``.
    """

    optimises: bool = True   # False: a selection of real images, no bi-level loop
    augment = False          # the real batches come unaugmented (DSA augments inside the loss)

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        self.seed = 0  # the run's seed, set by the protocol before ``initialise``
        self.images = nn.Parameter(torch.zeros(0, 1, 1, 1))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))
        self.register_buffer("init_indices", torch.zeros(0, dtype=torch.long))
        self.model.requires_grad_(True)  # autograd.grad needs it; the engine's optimizer never sees it
        self._template = [copy.deepcopy(model).cpu()]  # a list: not a submodule, not checkpointed

    # --- the synthetic set ------------------------------------------------------------------
    @property
    def ipc(self) -> int:
        return len(self.labels) // max(self.num_classes, 1)

    @property
    def dsa_strategy(self) -> str:
        strategy = str(self.hparams.get("dsa_strategy", "none") or "none")
        strategy_families(strategy)  # raises on an unknown family
        return strategy

    def set_synthetic(self, images: torch.Tensor, labels: torch.Tensor, init_indices: torch.Tensor) -> None:
        """The initial set: normalised images [K * ipc, C, H, W] ordered by class, ``ipc`` per class."""
        k = self.num_classes
        if len(images) != len(labels) or len(images) % k:
            raise ValueError(f"{len(images)} images and {len(labels)} labels for {k} classes")
        ipc = len(labels) // k
        expected = torch.arange(k).repeat_interleave(ipc)
        if not torch.equal(labels.cpu().long(), expected):
            raise ValueError("synthetic labels must be ipc copies of each class, in class order")
        device = self.images.device
        self.images = nn.Parameter(images.detach().float().clone().to(device))
        self.labels = expected.to(device)
        self.init_indices = torch.as_tensor(init_indices, dtype=torch.long).to(device)

    def class_slice(self, c: int) -> slice:
        return slice(c * self.ipc, (c + 1) * self.ipc)

    def condensed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthetic set as it stands: (normalised float images, labels), on the CPU."""
        return self.images.detach().float().cpu().contiguous(), self.labels.cpu().clone()

    def initialise(self, data: RealData, ipc: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The initial set and the real indices it came from: ``init: real`` (DC's ``--init real``) takes
        ``ipc`` random real images of each class; ``init: noise`` standard normal pixels (indices -1)."""
        idx = random_class_subset(data, ipc, self.seed)
        if str(self.hparams.get("init", "real")) == "noise":
            gen = cpu_generator(self.seed, _INIT, 1)
            shape = (data.num_classes * ipc, *data.image_shape)
            return torch.randn(shape, generator=gen), torch.full((len(idx),), -1, dtype=torch.long)
        return data.normalize(data.x[idx]), idx

    # --- the engine's hooks -----------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return [{"params": [self.images], "lr": float(self.hparams["lr_img"])}]

    def configure_optimizer(self) -> torch.optim.Optimizer:
        # DC: optimizer_img = SGD([image_syn], lr=lr_img, momentum=0.5)
        return torch.optim.SGD(self.param_groups(), lr=float(self.hparams["lr_img"]),
                               momentum=float(self.hparams.get("momentum_img", 0.5)))

    def loops(self) -> tuple[int, int]:
        """(outer_loop, inner_loop) at this set's ipc (``resolve_loops``)."""
        return resolve_loops(self.hparams, self.ipc)

    def network_params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        # the matching is precision-sensitive (cosines of small gradients): full precision on every device
        with torch.autocast(device_type=self.images.device.type, enabled=False):
            loss, logs = self.matching_loss(batch)
        return loss, {**logs, "match_loss": loss.detach()}

    def optimizer_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, closure: Callable) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[self.images])  # the images only: the network is the inner loop's
        self.mask_image_grad()
        optimizer.step()

    def mask_image_grad(self) -> None:
        """Change ``self.images.grad`` before the image step (NRR-DD keeps its critical pixels)."""

    def on_train_start(self, loader) -> None:
        outer, _ = self.loops()
        self.reset_network(self.global_step // outer)  # a resumed run loads the saved network after this

    def on_after_step(self, batch: dict, logs: dict) -> None:
        self.bilevel_update(self.global_step)

    # --- the one bi-level helper ------------------------------------------------------------
    def bilevel_update(self, step: int) -> None:
        """After image update ``step``: a new network at the end of an iteration (DC draws a random
        network per iteration), else ``inner_loop`` epochs of the network on the detached synthetic set."""
        outer, inner = self.loops()
        iteration, position = divmod(int(step), outer)
        if position == outer - 1:
            self.reset_network(iteration + 1)
        else:
            self.train_network(inner, step)

    def reset_network(self, iteration: int) -> None:
        seeded_reset(self.model, mix_seed(self.seed, _NET_INIT, iteration), self._template[0])

    def train_network(self, epochs: int, step: int) -> None:
        """DC's inner loop: ``epochs`` passes of plain SGD (``lr_net``) over the synthetic set in shuffled
        batches of ``batch_train``, DSA-augmented per sample when the method uses DSA."""
        x, y = self.images.detach(), self.labels
        n, bs = len(y), int(self.hparams.get("batch_train", 256))
        lr = float(self.hparams["lr_net"])
        strategy = self.dsa_strategy
        gen = cpu_generator(self.seed, _INNER, step)
        params = self.network_params()
        with torch.autocast(device_type=x.device.type, enabled=False):
            for _ in range(int(epochs)):
                order = torch.randperm(n, generator=gen).to(x.device)
                for start in range(0, n, bs):
                    idx = order[start:start + bs]
                    xb = dsa_augment(x[idx], strategy, gen) if strategy_families(strategy) else x[idx]
                    loss = F.cross_entropy(self.model(xb), y[idx])
                    grads = torch.autograd.grad(loss, params)
                    with torch.no_grad():
                        for p, g in zip(params, grads):
                            p.sub_(lr * g)

    # --- the outer loss ---------------------------------------------------------------------
    def matching_loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        return self.per_class_matching(batch), {}

    def class_batches(self, batch: dict) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """[(c, real images of class c, synthetic images of class c)] for the classes in the batch, each
        pair DSA-augmented with ONE shared draw (siamese) when the method uses DSA."""
        strategy = self.dsa_strategy
        out = []
        for c in range(self.num_classes):
            real = batch["x"][batch["y"] == c]
            if len(real) == 0:
                continue
            syn = self.images[self.class_slice(c)]
            if strategy_families(strategy):
                params = sample_dsa(strategy, 1, cpu_generator(self.seed, _MATCH, self.global_step, c),
                                    tuple(real.shape[-2:]))
                real, syn = apply_dsa(real, params), apply_dsa(syn, params)
            out.append((c, real, syn))
        return out

    def per_class_matching(self, batch: dict) -> torch.Tensor:
        """DC's outer loss: sum over classes c of D(grad L(S_c, c), grad L(T_c, c)), the real gradient a
        constant (detached), the synthetic one differentiable in S (create_graph)."""
        params = self.network_params()
        loss = None
        for c, real, syn in self.class_batches(batch):
            target_real = torch.full((len(real),), c, dtype=torch.long, device=real.device)
            g_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(self.model(real), target_real), params)]
            target_syn = torch.full((len(syn),), c, dtype=torch.long, device=syn.device)
            g_syn = torch.autograd.grad(F.cross_entropy(self.model(syn), target_syn), params, create_graph=True)
            term = gradient_matching_distance(g_syn, g_real)
            loss = term if loss is None else loss + term
        if loss is None:
            raise ValueError("a condensation step got a batch with no real image of any class")
        return loss

    # --- evaluation -------------------------------------------------------------------------
    def evaluation_teacher(self) -> tuple[nn.Module | None, float]:
        """(teacher, weight) for distance-based knowledge transfer at evaluation (NRR-DD); none here."""
        return None, 0.0


def random_class_subset(data: RealData, ipc: int, seed: int) -> torch.Tensor:
    """``ipc`` distinct random train positions of each class, in class order (seeded per class)."""
    parts = []
    for c in range(data.num_classes):
        members = data.class_indices(c)
        if len(members) < ipc:
            raise ValueError(f"images_per_class: {ipc} exceeds the {len(members)} training samples of class {c}")
        order = torch.randperm(len(members), generator=cpu_generator(seed, _INIT, 0, c))
        parts.append(members[order[:ipc]])
    return torch.cat(parts)


# --- the shared evaluation ---------------------------------------------------------------------

def _cutmix(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019) of a batch with a permutation of itself: (mixed, permutation, lambda), lambda
    the share of each image's own pixels."""
    b, _, h, w = x.shape
    perm = torch.randperm(b, generator=gen).to(x.device)
    lam = float(torch.rand(1, generator=gen))
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed = x.clone()
    mixed[:, :, top:bottom, left:right] = x[perm][:, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / float(h * w)
    return mixed, perm, lam


def dbr_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, y_org: torch.Tensor, y_aug: torch.Tensor,
             lam: float, weight: float) -> torch.Tensor:
    """NRR-DD's student loss on a mixed batch: L_sce + weight * L_dbr with
        L_sce = lam CE(S(x_mix), y_org) + (1 - lam) CE(S(x_mix), y_aug)     (the mixed one-hot labels)
        L_dbr = mean[(CE(S(x_mix), y_org) - d_org)^2 + (CE(S(x_mix), y_aug) - d_aug)^2],
    d_org = CE(T(x_mix), y_org) and d_aug = CE(T(x_mix), y_aug) the teacher's two distances to the one-hot
    labels: the only teacher knowledge the student needs (two numbers per image instead of a soft label)."""
    ce_org = F.cross_entropy(logits, y_org, reduction="none")
    ce_aug = F.cross_entropy(logits, y_aug, reduction="none")
    sce = (lam * ce_org + (1.0 - lam) * ce_aug).mean()
    with torch.no_grad():
        d_org = F.cross_entropy(teacher_logits, y_org, reduction="none")
        d_aug = F.cross_entropy(teacher_logits, y_aug, reduction="none")
    dbr = ((ce_org - d_org) ** 2 + (ce_aug - d_aug) ** 2).mean()
    return sce + weight * dbr


def evaluate_condensed(images: torch.Tensor, labels: torch.Tensor, data, seed: int, runs: int = 5,
                       epochs: int = 300, lr: float = 0.01, batch_size: int = 256, momentum: float = 0.9,
                       weight_decay: float = 5e-4, augment: str = "none", dsa_strategy: str = DSA_STRATEGY,
                       device: torch.device | str | None = None, backbone_kwargs: dict | None = None,
                       teacher: nn.Module | None = None, dbr_weight: float = 0.0,
                       done: Sequence[float] = (), on_run: Callable[[int, float], None] | None = None) -> dict:
    """Train a fresh ``convnet_dc`` on the synthetic set ``runs`` times and test each on ``data.test``.

    ``images`` are normalised floats [N, C, H, W] (the synthetic set), ``labels`` their classes;
    ``data`` has ``test.x`` (uint8), ``test.y``, ``manifest["channel_mean"/"channel_std"]`` and
    ``num_classes``. Each run draws its network from (seed, run) and trains ``epochs`` epochs of SGD
    (``momentum``, ``weight_decay``): epochs 0 .. E // 2 at ``lr``, the rest at ``lr / 10`` with a fresh
    optimizer (DC's ``evaluate_synset`` trains E + 1 epochs and decays after epoch E // 2 + 1), on shuffled batches of
    ``batch_size``; ``augment: dsa`` augments each batch with per-sample DSA draws of ``dsa_strategy``
    (DSA and DCC's evaluation; DC evaluates Fashion-MNIST without augmentation). With a ``teacher`` and
    ``dbr_weight`` > 0 each batch is also CutMix-ed and the loss is NRR-DD's ``dbr_loss``.

    ``done`` holds accuracies of runs already finished (a resumed evaluation starts after them);
    ``on_run(k, acc)`` is called after run k. Returns accuracies, mean and std (population)."""
    from classlab.engine import predict_logits
    from classlab.engine.device import pick_device
    from classlab.models import build_classifier

    if augment not in ("none", "dsa"):
        raise ConfigError(f"eval_augment: {augment!r}; use 'none' or 'dsa'")
    dev = pick_device(str(device) if device is not None else None)
    mean, std = data.manifest["channel_mean"], data.manifest["channel_std"]
    k = int(data.num_classes)
    x_syn, y_syn = images.detach().float().to(dev), labels.long().to(dev)
    c, h, _ = x_syn.shape[1:]
    accs = [float(a) for a in done]
    if teacher is not None:
        teacher = teacher.to(dev).eval()
    for run in range(len(accs), int(runs)):
        model = build_classifier("convnet_dc", int(c), k, img_size=int(h), backbone_kwargs=backbone_kwargs)
        seeded_reset(model, mix_seed(seed, _EVAL, run, 0))
        model.to(dev).train()
        gen = cpu_generator(seed, _EVAL, run, 1)
        n = len(y_syn)
        half = int(epochs) // 2
        opt = None
        for epoch in range(int(epochs)):
            if epoch == 0 or epoch == half + 1:
                rate = lr if epoch <= half else lr * 0.1
                opt = torch.optim.SGD(model.parameters(), lr=rate, momentum=momentum, weight_decay=weight_decay)
            order = torch.randperm(n, generator=gen).to(dev)
            for start in range(0, n, int(batch_size)):
                idx = order[start:start + int(batch_size)]
                xb, yb = x_syn[idx], y_syn[idx]
                if augment == "dsa":
                    xb = dsa_augment(xb, dsa_strategy, gen)
                if teacher is not None and dbr_weight > 0:
                    xb, perm, lam = _cutmix(xb, gen)
                    with torch.no_grad():
                        t_logits = teacher(xb)
                    loss = dbr_loss(model(xb), t_logits, yb, yb[perm], lam, float(dbr_weight))
                else:
                    loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        logits = predict_logits(model, data.test.x, mean, std, dev)
        acc = float((logits.argmax(1) == data.test.y).float().mean())
        accs.append(acc)
        if on_run is not None:
            on_run(run, acc)
    t = torch.tensor(accs, dtype=torch.float64)
    return {"accuracies": accs, "mean": float(t.mean()) if len(accs) else None,
            "std": float(t.std(unbiased=False)) if len(accs) else None}
