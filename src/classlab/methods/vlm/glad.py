"""GLAD: LoRA on the image-text model's encoders, its gradient steered by a sharpness-aware reference.

Peng, Wang, Liu and Chen, "GLAD: Generalizable Tuning for Vision-Language Models", arXiv 2507.13089
(2025), ICCV 2025 Workshops. GLAD trains low-rank adapters (LoRA, Hu et al. 2022) instead of prompts,
classifying by the hand-written prompts "a photo of a {class}." as zero-shot CLIP does,

    W = W_0 + (alpha / r) B A,   A in R^{r x d_in}, B in R^{d_out x r}, B = 0 at the start,

so that before training the model is exactly the pretrained one (tested), and regularises the few-shot
gradient with the gradient of Sharpness-Aware Minimization (SAM, Foret et al. 2021) used as a reference
signal that steers the update towards parameters good for both the task and a flat (stable) region.

Where LoRA goes here. Our offline CLIP (``classlab.models.image_text``) has a frozen MiniLM text tower
shared by every method of the family (``text_tower()``, never a submodule), then a learned linear
``text_proj``; the image side is one of the project's backbones (``image_encoder``) and ``image_proj``.
LoRA (through ``peft``) goes on:

- ``clip.text_proj``: the only text-side weight this model learned (the paper adapts the text encoder;
  the MiniLM tower is a shared frozen module, so its projection is where the text side can adapt);
- ``clip.image_proj`` and every ``nn.Linear`` and ``nn.Conv2d`` inside ``clip.image_encoder`` (the
  ConvNet's 3x3 convolutions; a ViT's qkv, attention output and MLP linears and its patch embedding;
  a ResNet's convolutions): peft's LoRA layers support both types. CLIP-LoRA puts its adapters on the
  attention's q, k, v of both CLIP encoders; GLAD's exact placement could not be read, so adapting
  every linear/conv map of the image side is our reading. ``lora_image: false`` / ``lora_text: false``
  drop a side.

Everything else (the backbone's weights, BatchNorm, the temperature) stays frozen. BatchNorm layers
are kept in eval mode while the adapters train, so the pretrained running statistics are part of
the frozen model (CLIP's own encoders use LayerNorm and have no such statistics): this is our choice.

The regulariser. The exact equation of the paper could not be read here (the method section of the
arXiv text was not reachable; the code repository holds only a README). What the paper states: the
gradient computed by SAM is a reference signal used to steer the original gradient direction toward
a region shared by stable solutions and task-specific solutions. OUR READING of that, with theta the
LoRA parameters (all of them flattened into one vector) and L the batch's cross-entropy:

    g     = grad L(theta)                                   the task gradient
    eps   = rho g / ||g||_2                                 SAM's first-order worst-case perturbation
    g_s   = grad L(theta + eps)                             SAM's gradient (the reference)

and the optimizer steps with a steered g~ (``grad_rule``):

- ``blend`` (the default):  g~ = (1 - lambda) g + lambda g_s,
  the gradient of  L(theta) + lambda [L(theta + eps) - L(theta)]  with eps held fixed as SAM holds it:
  the task loss plus lambda times SAM's sharpness gap. The direction turns from the task gradient
  toward the flat-region gradient by lambda (0: LoRA alone, 1: SAM), so the step serves both.
- ``project``:  g~ = g if <g, g_s> >= 0, else g - lambda (<g, g_s> / ||g_s||^2) g_s,
  ProGrad's rule (Zhu et al., ICCV 2023) with SAM's gradient as the anchor: only a component of g
  that conflicts with g_s is removed (lambda = 1: the step is orthogonal to g_s). With a small rho the
  two gradients rarely conflict (on the digits runs here never at rho = 0.05), so this rule seldom acts.

Which rule the paper uses, lambda = 0.5 and rho = 0.05 (SAM's default) are our reading, not values read
from GLAD. Each step costs two forward and backward passes (``optimizer_step``; ``training_step`` is
pure, so ``closure`` re-evaluates it at theta + eps).

LoRA defaults (rank 2, alpha 1, dropout 0.25, AdamW at 2e-4, weight decay 0.01, cosine) are those of
CLIP-LoRA (Zanella and Ben Ayed, CVPRW 2024), the standard recipe for LoRA on few-shot CLIP; GLAD's own
values were not readable here, so these too are our reading.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.vlm_learner import PromptMethod

ADAPTER = "default"
LORA_TYPES = (nn.Linear, nn.Conv2d)  # module types that get an adapter (peft's LoRA supports both)


def lora_target_names(clip: nn.Module, image: bool = True, text: bool = True) -> list[str]:
    """The names (inside ``clip``) of the modules that get LoRA: every Linear/Conv2d of the image
    encoder and ``image_proj`` (``image``), and ``text_proj`` (``text``)."""
    names = []
    if image:
        names += [f"image_encoder.{name}" for name, module in clip.image_encoder.named_modules()
                  if name and isinstance(module, LORA_TYPES)]
        names.append("image_proj")
    if text:
        names.append("text_proj")
    return names


def steer_gradient(grad: list[torch.Tensor], reference: list[torch.Tensor], strength: float = 0.5,
                   rule: str = "blend", eps: float = 1e-12) -> list[torch.Tensor]:
    """The task gradient ``grad`` (g) steered by the reference ``reference`` (SAM's g_s), the parameters
    flattened together; ``strength`` is lambda.

    blend:   g~ = (1 - lambda) g + lambda g_s
    project: g~ = g - lambda min(0, <g, g_s>) / ||g_s||^2 g_s
    """
    lam = float(strength)
    if rule == "blend":
        return [(1.0 - lam) * g + lam * r for g, r in zip(grad, reference)]  # (1 - lambda) g + lambda g_s
    if rule != "project":
        raise ValueError(f"glad: grad_rule {rule!r} is not one of ['blend', 'project']")
    dot = sum((g * r).sum() for g, r in zip(grad, reference))           # <g, g_s>
    if float(dot) >= 0.0:
        return [g.clone() for g in grad]
    ref_sq = sum(r.pow(2).sum() for r in reference)                    # ||g_s||^2
    coef = lam * dot / (ref_sq + eps)                                  # lambda <g, g_s> / ||g_s||^2
    return [g - coef * r for g, r in zip(grad, reference)]             # g - coef g_s


@register_method("vlm", "glad")
class GLAD(PromptMethod):
    """LoRA on the image encoder and both projections, hand-written prompts as the classifier, the
    gradient steered by SAM's (see the module docstring for what is the paper's and what is ours)."""

    def build(self, class_names):
        super().build(class_names)  # the hand-written prompts' sentence embeddings: the classifier's input
        from peft import LoraConfig, inject_adapter_in_model

        hp = self.hparams
        names = lora_target_names(self.clip, bool(hp.get("lora_image", True)), bool(hp.get("lora_text", True)))
        if not names:
            raise ValueError("glad: lora_image and lora_text are both false, nothing would be trained")
        # peft full-matches a string target against each module's name: exactly these modules
        pattern = "|".join(re.escape(name) for name in names)
        config = LoraConfig(r=int(hp["lora_rank"]), lora_alpha=float(hp["lora_alpha"]),
                            lora_dropout=float(hp["lora_dropout"]), target_modules=pattern, bias="none")
        inject_adapter_in_model(config, self.clip, adapter_name=ADAPTER)
        for name, param in self.clip.named_parameters():  # only A and B train; W_0 stays as pretrained
            param.requires_grad = ".lora_" in name
        self.lora_modules = names
        self.clip.to(self.clip.logit_scale.device)

    def lora_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.clip.named_parameters() if ".lora_" in name and p.requires_grad]

    def param_groups(self) -> list[dict]:
        return [{"params": self.lora_parameters()}]

    def train(self, mode: bool = True):
        # LoRA's dropout follows the mode; BatchNorm keeps the pretrained statistics (eval) throughout
        nn.Module.train(self, mode)
        for module in self.model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def optimizer_step(self, loss, optimizer, closure):
        rho, strength = float(self.hparams.get("rho", 0.05)), float(self.hparams.get("grad_reg", 0.5))
        rule = str(self.hparams.get("grad_rule", "blend"))
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]  # g
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grad]))
        if rho > 0 and strength > 0 and float(norm) > 0:
            with torch.no_grad():
                origin = [p.detach().clone() for p in params]
                for p, g in zip(params, grad):
                    p.add_(g, alpha=rho / float(norm))  # theta + eps, eps = rho g / ||g||
            optimizer.zero_grad(set_to_none=True)
            closure().backward()  # L(theta + eps) on the same batch (training_step is pure)
            reference = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
            with torch.no_grad():
                for p, w in zip(params, origin):
                    p.copy_(w)  # back to theta exactly
            grad = steer_gradient(grad, reference, strength, rule)  # g~ from g and SAM's g_s
        for p, g in zip(params, grad):
            p.grad = g
        if self.hparams.get("grad_clip", 0) > 0:
            torch.nn.utils.clip_grad_norm_(params, self.hparams["grad_clip"])
        optimizer.step()
