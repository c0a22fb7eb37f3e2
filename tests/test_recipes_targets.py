"""Supervised recipes that change the loss, the targets, the data distribution or the training
signal: z_loss (shift/scale invariance), ps_kd (targets from last epoch's predictions, memory
restored on resume), useful (slow cluster upsampled once, retrain from the initial weights) and
noprop (blocks trained without gradients between them, the inference chain)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from classlab.config import ROOT, ConfigError, check_hparams, method_defaults, resolve_hparams, validate_config
from classlab.engine import Trainer, TrainConfig
from classlab.methods.registry import get_method
from classlab.models import build_classifier

TINY = {"widths": [8, 8], "pool_after": [0]}


def _model(k=4, size=8):
    torch.manual_seed(0)
    return build_classifier("convnet", 1, k, img_size=size, backbone_kwargs=TINY)


def _batch(n=16, k=4, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, size, size, generator=g), "y": torch.randint(0, k, (n,), generator=g),
            "index": torch.arange(n)}


@pytest.mark.parametrize("method", ["z_loss", "ps_kd", "useful", "sam_useful", "noprop", "noprop_blocks_ce"])
def test_recipe_defaults_are_declared_and_valid(method):
    assert check_hparams("supervised", method, method_defaults("supervised", method)) == []


# --- z_loss ----------------------------------------------------------------------------------

def test_z_loss_matches_its_formula_and_is_shift_and_scale_invariant():
    from classlab.methods.supervised.z_loss import z_loss

    torch.manual_seed(0)
    o = torch.randn(32, 10, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (32,))
    a, b = 1.5, 2.0
    # the paper's definition written out: mu, sigma over the classes, softplus of the target's z
    mu = o.mean(1, keepdim=True)
    sigma = ((o ** 2).mean(1, keepdim=True) - mu ** 2).sqrt()
    z_y = ((o - mu) / sigma)[torch.arange(32), y]
    expected = (torch.log1p(torch.exp(a * (b - z_y))) / a).mean()
    assert z_loss(o.float(), y, a, b).item() == pytest.approx(expected.item(), rel=1e-5)

    def loss_and_grad(logits):
        logits = logits.clone().float().requires_grad_(True)
        loss = z_loss(logits, y, a, b)
        loss.backward()
        return loss.item(), logits.grad

    ref_loss, ref_grad = loss_and_grad(o)
    for alpha, beta in [(0.1, 0.0), (7.0, -3.0), (1.0, 50.0), (25.0, 4.0)]:
        loss, grad = loss_and_grad(alpha * o + beta)
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        # the gradient wrt the outputs keeps its direction and scales by 1/alpha (L(o) = L(alpha o + beta))
        cos = F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(grad * alpha, ref_grad, rtol=1e-4, atol=1e-6)
    # cross-entropy, for contrast, is not scale invariant: the test would notice a CE in disguise
    assert F.cross_entropy(7.0 * o.float(), y).item() != pytest.approx(F.cross_entropy(o.float(), y).item(), rel=1e-2)


def test_z_loss_method_trains_with_its_a_and_b():
    from classlab.methods.supervised.z_loss import z_loss

    hp = resolve_hparams("supervised", "z_loss", {"z_a": 0.5, "z_b": 1.0})
    method = get_method("supervised", "z_loss")(_model(), hp, 4)
    batch = _batch()
    loss, logs = method.training_step(batch)
    assert loss.item() == pytest.approx(z_loss(logs["logits"], batch["y"], 0.5, 1.0).item(), rel=1e-6)
    assert loss.item() != pytest.approx(z_loss(logs["logits"], batch["y"], 1.0, 2.0).item(), rel=1e-3)


# --- ps_kd -----------------------------------------------------------------------------------

class _Loader:
    def __init__(self, n):
        self.num_train_samples = n


def _pskd(epochs=4, n=16, k=4):
    hp = resolve_hparams("supervised", "ps_kd", {"epochs": epochs})
    method = get_method("supervised", "ps_kd")(_model(k), hp, k)
    method.on_train_start(_Loader(n))
    return method


def test_ps_kd_is_cross_entropy_in_the_first_epoch():
    method = _pskd()
    batch = _batch()
    method.prev_probs.copy_(F.softmax(torch.randn(16, 4), 1))  # whatever is in memory is not used yet
    method.on_epoch_start(0)
    loss, logs = method.training_step(batch)
    assert loss.item() == pytest.approx(F.cross_entropy(logs["logits"], batch["y"]).item(), rel=1e-6)


def test_ps_kd_targets_follow_the_alpha_schedule():
    from classlab.methods.supervised.ps_kd import alpha_schedule

    epochs = 4
    assert [alpha_schedule(t, epochs, 0.8) for t in range(epochs)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    method = _pskd(epochs)
    batch = _batch()
    prev = F.softmax(3 * torch.randn(16, 4), 1)
    prev[5] = 0.0  # a sample no batch of the last epoch held: its target is the one-hot label
    method.prev_probs.copy_(prev)
    onehot = F.one_hot(batch["y"], 4).float()
    remembered = torch.where(prev.sum(1, keepdim=True) > 0, prev, onehot)
    for t in range(1, epochs):
        method.on_epoch_start(t)
        loss, logs = method.training_step(batch)
        a_t = 0.8 * (t + 1) / epochs
        target = (1 - a_t) * onehot + a_t * remembered
        expected = -(target * F.log_softmax(logs["logits"], 1)).sum(1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6), t
    assert method.alpha_t() == pytest.approx(0.8)


def test_ps_kd_training_step_is_pure_and_the_hooks_carry_the_memory():
    method = _pskd(n=40)
    batch = dict(_batch(), index=torch.arange(16) + 20)  # positions in the full train split
    method.on_epoch_start(1)
    before = (method.prev_probs.clone(), method.cur_probs.clone())
    first, logs = method.training_step(batch)
    second, _ = method.training_step(batch)  # a SAM closure calls it again: nothing may change
    assert first.item() == second.item()
    assert torch.equal(method.prev_probs, before[0]) and torch.equal(method.cur_probs, before[1])
    method.on_after_step(batch, logs)
    torch.testing.assert_close(method.cur_probs[20:36], F.softmax(logs["logits"], 1))
    assert method.cur_probs[:20].abs().sum() == 0 and method.prev_probs.abs().sum() == 0
    method.on_epoch_end(1)
    torch.testing.assert_close(method.prev_probs[20:36], F.softmax(logs["logits"], 1))
    assert method.cur_probs.abs().sum() == 0


def _pskd_run(tmp_path, name, epochs=3, kill_at=None, every_steps=0):
    """ps_kd on 96 synthetic 8x8 images (6 steps an epoch) through the engine's Trainer."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(96) % 4
    x = (torch.rand(96, 1, 8, 8, generator=g) * 80 + y.view(-1, 1, 1, 1) * 40).to(torch.uint8)
    hp = resolve_hparams("supervised", "ps_kd", {"epochs": epochs, "batch_size": 16, "lr": 0.05,
                                                   "augment_pad": 1, "augment_hflip": False})
    method = get_method("supervised", "ps_kd")(_model(), hp, 4)
    trainer = Trainer(method, TrainConfig.from_hparams(hp), torch.device("cpu"), seed=5,
                      checkpoint=tmp_path / f"{name}.pt", progress=False, checkpoint_every_steps=every_steps)
    loader = trainer.make_loader(x, y, [0.3], [0.2])

    def on_step(steps, samples):
        if kill_at is not None and steps == kill_at:
            raise KeyboardInterrupt("killed")

    trainer.fit(loader, on_step=on_step)
    return method


@pytest.mark.parametrize("kill_at,every_steps", [(7, 0), (11, 2)], ids=["at-epoch-end", "mid-epoch"])
def test_ps_kd_resumed_run_restores_the_memory(tmp_path, one_thread, kill_at, every_steps):
    reference = _pskd_run(tmp_path, "reference")
    assert reference.prev_probs.sum(1).gt(0).all()  # every sample has a remembered prediction
    with pytest.raises(KeyboardInterrupt):
        _pskd_run(tmp_path, "killed", kill_at=kill_at, every_steps=every_steps)
    resumed = _pskd_run(tmp_path, "killed", every_steps=every_steps)  # a new process: fresh method, same path
    assert torch.equal(resumed.prev_probs, reference.prev_probs)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


# --- useful ----------------------------------------------------------------------------------

def test_useful_upsamples_the_higher_loss_cluster_once_per_class():
    from classlab.methods.supervised.useful import upsample_slow_clusters

    g = torch.Generator().manual_seed(0)
    groups = []  # (class, n, centre of its outputs, its loss); the slow group is the smaller one in
    groups += [(0, 30, (6.0, 0.0), 0.1), (0, 10, (0.0, 1.0), 2.0)]   # class 0, and the larger one in
    groups += [(1, 8, (0.0, 6.0), 0.05), (1, 25, (1.0, 0.0), 1.5)]   # class 1: chosen by loss, not size
    outputs, losses, labels, slow = [], [], [], []
    for c, n, centre, loss in groups:
        outputs.append(torch.tensor(centre) + 0.1 * torch.randn(n, 2, generator=g))
        losses.append(loss + 0.01 * torch.rand(n, generator=g))
        labels.append(torch.full((n,), c))
        slow.append(torch.full((n,), loss > 1.0))
    outputs, losses, labels, slow = map(torch.cat, (outputs, losses, labels, slow))
    positions = torch.randperm(1000, generator=g)[:len(labels)]  # train-split positions, not 0..n-1
    resampled, counts = upsample_slow_clusters(outputs, losses, labels, positions, factor=2, seed=0)
    assert counts == {0: (40, 10), 1: (33, 25)}
    assert torch.equal(resampled[:len(positions)], positions)  # every example once, in order
    assert sorted(resampled[len(positions):].tolist()) == sorted(positions[slow].tolist())
    for c, (n, s) in counts.items():
        assert int(torch.isin(resampled, positions[labels == c]).sum()) == n + s
    same, _ = upsample_slow_clusters(outputs, losses, labels, positions, factor=1, seed=0)
    assert torch.equal(same, positions)


def test_useful_end_stage_clusters_the_models_outputs():
    """end_stage reads the model's outputs on the stage's samples: a fixed linear 'model' makes
    the slow examples the ones it gives a low score for their label."""
    hp = resolve_hparams("supervised", "useful", {})
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2) * 4)
    method = get_method("supervised", "useful")(model, hp, 2)
    g = torch.Generator().manual_seed(0)
    easy = torch.tensor([1.0, -1.0]) + 0.1 * torch.randn(20, 2, generator=g)   # class 0, confidently right
    hard = torch.tensor([-0.2, 0.2]) + 0.1 * torch.randn(6, 2, generator=g)    # class 0, wrong side
    other = torch.tensor([-1.0, 1.0]) + 0.1 * torch.randn(14, 2, generator=g)  # class 1
    x = torch.cat([easy, hard, other])
    y = torch.tensor([0] * 26 + [1] * 14)
    index = torch.arange(40) * 3 + 7
    loader = [{"x": x[i:i + 16], "y": y[i:i + 16], "index": index[i:i + 16]} for i in range(0, 40, 16)]
    resampled = method.end_stage("probe", loader)
    assert torch.equal(resampled[:40], index)
    extra = resampled[40:]
    assert set(index[20:26].tolist()) <= set(extra.tolist())          # class 0's slow examples, once more
    assert not set(index[:20].tolist()) & set(extra.tolist())         # its fast ones not
    assert method.end_stage("retrain", loader) is None
    assert method.training_stages() == [{"name": "probe", "epochs": hp["probe_epochs"]},
                                        {"name": "retrain", "reinit": True}]


def test_useful_run_writes_the_resampled_list_and_retrains_from_the_initial_weights(digits_prepared, tmp_path, monkeypatch,
                                                                                    one_thread):
    import classlab.train as train_mod
    from classlab.data.prepare import load_prepared
    from classlab.engine.device import seed_everything
    from classlab.methods.supervised.useful import USEFUL

    seen = []

    class Watched(USEFUL):
        def on_train_start(self, loader):
            seen.append((self.stage, {k: v.clone() for k, v in self.model.state_dict().items()}))

    monkeypatch.setattr(train_mod, "get_method", lambda family, name: Watched)
    overrides = {"epochs": 1, "probe_epochs": 1, "batch_size": 64, "augment_pad": 0, "augment_hflip": False}
    out = tmp_path / "run"
    train_mod.train("supervised", "useful", digits_prepared, "convnet", 3, out, overrides=overrides, backbone_kwargs=TINY,
                    progress=False, threads=1)
    written = json.loads((out / "stage_probe_indices.json").read_text())
    labels = load_prepared(digits_prepared).train.y
    positions = torch.tensor(written["indices"])
    counts = torch.bincount(positions, minlength=len(labels))
    assert counts.min() == 1 and counts.max() == 2  # every example, the slow ones twice (upsampled once)
    for c in range(10):
        size = int((labels == c).sum())
        slow = int(((counts == 2) & (labels == c)).sum())
        assert 0 < slow < size and int((labels[positions] == c).sum()) == size + slow
    assert [stage for stage, _ in seen] == ["probe", "retrain"]
    seed_everything(3)
    initial = build_classifier("convnet", 1, 10, img_size=8, backbone_kwargs=TINY).state_dict()
    for key, value in seen[1][1].items():  # the retrain starts from the run's initial weights
        assert torch.equal(value, initial[key]), key


def test_sam_useful_has_useful_stages_and_takes_sam_steps():
    from classlab.methods.supervised.sam import SAM
    from classlab.methods.supervised.useful import USEFUL

    cls = get_method("supervised", "sam_useful")
    assert issubclass(cls, USEFUL) and issubclass(cls, SAM)
    assert cls.optimizer_step is SAM.optimizer_step and cls.end_stage is USEFUL.end_stage
    hp = resolve_hparams("supervised", "sam_useful", {"lr": 0.5})
    assert hp["rho"] == 0.05 and hp["probe_epochs"] == method_defaults("supervised", "useful")["probe_epochs"]
    assert cls(_model(), hp, 4).training_stages()[1] == {"name": "retrain", "reinit": True}
    # one step from the same weights on the same batch moves them as sam's step does, not as erm's
    after = {}
    for name in ("sam_useful", "sam", "erm"):
        method = get_method("supervised", name)(_model(), dict(hp, rho=0.05), 4)
        optimizer = method.configure_optimizer()
        batch = _batch()
        loss, _ = method.training_step(batch)
        method.optimizer_step(loss, optimizer, lambda: method.training_step(batch)[0])
        after[name] = torch.cat([p.detach().flatten() for p in method.model.parameters()])
    torch.testing.assert_close(after["sam_useful"], after["sam"])
    assert not torch.allclose(after["sam_useful"], after["erm"])


# --- noprop ----------------------------------------------------------------------------------

def _noprop(T=4, k=4, **over):
    hp = resolve_hparams("supervised", "noprop", dict({"T": T, "block_widths": [8], "hidden": 32}, **over))
    torch.manual_seed(0)
    return get_method("supervised", "noprop")(_model(k), hp, k)


def test_noprop_no_gradient_crosses_blocks():
    method = _noprop()
    batch = _batch()
    u = method.embed[batch["y"]].float()
    h = [block.encode(batch["x"]) for block in method.blocks]   # every block's features, one graph
    blocks = list(method.blocks)
    for t in range(1, method.T + 1):
        method.zero_grad(set_to_none=True)
        method.block_loss(t, h[t - 1], u).backward(retain_graph=True)
        for s, block in enumerate(blocks, start=1):
            grads = [p.grad for p in block.parameters()]
            if s == t:
                assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
            else:
                assert all(g is None or not g.any() for g in grads), f"block {t}'s loss reached block {s}"
        assert all(p.grad is None for p in method.model.parameters())
    # the summed training loss gives block k exactly the gradient of its own term
    k = 2
    torch.manual_seed(7)
    method.zero_grad(set_to_none=True)
    method.training_step(batch)[0].backward()
    total = [p.grad.clone() for p in blocks[k - 1].parameters()]
    torch.manual_seed(7)  # the same noise draws, in the same order as training_step makes them
    method.zero_grad(set_to_none=True)
    h = [block.encode(batch["x"]) for block in method.blocks]
    terms = [method.block_loss(t, h[t - 1], u) for t in range(1, method.T + 1)]
    terms[k - 1].backward()
    for mine, alone in zip(total, [p.grad for p in blocks[k - 1].parameters()]):
        torch.testing.assert_close(mine, alone)


def test_noprop_schedule_and_chain_coefficients_are_the_gaussian_posterior():
    from classlab.methods.supervised.noprop import chain_coefficients, cosine_alpha_bar

    for T in (1, 3, 10):
        ab = cosine_alpha_bar(T)
        assert ab[0] < 1e-6 and bool((ab[1:] > ab[:-1]).all()) and ab[-1] < 1
        a, b, c = chain_coefficients(ab)
        # a step of the chain with a perfect block maps q(z_{t-1}|y) onto q(z_t|y):
        # mean a_t + b_t sqrt(abar_{t-1}) = sqrt(abar_t), variance b_t^2 (1 - abar_{t-1}) + c_t = 1 - abar_t
        torch.testing.assert_close(a + b * ab[:-1].sqrt(), ab[1:].sqrt())
        torch.testing.assert_close(b ** 2 * (1 - ab[:-1]) + c, 1 - ab[1:])
    method = _noprop(T=10)
    ab = cosine_alpha_bar(10)
    snr = ab / (1 - ab)  # SNR(t) = abar_t / (1 - abar_t), in float64
    torch.testing.assert_close(method.snr_weight.double(), snr[1:] - snr[:-1], rtol=1e-6, atol=1e-6)
    assert bool((method.snr_weight > 0).all())


def test_noprop_chain_is_deterministic_and_reloads_into_a_fresh_method():
    method = _noprop().eval()
    x = _batch()["x"]
    with torch.no_grad():
        first, second = method(x), method(x)
    assert torch.equal(first, second) and first.shape == (16, 4)
    fresh = _noprop()
    torch.manual_seed(123)
    for p in fresh.parameters():  # different weights until the state is loaded
        p.data.normal_()
    fresh.load_state_dict(method.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), first)
    noisy = _noprop(eval_noise=True).eval()
    with torch.no_grad():
        assert torch.equal(noisy(x), noisy(x)) and not torch.equal(noisy(x), first)
    assert method.evaluate_with_method
    assert {id(p) for g in method.param_groups() for p in g["params"]}.isdisjoint(
        {id(p) for p in method.model.parameters()})
    assert len(method.param_groups()) == method.T + 1  # one group per block, one for the shared head


def test_noprop_learns_a_small_separable_set(one_thread):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(64) % 4
    protos = torch.randn(4, 1, 8, 8, generator=g)
    x = protos[y] + 0.5 * torch.randn(64, 1, 8, 8, generator=g)
    batch = {"x": x, "y": y, "index": torch.arange(64)}
    method = _noprop(T=3, lr=1e-2)
    optimizer = method.configure_optimizer()
    method.train()
    losses = []
    for _ in range(50):
        loss, logs = method.training_step(batch)
        method.optimizer_step(loss, optimizer, lambda: loss)
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    with torch.no_grad():
        acc = (method.eval()(x).argmax(1) == y).float().mean().item()
    assert acc >= 0.9, acc


def test_noprop_with_no_blocks_is_refused_at_parse_time():
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config = copy.deepcopy(config)
    config["families"]["supervised"]["methods"].append("noprop")
    config["families"]["supervised"]["overrides"]["noprop"] = {"T": 0}
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    message = str(info.value)
    assert "config key families.supervised.overrides.noprop.T: 0 is less than the minimum of 1" in message
    assert "(declared in config/methods/supervised/noprop.yaml)" in message


def test_noprop_backprop_sends_gradient_through_every_block_of_the_same_architecture():
    """The NoProp claim's baseline: the same blocks, trained end to end, so every block's parameters get
    a gradient from the one loss (NoProp's own test checks the opposite), and the parameter count is
    NoProp's."""
    import torch

    from classlab.methods.registry import get_method
    from classlab.config import resolve_hparams
    from classlab.models import build_classifier

    hp = resolve_hparams("supervised", "noprop_backprop", {"T": 3})
    model = build_classifier("convnet", 1, 4, img_size=8, backbone_kwargs={"widths": [4], "pool_after": []})
    method = get_method("supervised", "noprop_backprop")(model, hp, 4)
    twin = get_method("supervised", "noprop")(model, resolve_hparams("supervised", "noprop", {"T": 3}), 4)
    assert sum(p.numel() for p in method.blocks.parameters()) == sum(p.numel() for p in twin.blocks.parameters())
    torch.manual_seed(0)
    batch = {"x": torch.randn(6, 1, 8, 8), "y": torch.tensor([0, 1, 2, 3, 0, 1])}
    loss, _ = method.training_step(batch)
    loss.backward()
    for t, block in enumerate(method.blocks):
        grads = [p.grad for p in block.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), t


def test_noprop_blocks_ce_is_noprops_image_paths_trained_end_to_end():
    """The NoProp claim's baseline of the same size: the encoders are NoProp's blocks' image paths
    layer for layer; the averaged logits are the forward; one CE gives every encoder a gradient."""
    hp = resolve_hparams("supervised", "noprop_blocks_ce", {"T": 3, "block_widths": [8], "hidden": 32, "head_hidden": 16})
    method = get_method("supervised", "noprop_blocks_ce")(_model(4), hp, 4)
    noprop = _noprop(T=3)
    for enc, block in zip(method.encoders, noprop.blocks):
        assert [tuple(p.shape) for p in enc.parameters()] == [tuple(p.shape) for p in block.image.parameters()]
    batch = _batch()
    logits = method(batch["x"])
    by_hand = sum(head(enc(batch["x"])) for enc, head in zip(method.encoders, method.heads)) / 3
    torch.testing.assert_close(logits, by_hand)
    loss, logs = method.training_step(batch)
    torch.testing.assert_close(loss, F.cross_entropy(by_hand, batch["y"]))
    loss.backward()
    for t, (enc, head) in enumerate(zip(method.encoders, method.heads)):
        for p in [*enc.parameters(), *head.parameters()]:
            assert p.grad is not None and p.grad.abs().sum() > 0, t
    assert all(p.grad is None for p in method.model.parameters())
    assert method.evaluate_with_method
    assert {id(p) for g in method.param_groups() for p in g["params"]} == {id(p) for p in method.parameters()
                                                                           if p.requires_grad}


def test_noprop_blocks_ce_has_noprops_size_at_the_defaults():
    """"Backprop of the same size": at the YAML defaults the baseline's trained parameters are within
    5% of NoProp's (the heads take the label paths' share)."""
    model = build_classifier("convnet", 1, 10, img_size=28, backbone_kwargs=TINY)
    sizes = {}
    for name in ("noprop", "noprop_blocks_ce"):
        method = get_method("supervised", name)(model, resolve_hparams("supervised", name, {}), 10)
        sizes[name] = sum(p.numel() for p in method.parameters() if p.requires_grad)
    assert abs(sizes["noprop_blocks_ce"] / sizes["noprop"] - 1) < 0.05, sizes
