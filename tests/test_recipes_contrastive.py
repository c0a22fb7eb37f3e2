"""Contrastive and kernel recipes: SimCLR (pretrain), SupCon, SBCL, Core-tuning and the
infinitely-wide-and-deep limit classifiers (ntk_classifier), each against a direct formula or an
invariance; plus the synthetic data with a closed-form Bayes error they are checked on."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from classlab.config import ROOT, ConfigError, check_hparams, method_defaults, validate_config
from classlab.data.loader import TensorLoader
from classlab.methods.registry import get_method
from classlab.models import build_classifier

TINY = {"widths": [8, 8], "pool_after": [0]}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _model(k=4, size=12):
    torch.manual_seed(0)
    return build_classifier("convnet", 1, k, img_size=size, backbone_kwargs=TINY)


def _two_view_batch(n=12, k=4, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(n, 1, size, size, generator=g), torch.randn(n, 1, size, size, generator=g)
    return {"x": x1, "views": [x1, x2], "y": torch.arange(n) % k, "index": torch.arange(n) * 3 + 1}


def _normed(m, d, seed):
    return F.normalize(torch.randn(m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def _direct_log_p(z, i, j, tau, allowed):
    """log exp(z_i.z_j/tau) / sum_{a in allowed} exp(z_i.z_a/tau), by a loop."""
    return float(z[i] @ z[j]) / tau - math.log(sum(math.exp(float(z[i] @ z[a]) / tau) for a in allowed))


# --- SimCLR -----------------------------------------------------------------------------------

def test_simclr_nt_xent_equals_the_direct_formula_and_reads_no_labels():
    from classlab.methods.pretrain.simclr import nt_xent

    z1, z2 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    tau, n = 0.5, 3
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    # l(i, j) = -log exp(sim_ij/tau) / sum_{k != i} exp(sim_ik/tau), mean over the 2N anchors
    losses = [-_direct_log_p(z, i, (i + n) % (2 * n), tau, [a for a in range(2 * n) if a != i]) for i in range(2 * n)]
    assert nt_xent(z1, z2, tau).item() == pytest.approx(sum(losses) / (2 * n), rel=1e-10)

    method = get_method("pretrain", "simclr")(_model(), method_defaults("pretrain", "simclr"), 4)
    batch = _two_view_batch()
    loss, _ = method.training_step(batch)
    relabelled = dict(batch, y=batch["y"][torch.randperm(len(batch["y"]))] * 0 + 3)
    assert method.training_step(relabelled)[0].item() == loss.item()  # label-free, and pure (same views again)


def test_simclr_nt_xent_is_lower_on_identical_views_than_on_shuffled_pairs():
    from classlab.methods.pretrain.simclr import nt_xent

    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    shuffled = z[torch.roll(torch.arange(16), 1)]
    assert nt_xent(z, z, 0.5) < nt_xent(z, shuffled, 0.5) - 0.5


def test_simclr_projection_head_is_the_methods_and_the_classification_head_stays_untrained():
    model = _model()
    method = get_method("pretrain", "simclr")(model, dict(method_defaults("pretrain", "simclr"), lr=0.05), 4)
    assert method.head_trained is False and method.num_views == 2
    assert not any(k.startswith("projector") for k in model.state_dict())  # train.py saves model only
    head, proj = model.head.weight.clone(), method.projector[0].weight.clone()
    conv = model.backbone.features[0].weight.clone()
    opt = method.configure_optimizer()
    method.train()
    for step in range(2):
        method.global_step = step
        batch = _two_view_batch(seed=step)
        loss, _ = method.training_step(batch)
        method.optimizer_step(loss, opt, lambda: method.training_step(batch)[0])
    assert torch.equal(model.head.weight, head)
    assert not torch.equal(method.projector[0].weight, proj) and not torch.equal(model.backbone.features[0].weight, conv)


def test_simclr_method_side_augmentation_is_seeded_by_step_and_changes_the_views():
    from classlab.methods.pretrain.simclr import augmented_views

    method = get_method("pretrain", "simclr")(_model(), method_defaults("pretrain", "simclr"), 4)
    batch = _two_view_batch()
    a = augmented_views(method, batch)
    assert all(torch.equal(u, v) for u, v in zip(a, augmented_views(method, batch)))
    method.global_step = 1
    b = augmented_views(method, batch)
    assert not torch.equal(a[0], b[0]) and not torch.equal(a[0], batch["views"][0])
    assert a[0].shape == batch["views"][0].shape


# --- SupCon -----------------------------------------------------------------------------------

def test_supcon_loss_equals_the_direct_formula_of_l_out():
    from classlab.methods.supervised.supcon import supcon_loss

    z, y, tau = _normed(6, 4, 0), torch.tensor([0, 1, 0, 2, 1, 0]), 0.1
    per_anchor = []
    for i in range(6):
        others = [a for a in range(6) if a != i]
        pos = [p for p in others if y[p] == y[i]]
        if pos:  # L_out: -1/|P(i)| sum_p log exp(z_i.z_p/tau) / sum_{a != i} exp(z_i.z_a/tau)
            per_anchor.append(-sum(_direct_log_p(z, i, p, tau, others) for p in pos) / len(pos))
    assert supcon_loss(z, y, tau).item() == pytest.approx(sum(per_anchor) / len(per_anchor), rel=1e-10)


def test_supcon_cross_entropy_trains_only_the_head():
    batch = _two_view_batch()
    grads = {}
    for w in (0.0, 5.0):
        method = get_method("supervised", "supcon")(_model(), dict(method_defaults("supervised", "supcon"), ce_weight=w), 4)
        loss, logs = method.training_step(batch)
        loss.backward()
        assert logs["logits"].shape == (len(batch["y"]), 4)
        grads[w] = (method.model.backbone.features[0].weight.grad.clone(), method.model.head.weight.grad)
    assert torch.allclose(grads[0.0][0], grads[5.0][0], atol=1e-7)  # CE on detached features: no backbone gradient
    assert grads[0.0][1] is None or grads[0.0][1].abs().max() == 0
    assert grads[5.0][1].abs().max() > 0


# --- SBCL -------------------------------------------------------------------------------------

def test_sbcl_splits_each_class_into_tail_sized_balanced_subclasses():
    from classlab.methods.supervised.sbcl import split_subclasses, subclass_counts

    k, m = subclass_counts(torch.tensor([1000, 95, 30, 0]), min_size=10)
    assert m == 30 and k.tolist() == [33, 3, 1, 0]  # k_c = max(floor(n_c / M), 1), M = max(n_tail, 10)
    assert subclass_counts(torch.tensor([400, 4]), min_size=10)[0].tolist() == [40, 1]  # M is at least 10
    y = torch.cat([torch.zeros(1000), torch.ones(95), torch.full((30,), 2)]).long()
    z = torch.randn(len(y), 16, generator=torch.Generator().manual_seed(0))
    ids, _ = split_subclasses(z, y, 4, 10, torch.Generator().manual_seed(0))
    sizes = torch.bincount(ids)
    assert len(sizes) == 37 and ids.min() == 0
    assert set(ids[y == 0].tolist()) == set(range(33)) and set(ids[y == 2].tolist()) == {36}
    assert sizes[:33].min() >= 1000 // 33 and sizes[:33].max() <= 1000 // 33 + 1  # balanced: 30 or 31 each
    assert sorted(sizes[33:36].tolist()) == [31, 32, 32]


def _direct_class_level(z, y, s, tau2):
    """mean_i -1/|C(i)| sum_{p in C(i)} log exp(z_i.z_p/tau2) / sum_{a in D(i)} exp(z_i.z_a/tau2), by loops."""
    m = len(z)
    out = []
    for i in range(m):
        partner = (i + m // 2) % m
        allowed = [partner] + [a for a in range(m) if s[a] != s[i]]
        positives = [partner] + [a for a in range(m) if s[a] != s[i] and y[a] == y[i]]
        out.append(-sum(_direct_log_p(z, i, p, tau2, allowed) for p in positives) / len(positives))
    return sum(out) / m


def test_sbcl_loss_is_supcon_when_every_class_is_one_subclass():
    from classlab.methods.supervised.sbcl import sbcl_loss
    from classlab.methods.supervised.supcon import supcon_loss

    n, tau1, tau2 = 4, 0.1, 0.2
    z = _normed(2 * n, 5, 3)
    y = torch.tensor([0, 0, 1, 2]).repeat(2)
    supcon = supcon_loss(z, y, tau1).item()
    loss, l_sub, l_cls = sbcl_loss(z, y, y.clone(), tau1, tau2, beta=0.0)
    assert loss.item() == pytest.approx(supcon, rel=1e-10) and l_sub.item() == pytest.approx(supcon, rel=1e-10)
    # the class level then pulls each view to its own other view against the other classes only
    assert l_cls.item() == pytest.approx(_direct_class_level(z, y, y, tau2), rel=1e-10)
    # class 0 split in two: its other subclass becomes a class-level positive and leaves the subclass level
    s = torch.tensor([0, 1, 2, 3]).repeat(2)
    loss2, l_sub2, l_cls2 = sbcl_loss(z, y, s, tau1, torch.full((2 * n,), tau2, dtype=torch.float64), beta=0.5)
    assert l_cls2.item() == pytest.approx(_direct_class_level(z, y, s, tau2), rel=1e-10)
    assert l_sub2.item() == pytest.approx(supcon_loss(z, s, tau1).item(), rel=1e-10)
    assert loss2.item() == pytest.approx(l_sub2.item() + 0.5 * l_cls2.item(), rel=1e-12)


def test_sbcl_reclusters_at_epoch_start_keeps_the_split_on_resume_and_loads_into_a_fresh_method():
    hp = dict(method_defaults("supervised", "sbcl"), min_subclass_size=3, kmeans_iters=5)
    y = torch.cat([torch.zeros(24), torch.ones(6), torch.full((3,), 2)]).long().repeat_interleave(2)
    x = torch.randint(0, 255, (len(y), 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # the training subset is every other position of the split (as a long-tailed cut would be)
    loader = TensorLoader(x, y, 16, device="cpu", mean=[0.5], std=[0.25], views=2,
                          indices=torch.arange(0, len(y), 2), seed=3, shuffle=True)
    method = get_method("supervised", "sbcl")(_model(k=3), hp, 3)
    method.on_train_start(loader)
    assert len(method.subclass_of) == loader.num_train_samples
    method.on_epoch_start(0)
    assert method.subclasses_per_class.tolist() == [8, 2, 1] and int(method.clustered_epoch) == 0
    split = method.subclass_of.clone()
    assert (split[loader.source_index] >= 0).all() and (split[1::2] == -1).all()
    batch = next(iter(loader))
    loss, logs = method.training_step(batch)
    assert torch.isfinite(loss) and "l_subclass" in logs
    # a resumed epoch 0 keeps its split even if the weights moved
    with torch.no_grad():
        method.projector[0].weight.mul_(-1.0)
    method.on_epoch_start(0)
    assert torch.equal(method.subclass_of, split)
    fresh = get_method("supervised", "sbcl")(_model(k=3), hp, 3)
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.subclass_of, split) and torch.equal(fresh.tau2_class, method.tau2_class)


# --- Core-tuning ------------------------------------------------------------------------------

def test_core_tuning_focal_contrastive_equals_the_direct_formula_and_gamma_zero_is_plain_contrast():
    from classlab.methods.supervised.core_tuning import focal_contrastive_loss
    from classlab.methods.supervised.supcon import supcon_loss

    z, y, tau, gamma = _normed(7, 4, 5), torch.tensor([0, 1, 0, 2, 1, 0, 3]), 0.07, 2.0
    per_anchor = []
    for i in range(7):
        others = [a for a in range(7) if a != i]
        pos = [p for p in others if y[p] == y[i]]
        if pos:  # -1/|P(i)| sum_j (1 - p_ij)^gamma log p_ij
            terms = [_direct_log_p(z, i, p, tau, others) for p in pos]
            per_anchor.append(-sum((1 - math.exp(t)) ** gamma * t for t in terms) / len(pos))
    assert focal_contrastive_loss(z, y, tau, gamma).item() == pytest.approx(sum(per_anchor) / len(per_anchor), rel=1e-9)
    assert focal_contrastive_loss(z, y, tau, 0.0).item() == pytest.approx(supcon_loss(z, y, tau).item(), rel=1e-12)
    assert focal_contrastive_loss(z, y, tau, gamma) < focal_contrastive_loss(z, y, tau, 0.0)


def test_core_tuning_mines_hard_pairs_and_mixes_targets():
    from classlab.methods.supervised.core_tuning import core_mixup

    # class 0: samples 0, 1 (1 far from 0); class 1: samples 2, 3 (2 close to 0)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.2]])
    y = torch.tensor([0, 0, 1, 1])
    t = F.one_hot(y, 2).float()
    feats, soft = core_mixup(h, t, y, torch.Generator().manual_seed(0), alpha=1.0, negative_lambda_min=0.8)
    assert feats.shape == (12, 2) and torch.allclose(soft.sum(1), torch.ones(12))
    assert torch.equal(feats[:4], h) and torch.equal(soft[:4], t)
    # anchor 0's hard positive mixes its hardest positive (1) with its hardest negative (2)
    lam = soft[8, 0]  # the mix's class-0 share is the weight of sample 1
    assert torch.allclose(feats[8], lam * h[1] + (1 - lam) * h[2], atol=1e-6)
    # hard negatives: the partner keeps at least 0.8 of the mix
    method = get_method("supervised", "core_tuning")(_model(k=2), method_defaults("supervised", "core_tuning"), 2)
    batch = _two_view_batch(n=8, k=2)
    del batch["views"]
    loss, logs = method.training_step(batch)
    assert torch.isfinite(loss) and method.training_step(batch)[0].item() == loss.item()  # pure (seeded mixup)
    loss.backward()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert loss.item() == pytest.approx((logs["ce"] + 0.1 * logs["focal_contrastive"]).item(), rel=1e-6)


# --- ntk_classifier and the synthetic data ------------------------------------------------------

def test_synthetic_bayes_errors_match_monte_carlo():
    from classlab.data.synthetic import bayes_predict, gaussian_pair, sphere_linear, sphere_xor

    for data in (sphere_xor(60000, 3, 0.8, seed=1), sphere_linear(60000, 4, 0.7, seed=1),
                 gaussian_pair(60000, 2, 1.5, 0.3, seed=1)):
        empirical = (bayes_predict(data) != data.y).float().mean().item()
        assert empirical == pytest.approx(data.bayes_error, abs=0.008), data.kind
    assert sphere_xor(10, 3, 0.8).bayes_error == pytest.approx(0.2)


def test_ntk_classifier_singular_kernel_nears_the_bayes_rate_as_n_grows_unlike_relus_limit():
    from classlab.data.synthetic import sphere_xor
    from classlab.methods.supervised.ntk_classifier import kernel_scores, relu_ntk_fit, to_sphere

    data = sphere_xor(5000, dim=3, p=0.8, seed=0)  # on S^2: alpha = d = 2; Bayes error 0.2
    train, test = data.split(4000)
    tx = to_sphere(test.x)

    def error(kernel, n, **kw):
        xs, ys = to_sphere(train.x[:n]), train.y[:n]
        return (kernel_scores(kernel, xs, ys, tx, 2, **kw).argmax(1) != test.y).float().mean().item()

    small, large = error("singular", 200), error("singular", 4000)
    assert large - data.bayes_error < small - data.bayes_error and large - data.bayes_error < 0.08
    assert large < error("one_nn", 4000) - 0.03  # 1-NN stays near 2p(1-p) = 0.32
    assert abs(error("majority", 4000) - 0.5) < 0.05  # the infinite-depth ReLU limit: chance here
    # the ReLU NTK itself turns into the majority vote as it deepens (100 points, 1000 layers)
    keep = torch.cat([torch.nonzero(train.y == 0).flatten()[:70], torch.nonzero(train.y == 1).flatten()[:30]])
    xs, ys = to_sphere(train.x[keep]), train.y[keep]  # 70 / 30: a clear majority
    deep = kernel_scores("relu_ntk", xs, ys, tx, 2, depth=1000, coef=relu_ntk_fit(xs, ys, 2, 1000)).argmax(1)
    assert (deep == 0).float().mean() > 0.95


@pytest.mark.parametrize("name", ["ntk_classifier", "ntk_one_nn", "ntk_majority", "ntk_relu"])
def test_ntk_classifier_buffers_load_into_a_freshly_built_method(name):
    hp = dict(method_defaults("supervised", name), representation="pixels", max_train=0)
    y = torch.arange(30) % 3
    x = torch.randint(0, 255, (30, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    loader = TensorLoader(x, y, 8, device="cpu", mean=[0.5], std=[0.25])
    method = get_method("supervised", name)(_model(k=3, size=6), hp, 3)
    assert method.evaluate_with_method
    method.on_train_start(loader)
    method.eval()
    xb = loader.normalize(loader.x)
    scores = method(xb)
    fresh = get_method("supervised", name)(_model(k=3, size=6), hp, 3)
    fresh.load_state_dict(method.state_dict())
    # the same buffers give the same scores; the last bits may differ (BLAS may sum a matrix product in
    # another order for another allocation), so equal to double-precision rounding and the same argmax
    reloaded = fresh.eval()(xb)
    assert torch.allclose(reloaded, scores, rtol=0, atol=1e-12) and torch.equal(reloaded.argmax(1), scores.argmax(1))
    if name in ("ntk_classifier", "ntk_one_nn", "ntk_relu"):  # interpolating rules: training points keep their label
        assert torch.equal(scores.argmax(1), y)


def test_ntk_classifier_runs_through_train_and_evaluate_with_zero_epochs(tmp_path):
    from classlab.data.prepare import prepare
    from classlab.data.registry import get_dataset
    from classlab.train import evaluate, train

    get_dataset("digits").download(tmp_path / "raw")
    prepare("digits", tmp_path / "raw", tmp_path / "prep")
    out = train("supervised", "ntk_classifier", tmp_path / "prep", "convnet", 0, tmp_path / "run",
                overrides={"representation": "pixels"}, backbone_kwargs=TINY, progress=False)
    assert out["meta"]["train_steps"] == 0
    metrics = evaluate(tmp_path / "run" / "model.pt", tmp_path / "prep", tmp_path / "eval")
    assert metrics["top1"] > 0.9  # near-1-NN on 8x8 digit pixels


# --- bad hyperparameters are refused at parse time --------------------------------------------

def _smoke():
    return yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())


@pytest.mark.parametrize("method,key,value,needle", [
    ("supcon", "temperature", 0.0, "less than or equal to the minimum of 0"),
    ("sbcl", "temperature", -0.1, "less than or equal to the minimum of 0"),
    ("sbcl", "tau2", 0, "less than or equal to the minimum of 0"),
    ("sbcl", "imbalance_ratio", 0.5, "less than the minimum of 1"),
    ("core_tuning", "temperature", -1.0, "less than or equal to the minimum of 0"),
    ("ntk_classifier", "kernel", "relu", "is not one of"),
])
def test_contrastive_temperatures_and_ratios_are_refused_at_parse_time(method, key, value, needle):
    config = copy.deepcopy(_smoke())
    config["families"]["supervised"]["methods"].append(method)
    config["families"]["supervised"]["overrides"][method] = {key: value}
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert f"families.supervised.overrides.{method}.{key}" in str(info.value) and needle in str(info.value)


def test_simclr_temperature_is_refused_naming_the_method_and_field():
    problems = check_hparams("pretrain", "simclr", dict(method_defaults("pretrain", "simclr"), temperature=0.0),
                             where={"temperature": "pretrain.overrides.temperature"})
    assert len(problems) == 1
    assert "pretrain.overrides.temperature" in problems[0] and "config/methods/pretrain/simclr.yaml" in problems[0]
