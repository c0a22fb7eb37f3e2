"""Zero-shot CLIP: classify by the hand-written prompt, nothing trained.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021:
p(y = c | x) = softmax_c( exp(t) <f(x), g("a photo of a {c}.")> ), f and g the unit-norm image and text
features. The baseline every prompt-learning paper starts from; with our offline CLIP, the image side
saw only the base classes, so its new-class accuracy measures how far the text tower carries it.
"""
from classlab.methods.registry import register_method
from classlab.methods.vlm_learner import PromptMethod


@register_method("vlm", "zeroshot")
class ZeroShot(PromptMethod):
    learns = False
