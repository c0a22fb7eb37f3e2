"""The supervised family's optimizer and gradient recipes: adamw, lion, grad_noise, tract, sam,
and the deep_mlp backbone of the gradient-noise paper."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from classlab.config import ROOT, ConfigError, method_defaults, validate_config
from classlab.methods.registry import get_method
from classlab.models import build_classifier


def _convnet(k=4, seed=0):
    torch.manual_seed(seed)
    return build_classifier("convnet", 1, k, img_size=8, backbone_kwargs={"widths": [4, 6], "pool_after": [0]})


def _batch(n=16, k=4, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, size, size, generator=g), "y": torch.randint(0, k, (n,), generator=g),
            "index": torch.arange(n)}


def _method(name, model, k=4, **hp):
    hparams = method_defaults("supervised", name)
    hparams.update(hp)
    return get_method("supervised", name)(model, hparams, k)


def _sgd(method, lr=1.0):
    """Plain SGD with lr 1: a step moves each parameter by minus the gradient the method produced."""
    return torch.optim.SGD([p for p in method.model.parameters() if p.requires_grad], lr=lr)


def _grads(model, batch):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch["x"]), batch["y"]).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# --- lion and adamw --------------------------------------------------------------------------

def test_lion_one_step_matches_paper_update():
    """timm's Lion through the method's optimizer, three steps, against the paper's equations:
    c = b1 m + (1-b1) g; w -= lr (sign(c) + wd w); m = b2 m + (1-b2) g."""
    import timm.optim

    lr, wd, (b1, b2) = 0.01, 0.5, (0.9, 0.99)
    method = _method("lion", nn.Linear(6, 5), lr=lr, weight_decay=wd, betas=[b1, b2])
    opt = method.configure_optimizer()
    assert isinstance(opt, timm.optim.Lion)
    params = list(method.model.parameters())
    w = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(x) for x in w]
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        if step == 1:  # against the first gradient: the sign of c is b1's business, not b2's
            grads = [-0.5 * gr for gr in prev]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads):
            c = b1 * m[i] + (1 - b1) * gr.double()
            w[i] = w[i] - lr * (torch.sign(c) + wd * w[i])
            m[i] = b2 * m[i] + (1 - b2) * gr.double()
        prev = grads
        for p, expected in zip(params, w):
            torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=0)


def test_adamw_step_is_adam_with_decoupled_weight_decay():
    lr, wd, (b1, b2), eps = 0.01, 0.3, (0.9, 0.999), 1e-8
    method = _method("adamw", nn.Linear(4, 3), lr=lr, weight_decay=wd)
    opt = method.configure_optimizer()
    params = list(method.model.parameters())
    w = [p.detach().clone().double() for p in params]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    g = torch.Generator().manual_seed(1)
    for t in (1, 2):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads):
            gr = gr.double()
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr ** 2
            adam = (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
            w[i] = w[i] - lr * (adam + wd * w[i])  # the decay is not part of the gradient Adam normalises
        for p, expected in zip(params, w):
            torch.testing.assert_close(p.detach().double(), expected, atol=1e-6, rtol=1e-5)


def test_lion_yaml_follows_the_papers_rule_against_adamw():
    lion, adamw = method_defaults("supervised", "lion"), method_defaults("supervised", "adamw")
    assert lion["optimizer"] == "lion" and adamw["optimizer"] == "adamw"
    assert lion["betas"] == [0.9, 0.99]
    assert 3 <= adamw["lr"] / lion["lr"] <= 10  # lr 3-10x smaller
    assert 3 <= lion["weight_decay"] / adamw["weight_decay"] <= 10  # wd 3-10x larger
    with pytest.raises(ValueError, match="lion"):
        _method("lion", nn.Linear(2, 2), optimizer="sgd").configure_optimizer()


# --- grad_noise ------------------------------------------------------------------------------

@pytest.mark.parametrize("eta,t", [(0.3, 0), (0.3, 2000), (0.01, 150)])
def test_grad_noise_variance_follows_the_annealing_schedule(eta, t):
    """With a zero gradient, SGD at lr 1 moves the weights by exactly the added noise, whose
    variance must be eta / (1 + t)^0.55 (100k draws: the sample variance is within ~1.5%)."""
    torch.manual_seed(123)
    model = nn.Linear(500, 200)
    method = _method("grad_noise", model, grad_noise_eta=eta)
    method.global_step = t
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss = sum((0.0 * p).sum() for p in model.parameters())
    method.optimizer_step(loss, _sgd(method), lambda: loss)
    noise = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = eta / (1 + t) ** 0.55
    assert noise.var().item() == pytest.approx(expected, rel=0.03)
    assert abs(noise.mean().item()) < 4 * math.sqrt(expected / noise.numel())


def test_grad_noise_with_eta_zero_is_the_plain_gradient_and_noise_follows_the_global_seed():
    batch = _batch()
    reference = _grads(_convnet(), batch)

    def step(eta, seed):
        model = _convnet()
        method = _method("grad_noise", model, grad_noise_eta=eta)
        method.global_step = 5
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss, _ = method.training_step(batch)
        torch.manual_seed(seed)
        method.optimizer_step(loss, _sgd(method), lambda: loss)
        return {n: before[n] - p.detach() for n, p in model.named_parameters()}

    plain = step(0.0, 0)
    for name, g in reference.items():
        torch.testing.assert_close(plain[name], g)
    a, b, c = step(0.3, 7), step(0.3, 7), step(0.3, 8)
    assert all(torch.equal(a[n], b[n]) for n in a)  # resumable: the engine reseeds the global RNG
    assert not torch.equal(a["head.weight"], c["head.weight"])


# --- deep_mlp --------------------------------------------------------------------------------

def test_deep_mlp_backbone_is_the_papers_20_layer_net_with_a_poor_init():
    from classlab.models.backbones import build_backbone, intermediates, layer_names

    torch.manual_seed(0)
    model = build_classifier("deep_mlp", 1, 10, img_size=28)
    x = torch.randn(8, 1, 28, 28)
    assert model(x).shape == (8, 10) and model.num_features == 50
    linears = [m for m in model.backbone.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 20 and linears[0].in_features == 784
    stds = torch.tensor([lin.weight.std().item() for lin in linears])
    assert torch.allclose(stds, torch.full_like(stds, 0.1), rtol=0.1)  # Simple Init: N(0, 0.1^2)
    names = layer_names(model)
    assert names[:2] == ["block0", "block1"] and names[-3:] == ["block19", "pooled", "logits"]
    out = intermediates(model, x, ["block0", "block19", "logits"])
    assert out["block19"].shape == (8, 50)
    # the poor init: the signal all but vanishes over 20 layers; He's init keeps it
    assert out["block19"].std() < 1e-3 * out["block0"].std()
    he = build_classifier("deep_mlp", 1, 10, img_size=28, backbone_kwargs={"init": "he"})
    out = intermediates(he, x, ["block0", "block19"])
    assert out["block19"].std() > 1e-2 * out["block0"].std()
    assert build_backbone("deep_mlp", 3, img_size=16, depth=2, width=7)(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    with pytest.raises(ValueError, match="backbone_kwargs.deep_mlp.widht"):
        build_backbone("deep_mlp", 1, img_size=28, widht=8)


# --- tract -----------------------------------------------------------------------------------

def _explicit_tract(ordinary, A, lam):
    """(G^T A) (A^T A / m + lambda I)^-1 with an explicit inverse, in float64."""
    ordinary, A = ordinary.double(), A.double()
    m, d = A.shape
    return ordinary @ torch.linalg.inv(A.T @ A / m + lam * torch.eye(d, dtype=A.dtype))


@pytest.mark.parametrize("m,d", [(40, 9), (12, 30)])
def test_tract_direct_and_woodbury_forms_agree(m, d):
    from classlab.methods.supervised.tract import tract_gradient

    g = torch.Generator().manual_seed(m)
    A, G = torch.randn(m, d, generator=g, dtype=torch.float64), torch.randn(m, 5, generator=g, dtype=torch.float64)
    ordinary = G.T @ A
    expected = _explicit_tract(G.T @ A, A, 0.1)
    direct = tract_gradient(ordinary, A, 0.1, "direct")
    woodbury = tract_gradient(ordinary, A, 0.1, "woodbury")
    torch.testing.assert_close(direct, expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(woodbury, expected, rtol=1e-8, atol=1e-10)
    assert not torch.allclose(direct, ordinary / 0.1, rtol=1e-2)  # lambda 0.1 is far from the limit


def test_tract_tends_to_the_ordinary_gradient_as_lambda_grows():
    """lambda dW = G^T A (I + A^T A / (m lambda))^-1; with s the top eigenvalue of A^T A / m the
    relative distance to G^T A is at most s / (lambda + s), so it vanishes as lambda grows."""
    from classlab.methods.supervised.tract import tract_gradient

    g = torch.Generator().manual_seed(3)
    A, G = torch.randn(64, 9, generator=g, dtype=torch.float64), torch.randn(64, 4, generator=g, dtype=torch.float64)
    ordinary = G.T @ A
    s = torch.linalg.eigvalsh(A.T @ A / 64).max().item()
    errors = []
    for lam in (0.1, 1.0, 10.0, 100.0, 1e4):
        scaled = lam * tract_gradient(ordinary, A, lam)
        errors.append(((scaled - ordinary).norm() / ordinary.norm()).item())
        assert errors[-1] <= s / (lam + s) + 1e-12
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.3 and errors[-1] < 1e-3


@pytest.mark.parametrize("backbone", ["convnet", "deep_mlp"])
def test_tract_step_replaces_only_the_first_layer_weight_gradient(backbone):
    from classlab.methods.supervised.tract import layer_rows

    torch.manual_seed(0)
    if backbone == "convnet":
        model, first = _convnet(), "backbone.features.0"
    else:
        model = build_classifier("deep_mlp", 1, 4, img_size=8, backbone_kwargs={"depth": 3, "width": 6, "init": "he"})
        first = "backbone.block0.0"
    batch = _batch()
    reference = copy.deepcopy(model)
    method = _method("tract", model, tract_lambda=0.1)
    assert method.first_layer == first
    method.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss, _ = method.training_step(batch)
    method.optimizer_step(loss, _sgd(method), lambda: loss)
    layer = model.get_submodule(first)
    assert not layer._forward_hooks  # the recording hook lives only inside training_step

    grads = _grads(reference.train(), batch)
    rows = layer_rows(layer, batch["x"])  # the first layer's input is the image itself
    # the rows are what the layer multiplies: its pre-activations are A W^T (+ b)
    ref_layer = reference.get_submodule(first)
    z = ref_layer(batch["x"].flatten(1) if isinstance(ref_layer, nn.Linear) else batch["x"])
    z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) if z.dim() == 4 else z
    bias = 0 if ref_layer.bias is None else ref_layer.bias
    torch.testing.assert_close(rows @ before[f"{first}.weight"].reshape(z.shape[1], -1).T + bias, z)
    for name, p in model.named_parameters():
        step = before[name] - p.detach()
        if name == f"{first}.weight":
            ordinary = grads[name].reshape(p.shape[0], -1)
            expected = _explicit_tract(ordinary, rows, 0.1).float()
            torch.testing.assert_close(step.reshape(p.shape[0], -1), expected, rtol=1e-4, atol=1e-6)
            assert not torch.allclose(step.reshape(p.shape[0], -1), ordinary, rtol=0.1)
        else:
            torch.testing.assert_close(step, grads[name], rtol=1e-4, atol=1e-7)


# --- sam -------------------------------------------------------------------------------------

def _sam_step(model, batch, rho=0.05):
    """One SAM step with SGD at lr 1; returns the weights closure() saw and the step taken."""
    method = _method("sam", model, rho=rho)
    method.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = []

    def closure():
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return method.training_step(batch)[0]

    loss, _ = method.training_step(batch)
    method.optimizer_step(loss, _sgd(method), closure)
    return before, seen, {n: before[n] - p.detach() for n, p in model.named_parameters()}


def test_sam_ascent_step_has_norm_rho_along_the_gradient():
    batch = _batch()
    grads = _grads(_convnet().train(), batch)
    before, seen, _ = _sam_step(_convnet(), batch, rho=0.05)
    assert len(seen) == 1  # one extra forward per step
    e = torch.cat([(seen[0][n] - before[n]).flatten() for n in before])
    g = torch.cat([grads[n].flatten() for n in before])
    assert e.norm().item() == pytest.approx(0.05, rel=1e-4)
    assert F.cosine_similarity(e, g, dim=0).item() == pytest.approx(1.0, abs=1e-5)


def test_sam_steps_with_the_gradient_at_the_perturbed_weights():
    batch, rho = _batch(), 0.05
    reference = _convnet().train()
    g = _grads(reference, batch)
    norm = torch.cat([v.flatten() for v in g.values()]).norm()
    with torch.no_grad():  # w + e, e = rho g / ||g||
        for n, p in reference.named_parameters():
            p.add_(rho * g[n] / norm)
    expected = _grads(reference, batch)
    _, _, step = _sam_step(_convnet(), batch, rho=rho)
    for n in expected:
        torch.testing.assert_close(step[n], expected[n], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(step["head.weight"], g["head.weight"], rtol=1e-3)  # not the plain gradient


def test_sam_updates_batchnorm_statistics_once_per_step():
    batch = _batch()
    plain = _convnet().train()
    with torch.no_grad():
        plain(batch["x"])
    model = _convnet()
    _sam_step(model, batch)
    bn = {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    assert bn and any("num_batches" in k for k in bn)
    for k, v in bn.items():
        assert torch.equal(v, plain.state_dict()[k]), k


# --- every recipe through the engine's loop ---------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "lion", "grad_noise", "tract", "sam"])
def test_recipe_trains_through_the_engine_loop(name, one_thread):
    from classlab.engine.trainer import Trainer, TrainConfig

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(48) % 4
    model = _convnet()
    before = copy.deepcopy(model.state_dict())
    method = _method(name, model, epochs=1, batch_size=16)
    trainer = Trainer(method, TrainConfig(epochs=1, batch_size=16), torch.device("cpu"), seed=0, progress=False)
    history = trainer.fit(trainer.make_loader(x, y, [0.5], [0.25]))
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])


# --- bad hyperparameters fail at parse time --------------------------------------------------

@pytest.mark.parametrize("method,override,needle", [
    ("sam", {"rho": 0}, "families.supervised.overrides.sam.rho: 0 is less than or equal to the minimum of 0"),
    ("sam", {"rho": -0.05}, "families.supervised.overrides.sam.rho: -0.05 is less than or equal to the minimum"),
    ("tract", {"tract_lambda": 0.0}, "families.supervised.overrides.tract.tract_lambda: 0.0 is less than or equal"),
    ("grad_noise", {"grad_noise_eta": -0.01}, "families.supervised.overrides.grad_noise.grad_noise_eta: -0.01 is less"),
    ("lion", {"optimizer": "adamw"}, "families.supervised.overrides.lion.optimizer: 'adamw' is not one of ['lion']"),
    ("adamw", {"lr": -0.001}, "families.supervised.overrides.adamw.lr: -0.001 is less than or equal to the minimum"),
])
def test_recipe_hyperparameters_out_of_range_are_refused_naming_method_and_field(method, override, needle):
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["families"]["supervised"]["methods"] = ["erm", method]
    config["families"]["supervised"]["overrides"] = {method: override}
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert needle in str(info.value), str(info.value)
    config["families"]["supervised"]["overrides"] = {}
    validate_config(config)  # the shipped defaults pass
