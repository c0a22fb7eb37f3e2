"""Test-time adaptation (family shift): corruptions, source statistics, source / bn_adapt / tent / cafa."""
import copy

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import mahalanobis

from classlab.config import resolve_hparams
from classlab.data.corruptions import CORRUPTIONS, SEVERITIES, check_corruption, corrupt
from classlab.methods.registry import get_method
from classlab.methods.shift.bn_adapt import batchnorm_layers
from classlab.methods.shift.cafa import cafa_loss, mahalanobis_sq
from classlab.methods.source_stats import (compute_source_statistics, extract_features,
                                                 load_source_statistics, save_source_statistics)
from classlab.methods.shift.tent import softmax_entropy
from classlab.models import build_classifier

K = 3
METHODS = ("source", "bn_adapt", "tent", "cafa")
RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "motion_blur", "fog"}


def hparams(name: str, **overrides) -> dict:
    return resolve_hparams("shift", name, overrides)


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_classifier("convnet", in_chans=1, num_classes=K,
                             backbone_kwargs={"widths": [4, 4], "pool_after": [0]})
    # non-trivial source running statistics and BN affine parameters, as a trained model has
    for layer in batchnorm_layers(model):
        layer.running_mean.uniform_(-0.2, 0.2)
        layer.running_var.uniform_(0.5, 1.5)
        layer.weight.data.uniform_(0.5, 1.5)
        layer.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def batch(n: int = 16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 12, 12, generator=g) * 1.5 + 0.3  # shifted away from the source statistics


def images(n: int = 4, c: int = 1, size: int = 28) -> torch.Tensor:
    """Structured uint8 images: smooth blobs and a sharp-edged square, values in 30..220."""
    rng = np.random.default_rng(0)
    x = ndimage.gaussian_filter(rng.random((n, c, size, size)), sigma=(0, 0, 1.5, 1.5))
    x = (x - x.min()) / (x.max() - x.min())
    x[:, :, size // 4: size // 2, size // 4: size // 2] = 1.0
    return torch.from_numpy((x * 190 + 30).astype(np.uint8))


def stats_for(model, n: int = 60, seed: int = 2) -> dict:
    with torch.no_grad():
        feats = model.features(batch(n, seed))
    labels = torch.arange(n) % K
    return compute_source_statistics(feats, labels, K)


def build(name: str, model, **overrides):
    cls = get_method("shift", name)
    stats = stats_for(copy.deepcopy(model).eval()) if cls.needs_source_stats else None
    return cls(model, hparams(name, **overrides), K, source_stats=stats)


# --- configuration -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_methods_are_registered_with_their_yaml(name):
    cls = get_method("shift", name)
    assert cls.scenario_kinds == ("test_time",)
    hp = hparams(name)
    if name in ("tent", "cafa"):
        assert hp["optimizer"] == "adam" and hp["lr"] == 1e-3 and list(hp["betas"]) == [0.9, 0.999]
        assert hp["weight_decay"] == 0.0
    if name == "bn_adapt":
        assert hp["source_prior"] == 0


# --- corruptions -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corruption_changes_keeps_format_is_deterministic_and_grows_with_severity(name):
    x = images()
    out1, out5 = corrupt(x, name, 1, seed=3), corrupt(x, name, 5, seed=3)
    for out in (out1, out5):
        assert out.dtype == torch.uint8 and out.shape == x.shape
        assert not torch.equal(out, x)
    assert torch.equal(corrupt(x, name, 5, seed=3), out5)
    assert torch.equal(corrupt(x, name, 5, seed=np.random.default_rng(3)), out5)
    assert torch.equal(corrupt(x, name, 5, seed=torch.Generator().manual_seed(7)),
                       corrupt(x, name, 5, seed=torch.Generator().manual_seed(7)))
    if name in RANDOM:
        assert not torch.equal(corrupt(x, name, 5, seed=4), out5)
    mad = [(out.float() - x.float()).abs().mean().item() for out in (out1, out5)]
    assert mad[1] > mad[0], f"{name}: severity 5 ({mad[1]:.2f}) not further from clean than severity 1 ({mad[0]:.2f})"
    assert len(SEVERITIES[name]) == 5


@pytest.mark.parametrize("name", ["gaussian_noise", "contrast", "brightness", "fog", "motion_blur", "pixelate"])
def test_corruption_works_for_colour_and_other_sizes(name):
    x = images(n=3, c=3, size=20)
    out = corrupt(x, name, 3, seed=0)
    assert out.shape == x.shape and out.dtype == torch.uint8 and not torch.equal(out, x)


def test_noise_and_contrast_are_monotone_in_severity():
    x = images(n=8)
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "contrast", "brightness"):
        mad = [(corrupt(x, name, s, seed=0).float() - x.float()).abs().mean().item() for s in range(1, 6)]
        assert all(a < b for a, b in zip(mad, mad[1:])), (name, mad)


def test_bad_corruption_names_and_severities_are_named():
    with pytest.raises(ValueError, match=r"corruption 'foo' does not exist; valid: \[.*'gaussian_noise'"):
        check_corruption("foo", 1)
    with pytest.raises(ValueError, match="severity 7 is outside 1-5"):
        check_corruption("fog", 7)
    with pytest.raises(ValueError, match="severity 0 is outside 1-5"):
        corrupt(images(n=1), "fog", 0, seed=0)
    with pytest.raises(ValueError, match="severity '3'"):
        check_corruption("fog", "3")
    with pytest.raises(ValueError, match="uint8 images"):
        corrupt(images(n=1).float(), "fog", 1, seed=0)


# --- source statistics -------------------------------------------------------------------------

def test_source_statistics_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 3)) * [1.0, 2.0, 0.5] + [0.0, 1.0, -1.0]
    labels = np.repeat([0, 1, 2], [15, 20, 5])
    eps = 1e-3
    stats = compute_source_statistics(torch.from_numpy(feats), torch.from_numpy(labels), 4, eps=eps)
    for k in range(3):
        fk = feats[labels == k]
        np.testing.assert_allclose(stats["mu"][k].numpy(), fk.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["cov"][k].numpy(), np.cov(fk, rowvar=False) + eps * np.eye(3),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["precision"][k].numpy() @ stats["cov"][k].numpy(), np.eye(3), atol=1e-4)
    assert stats["counts"].tolist() == [15, 20, 5, 0]
    np.testing.assert_allclose(stats["mean"].numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["global_cov"].numpy(), np.cov(feats, rowvar=False) + eps * np.eye(3), rtol=1e-5)
    # an empty class falls back on the global mean and covariance
    np.testing.assert_allclose(stats["mu"][3].numpy(), feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["cov"][3].numpy(), stats["global_cov"].numpy(), rtol=1e-6)

    path = save_source_statistics(tmp_path / "stats" / "source_stats.pt", stats, {"backbone": "convnet", "n": 40})
    loaded, meta = load_source_statistics(path)
    assert meta == {"backbone": "convnet", "n": 40}
    assert all(torch.equal(loaded[k], stats[k]) for k in ("mu", "cov", "precision", "counts"))
    assert loaded["eps"] == eps
    assert sorted(p.name for p in path.parent.iterdir()) == ["source_stats.pt"]  # no temporary left behind


def test_extract_features_normalises_like_the_loaders():
    model = tiny_model()
    x = images(n=5)
    feats = extract_features(model, x, mean=[0.5], std=[0.25], batch_size=2)
    with torch.no_grad():
        expected = model.features((x.float() / 255.0 - 0.5) / 0.25)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)


# --- CAFA's distance and loss ------------------------------------------------------------------

def test_cafa_mahalanobis_matches_scipy():
    rng = np.random.default_rng(0)
    feats, mu = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    a = rng.normal(size=(3, 4, 4))
    cov = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(4)
    precision = np.linalg.inv(cov)
    dist = mahalanobis_sq(torch.from_numpy(feats), torch.from_numpy(mu), torch.from_numpy(precision)).numpy()
    for i in range(5):
        for c in range(3):
            assert dist[i, c] == pytest.approx(mahalanobis(feats[i], mu[c], precision[c]) ** 2, rel=1e-10)
    # the loss: mean log(D_intra / sum_c D_c) with the argmax of the logits as the class
    logits = torch.from_numpy(rng.normal(size=(5, 3)))
    y_hat = logits.argmax(1).numpy()
    expected = np.mean([np.log(dist[i, y_hat[i]] / dist[i].sum()) for i in range(5)])
    loss = cafa_loss(torch.from_numpy(feats), logits, torch.from_numpy(mu), torch.from_numpy(precision))
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_cafa_needs_source_statistics():
    with pytest.raises(ValueError, match="source_stats"):
        get_method("shift", "cafa")(tiny_model(), hparams("cafa"), K)


# --- the methods -------------------------------------------------------------------------------

def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_affine_names(model):
    names = set()
    for prefix, module in model.named_modules():
        if module in batchnorm_layers(model):
            names |= {f"{prefix}.weight", f"{prefix}.bias"}
    return names


@pytest.mark.parametrize("name", ["tent", "cafa"])
def test_gradient_methods_update_only_bn_affine_parameters(name):
    model = tiny_model()
    before = _snapshot(model)
    method = build(name, model)
    x = batch()
    with torch.no_grad():
        expected = copy.deepcopy(model).train()(x)  # BN with the batch's statistics, before the step
    logits = method.forward_and_adapt(x)
    torch.testing.assert_close(logits, expected)  # the prediction is the forward pass the step uses
    affine = _bn_affine_names(model)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= affine, f"changed: {sorted(changed)}; BN affine: {sorted(affine)}"


def test_tent_lowers_the_batch_entropy():
    model = tiny_model()
    method = build("tent", model)
    x = batch()
    entropies = [softmax_entropy(method.forward_and_adapt(x)).mean().item() for _ in range(8)]
    assert entropies[-1] < entropies[0], entropies


def test_cafa_lowers_its_loss():
    model = tiny_model()
    method = build("cafa", model)
    x = batch()
    losses = []
    for _ in range(8):
        with torch.no_grad():
            losses.append(method.adaptation_loss(x)[0].item())
        method.forward_and_adapt(x)
    assert losses[-1] < losses[0], losses


def test_bn_adapt_normalises_with_the_batch_and_changes_nothing():
    model = tiny_model()
    before = _snapshot(model)
    reference = copy.deepcopy(model).train()  # every BN layer uses the batch statistics
    method = build("bn_adapt", model)
    x = batch()
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(method.forward_and_adapt(x), expected)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # parameters and running statistics
    with torch.no_grad():  # differs from the source model's eval-mode prediction
        assert not torch.allclose(copy.deepcopy(model).eval().requires_grad_(False)(x), expected)


def test_bn_adapt_source_prior_interpolates_between_batch_and_source_statistics():
    model = tiny_model()
    x = batch()
    with torch.no_grad():
        source = copy.deepcopy(model).eval()(x)
        batch_stats = copy.deepcopy(model).train()(x)
    huge = build("bn_adapt", copy.deepcopy(model), source_prior=1e12).forward_and_adapt(x)
    torch.testing.assert_close(huge, source, rtol=1e-4, atol=1e-5)
    tiny = build("bn_adapt", copy.deepcopy(model), source_prior=1e-12).forward_and_adapt(x)
    torch.testing.assert_close(tiny, batch_stats, rtol=1e-4, atol=1e-5)
    mixed = build("bn_adapt", copy.deepcopy(model), source_prior=16).forward_and_adapt(x)
    assert not torch.allclose(mixed, source) and not torch.allclose(mixed, batch_stats)


def test_source_predicts_with_the_source_model():
    model = tiny_model()
    reference = copy.deepcopy(model).eval()
    method = build("source", model)
    x = batch()
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(method.forward_and_adapt(x), expected)
    torch.testing.assert_close(method.forward_and_adapt(x[:3]), expected[:3])  # no dependence on the batch


@pytest.mark.parametrize("name", METHODS)
def test_reset_restores_the_source_weights_exactly(name):
    model = tiny_model()
    before = _snapshot(model)
    method = build(name, model)
    x = batch()
    first = method.forward_and_adapt(x)
    for _ in range(3):
        method.forward_and_adapt(x)
    method.reset()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    torch.testing.assert_close(method.forward_and_adapt(x), first)  # fresh optimiser state too


@pytest.mark.parametrize("name", ["bn_adapt", "tent", "cafa"])
def test_bn_methods_name_the_missing_batchnorm(name):
    torch.manual_seed(0)
    model = build_classifier("deep_mlp", in_chans=1, num_classes=K, img_size=12,
                             backbone_kwargs={"depth": 2, "width": 4})
    stats = {"mu": torch.zeros(K, 4), "precision": torch.eye(4).repeat(K, 1, 1)}
    with pytest.raises(ValueError, match="BatchNorm"):
        get_method("shift", name)(model, hparams(name), K, source_stats=stats)
