"""icl_gd (single_paper family; von Oswald et al., ICML 2023): the LSA layer's equation on a hand case, the
construction of one gradient-descent step, the sensitivities and step size the protocol compares with, and
the protocol ``run_icl_gd`` end to end on a tiny d with its bad-input refusals."""
import json

import pytest
import torch

from classlab.config import ConfigError
from classlab.methods.registry import get_method
from classlab.methods.single_paper.icl_gd import (ICLGradientDescent, LinearSelfAttention, effective_weights,
                                                  gd_construction, gd_one_step_prediction, lsa_predict, lsa_update,
                                                  query_start)
from classlab.protocols.icl_gd import dataset_name, fit_gd_eta, make_tasks, rescaled, run_icl_gd, sensitivities

METHOD = "icl_gd"
TINY = {"dim": 4, "context_points": 10, "train_tasks": 2048, "batch_size": 256, "epochs": 25, "lr": 0.02,
        "val_tasks": 512, "test_tasks": 512, "curve_every": 100}


# --- the layer and the construction ------------------------------------------------------------------
def test_lsa_forward_on_a_hand_case():
    # d = 1, N = 2: e1 = (1, 2), e2 = (-1, 1), query (3, 0); computed by hand from
    # e_j + (1/N) sum_i W_PV e_i (e_i^T W_KQ e_j)
    tokens = torch.tensor([[[1.0, 2.0], [-1.0, 1.0], [3.0, 0.0]]], dtype=torch.float64)
    w_kq = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    w_pv = torch.tensor([[0.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    out = lsa_update(tokens, w_kq, w_pv)
    expected = torch.tensor([[[8.5, 0.5], [2.0, -0.5], [4.5, 1.5]]], dtype=torch.float64)
    assert torch.allclose(out, expected)
    assert lsa_predict(tokens, w_kq, w_pv).item() == pytest.approx(-1.5)  # minus the query's y entry


def test_the_query_only_prediction_is_the_full_layers():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randn(5, 7, 4, generator=gen, dtype=torch.float64)  # the query's y entry nonzero: residual
    w_kq, w_pv = (torch.randn(4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    assert torch.allclose(lsa_predict(tokens, w_kq, w_pv), -lsa_update(tokens, w_kq, w_pv)[:, -1, -1])


def test_the_construction_is_one_gradient_step_from_any_w0():
    gen = torch.Generator().manual_seed(0)
    d, n, eta = 5, 7, 0.37
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) * 2 - 1
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    y = x @ w
    x_q = torch.rand(d, generator=gen, dtype=torch.float64) * 2 - 1
    w0 = torch.randn(d, generator=gen, dtype=torch.float64)
    # one step by hand: L(w) = 1/(2N) sum (w.x_i - y_i)^2, grad L(w0) = (1/N) X^T (X w0 - y)
    w1 = w0 - eta * x.T @ (x @ w0 - y) / n
    tokens = torch.cat([torch.cat([x, y[:, None]], 1), query_start(x_q, w0)[None]], 0)[None]
    w_kq, w_pv = gd_construction(d, eta, w0, dtype=torch.float64)
    assert lsa_predict(tokens, w_kq, w_pv).item() == pytest.approx(float(w1 @ x_q), abs=1e-12)
    # every context token's y entry moves by -(w1 - w0).x_i
    out = lsa_update(tokens, w_kq, w_pv)
    assert torch.allclose(out[0, :-1, -1], y - x @ (w1 - w0), atol=1e-12)
    assert torch.equal(out[0, :, :d], tokens[0, :, :d])  # the x entries are untouched
    # from w0 = 0 the prediction is (eta/N) sum_i y_i x_i.x_q, and so is gd_one_step_prediction's
    zero = torch.cat([torch.cat([x, y[:, None]], 1), query_start(x_q)[None]], 0)[None]
    w_kq0, w_pv0 = gd_construction(d, eta, dtype=torch.float64)
    direct = eta / n * float((y[:, None] * x).sum(0) @ x_q)
    assert lsa_predict(zero, w_kq0, w_pv0).item() == pytest.approx(direct, abs=1e-12)
    assert gd_one_step_prediction(zero, eta).item() == pytest.approx(direct, abs=1e-12)


def test_sensitivities_by_autograd_match_the_closed_forms():
    tokens, _ = make_tasks(64, 3, 6, 1.0, seed=1)
    tokens = tokens.double()
    eta = 0.8
    gd = gd_construction(3, eta, dtype=torch.float64)
    x, y = tokens[:, :-1, :-1], tokens[:, :-1, -1]
    # the construction: d y_hat / d x_q = w1 = (eta/N) sum_i y_i x_i
    assert torch.allclose(sensitivities(tokens, *gd), eta * torch.einsum("bi,bid->bd", y, x) / 6, atol=1e-12)
    # any layer: y_hat = -r^T C A x_q, r = W_PV's y row, C = (1/N) sum e_i e_i^T, A = W_KQ's x columns
    gen = torch.Generator().manual_seed(2)
    w_kq, w_pv = (torch.randn(4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    context = tokens[:, :-1, :]
    c = torch.einsum("bia,bic->bac", context, context) / 6
    closed = -torch.einsum("a,bac,ck->bk", w_pv[-1], c, w_kq[:, :3])
    assert torch.allclose(sensitivities(tokens, w_kq, w_pv), closed, atol=1e-10)


def test_the_step_size_is_the_line_search_minimum():
    tokens, targets = make_tasks(2000, 4, 10, 1.0, seed=5)
    eta = fit_gd_eta(tokens, targets, 4)

    def loss(step):
        return float(0.5 * (gd_one_step_prediction(tokens.double(), step) - targets.double()).pow(2).mean())
    grid = torch.linspace(0.05, 5.0, 991)
    best = float(grid[torch.tensor([loss(float(s)) for s in grid]).argmin()])
    assert eta == pytest.approx(best, abs=0.006)
    assert loss(eta) <= min(loss(eta - 1e-3), loss(eta + 1e-3))


def test_effective_weights_ignore_the_layers_rescaling_symmetry():
    gen = torch.Generator().manual_seed(4)
    w_kq, w_pv = (torch.randn(5, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    tokens = torch.randn(8, 6, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(lsa_predict(tokens, 3 * w_kq, w_pv / 3), lsa_predict(tokens, w_kq, w_pv))
    assert torch.allclose(effective_weights(3 * w_kq, w_pv / 3, 4), effective_weights(w_kq, w_pv, 4))
    scaled_kq, scaled_pv = rescaled(w_kq, w_pv, 4)
    assert torch.diagonal(scaled_kq[:4, :4]).mean().item() == pytest.approx(1.0)
    assert torch.allclose(lsa_predict(tokens, scaled_kq, scaled_pv), lsa_predict(tokens, w_kq, w_pv))
    # the construction's: only T[y, x_k, k] = -eta (symmetrised: half in T[x_k, y, k])
    t = effective_weights(*gd_construction(4, 2.0, dtype=torch.float64), 4)
    assert t[4, 2, 2].item() == pytest.approx(-1.0) and t[2, 4, 2].item() == pytest.approx(-1.0)
    assert float(t.abs().sum()) == pytest.approx(4 * 2 * 1.0)


def test_tasks_are_linear_seeded_and_the_query_carries_no_label():
    tokens, targets = make_tasks(50, 3, 6, 0.5, seed=11)
    assert tokens.shape == (50, 7, 4) and targets.shape == (50,)
    assert bool((tokens[:, -1, -1] == 0).all()) and float(tokens[:, :, :3].abs().max()) <= 0.5
    # the context determines w (N >= d, no noise), which predicts the query's target exactly
    x, y = tokens[:, :-1, :3].double(), tokens[:, :-1, 3].double()
    w = torch.linalg.lstsq(x, y[..., None]).solution[..., 0]
    assert torch.allclose(torch.einsum("bd,bd->b", w, tokens[:, -1, :3].double()), targets.double(), atol=1e-4)
    again, _ = make_tasks(50, 3, 6, 0.5, seed=11)
    other, _ = make_tasks(50, 3, 6, 0.5, seed=12)
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)


def test_the_method_is_registered_and_its_loss_is_half_the_squared_error():
    cls = get_method("single_paper", METHOD)
    assert cls is ICLGradientDescent and "icl_regression" in cls.scenario_kinds
    torch.manual_seed(0)
    model = LinearSelfAttention(3, 0.5)
    learner = cls(model, {"dim": 3, "init_std": 0.5}, 1)
    tokens, targets = make_tasks(16, 3, 5, 1.0, seed=0)
    loss, _ = learner.training_step({"x": tokens, "y": targets})
    assert loss.detach().item() == pytest.approx(float(0.5 * (model(tokens).detach() - targets).pow(2).mean()))


# --- the protocol ------------------------------------------------------------------------------------
def test_run_icl_gd_matches_gradient_descent_on_a_tiny_dimension(tmp_path):
    out = tmp_path / "run"
    metrics = run_icl_gd(METHOD, 0, out, overrides=dict(TINY), threads=1)
    saved = json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # the resume checkpoint is gone
    for key in ("protocol", "method", "seed", "dataset", "loss_trained", "loss_gd", "loss_gap", "pred_cosine",
                "sensitivity_cosine", "pred_gap", "gd_eta", "loss_curve", "train_steps", "loss_interpolated",
                "interpolated_gap", "weights_cosine", "cosine_curve", "hparams", "fingerprint", "train_seconds",
                "provenance"):
        assert key in saved, key
    assert saved["protocol"] == "icl_gd" and saved["method"] == METHOD and saved["seed"] == 0
    assert saved["dataset"] == dataset_name(4, 10) == "linear_regression_d4_n10"
    assert saved["train_steps"] == 25 * (2048 // 256)
    assert [row[0] for row in saved["loss_curve"]] == [0, 100, 200]
    assert saved["loss_gap"] == pytest.approx(saved["loss_trained"] - saved["loss_gd"])
    # the paper's claim, on d = 4: the trained layer computes what one GD step computes
    assert metrics["sensitivity_cosine"] > 0.9 and metrics["pred_cosine"] > 0.9
    assert metrics["loss_trained"] < 1.15 * metrics["loss_gd"] < 0.6 * metrics["loss_zero"]
    assert saved["loss_curve"][-1][1] < 0.5 * saved["loss_curve"][0][1]  # it learned
    assert saved["gd_eta"] > 0


@pytest.mark.parametrize("overrides, key", [
    ({"context_points": 0}, "context_points"),
    ({"dim": 0}, "dim"),
    ({"epochs": 0}, "epochs"),
    ({"train_tasks": 0}, "train_tasks"),
    ({"x_range": -1.0}, "x_range"),
    ({"test_tasks": 1}, "test_tasks"),
    ({"dimension": 3}, "dimension"),
])
def test_bad_input_is_refused_naming_the_key_before_anything_is_written(tmp_path, overrides, key):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=key):
        run_icl_gd(METHOD, 0, out, overrides=overrides, threads=1)
    assert not out.exists() or not any(out.iterdir())


def test_a_bad_seed_or_method_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="seed"):
        run_icl_gd(METHOD, "0", out)
    with pytest.raises(ConfigError, match="icl_gdd"):
        run_icl_gd("icl_gdd", 0, out)
    assert not out.exists()
