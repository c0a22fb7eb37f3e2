"""The online prompt-pool base that MVP builds on, with MVP's four components switched off.

Moon, Park, Kim, Park, "Online Class Incremental Learning on Stochastic Blurry Task Boundary via
Mask and Visual Prompt Tuning", ICCV 2023, ablation (Table 4: the base model, then each of mask,
contrastive loss, focal loss and feature scaling added). The base is a frozen ViT with a shared
g-prompt and a pool of e-prompts chosen by key matching (L2P/DualPrompt style), trained online
with plain cross-entropy over the classes exposed so far in the stream and L2P's key pull:

    L = CE(W f_P(x) + b + B, y) + w mean_b d(q_b, k_s(b)),
    B_c = 0 if class c was exposed, else -inf;  d = 1 - cos;  s(b) = argmin_i d(q_b, k_i)

Everything else (prompts, pool, key selection, optimizer, online passes) is MVP's; the YAML
``extends: mvp`` and only switches the components off, so the pair measures what they add.
"""
from __future__ import annotations

from classlab.methods.incremental.mvp import MVP
from classlab.methods.registry import register_method


MVP_COMPONENTS_OFF = {"use_mask": False, "use_contrastive": False, "use_afs": False, "use_gsf": False}


@register_method("incremental", "mvp_base")
class MVPBase(MVP):
    # the base model whatever a run's overrides say (the protocol re-assigns hparams every task)
    @property
    def hparams(self) -> dict:
        return self._hparams

    @hparams.setter
    def hparams(self, value: dict) -> None:
        self._hparams = {**value, **MVP_COMPONENTS_OFF}
