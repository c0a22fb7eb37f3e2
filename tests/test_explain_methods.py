"""The explain family's saliency methods against hand computations with autograd.

Grad-CAM against its equation on a ConvNet and a ViT; NormGrad against the weight gradient of real
identity layers inserted into the network; the combination, meta-saliency, captum baselines, the
random control, the checks of bad input, the untouched model and the randomisation cascade.
"""
from __future__ import annotations

import copy

import pytest
import torch
import yaml
import torch.nn.functional as F
from torch import nn

from classlab.config import check_hparams, list_methods, method_config_path, method_defaults, resolve_hparams
from classlab.methods.registry import METHODS, get_method
from classlab.methods.saliency_method import (SaliencyMethod, as_map, black_baseline, captured, minmax,
                                              randomisation_cascade, randomise_, token_grid, upsample)
from classlab.models import build_classifier
from classlab.models.backbones import intermediates, layer_names

torch.set_num_threads(1)

SALIENCY = ["gradcam", "normgrad", "normgrad_scaling", "normgrad_combined", "normgrad_meta", "saliency",
            "integrated_gradients", "random"]
BASELINE = black_baseline([0.2], [0.4])  # raw 0 in a normalisation with mean 0.2, std 0.4: -0.5


def _convnet(in_chans=1, seed=0):
    torch.manual_seed(seed)
    model = build_classifier("convnet", in_chans, 4, img_size=16, backbone_kwargs={"widths": [4, 8], "pool_after": [0]})
    with torch.no_grad():  # BatchNorm statistics away from (0, 1), so a reset or a drift shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _vit(seed=0):
    torch.manual_seed(seed)
    return build_classifier("vit_tiny", 1, 4, img_size=16,
                            backbone_kwargs={"depth": 2, "embed_dim": 24, "num_heads": 2}).eval()


def _inputs(b=3, c=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, 16, 16, generator=g), torch.tensor([0, 2, 3, 1, 0][:b])


def _method(name, **overrides):
    return get_method("explain", name)(resolve_hparams("explain", name, overrides))


# --- registry and YAMLs -------------------------------------------------------------------------

def test_every_explain_module_registers_itself_and_every_yaml_builds_its_method():
    names = list_methods("explain")
    assert set(SALIENCY) <= set(names)
    for name in names:
        cls = get_method("explain", name)
        assert (("explain", name) in METHODS) and cls.name == name
        assert yaml.safe_load(method_config_path("explain", name).read_text()).get("paper"), name
        assert check_hparams("explain", name, method_defaults("explain", name)) == [], name
    for name in SALIENCY:
        method = _method(name)
        assert isinstance(method, SaliencyMethod) and method.family == "explain"
    assert _method("normgrad_scaling").variant == "scaling"
    assert _method("normgrad_meta").meta_step_lr > 0
    assert _method("normgrad_combined").layered is False and _method("normgrad").layered is True
    assert check_hparams("explain", "normgrad", {"variant": "conv3x3"})  # the schema refuses other variants
    assert check_hparams("explain", "normgrad", {"combine_layers": "some"})


# --- layers by name -----------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["convnet", "vit_tiny", "resnet18"])
def test_the_hooked_module_of_every_stage_gives_the_map_intermediates_gives(backbone):
    model = {"convnet": _convnet, "vit_tiny": _vit}.get(backbone, lambda: build_classifier(
        "resnet18", 1, 4, img_size=16).eval())()
    x, _ = _inputs(2)
    stages = [n for n in layer_names(model) if n not in ("pooled", "logits")]
    with torch.no_grad():
        with captured(model, stages) as raw:
            model(x)
        expected = intermediates(model, x, stages)
    grid = token_grid(model, (16, 16))
    for name in stages:
        assert torch.equal(as_map(raw[name], grid, name), expected[name]), (backbone, name)


# --- Grad-CAM -----------------------------------------------------------------------------------

def _gradcam_by_hand(acts, grads):
    weights = grads.mean(dim=(2, 3))  # alpha_k = spatial mean of dy^c/dA^k
    return F.relu((weights[:, :, None, None] * acts).sum(1))  # ReLU(sum_k alpha_k A^k)


@pytest.mark.parametrize("layer", ["block0", "block1"])
def test_gradcam_is_relu_of_the_gradient_weighted_channels_at_the_layers_resolution(layer):
    model, (x, c) = _convnet(), _inputs()
    out = intermediates(model, x, [layer, "logits"])  # convnet stages are hooked: in the graph
    acts = out[layer]
    grads, = torch.autograd.grad(out["logits"][torch.arange(3), c].sum(), acts)
    expected = _gradcam_by_hand(acts.detach(), grads)
    got = _method("gradcam").attribute(model, x, c, layer)
    assert got.shape == acts.shape[:1] + acts.shape[2:]  # the layer's grid, not the input's
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert (got >= 0).all() and got.max() > 0 and not torch.allclose(got.amax((1, 2)), torch.ones(3))  # raw
    up = _method("gradcam").explain(model, x, c, layer)
    torch.testing.assert_close(up, F.interpolate(expected[:, None], size=(16, 16), mode="bilinear",
                                                 align_corners=False)[:, 0], rtol=1e-5, atol=1e-7)
    # another class, another map
    other = _method("gradcam").attribute(model, x, (c + 1) % 4, layer)
    assert not torch.allclose(other, got)


def test_gradcam_on_a_vit_reads_the_patch_tokens_on_the_patch_grid():
    model, (x, c) = _vit(), _inputs()
    kept = {}
    handle = model.backbone.blocks[0].register_forward_hook(lambda m, i, o: kept.update(tokens=o))
    try:
        logits = model(x.requires_grad_(True))
    finally:
        handle.remove()
    tokens = kept["tokens"]  # (B, 1 + 16, D): the class token first
    grads, = torch.autograd.grad(logits[torch.arange(3), c].sum(), tokens)

    def grid(t):  # drop the class token, patches row by row on the 4x4 grid (16 / patch 4)
        return t[:, 1:].reshape(3, 4, 4, -1).permute(0, 3, 1, 2)
    expected = _gradcam_by_hand(grid(tokens.detach()), grid(grads))
    got = _method("gradcam").attribute(model, x.detach(), c, "block0")
    assert got.shape == (3, 4, 4)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# --- NormGrad -----------------------------------------------------------------------------------

class PerLocationIdentity(nn.Module):
    """A 1x1 convolution (``mode="conv1x1"``, W_u in R^{K x K}) or a per-channel scaling
    (``mode="scaling"``, w_u in R^K) with its own identity weights at every location u, so that
    autograd gives each location's term of the weight gradient separately; their sum over u is the
    weight gradient of the ordinary layer (one W for all locations)."""

    def __init__(self, channels, h, w, mode):
        super().__init__()
        self.mode = mode
        eye = torch.eye(channels).repeat(h * w, 1, 1)
        self.weight = nn.Parameter(eye if mode == "conv1x1" else torch.ones(h * w, channels))

    def forward(self, a):
        b, k, h, w = a.shape
        flat = a.flatten(2)  # (B, K, U)
        if self.mode == "conv1x1":
            out = torch.einsum("ukl,blu->bku", self.weight, flat)  # y_u = W_u a_u
        else:
            out = self.weight.t()[None] * flat                     # y_u = w_u (.) a_u
        return out.reshape(b, k, h, w)


def _insert_after(model, relu_index, layer):
    net = copy.deepcopy(model)
    net.backbone.features[relu_index] = nn.Sequential(nn.ReLU(), layer)
    return net


@pytest.mark.parametrize("layer,relu_index,channels,size", [("block0", 2, 4, 16), ("block1", 6, 8, 8)])
def test_normgrad_is_the_norm_of_each_locations_weight_gradient_of_an_inserted_identity_conv(
        layer, relu_index, channels, size):
    model, (x, c) = _convnet(), _inputs()
    got = _method("normgrad").attribute(model, x, c, layer)
    assert got.shape == (3, size, size)
    for i in range(3):  # one image at a time: the weight gradient sums over the batch too
        xi, ci = x[i:i + 1], c[i:i + 1]
        per_location = PerLocationIdentity(channels, size, size, "conv1x1")
        net = _insert_after(model, relu_index, per_location)
        logits = net(xi)
        torch.testing.assert_close(logits, model(xi))  # identity: the same function
        grad_w, = torch.autograd.grad(logits[0, ci[0]], per_location.weight)  # (U, K, K): g_u a_u^T per u
        torch.testing.assert_close(got[i], grad_w.flatten(1).norm(dim=1).reshape(size, size), rtol=1e-5, atol=1e-8)
        # the per-location terms add up to the weight gradient of a real identity 1x1 convolution
        conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        real = _insert_after(model, relu_index, conv)
        grad_conv, = torch.autograd.grad(real(xi)[0, ci[0]], conv.weight)
        torch.testing.assert_close(grad_w.sum(0), grad_conv[:, :, 0, 0], rtol=1e-5, atol=1e-7)


def test_normgrad_scaling_is_the_norm_of_each_locations_gradient_of_an_inserted_scaling_layer():
    model, (x, c) = _convnet(), _inputs()
    got = _method("normgrad_scaling").attribute(model, x, c, "block0")
    plain = _method("normgrad").attribute(model, x, c, "block0")
    assert not torch.allclose(got, plain) and (got <= plain + 1e-7).all()  # ||g (.) a|| <= ||g|| ||a||
    for i in range(3):
        scale = PerLocationIdentity(4, 16, 16, "scaling")
        net = _insert_after(model, 2, scale)
        grad_w, = torch.autograd.grad(net(x[i:i + 1])[0, c[i]], scale.weight)  # (U, K): g_u (.) a_u
        torch.testing.assert_close(got[i], grad_w.norm(dim=1).reshape(16, 16), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("rule", ["product", "sum"])
def test_normgrad_combined_multiplies_the_normalised_upsampled_layer_maps(rule):
    model, (x, c) = _convnet(), _inputs()
    single = [minmax(upsample(_method("normgrad").attribute(model, x, c, n), (16, 16))) for n in ("block0", "block1")]
    assert all(torch.isclose(m.amax((1, 2)), torch.ones(3)).all() and (m.amin((1, 2)) == 0).all() for m in single)
    combined = _method("normgrad_combined", combine_rule=rule)
    got = combined.explain(model, x, c, "input")
    expected = single[0] * single[1] if rule == "product" else (single[0] + single[1]) / 2
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    listed = _method("normgrad", combine_layers=["block1", "block0"], combine_rule=rule).attribute(model, x, c, None)
    torch.testing.assert_close(listed, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not layered"):
        combined.attribute(model, x, c, "block0")
    with pytest.raises(KeyError, match="block9"):
        _method("normgrad", combine_layers=["block0", "block9"]).attribute(model, x, c, None)


def test_meta_saliency_takes_one_sgd_step_on_the_explained_class_and_restores_the_weights_exactly():
    model, (x, c) = _convnet(), _inputs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 0.5  # large enough that the step visibly changes the map of this small random model
    got = _method("normgrad_meta", meta_step_lr=lr).attribute(model, x, c, "block1")
    for k, v in model.state_dict().items():  # every parameter and buffer, bit for bit
        assert torch.equal(v, before[k]), k
    for i in range(3):  # by hand: theta' = theta - lr dCE(f(x_i), c_i)/dtheta, then NormGrad at theta'
        stepped = copy.deepcopy(model)
        opt = torch.optim.SGD(stepped.parameters(), lr=lr)
        F.cross_entropy(stepped(x[i:i + 1]), c[i:i + 1]).backward()
        opt.step()
        expected = _method("normgrad").attribute(stepped, x[i:i + 1], c[i:i + 1], "block1")
        torch.testing.assert_close(got[i:i + 1], expected, rtol=1e-4, atol=1e-7)
    plain = _method("normgrad").attribute(model, x, c, "block1")
    assert not torch.allclose(got, plain, rtol=1e-3)


# --- captum baselines and the random control ----------------------------------------------------

def test_saliency_is_the_channel_maximum_of_the_absolute_input_gradient():
    model, (x, c) = _convnet(in_chans=3), _inputs(c=3)
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(model(xg)[torch.arange(3), c].sum(), xg)
    got = _method("saliency").attribute(model, x, c, None)
    torch.testing.assert_close(got, grad.abs().amax(1), rtol=1e-5, atol=1e-8)
    assert not torch.allclose(got, grad.abs().sum(1))  # three channels: max, not sum


def test_integrated_gradients_from_the_black_image_by_a_hand_riemann_sum():
    model, (x, c) = _convnet(), _inputs()
    assert torch.allclose(BASELINE, torch.tensor(-0.5).reshape(1, 1, 1))  # (0 - 0.2) / 0.4
    n = 8
    ig = _method("integrated_gradients", n_steps=n, integration="riemann_right")
    got = ig.attribute(model, x, c, "input", baseline=BASELINE)
    base = BASELINE.expand_as(x)
    total = torch.zeros_like(x)
    for k in range(1, n + 1):  # right Riemann sum of dF_c/dx along x' + a (x - x'), a = k/n
        point = (base + k / n * (x - base)).requires_grad_(True)
        total += torch.autograd.grad(model(point)[torch.arange(3), c].sum(), point)[0]
    expected = ((x - base) * total / n).sum(1)  # IG summed over channels, signed
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-7)
    assert (got < 0).any() and (got > 0).any()
    # completeness with the default rule: sum_i IG_i ~ F_c(x) - F_c(x')
    with torch.no_grad():
        gap = model(x)[torch.arange(3), c] - model(base)[torch.arange(3), c]
    full = _method("integrated_gradients").attribute(model, x, c, None, baseline=BASELINE).sum((1, 2))
    torch.testing.assert_close(full, gap, rtol=0.05, atol=0.05 * float(gap.abs().max()))
    with pytest.raises(ValueError, match="needs baseline"):
        ig.attribute(model, x, c, None)
    with pytest.raises(ValueError, match="does not broadcast"):
        ig.attribute(model, x, c, None, baseline=torch.zeros(2, 1, 1))


def test_random_maps_are_seeded_per_image_and_never_read_the_model():
    model, (x, c) = _convnet(), _inputs()
    rand = _method("random")
    maps = rand.explain(model, x, c)
    assert maps.shape == (3, 16, 16) and maps.dtype == torch.float32 and (maps >= 0).all() and (maps < 1).all()
    torch.testing.assert_close(rand.explain(model, x.flip(0), c.flip(0)), maps.flip(0))  # batch order free
    assert not torch.equal(maps[0], maps[1])
    assert not torch.equal(_method("random", seed=1).explain(model, x, c), maps)
    wrecked = copy.deepcopy(model)
    randomise_([wrecked], seed=3)
    assert torch.equal(rand.explain(wrecked, x, c), maps)  # fails the randomisation check by construction


# --- every method: bad input and an untouched model ---------------------------------------------

@pytest.mark.parametrize("name", SALIENCY)
def test_every_method_leaves_the_model_as_it_found_it(name):
    model, (x, c) = _convnet(), _inputs()
    model.train()
    model.head.eval()  # a mixed mode, to be restored module by module
    model.backbone.features[0].weight.requires_grad_(False)
    sentinel = torch.full_like(model.head.weight, 7.0)
    model.head.weight.grad = sentinel
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    method = _method(name)
    maps = method.explain(model, x, c, "block1" if method.layered else "input", baseline=BASELINE)
    assert maps.shape == (3, 16, 16) and maps.dtype == torch.float32 and torch.isfinite(maps).all()
    assert not maps.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), (name, k)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.head.weight.grad is sentinel and torch.equal(sentinel, torch.full_like(sentinel, 7.0))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight"), name


@pytest.mark.parametrize("name", SALIENCY)
def test_bad_layers_and_classes_are_refused_naming_what_is_valid(name):
    model, (x, c) = _convnet(), _inputs()
    method = _method(name)
    with pytest.raises(ValueError, match="outside the model's head: it has 4 classes"):
        method.attribute(model, x, torch.tensor([0, 4, 1]), "block0" if method.layered else None, baseline=BASELINE)
    with pytest.raises(ValueError, match="outside the model's head: it has 4 classes"):
        method.explain(model, x, torch.tensor([0, -1, 1]), "block0" if method.layered else None, baseline=BASELINE)
    with pytest.raises(ValueError, match="3 images"):
        method.attribute(model, x, torch.tensor([0, 1]), "block0" if method.layered else None, baseline=BASELINE)
    if method.layered:
        with pytest.raises(KeyError) as info:
            method.attribute(model, x, c, "block7")
        assert "block7" in str(info.value) and "['block0', 'block1']" in str(info.value)
        with pytest.raises(ValueError, match="not a spatial map"):
            method.attribute(model, x, c, "pooled")
        with pytest.raises(ValueError, match="name one"):
            method.attribute(model, x, c, None)
        # any submodule name is a layer too: block1's conv output, before BN and ReLU
        assert method.attribute(model, x, c, "backbone.features.4").shape == (3, 8, 8)
    else:
        with pytest.raises(ValueError, match="not layered"):
            method.attribute(model, x, c, "block0", baseline=BASELINE)


def test_a_layer_without_a_spatial_map_is_refused():
    torch.manual_seed(0)
    mlp = build_classifier("deep_mlp", 1, 4, img_size=16, backbone_kwargs={"depth": 2, "width": 8}).eval()
    x, c = _inputs()
    for name in ("gradcam", "normgrad"):
        with pytest.raises(ValueError, match="not a spatial map"):
            _method(name).attribute(mlp, x, c, "block0")


# --- the randomisation cascade ------------------------------------------------------------------

def test_the_cascade_runs_from_the_head_down_through_the_named_stages():
    model = _convnet()
    cascade = randomisation_cascade(model)
    assert [n for n, _ in cascade] == ["head", "block1", "block0"]
    features = model.backbone.features
    assert cascade[0][1] == [model.head]
    assert cascade[1][1] == [features[i] for i in (3, 4, 5, 6)] and cascade[2][1] == [features[i] for i in (0, 1, 2)]
    vit = _vit()
    assert [n for n, _ in randomisation_cascade(vit)] == ["head", "backbone.norm", "block1", "block0",
                                                           "backbone.patch_embed"]


def test_randomise_reinitialises_exactly_the_given_modules_seeded():
    model = _convnet()
    cascade = dict(randomisation_cascade(model))
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = [names[id(m)] for m in cascade["block1"]]
    rng = torch.get_rng_state()
    for net in (a, b):
        modules = dict(net.named_modules())
        randomise_([modules[n] for n in targets], seed=5)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is untouched
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k  # same seed, same weights
        inside = any(k.startswith(t + ".") for t in targets)
        assert torch.equal(va, model.state_dict()[k]) != inside or k.endswith("num_batches_tracked"), k
    bn = dict(a.named_modules())["backbone.features.5"]
    assert torch.equal(bn.running_mean, torch.zeros(8)) and torch.equal(bn.weight, torch.ones(8))
    x, c = _inputs()
    trained = _method("gradcam").attribute(model, x, c, "block1")
    assert not torch.allclose(_method("gradcam").attribute(a, x, c, "block1"), trained)
