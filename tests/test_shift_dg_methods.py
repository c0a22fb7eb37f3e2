"""Domain-generalisation methods of the shift family (DomainBed style): their penalties and hooks."""
import pytest
import torch
import torch.nn.functional as F

from classlab.config import resolve_hparams
from classlab.methods.registry import METHODS
from classlab.methods.shift.coral import CORAL, coral_penalty
from classlab.methods.shift.erm import ERM
from classlab.methods.shift.fishr import Fishr, per_sample_head_grads
from classlab.methods.shift.hgp import HGP, flatten, hessian_gradient_product
from classlab.methods.shift.hutchinson import Hutchinson, ce_linear_head_hvp, hutchinson_diagonal
from classlab.methods.shift.irm import IRM, irm_penalty
from classlab.methods.shift.vrex import VREx, vrex_penalty
from classlab.models.backbones import build_classifier

CLASSES = {"erm": ERM, "coral": CORAL, "irm": IRM, "vrex": VREx, "fishr": Fishr, "hgp": HGP, "hutchinson": Hutchinson}
K = 3  # classes


def _model(seed=0):
    torch.manual_seed(seed)
    return build_classifier("convnet", in_chans=1, num_classes=K, backbone_kwargs={"widths": [4, 4], "pool_after": [0]})


def _batch(domains=2, per_domain=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = domains * per_domain
    x = torch.randn(n, 1, 8, 8, generator=g)
    x[per_domain:] = 0.5 * x[per_domain:] + 1.0  # the second domain is shifted
    return {"x": x, "y": torch.randint(0, K, (n,), generator=g),
            "source": torch.arange(domains).repeat_interleave(per_domain), "index": torch.arange(n)}


def _method(name, overrides=None, domains=2, seed=0):
    hp = resolve_hparams("shift", name, overrides or {})
    method = CLASSES[name](_model(seed), hp, K)
    method.num_domains = domains
    method.train()
    return method


def _head(seed=0, n=7, d=4):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    y = torch.randint(0, K, (n,), generator=g)
    w = torch.randn(K, d, generator=g).requires_grad_()
    b = torch.randn(K, generator=g).requires_grad_()
    return feats, y, w, b


# --- HGP and Hutchinson ------------------------------------------------------------------------

def test_hessian_gradient_product_matches_autograd_hvp():
    feats, y, w, b = _head()

    def loss_fn(w_, b_):
        return F.cross_entropy(feats @ w_.t() + b_, y)

    grads = torch.autograd.grad(loss_fn(w, b), [w, b])
    _, expected = torch.autograd.functional.hvp(loss_fn, (w.detach(), b.detach()), v=grads)
    got = hessian_gradient_product(loss_fn(w, b), [w, b])
    for e, g in zip(expected, got):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert flatten(expected).abs().max() > 1e-3  # not a trivially zero product


def test_hutchinson_estimate_converges_to_the_diagonal_of_a_quadratic():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g)
    a = m + m.t()  # symmetric, large off-diagonal entries: the estimator's noise
    x = torch.randn(6, generator=g).requires_grad_()

    def error(probes):
        errs = []
        for seed in range(4):
            loss = 0.5 * x @ a @ x  # Hessian A
            (diag,) = hutchinson_diagonal(loss, [x], probes, torch.Generator().manual_seed(seed))
            errs.append((diag - a.diagonal()).abs().mean())
        return torch.stack(errs).mean().item()

    few, some, many = error(4), error(64), error(4096)
    assert few > some > many
    assert many < 0.1 * a.diagonal().abs().mean().item()


def test_closed_form_head_hvp_matches_autograd():
    feats, y, w, b = _head(seed=1)
    loss = F.cross_entropy(feats @ w.t() + b, y)
    grads = torch.autograd.grad(loss, [w, b], create_graph=True)
    g = torch.Generator().manual_seed(3)
    zw, zb = torch.randn(2, K, 4, generator=g), torch.randn(2, K, generator=g)
    hw, hb = ce_linear_head_hvp(feats, (feats @ w.t() + b), zw, zb)
    for s in range(2):
        ew, eb = torch.autograd.grad((grads[0] * zw[s]).sum() + (grads[1] * zb[s]).sum(), [w, b], retain_graph=True)
        torch.testing.assert_close(hw[s], ew, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hb[s], eb, rtol=1e-5, atol=1e-6)


def test_hutchinson_method_uses_the_estimator_with_step_seeded_probes():
    method = _method("hutchinson", {"hutchinson_probes": 8})
    method.global_step = 5
    batch = _batch()
    feats, logits = method.features_and_logits(batch["x"])
    parts = method.split_by_domain(batch, feats, logits, batch["y"])
    params = method.head_params()
    per_domain, reference = method.curvature(parts, None, params)
    f0, z0, y0 = parts[0]
    expected = hutchinson_diagonal(F.cross_entropy(z0, y0), params, 8, method.probe_generator())
    torch.testing.assert_close(per_domain[0], flatten(expected), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(reference, torch.stack(per_domain).mean(0).detach())
    method.global_step = 6  # other probes at another step
    assert not torch.allclose(method.curvature(parts, None, params)[0][0], per_domain[0])


# --- CORAL, IRM, V-REx, Fishr ------------------------------------------------------------------

def test_coral_penalty_is_zero_for_identical_domains_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(10, 5, generator=g)
    assert coral_penalty([a, a.clone()]).item() == pytest.approx(0.0, abs=1e-12)
    shift = torch.randn(5, generator=g)
    # a pure shift leaves the covariance: the penalty is the mean squared mean difference
    assert coral_penalty([a, a + shift]).item() == pytest.approx(shift.pow(2).mean().item(), rel=1e-5)
    # the same mean, the deviations doubled: only the covariances differ, C_b = 4 C_a
    centred = a - a.mean(0)
    b = a.mean(0) + 2 * centred
    cov_a = centred.t() @ centred / 9
    assert coral_penalty([a, b]).item() == pytest.approx((3 * cov_a).pow(2).mean().item(), rel=1e-5)
    assert coral_penalty([a, b]).item() > 0


def test_irm_penalty_is_the_product_of_finite_difference_derivatives():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, K, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (8,), generator=g)
    h = 1e-5

    def derivative(rows):
        up = F.cross_entropy(logits[rows] * (1 + h), y[rows])
        down = F.cross_entropy(logits[rows] * (1 - h), y[rows])
        return (up - down) / (2 * h)

    expected = derivative(slice(0, None, 2)) * derivative(slice(1, None, 2))
    assert irm_penalty(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(expected.item()) > 1e-4


def test_vrex_penalty_is_the_variance_of_the_domain_risks():
    method = _method("vrex", {"penalty_anneal_iters": 0, "rescale_loss": True})
    batch = _batch()
    loss, logs = method.training_step(batch)
    logits = method.model(batch["x"])
    risks = torch.stack([F.cross_entropy(logits[batch["source"] == d], batch["y"][batch["source"] == d])
                         for d in range(2)])
    assert logs["penalty"].item() == pytest.approx(risks.var(unbiased=False).item(), rel=1e-5)
    assert logs["penalty"].item() > 0
    assert vrex_penalty(torch.tensor([1.0, 3.0])).item() == pytest.approx(1.0)
    lam = float(method.hparams["vrex_lambda"])
    # weight lambda > 1 after the anneal, loss rescaled by 1/lambda (IRM's reference code) ...
    assert loss.item() == pytest.approx((risks.mean() + lam * logs["penalty"]).item() / lam, rel=1e-5)
    # ... and not rescaled by default, as DomainBed
    plain = _method("vrex", {"penalty_anneal_iters": 0})
    plain.load_state_dict(method.state_dict())
    loss_plain, _ = plain.training_step(batch)
    assert loss_plain.item() == pytest.approx((risks.mean() + lam * logs["penalty"]).item(), rel=1e-5)


def test_fishr_analytic_per_sample_head_gradients_match_autograd():
    feats, y, w, b = _head(seed=2)
    logits = feats @ w.t() + b
    got = per_sample_head_grads(feats, logits, y)

    def sample_loss(w_, b_, f, t):
        return F.cross_entropy((f @ w_.t() + b_).unsqueeze(0), t.unsqueeze(0))

    gw, gb = torch.func.vmap(torch.func.grad(sample_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(
        w.detach(), b.detach(), feats, y)
    expected = torch.cat([gw.flatten(1), gb], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_fishr_ema_moves_only_in_on_after_step_and_survives_a_checkpoint():
    method = _method("fishr", {"penalty_anneal_iters": 0})
    batch = _batch()
    loss1, logs1 = method.training_step(batch)
    loss2, _ = method.training_step(batch)
    assert loss1.item() == loss2.item() and method.grad_var_ema.numel() == 0  # pure
    method.on_after_step(batch, logs1)
    ema = float(method.hparams["fishr_ema"])
    grads = per_sample_head_grads(*method.features_and_logits(batch["x"]), batch["y"]).detach()
    var0 = grads[batch["source"] == 0].var(0, unbiased=False)
    # m(0) = ema * 0 + (1 - ema) * v(0)
    torch.testing.assert_close(method.grad_var_ema[0], (1 - ema) * var0, rtol=1e-4, atol=1e-8)
    _, logs3 = method.training_step(batch)
    # m(1) = ema m(0) + (1 - ema) v: the same batch gives (1 - ema^2) v
    torch.testing.assert_close(logs3["fishr_ema"][0], (1 - ema ** 2) * var0, rtol=1e-4, atol=1e-8)
    fresh = _method("fishr", {"penalty_anneal_iters": 0}, seed=1)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.grad_var_ema, method.grad_var_ema)


def test_irm_clears_the_optimizer_state_exactly_at_the_anneal_step():
    method = _method("irm", {"penalty_anneal_iters": 2, "irm_lambda": 50.0})
    optimizer = method.configure_optimizer()
    batch = _batch()
    p = method.model.head.weight
    steps, weights = [], []
    for t in range(4):
        method.global_step = t
        loss, logs = method.training_step(batch)
        method.optimizer_step(loss, optimizer, lambda: method.training_step(batch)[0])
        method.on_after_step(batch, logs)
        steps.append(int(optimizer.state[p]["step"]))
        weights.append(float(logs["penalty_weight"]))
    assert steps == [1, 2, 1, 2]  # Adam restarted at step 2, not before or after
    assert weights == [1.0, 1.0, 50.0, 50.0]


# --- every method: one step, pure ----------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CLASSES))
def test_one_training_step_runs_and_is_pure(name):
    assert METHODS[("shift", name)] is CLASSES[name]
    method = _method(name, {"penalty_anneal_iters": 0} if name in ("irm", "vrex", "fishr") else None)
    method.global_step = 3
    batch = _batch()
    before = {k: v.clone() for k, v in method.state_dict().items() if "running" not in k and "num_batches" not in k}
    loss1, logs1 = method.training_step(batch)
    loss2, _ = method.training_step(batch)
    assert torch.isfinite(loss1) and loss1.item() == pytest.approx(loss2.item(), rel=1e-6, abs=1e-9)
    assert logs1["logits"].shape == (12, K)
    for k, v in method.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), f"{name}: training_step changed {k}"
    optimizer = method.configure_optimizer()
    method.optimizer_step(loss1, optimizer, lambda: method.training_step(batch)[0])
    method.on_after_step(batch, logs1)
    assert any(not torch.equal(v, before[k]) for k, v in method.state_dict().items() if k in before)


def test_alignment_penalties_vanish_with_zero_weights():
    batch = _batch()
    erm_loss, _ = _method("erm").training_step(batch)
    for name in ("hgp", "hutchinson"):
        loss, logs = _method(name, {"hessian_weight": 0.0, "grad_weight": 0.0}).training_step(batch)
        assert loss.item() == pytest.approx(erm_loss.item(), rel=1e-6)
        assert logs["grad_align"].item() > 0 and logs["hessian_align"].item() > 0
