"""ddpm: a small class-conditional denoising diffusion model whose condition is a composition of words.

Paper: Jonathan Ho, Ajay Jain and Pieter Abbeel, "Denoising Diffusion Probabilistic Models", NeurIPS 2020;
the condition dropout that allows classifier-free guidance at sampling time is Jonathan Ho and Tim
Salimans, "Classifier-Free Diffusion Guidance", NeurIPS 2021 Workshop on Deep Generative Models.

Forward process (Ho et al., Eq. 4), with a noise schedule beta_1..beta_T (the paper's linear one, or the cosine
schedule of Nichol and Dhariwal, ICML 2021, our default) and abar_t = prod_{s<=t}(1 - beta_s):

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,    eps ~ N(0, I)

Training minimises the simplified objective (Ho et al., Eq. 14) at a uniform random timestep:

    L_simple = E_{x_0, c, t ~ U{1..T}, eps} || eps - eps_theta(x_t, t, c) ||^2

(the mean over pixels, which is the same objective up to a constant). The noise predictor
eps_theta is diffusers' ``UNet2DModel``, and the forward process is diffusers' ``DDPMScheduler``
(``add_noise``); samples are drawn with its ``DDIMScheduler`` (Song, Meng and Ermon, ICLR 2021) in a
few strided steps (eta = 1: ancestral sampling as in Ho et al.). Nothing of the diffusion itself is written here.

Compositional condition. The pairs datasets (``classlab.data.pairs``) label an image by a pair
(attribute a, object o), "red trouser"; a quarter of the pairs never occurs in training. A condition
vector per *pair* would leave those pairs without one, so the condition is built from words:

    c(a, o) = MLP( f(a, o) ),   words:  f(a, o) = E_attr[a] + E_obj[o]
                                minilm: f(a, o) = MiniLM("<colour> <garment>")  (frozen, 384-d)

Every pair of the grid, held out or not, has a condition. ``c`` is the vector diffusers' UNet adds to
its timestep embedding (``class_embed_type="identity"``), so every residual block reads it through its
``time_emb_proj``. A word that is missing contributes nothing (words) or is left out of the phrase
(minilm): with probability ``condition_dropout`` each of the two words is dropped in training, so the
model also learns "trouser" alone, "red" alone, and the empty phrase, which is the unconditional model
that classifier-free guidance needs:

    eps_guided = eps(x_t, t, empty) + s * (eps(x_t, t, c) - eps(x_t, t, empty)).

The ``minilm`` condition reads the offline MiniLM text tower (``classlab.models.text``); its phrase
embeddings are computed once and kept in the model's state dict, so the trained model samples and
classifies without the text model.

Choices for CPU scale (the YAML notes each): a UNet of (16, 32, 32) channels, one residual block per
level and no attention (Ho et al.: 35.7M parameters with attention at 16x16 on CIFAR-10), ~2.5k steps of
batch 32 (~10 CPU-minutes), the cosine schedule, a faster EMA of the weights (Ho et al.: 0.9999 over 800k
steps), and sampling with ancestral (eta = 1) strided steps and guidance scale 4: at this budget the
model's predictions at the highest noise levels are poor, deterministic DDIM keeps their errors as
texture, and weaker guidance leaves colours wrong. A linear-schedule run of 634 steps (batch 128) gave
unrecognisable samples.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.methods.base import Method
from classlab.methods.registry import register_method

FAMILY = "generative"
CHECKPOINT_KIND = "generative/ddpm"
TEXT_DIM = 384                 # the MiniLM sentence embedding
IDENTIFIER_PLACEHOLDER = "v"   # a one-wordpiece word whose input embedding the personalised identifier replaces
CONDITIONS = ("words", "minilm")
# the spec keys a denoiser is rebuilt from (the checkpoint keeps them)
SPEC_KEYS = ("attributes", "objects", "image_shape", "block_out_channels", "layers_per_block", "attention",
             "norm_num_groups", "condition", "num_train_timesteps", "beta_schedule", "beta_start", "beta_end")


# --- checks ---------------------------------------------------------------------------------------

def check_step_counts(hparams: dict, keys) -> None:
    """Every key of ``keys`` present in ``hparams`` is a count of diffusion timesteps or steps: an integer
    >= 1. Raises ConfigError naming the key (called before anything is read, trained or written)."""
    for key in keys:
        if key not in hparams:
            continue
        value = hparams[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}: {value!r} is not a valid number of diffusion timesteps; give an integer >= 1")


def split_labels(y: torch.Tensor, num_objects: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair labels ``a * O + o`` (attribute-major, ``classlab.data.pairs``) -> (attribute, object)."""
    return torch.div(y, num_objects, rounding_mode="floor"), torch.remainder(y, num_objects)


def denoiser_spec(hparams: dict, attributes: list[str], objects: list[str], image_shape) -> dict:
    """The JSON-able description a ``ConditionalDenoiser`` is built (and rebuilt from a checkpoint) from."""
    check_step_counts(hparams, ("num_train_timesteps",))
    channels = [int(c) for c in hparams["block_out_channels"]]
    shape = [int(s) for s in image_shape]
    if hparams["condition"] not in CONDITIONS:
        raise ConfigError(f"condition: {hparams['condition']!r}; allowed values: {list(CONDITIONS)}")
    levels = len(channels)
    if shape[1] % 2 ** (levels - 1) or shape[2] % 2 ** (levels - 1):
        raise ConfigError(f"block_out_channels: {levels} levels halve a {shape[1]}x{shape[2]} image {levels - 1} "
                          f"times, which does not divide it; use fewer levels")
    groups = int(hparams["norm_num_groups"])
    if any(c % groups for c in channels):
        raise ConfigError(f"norm_num_groups: {groups} does not divide every width of block_out_channels {channels}")
    spec = {key: hparams[key] for key in SPEC_KEYS if key in hparams}
    spec.update(attributes=list(attributes), objects=list(objects), image_shape=shape, block_out_channels=channels)
    return spec


# --- the condition ---------------------------------------------------------------------------------

def phrase_text(attribute: str | None, obj: str | None, identifier: bool = False) -> str:
    """The phrase of a (possibly partial) pair: "red trouser", "trouser", "red", "" (the empty phrase);
    ``identifier`` puts the personalised identifier's placeholder before the object ("red v trouser")."""
    words = [w for w in (attribute, IDENTIFIER_PLACEHOLDER if identifier else None, obj) if w]
    return " ".join(words)


def minilm_phrase_table(attributes: list[str], objects: list[str]) -> torch.Tensor:
    """((A + 1) * (O + 1), 384): the MiniLM embedding of every partial phrase, row (a + 1) * (O + 1) + (o + 1),
    a = -1 / o = -1 meaning the word is absent."""
    from classlab.models.text import encode_texts

    texts = [phrase_text(attributes[a] if a >= 0 else None, objects[o] if o >= 0 else None)
             for a in range(-1, len(attributes)) for o in range(-1, len(objects))]
    return encode_texts(texts).float()


def minilm_identifier_features(texts: list[str], identifier: torch.Tensor) -> torch.Tensor:
    """MiniLM sentence embeddings (B, 384) of ``texts``, each holding the placeholder word once, with the
    placeholder's input word embedding replaced by ``identifier`` (384,): a new token of the frozen text
    tower, as a personalisation method learns it. Differentiable in ``identifier``; computed as
    ``classlab.models.text.encode_texts`` computes every other phrase (mean pooling, unit norm)."""
    from classlab.models.text import _load, sentence_embedding

    tokenizer, model = _load()
    tokens = tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
    placeholder = tokenizer.convert_tokens_to_ids(IDENTIFIER_PLACEHOLDER)
    slot = tokens["input_ids"] == placeholder
    if not bool((slot.sum(1) == 1).all()):
        raise ValueError(f"every phrase must hold the identifier placeholder {IDENTIFIER_PLACEHOLDER!r} exactly once: "
                         f"{list(texts)}")
    with torch.no_grad():
        embeds = model.embeddings.word_embeddings(tokens["input_ids"])
    embeds = torch.where(slot.unsqueeze(-1), identifier.to(embeds.dtype).view(1, 1, -1), embeds)
    hidden = model(inputs_embeds=embeds, attention_mask=tokens["attention_mask"],
                   token_type_ids=tokens.get("token_type_ids")).last_hidden_state.float()
    return sentence_embedding(hidden, tokens["attention_mask"])


def minilm_placeholder_embedding() -> torch.Tensor:
    """The input word embedding of the placeholder (384,): where a personalised identifier starts."""
    from classlab.models.text import _load

    tokenizer, model = _load()
    index = tokenizer.convert_tokens_to_ids(IDENTIFIER_PLACEHOLDER)
    return model.embeddings.word_embeddings.weight[index].detach().clone().float()


class PhraseEncoder(nn.Module):
    """(attribute, object) word indices (-1: absent) -> condition vector ``c = MLP(f(a, o))``.

    ``features`` gives the input-side phrase feature f (sum of word embeddings, or the frozen MiniLM
    embedding); ``forward`` maps features to the condition, so a personalisation method can add its own
    word to the features and pass them through the same (frozen) encoder."""

    def __init__(self, num_attributes: int, num_objects: int, dim: int, kind: str = "words",
                 phrase_table: torch.Tensor | None = None):
        super().__init__()
        self.kind = kind
        self.num_attributes, self.num_objects = num_attributes, num_objects
        if kind == "words":
            self.attribute_embedding = nn.Embedding(num_attributes, dim)
            self.object_embedding = nn.Embedding(num_objects, dim)
            feature_dim = dim
        elif kind == "minilm":
            rows = (num_attributes + 1) * (num_objects + 1)
            table = phrase_table if phrase_table is not None else torch.zeros(rows, TEXT_DIM)
            if tuple(table.shape) != (rows, TEXT_DIM):
                raise ValueError(f"minilm phrase table of shape {tuple(table.shape)}, expected {(rows, TEXT_DIM)}")
            self.register_buffer("phrase_table", table.float().clone())
            feature_dim = TEXT_DIM
        else:
            raise ConfigError(f"condition: {kind!r}; allowed values: {list(CONDITIONS)}")
        self.feature_dim = feature_dim
        self.mlp = nn.Sequential(nn.Linear(feature_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, attribute: torch.Tensor, obj: torch.Tensor) -> torch.Tensor:
        attribute, obj = torch.as_tensor(attribute), torch.as_tensor(obj)
        attribute, obj = torch.broadcast_tensors(attribute.reshape(-1), obj.reshape(-1))
        if self.kind == "words":
            # f(a, o) = E_attr[a] + E_obj[o]; an absent word (-1) adds nothing
            device = self.attribute_embedding.weight.device
            attribute, obj = attribute.to(device), obj.to(device)
            f = self.attribute_embedding(attribute.clamp_min(0)) * (attribute >= 0).unsqueeze(1)
            return f + self.object_embedding(obj.clamp_min(0)) * (obj >= 0).unsqueeze(1)
        device = self.phrase_table.device
        row = (attribute.to(device) + 1) * (self.num_objects + 1) + (obj.to(device) + 1)
        return self.phrase_table[row]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class ConditionalDenoiser(nn.Module):
    """eps_theta(x_t, t, c): diffusers' UNet2DModel with the phrase condition added to its time embedding."""

    def __init__(self, spec: dict, phrase_table: torch.Tensor | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        self.spec = dict(spec)
        channels, height, _ = spec["image_shape"]
        widths = tuple(int(c) for c in spec["block_out_channels"])
        attention = bool(spec.get("attention", False))
        down = ["DownBlock2D"] * len(widths)
        up = ["UpBlock2D"] * len(widths)
        if attention:  # self-attention at the coarsest resolution only (Ho et al.: at 16x16)
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.unet = UNet2DModel(sample_size=int(height), in_channels=int(channels), out_channels=int(channels),
                                layers_per_block=int(spec["layers_per_block"]), block_out_channels=widths,
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                norm_num_groups=int(spec["norm_num_groups"]), class_embed_type="identity")
        self.condition_dim = int(self.unet.time_embedding.linear_2.out_features)
        self.num_attributes, self.num_objects = len(spec["attributes"]), len(spec["objects"])
        self.encoder = PhraseEncoder(self.num_attributes, self.num_objects, self.condition_dim,
                                     spec.get("condition", "words"), phrase_table)

    def condition(self, attribute, obj) -> torch.Tensor:
        """c(a, o) for index tensors (-1: the word is absent); any pair of the grid has one."""
        return self.encoder(self.encoder.features(attribute, obj))

    def pair_conditions(self) -> torch.Tensor:
        """(A * O, d): the condition of every pair label a * O + o, held-out pairs included."""
        labels = torch.arange(self.num_attributes * self.num_objects)
        return self.condition(*split_labels(labels, self.num_objects))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, class_labels=condition).sample


def build_denoiser(spec: dict) -> ConditionalDenoiser:
    """A fresh denoiser; the minilm condition computes its phrase table here (once, from the text tower)."""
    table = minilm_phrase_table(spec["attributes"], spec["objects"]) if spec.get("condition") == "minilm" else None
    return ConditionalDenoiser(spec, table)


def build_scheduler(spec: dict):
    """The forward process: diffusers' DDPMScheduler (epsilon prediction, samples clipped to [-1, 1])."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=int(spec["num_train_timesteps"]), beta_start=float(spec["beta_start"]),
                         beta_end=float(spec["beta_end"]), beta_schedule=str(spec["beta_schedule"]),
                         prediction_type="epsilon", clip_sample=True)


def build_sampler(spec: dict, steps: int):
    """DDIM over the same noise schedule, set to ``steps`` deterministic steps (eta = 0)."""
    from diffusers import DDIMScheduler

    check_step_counts({"sample_steps": steps}, ("sample_steps",))
    if steps > int(spec["num_train_timesteps"]):
        raise ConfigError(f"sample_steps: {steps} exceeds the model's {spec['num_train_timesteps']} training timesteps")
    sampler = DDIMScheduler(num_train_timesteps=int(spec["num_train_timesteps"]), beta_start=float(spec["beta_start"]),
                            beta_end=float(spec["beta_end"]), beta_schedule=str(spec["beta_schedule"]),
                            prediction_type="epsilon", clip_sample=True)
    sampler.set_timesteps(int(steps))
    return sampler


@torch.no_grad()
def sample_images(denoiser: ConditionalDenoiser, features: torch.Tensor, steps: int, guidance_scale: float,
                  generator: torch.Generator, empty_features: torch.Tensor | None = None,
                  eta: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) samples in [-1, 1] for the phrase features ``features`` (B, F), by DDIM from noise drawn
    with ``generator``, with classifier-free guidance of scale ``guidance_scale`` (1: none) against the
    empty phrase (or ``empty_features``). ``eta`` = 1 makes each DDIM step an ancestral (DDPM) step over the
    strided timesteps, fresh noise from ``generator`` included; eta = 0 is deterministic DDIM, which keeps
    the errors of a briefly trained model's high-noise predictions as texture (seen on our CPU budget)."""
    spec = denoiser.spec
    sampler = build_sampler(spec, steps)
    device = next(denoiser.parameters()).device
    n = features.shape[0]
    cond = denoiser.encoder(features.to(device))
    if empty_features is None:
        empty_features = denoiser.encoder.features(torch.tensor([-1]), torch.tensor([-1]))
    empty = denoiser.encoder(empty_features.to(device)).expand(n, -1)
    x = torch.randn((n, *spec["image_shape"]), generator=generator).to(device)
    guided = float(guidance_scale) != 1.0
    for t in sampler.timesteps:
        if guided:
            # eps = eps(empty) + s * (eps(c) - eps(empty)) (Ho and Salimans), one batch for both halves
            both = denoiser(torch.cat([x, x]), t, torch.cat([empty, cond]))
            eps_empty, eps_cond = both.chunk(2)
            eps = eps_empty + float(guidance_scale) * (eps_cond - eps_empty)
        else:
            eps = denoiser(x, t, cond)
        x = sampler.step(eps, t, x, eta=float(eta), generator=generator).prev_sample
    return x.clamp(-1.0, 1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float images -> uint8 in 0..255."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> [-1, 1] floats (the loader's normalisation with mean = std = 0.5)."""
    return x.float() / 127.5 - 1.0


# --- checkpoints -----------------------------------------------------------------------------------

def save_denoiser(path: Path, denoiser: ConditionalDenoiser, meta: dict) -> None:
    """``model.pt``: the denoiser's state dict, its spec and ``meta`` (plain containers; loads with
    ``torch.load(weights_only=True)``), written atomically."""
    from classlab.engine.checkpoint import save_checkpoint

    state = {k: v.detach().cpu().clone() for k, v in denoiser.state_dict().items()}
    save_checkpoint({"kind": CHECKPOINT_KIND, "spec": dict(denoiser.spec), "state_dict": state, "meta": dict(meta)},
                    Path(path))


def load_denoiser(path: Path) -> tuple[ConditionalDenoiser, dict]:
    """(denoiser in eval mode, the checkpoint's meta). A file that is not a ddpm checkpoint raises
    ConfigError naming ``model_path``."""
    from classlab.engine.checkpoint import CheckpointError, load_checkpoint

    try:
        blob = load_checkpoint(Path(path))
    except CheckpointError as exc:
        raise ConfigError(f"model_path: {exc}") from None
    if not isinstance(blob, dict) or blob.get("kind") != CHECKPOINT_KIND:
        raise ConfigError(f"model_path: {path} is not a generative/ddpm checkpoint (train one with "
                          f"classlab.protocols.generative.train_diffusion)")
    denoiser = ConditionalDenoiser(blob["spec"])  # a minilm table is a buffer: the state dict fills it
    denoiser.load_state_dict(blob["state_dict"])
    return denoiser.eval(), dict(blob.get("meta") or {})


# --- the method ------------------------------------------------------------------------------------

@register_method("generative", "ddpm")
class DDPM(Method):
    """Trains ``model`` (a ``ConditionalDenoiser``) with L_simple; keeps an EMA of its weights."""

    def __init__(self, model: ConditionalDenoiser, hparams: dict, num_classes: int):
        check_step_counts(hparams, ("num_train_timesteps",))
        super().__init__(model, hparams, num_classes)
        self.scheduler = build_scheduler(model.spec)
        self.condition_dropout = float(hparams.get("condition_dropout", 0.0))
        self.ema_decay = float(hparams.get("ema_decay", 0.0))
        # the EMA copy is a submodule (checkpointed with the run) outside the optimizer's parameters
        self.ema_model = copy.deepcopy(model).requires_grad_(False) if self.ema_decay > 0 else None

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ema_model is not None:
            self.ema_model.eval()
        return self

    def draw(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, eps, keep) for a batch, from the global RNG (seeded by the engine per epoch): t ~ U{0..T-1},
        eps ~ N(0, I), keep (B, 2) whether the attribute / object word stays in the phrase."""
        n = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        keep = torch.rand(n, 2, device=x0.device) >= self.condition_dropout
        return t, noise, keep

    def diffusion_loss(self, x0: torch.Tensor, attribute: torch.Tensor, obj: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor, model: nn.Module | None = None) -> torch.Tensor:
        model = model if model is not None else self.model
        # x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps   (Ho et al., Eq. 4; diffusers' add_noise)
        x_t = self.scheduler.add_noise(x0, noise, t)
        eps_hat = model(x_t, t, model.condition(attribute, obj))
        # L_simple = || eps - eps_theta(x_t, t, c) ||^2, averaged over pixels and the batch (Eq. 14)
        return F.mse_loss(eps_hat.float(), noise.float())

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x0 = batch["x"]
        attribute, obj = split_labels(batch["y"], self.model.num_objects)
        t, noise, keep = self.draw(x0)
        # condition dropout: a dropped word is absent from the phrase (both dropped: the unconditional model)
        attribute = torch.where(keep[:, 0], attribute, torch.full_like(attribute, -1))
        obj = torch.where(keep[:, 1], obj, torch.full_like(obj, -1))
        return self.diffusion_loss(x0, attribute, obj, t, noise), {}

    @torch.no_grad()
    def on_after_step(self, batch: dict, logs: dict) -> None:
        if self.ema_model is None:
            return
        # theta_ema <- decay * theta_ema + (1 - decay) * theta
        for ema_p, p in zip(self.ema_model.parameters(), self.model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.ema_decay)

    def trained_denoiser(self) -> ConditionalDenoiser:
        """The weights to sample and classify with: the EMA where kept, else the trained ones."""
        return self.ema_model if self.ema_model is not None else self.model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("generative/ddpm predicts noise, not classes: classify with "
                           "generative/diffusion_classifier (classlab.protocols.generative.classify_compositions)")
