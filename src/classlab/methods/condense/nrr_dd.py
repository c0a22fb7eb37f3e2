"""NRR-DD: dataset distillation by non-critical region refinement, on a gradient-matching base.

Tran, Le, Le, Do and Phung, "Enhancing Dataset Distillation via Non-Critical Region Refinement",
CVPR 2025 (arXiv 2503.18267; code github.com/tmtuan1307/NRR-DD, not readable from here: the pieces
below follow the paper's abstract and a detailed summary of its method section, and say where they
adapt it). The paper's base is an SRe2L/RDED-style pipeline (a pretrained teacher, patch selection,
CE + BN-statistics recovery, relabelling); on the CPU and at 28x28 we build on DC's matching instead
(``dsa_strategy`` picks DC or DSA as the base), with the same iterations, loops and image learning rate
as that base, so "NRR-DD vs its base at the same budget" is one override apart. Three pieces:

1. **Critical-based initial data discovery (CIDD).** A teacher T (``convnet_dc`` trained on the real
   training set, ``teacher_steps`` steps here) gives each candidate real image of class c its class
   activation map C (``class_activation_map``: LayerCAM's per-position form of Grad-CAM; the paper uses
   CAM, which needs a global-pooling head that DC's ConvNet does not have). From ``num_crops`` random
   square crops per candidate (area share ~ U(crop_scale)), the crop with the highest CAM ratio (CAM
   mass inside / total) is kept and resized to
   the image size; of those, the ``ipc`` with the LOWEST teacher confidence p_T(c | crop) initialise
   class c (the paper's inversion of RDED's highest-confidence rule: the most room to refine). The
   paper stitches beta patches into one image; at 28x28 we use one patch per image (beta = 1).
2. **Non-critical region refinement (NRR).** With C the teacher's CAM of the initial image (in [0, 1]),
   the refinement mask is M = max(0, epsilon - C) and every image update is
       x <- x - M * eta * grad_x L,      L = L_match(base) + ce_weight * CE(T(x), c)
   (``mask_image_grad`` multiplies the image gradient by M before the SGD step; momentum only ever sees
   masked gradients): pixels with C >= epsilon, the critical regions, keep their real values exactly;
   the others take class-general content from the class-level matching loss and the teacher's CE (the
   paper's L_ce; its BN-statistics term has no counterpart: the ConvNet uses instance norm).
3. **Distance-based representative (DBR) knowledge transfer.** At evaluation the student is trained on
   CutMix-ed synthetic batches with L_S = L_sce + dbr_weight * L_dbr (``condense_learner.dbr_loss``):
   L_sce the CE with the mixed one-hot labels, L_dbr = mean[(CE(S(x), y_org) - d_org)^2 +
   (CE(S(x), y_aug) - d_aug)^2], d_org = CE(T(x), y_org) and d_aug = CE(T(x), y_aug) the teacher's two
   distances to the one-hot labels (two numbers per image instead of a soft label). The squared
   difference is our choice of the distance between distances. The teacher's weights are saved with the
   condensed images so that the evaluation can be rerun from the artefact.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from classlab.methods.condense_learner import (_CROPS, CondensationMethod, class_activation_map, cpu_generator,
                                               train_reference_network)
from classlab.methods.registry import register_method


def refinement_mask(cam: torch.Tensor, epsilon: float) -> torch.Tensor:
    """M = max(0, epsilon - C): zero on the critical pixels (C >= epsilon)."""
    return (float(epsilon) - cam).clamp_min(0.0)


def cam_ratio(cam: torch.Tensor, top: int, left: int, side: int) -> float:
    """The share of a CAM's mass inside the square crop (top, left, side)."""
    total = float(cam.sum())
    return float(cam[top:top + side, left:left + side].sum()) / total if total > 0 else 0.0


@register_method("condense", "nrr_dd")
class NRRDD(CondensationMethod):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.teacher = copy.deepcopy(model)  # trained in ``initialise``; checkpointed with the method
        self.teacher.requires_grad_(False)
        self.register_buffer("refine_mask", torch.zeros(0, 1, 1, 1))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    # --- 1. CIDD ------------------------------------------------------------------------------
    def initialise(self, data, ipc, device):
        hp = self.hparams
        train_reference_network(self.teacher, data, self.seed, int(hp["teacher_steps"]), int(hp["teacher_batch"]),
                                float(hp["teacher_lr"]), device)
        lo, hi = (float(v) for v in hp["crop_scale"])
        h, w = data.image_shape[1:]
        images, sources, masks = [], [], []
        for c in range(data.num_classes):
            members = data.class_indices(c)
            if len(members) < ipc:
                raise ValueError(f"images_per_class: {ipc} exceeds the {len(members)} training samples of class {c}")
            gen = cpu_generator(self.seed, _CROPS, c)
            pool = members[torch.randperm(len(members), generator=gen)[:max(int(hp["candidates"]), ipc)]]
            x = data.normalize(data.x[pool]).to(device)
            target = torch.full((len(pool),), c, dtype=torch.long, device=device)
            cams = class_activation_map(self.teacher, x, target).cpu()
            crops = []
            for i in range(len(pool)):  # the crop of highest CAM ratio among num_crops random ones
                best = None
                for _ in range(int(hp["num_crops"])):
                    area = lo + (hi - lo) * float(torch.rand(1, generator=gen))
                    side = max(1, min(h, w, int(round(min(h, w) * area ** 0.5))))
                    top = int(torch.randint(h - side + 1, (1,), generator=gen))
                    left = int(torch.randint(w - side + 1, (1,), generator=gen))
                    ratio = cam_ratio(cams[i], top, left, side)
                    if best is None or ratio > best[0]:
                        best = (ratio, top, left, side)
                _, top, left, side = best
                crop = x[i:i + 1, :, top:top + side, left:left + side]
                crops.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
            crops = torch.cat(crops)
            with torch.no_grad():
                confidence = self.teacher(crops).softmax(1)[:, c]
            pick = confidence.argsort()[:ipc].cpu()  # the LOWEST-confidence critical crops
            chosen = crops[pick.to(device)]
            cam = class_activation_map(self.teacher, chosen, target[:ipc])
            images.append(chosen.detach().cpu())
            sources.append(pool[pick])
            masks.append(refinement_mask(cam, float(hp["epsilon"])).unsqueeze(1).cpu())  # M = max(0, eps - C)
        self.refine_mask = torch.cat(masks).to(self.refine_mask.device)
        return torch.cat(images), torch.cat(sources)

    # --- 2. NRR ------------------------------------------------------------------------------
    def matching_loss(self, batch):
        loss = self.per_class_matching(batch)  # the base's class-level matching (DC, or DSA by dsa_strategy)
        weight = float(self.hparams.get("ce_weight", 0.0))
        logs = {}
        if weight > 0:
            ce = F.cross_entropy(self.teacher(self.images), self.labels)  # the paper's L_ce on the teacher
            loss = loss + weight * ce
            logs["teacher_ce"] = ce.detach()
        return loss, logs

    def mask_image_grad(self):
        # x <- x - M * eta * grad: the critical pixels (M = 0) never move
        if self.images.grad is not None and self.refine_mask.numel():
            self.images.grad.mul_(self.refine_mask.to(self.images.grad))

    # --- 3. DBR ------------------------------------------------------------------------------
    def evaluation_teacher(self):
        return self.teacher, float(self.hparams.get("dbr_weight", 0.0))
