"""The switch to real CLIP weights (families.vlm.clip), through a tiny random-weight open_clip model:
the same code path as ViT-B/16 with OpenAI's weights, which cannot be fetched here."""
import pytest
import torch

pytest.importorskip("open_clip")

from classlab.config import ConfigError  # noqa: E402
from classlab.models.clip_weights import load_clip, parse_clip_spec  # noqa: E402
from classlab.models.image_text import PromptLearner, encode_sentences, text_tower, use_text_tower  # noqa: E402

TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
SPEC = "open_clip:classlab-tiny-clip:none"


@pytest.fixture
def tiny_clip():
    torch.manual_seed(0)
    holder = load_clip(SPEC, [0.5], [0.25], model_config=TINY)
    yield holder
    use_text_tower(None)  # back to the offline MiniLM for every other test


def test_the_clip_tower_is_clips_own_text_encoder_and_coop_reproduces_the_written_prompt(tiny_clip):
    import open_clip

    model = tiny_clip.clip.model
    prompts = ["a photo of a sandal.", "a photo of a ankle boot."]
    reference = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("classlab-tiny-clip")(prompts)),
                                              dim=-1)
    assert torch.allclose(text_tower().encode(prompts), reference, atol=1e-5)
    assert torch.allclose(encode_sentences(prompts), reference, atol=1e-5)
    # CoOp's context from "a photo of a" gives back the hand-written prompt through CLIP's tower too
    learner = PromptLearner(["sandal", "ankle boot"])
    assert learner.ctx.shape == (4, model.token_embedding.weight.shape[1])
    assert torch.allclose(learner(), reference, atol=1e-5)


def test_grayscale_28px_images_become_clips_input_and_score_against_prompts(tiny_clip):
    clip = tiny_clip.clip
    x = torch.randn(3, 1, 28, 28)
    pixels = clip.to_clip_input(x)
    assert pixels.shape == (3, 3, 32, 32)
    image = clip.encode_image(x)
    assert torch.allclose(image.norm(dim=-1), torch.ones(3), atol=1e-5)
    text = clip.encode_text(text_tower().encode(["a photo of a sandal.", "a photo of a bag."]))
    assert clip.logits(image, text).shape == (3, 2)


def test_coop_adapts_real_clip_end_to_end_and_a_bad_spec_is_named(tiny_clip, digits_prepared, tmp_path, one_thread):
    from classlab.protocols.vlm import run_base_to_novel

    torch.manual_seed(0)  # the fixture registered the tiny config under the spec's model name
    try:
        out = run_base_to_novel("coop", SPEC, digits_prepared, 0, tmp_path / "coop", shots=2, test_per_class=2,
                                overrides={"epochs": 1, "batch_size": 5}, threads=1, image_side="all")
        assert out["image_side_saw"] == "the web (real CLIP)" and out["backbone"] == SPEC and out["train_steps"] == 2
        with pytest.raises(ConfigError, match="real CLIP, pretrained on the web: use image_side 'all'"):
            run_base_to_novel("coop", SPEC, digits_prepared, 0, tmp_path / "base", shots=2)
        assert not (tmp_path / "base").exists()
    finally:
        use_text_tower(None)
    with pytest.raises(ConfigError, match="expected 'open_clip:<model>:<pretrained>'"):
        parse_clip_spec("open_clip:ViT-B-16")
