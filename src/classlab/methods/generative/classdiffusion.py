"""classdiffusion: personalisation fine-tuning with the semantic preservation loss.

Paper: Jiannan Huang, Jun Hao Liew, Hanshu Yan, Yuyang Yin, Yao Zhao, Humphrey Shi and Yunchao Wei,
"ClassDiffusion: More Aligned Personalization Tuning with Explicit Class Guidance", ICLR 2025
(arXiv 2405.17532).

Personalisation (DreamBooth, Ruiz et al. 2023; Custom Diffusion, Kumari et al. 2023) binds a new
identifier V* to a few images of one instance by fine-tuning the diffusion model on them with the
prompt "a V* <class>". It overfits: the personalised phrase drifts away from its class in the text
space and the model no longer composes it with other words ("a V* dog wearing a headphone" loses the
headphone). ClassDiffusion adds the semantic preservation loss (SPL), the cosine distance between the
text encoder's features of the personalised phrase and of the class phrase:

    L = L_recon + lambda * L_sp,
    L_recon = E_{x in instance, t, eps} || eps - eps_theta(x_t, t, E("V* <class>")) ||^2,
    L_sp    = 1 - cos( E("V* <class>"), E("<class>") ),

lambda = 1 (the official training script), trained with Custom Diffusion's recipe: the text encoder
frozen except the new token's embedding, and only the layers that read the text (cross-attention K
and V) fine-tuned.

Here (a toy of the same structure on the coloured garments):

- the "text encoder" E is the trained DDPM's phrase encoder (``ddpm.PhraseEncoder``), frozen; V* is a
  new word with a learnable input embedding v: with the ``words`` condition
  E("<colour> V* <garment>") = MLP(E_attr[colour] + v + E_obj[garment]); with ``minilm`` v replaces the
  placeholder token's input embedding inside the frozen MiniLM. SPL compares E("V* <garment>") with
  E("<garment>"), i.e. the condition vectors the UNet reads;
- the instance is k images of one garment in one colour (the protocol picks them: a seeded image and
  its nearest neighbours in the same pair, so that they look like one item), prompted "V* <garment>"
  with no colour word, as DreamBooth prompts "a V* dog": the colour is the instance's, for V* to learn;
- what is fine-tuned (``finetune``), besides v: ``condition_layers``, the UNet's ``time_emb_proj`` in every
  residual block, the only layers that read the condition (the analogue of Custom Diffusion's K/V, since
  this UNet takes its condition through the time embedding rather than cross-attention); ``all``: the whole
  UNet (DreamBooth), the default, because ``condition_layers`` did not bind the instance at our budget
  (chosen on plain personalisation's instance fidelity, see the YAML); ``identifier``: v alone (Textual
  Inversion);
- composition is then "<other colour> V* <garment>": the garment should stay the instance's and take
  the new colour. ``spl_weight: 0`` is plain personalisation (the ``personalize`` variant).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.config import ConfigError
from classlab.methods.base import Method
from classlab.methods.generative.ddpm import (ConditionalDenoiser, build_scheduler, minilm_identifier_features,
                                              minilm_placeholder_embedding, phrase_text)
from classlab.methods.registry import register_method

FINETUNE = ("condition_layers", "all", "identifier")


def semantic_preservation_loss(personal: torch.Tensor, class_condition: torch.Tensor) -> torch.Tensor:
    """L_sp = 1 - cos(E("V* <class>"), E("<class>")), averaged over rows (Huang et al.)."""
    return (1.0 - F.cosine_similarity(personal, class_condition, dim=-1)).mean()


@register_method("generative", "classdiffusion")
class ClassDiffusion(Method):
    """Fine-tunes a trained ``ConditionalDenoiser`` on one instance, bound to a new identifier V*."""

    def __init__(self, model: ConditionalDenoiser, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        finetune = hparams.get("finetune", "all")
        if finetune not in FINETUNE:
            raise ConfigError(f"finetune: {finetune!r}; allowed values: {list(FINETUNE)}")
        spl_weight = hparams.get("spl_weight", 1.0)
        if isinstance(spl_weight, bool) or not isinstance(spl_weight, (int, float)) or spl_weight < 0:
            raise ConfigError(f"spl_weight: {spl_weight!r}; give a number >= 0 (0: plain personalisation)")
        self.spl_weight = float(spl_weight)
        self.scheduler = build_scheduler(model.spec)
        self.instance_object = 0  # the garment of the instance (set_instance)
        encoder = model.encoder
        # V*'s input embedding: in words mode a random word of the norm of the trained ones (a rare token),
        # in minilm mode the placeholder token's own embedding (drawn from the global RNG, seeded by the run)
        if encoder.kind == "words":
            norms = torch.cat([encoder.attribute_embedding.weight, encoder.object_embedding.weight]).norm(dim=1)
            direction = torch.randn(encoder.feature_dim)
            init = direction / direction.norm() * norms.mean().detach()
        else:
            init = minilm_placeholder_embedding()
        self.identifier = nn.Parameter(init.to(next(model.parameters()).device))
        model.requires_grad_(False)
        if finetune == "all":
            model.unet.requires_grad_(True)
        elif finetune == "condition_layers":
            for name, module in model.unet.named_modules():
                if name.endswith("time_emb_proj"):
                    module.requires_grad_(True)
        self.finetune = finetune

    def set_instance(self, obj: int) -> None:
        if not 0 <= int(obj) < self.model.num_objects:
            raise ConfigError(f"instance object {obj} outside 0..{self.model.num_objects - 1}")
        self.instance_object = int(obj)

    def param_groups(self) -> list[dict]:
        trained = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": [self.identifier] + trained}]

    # --- phrases with V* -----------------------------------------------------------------------------
    def identifier_features(self, attribute, obj) -> torch.Tensor:
        """Phrase features of "<colour> V* <garment>" (attribute -1: "V* <garment>")."""
        encoder = self.model.encoder
        attribute = torch.as_tensor(attribute).reshape(-1)
        obj = torch.as_tensor(obj).reshape(-1)
        attribute, obj = torch.broadcast_tensors(attribute, obj)
        if encoder.kind == "words":
            # f = E_attr[a] + v + E_obj[o]: V* is one more word of the sum
            return encoder.features(attribute, obj) + self.identifier.unsqueeze(0)
        spec = self.model.spec
        texts = [phrase_text(spec["attributes"][a] if a >= 0 else None, spec["objects"][o], identifier=True)
                 for a, o in zip(attribute.tolist(), obj.tolist())]
        unique = sorted(set(texts))
        features = minilm_identifier_features(unique, self.identifier)
        return features[[unique.index(t) for t in texts]].to(self.identifier.device)

    def personal_and_class_conditions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E("V* <garment>"), E("<garment>")), each (1, d), for the instance's garment."""
        encoder, obj = self.model.encoder, torch.tensor([self.instance_object])
        personal = encoder(self.identifier_features(torch.tensor([-1]), obj))
        with torch.no_grad():
            class_condition = encoder(encoder.features(torch.tensor([-1]), obj))
        return personal, class_condition

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        x0 = batch["x"]
        n = x0.shape[0]
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), device=x0.device)
        noise = torch.randn_like(x0)
        personal, class_condition = self.personal_and_class_conditions()
        x_t = self.scheduler.add_noise(x0, noise, t)
        # L_recon = || eps - eps_theta(x_t, t, E("V* <garment>")) ||^2
        recon = F.mse_loss(self.model(x_t, t, personal.expand(n, -1)).float(), noise.float())
        # L_sp = 1 - cos(E("V* <garment>"), E("<garment>")); L = L_recon + lambda * L_sp
        spl = semantic_preservation_loss(personal, class_condition)
        loss = recon + self.spl_weight * spl if self.spl_weight > 0 else recon
        return loss, {"recon": recon.detach(), "spl": spl.detach()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("generative/classdiffusion personalises a generator; it has no class prediction")
