"""TMM: class-aware text prompts and text-guided image features, aligned by a contrastive loss.

Long, Zhao, Yuan, Tan, Liu, Zhou, Wang and Wang, "Task-Oriented Multi-Modal Mutual Learning for
Vision-Language Models", ICCV 2023 (arXiv 2303.17169, titled "... Mutual Leaning ..." there). CoCoOp adds
one image token to the prompts of EVERY class, which blurs the classes apart; TMM's two branches instead:

- **class-aware text prompt (CTP, image -> text):** the image enters the prompt of class c only through
  what it shares with that class: a shift pi(x, c) built from the image feature f(x) and the class's text
  embedding w_c is added to the context of class c,

      t_c(x) = [v_1 + pi(x, c), ..., v_M + pi(x, c), CLASS_c],   g_c(x) = g(t_c(x));

- **text-guided feature tuning (TFT, text -> image):** the image feature attends over the class text
  features and keeps what they point at,

      a_c(x) = softmax_c( s * <W_q f(x), W_k g_c(x)> ),   f~(x) = normalize( f(x) + W_o sum_c a_c(x) g_c(x) );

- **the loss:** CLIP's cross-entropy over the base classes with logits s <f~(x), g_c(x)>, plus a symmetric
  contrastive loss that aligns the two branches' outputs, each tuned image feature with the class-aware
  text feature of its own label, over the batch (same-class pairs are all positives):

      L = CE + lambda * 1/2 [ CE(s F~ G^T, Y) + CE(s G F~^T, Y) ],   G_b = g_{y_b}(x_b).

Our reading where the paper's details could not be found offline (said plainly):

- pi(x, c) = h(f(x) * w_c): a Linear-ReLU-Linear meta-net (CoCoOp's, width E / ``meta_reduction``) on the
  element-wise product of the image feature and the class's hand-written-prompt feature w_c =
  g("a photo of a {c}.") (frozen). The paper builds the class-aware token by attending from the label's
  text to the image's tokens; our encoder gives one pooled vector per image, over which attention from a
  single key is constant, so the product is the closest per-class interaction we can define.
- TFT: one attention head, W_q = W_k = I at start, temperature s = CLIP's (detached), values = the class
  text features themselves, and a zero-initialised output map W_o.
- The last layer of h and W_o start at zero, so an untrained TMM is exactly CoOp (tested).
- lambda (``align_weight``) = 1.0.
- At test time TFT attends over every class the forward pass scores (base and new together here; the
  paper evaluates base and new classes separately, each among its own).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.vlm.cocoop import meta_net
from classlab.methods.vlm.coop import CoOp
from classlab.models.image_text import symmetric_contrastive_loss, text_tower


@register_method("vlm", "tmm")
class TMM(CoOp):
    def build(self, class_names):
        super().build(class_names)
        dim = self.clip.embed_dim
        self.ctp_net = meta_net(dim, int(self.hparams["meta_reduction"]))
        self.tft_query = nn.Linear(dim, dim, bias=False)
        self.tft_key = nn.Linear(dim, dim, bias=False)
        self.tft_out = nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.ctp_net[-1].weight.zero_()
            self.ctp_net[-1].bias.zero_()
            self.tft_query.weight.copy_(torch.eye(dim))
            self.tft_key.weight.copy_(torch.eye(dim))
            self.tft_out.weight.zero_()
        for part in (self.ctp_net, self.tft_query, self.tft_key, self.tft_out):
            part.to(self.clip.logit_scale.device)

    # --- CTP: image -> text -----------------------------------------------------------------
    def class_anchor(self, classes) -> torch.Tensor:
        """w_c: the hand-written prompts' joint-space features (C, E), frozen."""
        with torch.no_grad():
            return self.clip.encode_text(self.hand_written[classes])

    def class_aware_shift(self, classes, image: torch.Tensor) -> torch.Tensor:
        """pi(x, c) = h(f(x) * w_c): (B, C, 384), one context shift per image and class."""
        anchor = self.class_anchor(classes)
        return self.ctp_net(image.unsqueeze(1) * anchor.unsqueeze(0))

    def text_features(self, classes, image):
        """g(t_c(x)): (B, C, E), the prompt of class c shifted by pi(x, c) on its context tokens only."""
        shift = self.class_aware_shift(classes, image)                    # (B, C, 384)
        base = self.prompt.token_embeddings(None, classes)               # (C, L, 384), learned context in
        b, c = shift.shape[:2]
        n_ctx, length, width = self.prompt.n_ctx, base.shape[1], base.shape[2]
        on_ctx = shift.unsqueeze(2).expand(b, c, n_ctx, width)
        offset = torch.cat([shift.new_zeros(b, c, 1, width), on_ctx,
                            shift.new_zeros(b, c, length - 1 - n_ctx, width)], dim=2)
        embeds = base.unsqueeze(0) + offset                               # v_m + pi(x, c) at the context positions
        rows = torch.as_tensor(classes, dtype=torch.long, device=self.prompt.attention_mask.device)
        mask = self.prompt.attention_mask[rows].unsqueeze(0).expand(b, -1, -1).reshape(b * c, length)
        tower = text_tower(self.prompt.token_ids.device)
        sentences = tower.encode_embeds(embeds.reshape(b * c, length, width), mask).view(b, c, -1)
        return self.clip.encode_text(sentences)

    # --- TFT: text -> image -----------------------------------------------------------------
    def tune_image(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """f~(x) = normalize(f(x) + W_o sum_c a_c g_c(x)), a_c = softmax_c(s <W_q f(x), W_k g_c(x)>)."""
        scale = self.clip.scale().detach()
        query = self.tft_query(image)                                    # (B, E)
        keys = self.tft_key(text)                                        # (B, C, E)
        attention = torch.softmax(scale * torch.einsum("be,bce->bc", query, keys), dim=1)
        guided = torch.einsum("bc,bce->be", attention, text)             # the text the image points at
        return F.normalize(image + self.tft_out(guided), dim=-1)

    # --- the mutual alignment -----------------------------------------------------------------
    def alignment_loss(self, image: torch.Tensor, text: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """1/2 [CE(s F~ G^T, Y) + CE(s G F~^T, Y)] with G_b = g_{y_b}(x_b): each tuned image against the
        class-aware text of its own label, across the batch (CLIP's symmetric InfoNCE, same-class positives)."""
        own_text = text[torch.arange(len(targets), device=text.device), targets]   # (B, E)
        return symmetric_contrastive_loss(image, own_text, targets, self.clip.scale())

    def extra_loss(self, logits, targets, image, text):
        align = self.alignment_loss(image, text, targets)
        return float(self.hparams["align_weight"]) * align, {"align": float(align.detach())}

