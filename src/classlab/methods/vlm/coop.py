"""CoOp: learned context vectors in place of the hand-written prompt's words.

Zhou, Yang, Loy and Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022. The prompt of
class c is t_c = [v_1, ..., v_M, CLASS_c], the v_m learned word embeddings shared by all classes
(unified context), and

    p(y = c | x) = exp(s <f(x), g(t_c)>) / sum_j exp(s <f(x), g(t_j)>),

trained by cross-entropy on the few-shot base images with both encoders frozen. Here M = 4 vectors
initialised from "a photo of a" (the paper's initialisation for its base-to-novel runs), so that
before training CoOp is zero-shot CLIP (tested in tests/test_vlm_model.py).
"""
from classlab.methods.registry import register_method
from classlab.methods.vlm_learner import PromptMethod
from classlab.models.image_text import PromptLearner


@register_method("vlm", "coop")
class CoOp(PromptMethod):
    def build(self, class_names):
        super().build(class_names)
        device = self.clip.logit_scale.device
        self.prompt = PromptLearner(self.class_names, ctx_init=self.hparams.get("ctx_init") or None,
                                    n_ctx=int(self.hparams["n_ctx"]), class_specific=bool(self.hparams["class_specific"]),
                                    device=device, seed=int(self.hparams.get("seed", 0)))

    def text_features(self, classes, image):
        return self.clip.encode_text(self.prompt(classes=classes))  # g(t_c) for the asked classes
