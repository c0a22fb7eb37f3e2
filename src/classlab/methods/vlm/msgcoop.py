"""MSGCoOp: several parallel contexts, guided towards the class descriptions and kept diverse.

Wang, Sun, Du and Huang, "MSGCoOp: Multiple Semantic-Guided Context Optimization for Few-Shot
Learning", arXiv 2507.21786 (2025). CoOp with N context sets learned side by side (an ensemble of prompt
learners), a KgCoOp-like pull of the ensemble towards description features, and a penalty on the sets
agreeing with each other. With w_c^i = g([v^i_1, ..., v^i_M, CLASS_c]) the unit-norm text feature of class
c under context set i (i = 1..N) and d_c = normalize( mean_d g("a photo of a {c}, which is {d}.") ) the
class's description ensemble (the shipped generic descriptions; the paper's are written by an LLM):

- ensemble logits, the mean of the N sets' CLIP logits:
      logit(x, c) = 1/N sum_i exp(t) <f(x), w_c^i> = exp(t) <f(x), wbar_c>,   wbar_c = 1/N sum_i w_c^i
  (so ``text_features`` returns wbar, not re-normalised);
- semantic guidance, one minus the mean cosine between the normalised ensemble and the descriptions:
      L_sg = 1 - 1/C sum_c cos( wbar_c, d_c );
- diversity, the mean squared cosine between the sets' features of the same class (0: orthogonal sets,
  1: collapsed, all sets equal); zero for a single set:
      L_div = 1/C sum_c  2/(N(N-1)) sum_{i<j} cos(w_c^i, w_c^j)^2;
- L = CE + lambda_sg L_sg + lambda_div L_div over the base classes, lambda_sg = 8.0, lambda_div = 1.0,
  N = 4, M = 4 from "a photo of a" (the release's base-to-novel script and README).

These equations follow the authors' public release (Rain-Bus/MSGCoOp, trainers/msgcoop.py), read for the
math only. Our reading where it differs or is silent:

- symmetry breaking: the release initialises every set from the same words, and then the N sets stay
  identical for ever (same loss gradient for each; the diversity term has zero gradient where the sets are
  equal, its maximum), so its diversity term cannot act. Set 1 starts from "a photo of a" as in CoOp; sets
  2..N start there plus N(0, sigma^2) noise, sigma = 0.02 (CoOp's random-context scale, ``ctx_noise``),
  drawn from ``seed`` + i. With a random start (``ctx_init: ""``) each set has its own draw;
- the template of the description prompts is the family's (``vlm_descriptions.GENERIC_TEMPLATE``);
- the schedule and epochs are CoOp's CPU budget here (the release runs KgCoOp's 100-epoch config).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.vlm_descriptions import class_mean, generic_embeddings
from classlab.methods.vlm_learner import PromptMethod
from classlab.models.image_text import PromptLearner


def diversity_loss(sets: torch.Tensor) -> torch.Tensor:
    """L_div of (N, C, E) per-set class features: the mean over classes and over set pairs i < j of
    cos(w_c^i, w_c^j)^2. 0 for N = 1 (nothing to diversify); 1 when every set is the same (collapse);
    finite (no NaN) even for zero vectors."""
    n = sets.shape[0]
    if n < 2:
        return sets.new_zeros(())
    unit = F.normalize(sets, dim=-1)
    cos = torch.einsum("icd,jcd->cij", unit, unit)                       # (C, N, N)
    upper = torch.triu_indices(n, n, offset=1, device=sets.device)
    return cos[:, upper[0], upper[1]].pow(2).mean()                      # mean_c mean_{i<j} cos^2


def semantic_guidance(ensemble: torch.Tensor, descriptions: torch.Tensor) -> torch.Tensor:
    """L_sg = 1 - mean_c cos(wbar_c, d_c) for (C, E) ensemble features and (C, E) description features."""
    return 1.0 - F.cosine_similarity(ensemble, descriptions, dim=-1, eps=1e-7).mean()


@register_method("vlm", "msgcoop")
class MSGCoOp(PromptMethod):
    def build(self, class_names):
        super().build(class_names)
        hp = self.hparams
        device = self.clip.logit_scale.device
        seed, sets = int(hp.get("seed", 0)), int(hp["n_prompts"])
        self.prompts = nn.ModuleList(
            PromptLearner(self.class_names, ctx_init=hp.get("ctx_init") or None, n_ctx=int(hp["n_ctx"]),
                          class_specific=bool(hp["class_specific"]), device=device, seed=seed + i)
            for i in range(sets))
        noise = float(hp.get("ctx_noise", 0.0))
        if hp.get("ctx_init") and noise > 0:
            with torch.no_grad():
                for i, prompt in enumerate(self.prompts):
                    if i == 0:
                        continue  # set 1 stays the hand-written words
                    gen = torch.Generator().manual_seed(seed + i)
                    prompt.ctx.add_((torch.randn(prompt.ctx.shape, generator=gen) * noise).to(prompt.ctx.device))
        self.descriptions, self.generic_texts, sentences, owner = generic_embeddings(hp, self.class_names, device)
        self.register_buffer("generic_sentences", sentences, persistent=False)
        self.register_buffer("generic_owner", owner, persistent=False)

    def description_features(self) -> torch.Tensor:
        """d_c for every class, (K, E): the description ensemble, frozen."""
        return class_mean(self.clip.encode_text(self.generic_sentences), self.generic_owner, len(self.class_names))

    def set_features(self, classes) -> torch.Tensor:
        """(N, C, E): w_c^i, each set's unit-norm text features of the asked classes."""
        return torch.stack([self.clip.encode_text(prompt(classes=classes)) for prompt in self.prompts])

    def text_features(self, classes, image):
        return self.set_features(classes).mean(0)  # wbar_c: its logits are the mean of the sets' logits

    def losses(self, sets: torch.Tensor, classes) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_sg, L_div) of per-set features (N, C, E) of ``classes``."""
        anchor = self.description_features()[classes].detach()
        return semantic_guidance(sets.mean(0), anchor), diversity_loss(sets)

    def training_step(self, batch: dict):
        # the base learner's step with the per-set features kept for the two regularisers
        x, y = batch["x"], batch["y"]
        classes = self.train_classes
        targets = self.positions_among(y, classes)
        image = self.encode_image(x)
        sets = self.set_features(classes)
        logits = self.clip.logits(image, sets.mean(0))
        ce = F.cross_entropy(logits, targets)
        guidance, diversity = self.losses(sets, classes)
        loss = ce + float(self.hparams["sg_weight"]) * guidance + float(self.hparams["div_weight"]) * diversity
        acc = float((logits.argmax(1) == targets).float().mean())
        return loss, {"ce": float(ce.detach()), "train_acc": acc, "sg": float(guidance.detach()),
                      "diversity": float(diversity.detach())}
