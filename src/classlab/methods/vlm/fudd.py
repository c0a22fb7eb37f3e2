"""FuDD: follow-up differential descriptions for each image's ambiguous classes, nothing trained.

Esfandiarpoor and Bach, "Follow-Up Differential Descriptions: Language Models Resolve Ambiguities for
Image Classification", ICLR 2024. A first, cheap pass finds the few classes an image could be; a second
pass tells those apart with descriptions written for exactly those differences. The authors' release
(BatsResearch/fudd, fudd_model.py and prompt_factory.py, read for the math only) fixes the details below
unless marked ours.

1. First stage: zero-shot CLIP with the single template, s1(x, c) = exp(t) <f(x), g("a photo of a {c}.")>
   (the release's ``single_template`` source; ``first_stage: descriptions`` uses the generic description
   ensemble of ``descriptions.py`` instead). The image's ambiguous classes are its top k under s1,
   A(x) = top_k(s1(x, .)). The release takes k = 10, which on its 10-class dataset (EuroSAT) is every
   class; our datasets have 10 classes, so we take k = 5 (``ambiguous_k``, our choice): half the label set,
   so that the first stage still selects and each half (base, new) usually keeps some of its classes in A.
2. Second stage: each c in A(x) is represented by the differential descriptions of its pairs with the
   other ambiguous classes, pooled once each and averaged in the joint space,

       u_c(x) = normalize( sum_{c' in A(x) - {c}, (c, c') described} g("a photo of a {c}, {tells(c, c')}.")
                           + [some c' in A(x) - {c} has no description of (c, c')] w_c ),

   w_c = c's generic description ensemble (``descriptions.py``): the fallback for a pair the file does not
   describe, counted once however many pairs lack one (the release pools the distinct prompts, and falls
   back to "a photo of a {c}." itself; the generic fallback is this project's choice). A class alone in
   A(x) (k = 1) gets w_c. Then s2(x, c) = exp(t) <f(x), u_c(x)>.
3. Output over every class: s2 for the ambiguous classes; the others keep their first-stage score shifted
   down by one per-image constant,

       logit(x, c) = s2(x, c)                                                      c in A(x),
                   = s1(x, c) - [max_j s1(x, j) - min_{a in A(x)} s2(x, a) + 1]    c not in A(x),

   so every class outside A(x) scores below every class inside it (it never wins an argmax that has an
   ambiguous class among its candidates) while the classes outside keep their first-stage order among
   themselves. The release predicts argmax over A(x) only; the shifted scores are our way of giving the
   protocol a logit for every class.

Ambiguity is computed among ALL classes. The protocol scores every class in one forward pass and only then
restricts the argmax to the base or to the new classes (``classlab.metrics.vlm.subset_accuracy``), so FuDD
cannot know which half will be asked: A(x) is the top k of all K classes. When the asked half has no class
in A(x), its argmax falls back to the first-stage order (the shift keeps it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.vlm.descriptions import Descriptions
from classlab.methods.vlm_descriptions import differential_sentence
from classlab.models.image_text import encode_sentences, text_tower

MARGIN = 1.0  # logits between the lowest ambiguous class and the highest other one


def fudd_scores(image: torch.Tensor, first: torch.Tensor, generic: torch.Tensor, differential: torch.Tensor,
                described: torch.Tensor, k: int, scale: torch.Tensor | float, margin: float = MARGIN) -> torch.Tensor:
    """FuDD's logits over every class (see the module docstring).

    image: (B, E) unit-norm image features; first: (B, K) first-stage logits s1; generic: (K, E) the generic
    ensembles w_c; differential: (K, K, E) with [c, c'] the feature of the description of the ordered pair
    (c, c') (anything where ``described`` is False); described: (K, K) bool; k: how many classes are
    ambiguous; scale: exp(t).
    """
    num = first.shape[1]
    k = max(1, min(int(k), num))
    ambiguous = torch.zeros_like(first, dtype=torch.bool)
    ambiguous.scatter_(1, first.topk(k, dim=1).indices, True)                 # A(x) = top_k s1(x, .)
    eye = torch.eye(num, dtype=torch.bool, device=first.device)
    partner = ambiguous.unsqueeze(1) & ~eye.unsqueeze(0)                     # (B, c, c'): c' in A(x) - {c}
    with_pair = (partner & described.unsqueeze(0)).to(differential.dtype)
    pooled = torch.einsum("bcj,cje->bce", with_pair, differential)          # sum of the described pairs' features
    fallback = (partner & ~described.unsqueeze(0)).any(-1) | ~partner.any(-1)  # a pair lacks one, or c is alone
    pooled = pooled + fallback.unsqueeze(-1).to(generic.dtype) * generic.unsqueeze(0)  # + w_c, once
    second = scale * torch.einsum("be,bce->bc", image, F.normalize(pooled, dim=-1))  # s2 = exp(t) <f(x), u_c(x)>
    inf = torch.finfo(first.dtype).max
    low = torch.where(ambiguous, second, torch.full_like(second, inf)).min(1, keepdim=True).values
    shift = first.max(1, keepdim=True).values - low + float(margin)          # every other class below min_A s2
    return torch.where(ambiguous, second, first - shift)


@register_method("vlm", "fudd")
class FuDD(Descriptions):
    learns = False

    def build(self, class_names):
        super().build(class_names)  # the generic ensemble (the fallback) and the hand-written prompts
        device = self.clip.logit_scale.device
        index = {name: i for i, name in enumerate(self.class_names)}
        pairs = sorted((index[a], index[b], tells) for (a, b), tells in self.descriptions["differential"].items())
        self.differential_texts = [differential_sentence(self.class_names[a], tells) for a, _, tells in pairs]
        embeddings = encode_sentences(self.differential_texts) if pairs else torch.zeros(0, text_tower().width)
        self.register_buffer("pair_sentences", embeddings.to(device), persistent=False)
        self.register_buffer("pair_index", torch.tensor([[a, b] for a, b, _ in pairs], dtype=torch.long,
                                                        device=device).view(-1, 2), persistent=False)

    def differential_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, K, E) features of the ordered pairs' differential descriptions (zero where none) and the
        (K, K) mask of the pairs that have one."""
        num, dim = len(self.class_names), self.clip.embed_dim
        device = self.clip.logit_scale.device
        table = torch.zeros(num, num, dim, device=device)
        described = torch.zeros(num, num, dtype=torch.bool, device=device)
        if len(self.pair_index):
            rows, cols = self.pair_index[:, 0], self.pair_index[:, 1]
            table[rows, cols] = self.clip.encode_text(self.pair_sentences)
            described[rows, cols] = True
        return table, described

    def first_stage(self, image: torch.Tensor, generic: torch.Tensor) -> torch.Tensor:
        """s1: zero-shot CLIP's logits (the release), or the description ensemble's (``first_stage``)."""
        if self.hparams.get("first_stage", "hand_written") == "descriptions":
            return self.clip.logits(image, generic)
        return self.clip.logits(image, self.clip.encode_text(self.hand_written))

    def scores(self, image: torch.Tensor) -> torch.Tensor:
        """FuDD's logits over every class from unit-norm image features (B, E)."""
        generic = self.description_features()                                # w_c, (K, E)
        table, described = self.differential_table()
        return fudd_scores(image, self.first_stage(image, generic), generic, table, described,
                           int(self.hparams["ambiguous_k"]), self.clip.scale())

    def forward(self, x):
        return self.scores(self.encode_image(x))
