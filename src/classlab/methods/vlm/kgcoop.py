"""KgCoOp: CoOp kept close to the hand-written prompts' knowledge.

Yao, Zhang and Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization", CVPR
2023. With w_c = g(t_c) the learned prompt's text feature and w_c^clip = g("a photo of a {c}.") the
hand-written one's (both unit-norm), the loss is

    L = L_ce + lambda * (1 / N_c) sum_c || w_c - w_c^clip ||_2^2,

over the training classes; lambda = 8.0 in the paper's base-to-novel runs. Keeping the learned
prompts near the general knowledge of the hand-written ones is what preserves new-class accuracy.
"""
from classlab.methods.registry import register_method
from classlab.methods.vlm.coop import CoOp


@register_method("vlm", "kgcoop")
class KgCoOp(CoOp):
    def extra_loss(self, logits, targets, image, text):
        anchor = self.clip.encode_text(self.hand_written[self.train_classes]).detach()  # w^clip
        distance = (text - anchor).pow(2).sum(-1).mean()                                # mean_c ||w_c - w_c^clip||^2
        return float(self.hparams["kg_weight"]) * distance, {"kg_distance": float(distance.detach())}
