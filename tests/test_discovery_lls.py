"""Latent label shift: the latent_shift split builder and LLS (DDFA)'s factorisation and adjustment."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from tests.discovery_helpers import digits_split, tiny_run

TRAIN = np.repeat(np.arange(4), 100)   # 4 classes x 100 samples: class c holds positions 100c..100c+99
TEST = np.repeat(np.arange(4), 60)


def build(seed=0, **kw):
    from classlab.data.latent_shift import build_split

    params = {"num_domains": 4, "samples_per_domain": 50, "test_samples_per_domain": 20}
    params.update(kw)
    return build_split("toy", TRAIN, 4, seed, test_labels=TEST, **params)


def test_largest_remainder_rounding_by_hand():
    from classlab.data.latent_shift import largest_remainder

    # 7 x [0.5, 0.3, 0.2] = [3.5, 2.1, 1.4]: floors [3, 2, 1] sum to 6; the one left goes to the largest
    # remainder (0.5, class 0)
    assert largest_remainder(np.array([0.5, 0.3, 0.2]), 7).tolist() == [4, 2, 1]


def test_latent_shift_domains_differ_in_priors_and_share_each_class_pool():
    from classlab.data.latent_shift import largest_remainder

    m = build()
    priors = np.asarray(m["domain_priors"])
    assert m["known_classes"] == [] and m["labelled"] == [] and m["novel_classes"] == [0, 1, 2, 3]
    # the priors differ across domains (seeded Dirichlet draws) and are well conditioned
    assert min(np.abs(priors[a] - priors[b]).max() for a in range(4) for b in range(a + 1, 4)) > 0.05
    assert np.linalg.cond(priors) <= m["params"]["max_condition_number"]
    for d, members in enumerate(m["domains"]):
        # domain d holds exactly the rounded share p_d(y) * 50 of each class
        counts = np.bincount(TRAIN[members], minlength=4)
        assert counts.tolist() == largest_remainder(priors[d], 50).tolist() == m["domain_class_counts"][d]
    for c in range(4):
        # one pool per class, no sample twice: class c's samples over all domains are the first ones of the
        # seeded permutation of its pool, dealt domain 0 first
        taken = [np.asarray(members)[TRAIN[members] == c] for members in m["domains"]]
        pool = np.random.default_rng([0, 12, c]).permutation(np.flatnonzero(TRAIN == c))
        dealt, start = [], 0
        for d in range(4):
            dealt.append(np.sort(pool[start:start + len(taken[d])]))
            start += len(taken[d])
        assert all(np.array_equal(a, b) for a, b in zip(taken, dealt))
    assert m["unlabelled"] == sorted(i for members in m["domains"] for i in members)
    # test samples: each drawn for one domain with that domain's prior, aligned with `test`
    test, dom = np.asarray(m["test"]), np.asarray(m["test_domains"])
    assert len(test) == len(dom) == 80 and m["test"] == sorted(m["test"])
    for d in range(4):
        assert np.bincount(TEST[test[dom == d]], minlength=4).tolist() == largest_remainder(priors[d], 20).tolist()
    # seeded: the same seed rebuilds the same manifest, another seed other priors
    assert build() == m and build(seed=1)["domain_priors"] != m["domain_priors"]


def test_latent_shift_fills_domains_as_far_as_the_pools_allow():
    m = build(samples_per_domain=0, test_samples_per_domain=0, classes=[1, 3], num_domains=3)
    n = m["params"]["samples_per_domain"]
    need = np.asarray(m["domain_class_counts"]).sum(0)
    assert m["novel_classes"] == [1, 3] and all(len(d) == n for d in m["domains"])
    assert (need <= 100).all() and need.max() >= 100 - 3  # full up to the rounding of 3 domains
    assert set(TRAIN[m["unlabelled"]]) == {1, 3}


@pytest.mark.parametrize("params, field", [
    ({"num_domains": 3}, "num_domains"),                 # fewer domains than the 4 classes
    ({"samples_per_domain": 1000}, "samples_per_domain"),
    ({"classes": [0, 12]}, "classes"),
    ({"classes": [2]}, "classes"),
    ({"concentration": 0.0}, "concentration"),
    ({"samples_per_class": 5}, "samples_per_class"),     # a gcd parameter
    ({"max_condition_number": 0.5}, "max_condition_number"),
])
def test_latent_shift_refuses_bad_input_naming_the_field(params, field):
    from classlab.data.discovery_split import SplitError, build_discovery_split

    with pytest.raises(SplitError, match=rf"discovery\.{field}"):
        build(**params)
    if field != "samples_per_class":  # (build_discovery_split consumes the gcd keys before dispatching)
        with pytest.raises(SplitError, match=rf"discovery\.{field}"):  # through the family's dispatcher
            build_discovery_split("latent_shift", "toy", TRAIN, 4, 0, test_labels=TEST,
                                  **{"num_domains": 4, "samples_per_domain": 50, **params})


def test_latent_shift_manifest_round_trip_and_tampering(tmp_path):
    from classlab.data.discovery_split import SplitError, load_discovery_split, write_discovery_split

    m = build()
    write_discovery_split(m, tmp_path / "ok.json")
    assert load_discovery_split(tmp_path / "ok.json") == json.loads(json.dumps(m))
    bad = dict(m, test_domains=m["test_domains"][:-1])
    with pytest.raises(SplitError, match="test_domains"):
        write_discovery_split(bad, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()


def test_lls_nmf_recovers_domain_priors_on_an_exact_case():
    from scipy.optimize import linear_sum_assignment

    from classlab.methods.discovery.lls import factorize_priors

    # 6 clusters, 3 classes, 4 domains. p(c|y): every class has anchor clusters (0 for class 0, 2 for
    # class 1, 4 for class 2) and clusters 1, 3, 5 mix classes; p(y|d) has full rank 3.
    p_c_y = np.array([[.5, 0, 0], [.2, .1, 0], [0, .5, 0], [.3, .2, .2], [0, 0, .5], [0, .2, .3]])
    p_y_d = np.array([[.7, .2, .1], [.1, .8, .1], [.2, .2, .6], [.5, 0, .5]])
    q = p_c_y @ p_y_d.T   # Q[c, d] = sum_y p(c|y) p(y|d): each column sums to 1
    est, est_c_y, err = factorize_priors(q, 3, seed=0)
    # the components are classes up to a permutation: match them (Hungarian on L1 distance)
    rows, cols = linear_sum_assignment(np.abs(est[:, :, None] - p_y_d[:, None, :]).sum(0))
    assert err < 1e-8
    np.testing.assert_allclose(est[:, rows], p_y_d[:, cols], atol=1e-6)
    np.testing.assert_allclose(est_c_y[:, rows], p_c_y[:, cols], atol=1e-6)


class _LogProbabilities(nn.Module):
    """A stand-in backbone whose features are the input (log p(d|x)), so that an identity domain head
    gives softmax(log p) = p(d|x) exactly."""

    num_features = 2

    def __init__(self):
        super().__init__()
        self.backbone = nn.Identity()

    def features(self, x):
        return x


def test_lls_domain_adjusted_posterior_by_hand():
    from classlab.methods.discovery.lls import LatentLabelShift, domain_given_class

    # Bayes over domains with p(y|d) = [[.8, .2], [.2, .8]] and p(d) = [.75, .25]:
    # p(d|y=0) = [.8*.75, .2*.25] / .65 = [12/13, 1/13]; p(d|y=1) = [.2*.75, .8*.25] / .35 = [3/7, 4/7]
    p_y_d = torch.tensor([[0.8, 0.2], [0.2, 0.8]])
    got = domain_given_class(p_y_d, torch.tensor([0.75, 0.25]))
    assert torch.allclose(got, torch.tensor([[12 / 13, 3 / 7], [1 / 13, 4 / 7]]), atol=1e-6)

    learner = LatentLabelShift(_LogProbabilities(), {"num_domains": 2}, 2)
    with torch.no_grad():
        learner.domain_head.weight.copy_(torch.eye(2))
        learner.domain_head.bias.zero_()
    learner.p_y_given_d.copy_(p_y_d)
    learner.domain_prior.copy_(torch.tensor([0.5, 0.5]))   # equal domains: p(d|y) = [[.8, .2], [.2, .8]]
    learner.fitted.fill_(True)
    # p(d|x) = [.65, .35] = p(d|y=0) a + p(d|y=1) (1 - a) => .8a + .2(1 - a) = .65 => a = .75: p(y|x) = [.75, .25]
    x = torch.log(torch.tensor([[0.65, 0.35], [0.65, 0.35]]))
    assert torch.allclose(learner.predict(x), torch.tensor([[0.75, 0.25]] * 2), atol=1e-6)
    # domain 0: [.75 * .8, .25 * .2] = [.6, .05] -> [12/13, 1/13]; domain 1: [.75 * .2, .25 * .8] = [.15, .2]
    # -> [3/7, 4/7]: the same image is class 0 in domain 0 and class 1 in domain 1
    got = learner.predict_in_domain(x, torch.tensor([0, 1]))
    assert torch.allclose(got, torch.tensor([[12 / 13, 1 / 13], [3 / 7, 4 / 7]]), atol=1e-6)


def test_lls_discriminator_loss_is_domain_cross_entropy_without_held_out_samples():
    from classlab.methods.discovery.lls import LatentLabelShift, heldout_mask

    # the hash leaves out close to the asked share of positions, whatever their order
    assert abs(float(heldout_mask(torch.arange(10000), 0.3).float().mean()) - 0.3) < 0.01
    learner = LatentLabelShift(_LogProbabilities(), {"num_domains": 2, "holdout_fraction": 0.5}, 2)
    with torch.no_grad():
        learner.domain_head.weight.copy_(torch.eye(2))
        learner.domain_head.bias.zero_()
    index = torch.arange(64)
    held = heldout_mask(index, 0.5)
    x = torch.log(torch.tensor([[0.65, 0.35]])).repeat(64, 1)
    domain = torch.ones(64, dtype=torch.long)
    # with f(x) = p(d|x) = [.65, .35] and domain 1 everywhere: CE = -log .35 over the samples not held out
    loss, _ = learner.training_step({"x": x, "y": domain, "index": index})
    assert 0 < int(held.sum()) < 64 and abs(loss.item() + np.log(0.35)) < 1e-6
    loss, _ = learner.training_step({"x": x[held], "y": domain[held], "index": index[held]})
    assert loss.item() == 0.0   # a batch of held-out samples trains nothing


def test_lls_tiny_run_on_a_latent_shift_digits_split(digits_prepared, tmp_path):
    from classlab.methods.discovery.lls import LatentLabelShift

    split = digits_split(digits_prepared, tmp_path / "lls.json", kind="latent_shift", num_domains=4,
                         classes=[0, 1, 7], samples_per_domain=60)
    manifest = json.loads(split.read_text())
    domain_of = {i: d for d, members in enumerate(manifest["domains"]) for i in members}
    seen, scored = [], []
    step, in_domain = LatentLabelShift.training_step, LatentLabelShift.predict_in_domain

    def spy_step(self, batch):
        seen.append((batch["y"].cpu(), batch["index"].cpu()))
        return step(self, batch)

    def spy_domain(self, x, domain):
        scored.append(domain.cpu())
        return in_domain(self, x, domain)

    LatentLabelShift.training_step, LatentLabelShift.predict_in_domain = spy_step, spy_domain
    try:
        # half the samples held out of the discriminator's training, fitting the clustering and the NMF
        out = tiny_run("lls", digits_prepared, split, tmp_path / "run",
                       overrides={"holdout_fraction": 0.5, "n_init": 1})
    finally:
        LatentLabelShift.training_step, LatentLabelShift.predict_in_domain = step, in_domain
    # the learner sees each sample's domain, never its class
    for y, index in seen:
        assert y.tolist() == [domain_of[int(i)] for i in index]
    z = out["predictions"]
    assert len(z["pred_unlabelled_task0"]) == len(manifest["unlabelled"]) == 240
    assert set(np.unique(z["labels_unlabelled_task0"])) == {0, 1, 7}
    assert len(z["pred_test_task0"]) == len(manifest["test"])
    assert set(z["pred_unlabelled_task0"]) <= {0, 1, 2}
    assert sorted(set(torch.cat(scored).tolist())) == [0, 1, 2, 3]   # every domain scored with its own p_d(y|x)
    state = torch.load(tmp_path / "run" / "ckpt" / "model.pt", weights_only=True)["learner"]
    assert state["domain_head.weight"].shape[0] == 4
    assert torch.allclose(state["p_y_given_d"].sum(1), torch.ones(4), atol=1e-5)
