"""CSP: compositional soft prompting, attributes and objects as learned vocabulary.

Nayak, Yu and Bach, "Learning to Compose Soft Prompts for Compositional Zero-Shot Learning", ICLR 2023.
The prompt of pair (a, o) is "a photo of [a] [o]", the two bracketed slots not word embeddings but
learned vectors, one per attribute theta_a and one per object theta_o (each initialised from the mean
of its word's token embeddings), the context "a photo of" fixed:

    t_(a,o) = [CLS] w_a w_photo w_of theta_a theta_o w_. [SEP],
    p((a, o) | x) = exp(s <f(x), g(t_(a,o))>) / sum_(a',o') in seen exp(s <f(x), g(t_(a',o'))>),

trained by cross-entropy over the SEEN pairs on their training images (the protocol sets
``train_classes`` to them), both encoders frozen. At test every pair of the grid, seen or unseen, is
composed from the learned tokens and scored, so an unseen pair reuses the attribute learned on its
seen pairs and the object learned on its own.

Here the text encoder is the frozen MiniLM fed through ``inputs_embeds`` (``classlab.models.image_text``);
at initialisation a pair whose attribute and object are one token each gets exactly the tower's
embedding of the written prompt "a photo of <attr> <obj>." (tested). The pairs (attribute and object of
each label) come from the dataset's manifest: the protocol sets ``self.pairs`` before ``build``.
"""
from __future__ import annotations

import torch
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.vlm_learner import PromptMethod
from classlab.models.image_text import text_tower


def mean_token_embedding(tower, words: list[str]) -> torch.Tensor:
    """(len(words), 384): each word's WordPiece token embeddings averaged (CSP's initialisation)."""
    rows = []
    with torch.no_grad():
        for word in words:
            ids = tower.word_ids(word)
            if not ids:
                raise ValueError(f"csp: {word!r} has no tokens")
            index = torch.tensor(ids, dtype=torch.long, device=tower.word_embeddings.weight.device)
            rows.append(tower.word_embeddings(index).mean(0))
    return torch.stack(rows).detach().clone()


@register_method("vlm", "csp")
class CSP(PromptMethod):
    def build(self, class_names):
        super().build(class_names)
        self.use_pairs()  # attributes, objects, pair_index
        tower = text_tower(self.clip.logit_scale.device)
        prefix = str(self.hparams["prompt"]).strip()
        n_prefix = tower.count_tokens(prefix)
        ids, mask = tower.tokenize([f"{prefix} x x."])  # two one-token placeholders for theta_a, theta_o
        self.register_buffer("template_ids", ids, persistent=False)
        self.register_buffer("template_mask", mask, persistent=False)
        self.attr_slot = 1 + n_prefix  # after [CLS] and the context
        # the learned vocabulary: one vector per attribute and per object
        self.attribute_tokens = nn.Parameter(mean_token_embedding(tower, self.attributes))
        self.object_tokens = nn.Parameter(mean_token_embedding(tower, self.objects))

    def pair_embeddings(self, classes) -> torch.Tensor:
        """(C, 384) sentence embeddings of the asked pairs' prompts, composed from the learned tokens."""
        tower = text_tower(self.template_ids.device)
        index = self.pair_index[torch.as_tensor(classes, dtype=torch.long, device=self.pair_index.device)]
        with torch.no_grad():
            base = tower.word_embeddings(self.template_ids).expand(len(index), -1, -1)
        a = self.attr_slot
        rows = torch.cat([base[:, :a], self.attribute_tokens[index[:, 0]].unsqueeze(1),
                          self.object_tokens[index[:, 1]].unsqueeze(1), base[:, a + 2:]], dim=1)
        return tower.encode_embeds(rows, self.template_mask.expand(len(index), -1))

    def text_features(self, classes, image):
        return self.clip.encode_text(self.pair_embeddings(classes))  # g(t_(a,o)) for the asked pairs
