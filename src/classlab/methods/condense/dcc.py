"""DCC: dataset condensation with contrastive signals.

Lee, Chun, Jung, Yun and Yoon, "Dataset Condensation with Contrastive Signals", ICML 2022 (official
code Saehyung-Lee/DCC, ``main.py --contrast``, built on DC's code). DC matches each class's gradient on
its own, so what is common to all classes dominates each class's gradient and what tells classes apart
is lost. DCC matches the gradient of the loss summed over classes instead, one real batch of every
class against the whole synthetic set:

    L(S) = D( grad_theta (1/K) sum_c CE(theta; A_w_c(S_c), c),  (1/K) sum_c grad_theta CE(theta; A_w_c(T_c), c) ),

the synthetic side one cross-entropy over all K * ipc images (the mean over them equals the mean over
classes: every class has ipc images), the real side the mean of the per-class gradients (the code adds
``gw_real_i / num_classes``). With DSA (``--method DSA``, "DSAC" in the paper, and our default) each
class's real and synthetic batch share one augmentation draw w_c, as in DSA.

**Warm-up (verified in the official main.py).** The contrastive loss is used when
``outer_warmup <= ol or inner_warmup <= il`` (ol the network index, il the image update within it);
otherwise the step uses DC's per-class loss. So for the first ``outer_warmup`` networks (250 of 1000)
the first ``inner_warmup`` (10) image updates of each network are DC steps, and every later update is
contrastive. Nothing is trained on real data: the warm-up is a matching-objective warm-up. With DCC's
schedule (image updates, network epochs) = (10, 5), (10, 50), (50, 10) for 1 / 10 / 50 images per
class, inner_warmup 10 makes the first 250 networks pure DC at 1 and 10 images per class.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.condense_learner import CondensationMethod, gradient_matching_distance
from classlab.methods.registry import register_method


def contrastive_gradients(model, params, pieces, num_classes: int):
    """(g_real, g_syn) of DCC for ``pieces`` = [(c, real_c, syn_c)]: g_real = (1/K) sum_c grad CE(T_c, c),
    detached; g_syn = grad of one CE over the concatenated synthetic images, differentiable (create_graph)."""
    g_real = None
    for c, real, _syn in pieces:
        target = torch.full((len(real),), c, dtype=torch.long, device=real.device)
        g = torch.autograd.grad(F.cross_entropy(model(real), target), params)
        g = [gi.detach() / float(num_classes) for gi in g]
        g_real = g if g_real is None else [a + b for a, b in zip(g_real, g)]
    syn = torch.cat([s for _c, _r, s in pieces])
    syn_labels = torch.cat([torch.full((len(s),), c, dtype=torch.long, device=s.device) for c, _r, s in pieces])
    g_syn = torch.autograd.grad(F.cross_entropy(model(syn), syn_labels), params, create_graph=True)
    return g_real, g_syn


@register_method("condense", "dcc")
class DCC(CondensationMethod):
    def contrastive(self, step: int) -> bool:
        """Whether image update ``step`` uses the contrastive loss (after the warm-up)."""
        outer, _ = self.loops()
        network, update = divmod(int(step), outer)
        return network >= int(self.hparams["outer_warmup"]) or update >= int(self.hparams["inner_warmup"])

    def matching_loss(self, batch):
        if not self.contrastive(self.global_step):
            return self.per_class_matching(batch), {"contrastive": torch.zeros(())}  # DC's warm-up step
        params = self.network_params()
        g_real, g_syn = contrastive_gradients(self.model, params, self.class_batches(batch), self.num_classes)
        # D(grad (1/K) sum_c CE(S_c), (1/K) sum_c grad CE(T_c))
        return gradient_matching_distance(g_syn, g_real), {"contrastive": torch.ones(())}
