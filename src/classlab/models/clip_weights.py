"""Real CLIP weights for the vlm family, through ``open_clip`` (the switch ``families.vlm.clip``).

Offline, the family's image-text model is the pretrain stage's (``classlab.models.image_text``: our
ConvNet aligned to the frozen MiniLM). With internet, ``families.vlm.clip: "open_clip:ViT-B-16:openai"``
loads Radford et al.'s weights instead, and every method runs unchanged on them: this module gives
real CLIP the two interfaces the family is written against.

- ``ClipTextTower`` is the text tower interface of ``classlab.models.image_text.TextTower``: token
  rows "<start> words <end>" whose word embeddings a prompt learner replaces (CoOp's context), run
  through CLIP's causal transformer, pooled at the end-of-text token and projected by CLIP's text
  projection: g(t) = LN(T(E_t + P))[eot] W_text, unit-normalised. Its "sentence embeddings" are
  therefore already in the joint space.
- ``PretrainedClip`` is ``ImageTextModel``'s interface: ``encode_image`` = normalize(V(x)) with V
  CLIP's visual tower and projection, after turning the dataset's normalised images back into pixels,
  resizing them to CLIP's input size and normalising them with CLIP's statistics; ``encode_text`` is
  the identity up to normalisation (the tower projected already); ``logits`` are exp(t) <image, text>
  with CLIP's own learned temperature.

``load_clip(spec, ...)`` returns an object the vlm protocols treat like the pretrain stage's model
(``.clip``) and routes the family's text through the CLIP tower (``use_text_tower``). The weights
come from open_clip's download of ``pretrained`` (a Hugging Face hub fetch the first time): never
on these machines, so the tests build a tiny random-weight CLIP from an inline config, through the
same code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.models.image_text import ImageTextModel, use_text_tower

PREFIX = "open_clip:"


def is_clip_spec(value) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """"open_clip:<model>:<pretrained tag>" -> (model, tag); the tag "none" gives random weights."""
    parts = spec[len(PREFIX):].split(":") if is_clip_spec(spec) else []
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"clip: {spec!r}; expected 'open_clip:<model>:<pretrained>', e.g. 'open_clip:ViT-B-16:openai' "
                          "('none' as the pretrained tag: random weights)")
    return parts[0], (None if parts[1] == "none" else parts[1])


class ClipTextTower(nn.Module):
    """CLIP's frozen text transformer behind the family's text tower interface."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model = model  # the open_clip CLIP (shared with PretrainedClip; frozen)
        self.tokenizer = tokenizer
        projection = model.text_projection
        self.width = int(projection.out_features if isinstance(projection, nn.Linear) else projection.shape[1])

    def train(self, mode: bool = True):  # frozen: no dropout whatever the caller's mode
        return super().train(False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.token_embedding

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (N, L) cut to the longest row (CLIP pads with 0 to 77) and the mask of real tokens."""
        ids = self.tokenizer(list(texts))
        mask = (ids != 0).long()
        length = int(mask.sum(1).max())
        device = self.word_embeddings.weight.device
        return ids[:, :length].to(device), mask[:, :length].to(device)

    def word_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def count_tokens(self, text: str) -> int:
        return len(self.word_ids(text))

    def encode_embeds(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(N, L, D) token embeddings -> (N, E) unit-norm joint-space text features: CLIP's
        ``encode_text`` from its token-embedding step on, the causal mask cut to L, pooled at each row's
        last real token (its end of text)."""
        m = self.model
        length = embeds.shape[1]
        x = embeds + m.positional_embedding[:length].to(embeds.dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), mask.sum(1) - 1]
        projection = m.text_projection
        pooled = projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection
        return F.normalize(pooled, dim=-1)

    def encode(self, texts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(texts)
        with torch.no_grad():
            return self.encode_embeds(self.word_embeddings(ids), mask)


class PretrainedClip(ImageTextModel):
    """Real CLIP behind ``ImageTextModel``'s interface (image encoder, projections, temperature)."""

    def __init__(self, model: nn.Module, image_size: int, channel_mean, channel_std, clip_mean, clip_std):
        nn.Module.__init__(self)
        self.model = model
        self.image_encoder = model.visual
        self.image_proj = nn.Identity()  # CLIP's visual tower projects already
        self.text_proj = nn.Identity()   # so does ClipTextTower
        self.logit_scale = model.logit_scale
        self.embed_dim = int(model.text_projection.shape[1]) if not isinstance(model.text_projection, nn.Linear) \
            else int(model.text_projection.out_features)
        self.image_size = int(image_size)
        view = (1, -1, 1, 1)
        self.register_buffer("data_mean", torch.tensor(channel_mean, dtype=torch.float32).view(view), persistent=False)
        self.register_buffer("data_std", torch.tensor(channel_std, dtype=torch.float32).view(view), persistent=False)
        self.register_buffer("clip_mean", torch.tensor(clip_mean, dtype=torch.float32).view(view), persistent=False)
        self.register_buffer("clip_std", torch.tensor(clip_std, dtype=torch.float32).view(view), persistent=False)

    def to_clip_input(self, x: torch.Tensor) -> torch.Tensor:
        """The loader's normalised images -> CLIP's input: pixels in [0, 1], 3 channels, resized to
        CLIP's size (bicubic, as its preprocessing), normalised with CLIP's statistics."""
        pixels = (x * self.data_std + self.data_mean).clamp(0, 1)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bicubic",
                                   align_corners=False).clamp(0, 1)
        return (pixels - self.clip_mean) / self.clip_std

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(self.to_clip_input(x))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(x), dim=-1)


class ClipHolder(nn.Module):
    """What the vlm protocols receive from ``load_clip``: ``.clip`` as the pretrain stage's model has."""

    def __init__(self, clip: PretrainedClip):
        super().__init__()
        self.clip = clip


def load_clip(spec: str, channel_mean, channel_std, device: torch.device | str = "cpu",
              model_config: dict | None = None) -> ClipHolder:
    """Build real CLIP from ``spec`` ("open_clip:<model>:<pretrained>"), frozen, and make its text
    tower the family's. ``model_config`` registers an inline open_clip config under the spec's model
    name first (the tests' tiny random CLIP)."""
    model_name, tag = parse_clip_spec(spec)
    try:
        import open_clip
    except ImportError as exc:
        raise ConfigError("clip: real CLIP weights need open_clip (pip install open_clip_torch; `make setup` "
                          "installs it)") from exc
    if model_config is not None:
        from open_clip import factory

        factory._MODEL_CONFIGS[model_name] = dict(model_config)  # open_clip's registry of model configs
    try:
        model = open_clip.create_model(model_name, pretrained=tag, device=device)
    except RuntimeError as exc:  # an unknown model name or pretrained tag, or weights that cannot be fetched
        raise ConfigError(f"clip: {spec!r} does not load through open_clip: {str(exc).splitlines()[0]}") from exc
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model_name)
    visual = model.visual
    size = visual.image_size if isinstance(getattr(visual, "image_size", None), int) else visual.image_size[0]
    mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    clip = PretrainedClip(model, size, channel_mean, channel_std, mean, std).to(device)
    tower = ClipTextTower(model, tokenizer)
    use_text_tower(lambda _device: tower)  # one frozen tower, on the model's device
    return ClipHolder(clip)
