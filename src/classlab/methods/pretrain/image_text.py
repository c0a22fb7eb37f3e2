"""The vlm family's offline CLIP: an image encoder aligned to the frozen MiniLM tower on the base classes.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision" (CLIP), ICML
2021. With image features I = normalize(W_i f(x)) and text features T = normalize(W_t g(p)) for a
batch of (image, prompt) pairs, CLIP minimises

    L = 1/2 [ CE(s I T^T, Y) + CE(s T I^T, Y) ],   s = exp(t) (learned, clipped at 100),

(``classlab.models.image_text.symmetric_contrastive_loss``; Y the same-class targets, since two
images of one class share their prompts). Here g is the frozen MiniLM sentence encoder and p_c is
one of ``templates`` filled with class c's name, drawn per image and step ("a photo of a {}." and its
variants stand in for CLIP's captions). f (the backbone), W_i, W_t and t are trained.

The vlm protocol trains it on the base classes only (``classes``: the first half of the sorted
labels), so the new classes' images are never seen by the image side; the checkpoint's
``hparams.classes`` records which classes were, and the report says so. Prediction over every class
(``forward``) is CLIP's zero-shot classifier with prompt ensembling: each class's text feature is the
normalised mean of its templates' features. The class prompts' MiniLM embeddings are a buffer filled
before training, so the saved model predicts without loading the text tower again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.data.loader import mix_seed
from classlab.methods.base import Method
from classlab.methods.registry import register_method
from classlab.models.image_text import TEXT_DIM, ImageTextModel, symmetric_contrastive_loss


@register_method("pretrain", "image_text")
class ImageTextPretraining(Method):
    evaluate_with_method = True  # predictions are the zero-shot prompts', not the (untrained) head's
    head_trained = False

    def __init__(self, model, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        templates = list(hparams["templates"])
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"templates: {templates!r}; give prompts with one '{{}}' for the class name each")
        self.templates = templates
        self.clip = ImageTextModel(model.backbone, model.num_features, embed_dim=int(hparams["embed_dim"]),
                                   init_temperature=float(hparams["temperature"]))
        # (K, templates, 384) MiniLM embeddings of every class's prompts; filled before training, saved with
        # the method so that evaluation needs no text tower
        self.register_buffer("prompt_bank", torch.zeros(num_classes, len(templates), TEXT_DIM))

    def param_groups(self) -> list[dict]:
        # the backbone through ``model``; the projections and the temperature through ``clip``
        # (``clip.image_encoder`` is the same module as ``model.backbone``: listed once)
        params = list(self.model.backbone.parameters()) + [self.clip.image_proj.weight, self.clip.text_proj.weight,
                                                           self.clip.logit_scale]
        return [{"params": [p for p in params if p.requires_grad]}]

    def fill_prompt_bank(self) -> None:
        from classlab.models.text import encode_texts

        texts = [t.format(name) for name in self.class_names for t in self.templates]
        bank = encode_texts(texts).view(len(self.class_names), len(self.templates), TEXT_DIM)
        self.prompt_bank.copy_(bank.to(self.prompt_bank.device))

    def on_train_start(self, loader) -> None:
        self.fill_prompt_bank()

    def training_step(self, batch: dict):
        x, y = batch["x"], batch["y"]
        image = self.clip.encode_image(x)
        # one template per image, drawn from the step and the batch's positions (pure in the batch)
        gen = torch.Generator().manual_seed(mix_seed(self.global_step, int(batch["index"][0]), len(y), 0x7E57))
        pick = torch.randint(len(self.templates), (len(y),), generator=gen).to(y.device)
        text = self.clip.encode_text(self.prompt_bank[y, pick])
        loss = symmetric_contrastive_loss(image, text, y, self.clip.scale())
        return loss, {"temperature": float(1.0 / self.clip.scale().detach())}

    def class_text_features(self) -> torch.Tensor:
        """(K, E): each class's templates through the text projection, averaged and renormalised."""
        per_template = self.clip.encode_text(self.prompt_bank)  # (K, T, E), unit rows
        return F.normalize(per_template.mean(1), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.logits(self.clip.encode_image(x), self.class_text_features())
