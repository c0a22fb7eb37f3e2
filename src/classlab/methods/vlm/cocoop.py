"""CoCoOp: the context conditioned on each image through a light meta-net.

Zhou, Yang, Loy and Liu, "Conditional Prompt Learning for Vision-Language Models", CVPR 2022. A
meta-net h (Linear - ReLU - Linear, hidden width E/16) maps the image feature f(x) to a token pi(x)
added to every context vector, v_m(x) = v_m + pi(x), so the prompt of class c for image x is
t_c(x) = [v_1(x), ..., v_M(x), CLASS_c] and

    p(y = c | x) = exp(s <f(x), g(t_c(x))>) / sum_j exp(s <f(x), g(t_j(x))>).

The paper's point: conditioning on the instance generalises better to unseen (new) classes than
CoOp's static context. Each image needs its own pass of every class prompt through the text tower,
which is why the paper trains with batch size 1.
"""
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.vlm.coop import CoOp
from classlab.models.image_text import text_tower


def meta_net(dim: int, reduction: int) -> nn.Sequential:
    """CoCoOp's meta-net h: Linear(E, E / reduction) - ReLU - Linear(., D), one token per image (D the
    text tower's token width: 384 for MiniLM, 512 for CLIP ViT-B)."""
    hidden = max(1, int(dim) // int(reduction))
    return nn.Sequential(nn.Linear(int(dim), hidden), nn.ReLU(inplace=True), nn.Linear(hidden, text_tower().width))


@register_method("vlm", "cocoop")
class CoCoOp(CoOp):
    def build(self, class_names):
        super().build(class_names)
        self.meta_net = meta_net(self.clip.embed_dim, int(self.hparams["meta_reduction"]))
        self.meta_net.to(self.clip.logit_scale.device)

    def text_features(self, classes, image):
        shift = self.meta_net(image)                        # pi(x), (B, 384)
        sentences = self.prompt(shift, classes)              # g(t_c(x)), (B, C, 384)
        return self.clip.encode_text(sentences)             # (B, C, E)
