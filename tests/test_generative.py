"""The generative family: the DDPM's training loss, the compositional condition, the diffusion_classifier
(shared draws, the rigged case, each timestep weighting), classdiffusion's semantic preservation loss,
the timestep-count checks, and the three protocols end to end on digits_pairs."""
from __future__ import annotations

import math

import pytest
import torch

from classlab.config import ConfigError
from classlab.data.prepare import prepare
from classlab.data.registry import get_dataset
from classlab.methods.generative.classdiffusion import ClassDiffusion, semantic_preservation_loss
from classlab.methods.generative.ddpm import (DDPM, ConditionalDenoiser, build_scheduler, check_step_counts,
                                              denoiser_spec)
from classlab.methods.generative.diffusion_classifier import (DiffusionClassifier, class_errors, elbo_weights,
                                                              fit_timestep_weights, polynomial_weights, predict,
                                                              shared_noise, stratified_timesteps, uniform_weights,
                                                              weighted_scores)
from classlab.methods.registry import get_method

TINY = {"num_train_timesteps": 50, "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
        "block_out_channels": [8, 16], "layers_per_block": 1, "attention": False, "norm_num_groups": 4,
        "condition": "words", "condition_dropout": 0.3, "ema_decay": 0.9, "lr": 0.001, "optimizer": "adamw"}
ATTRS, OBJS = ["red", "green", "blue"], ["a", "b", "c", "d"]


def tiny_denoiser(seed: int = 0) -> ConditionalDenoiser:
    torch.manual_seed(seed)
    return ConditionalDenoiser(denoiser_spec(TINY, ATTRS, OBJS, [3, 8, 8]))


# --- ddpm -------------------------------------------------------------------------------------------

def test_ddpm_training_step_is_the_eps_mse_at_the_drawn_timesteps():
    model = tiny_denoiser()
    method = DDPM(model, TINY, len(ATTRS) * len(OBJS))
    x0 = torch.rand(6, 3, 8, 8) * 2 - 1
    y = torch.tensor([0, 5, 7, 11, 2, 9])
    torch.manual_seed(11)
    loss, _ = method.training_step({"x": x0, "y": y})
    torch.manual_seed(11)
    t, noise, keep = method.draw(x0)
    # by hand: linear betas, abar = prod(1 - beta), x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    betas = torch.linspace(TINY["beta_start"], TINY["beta_end"], TINY["num_train_timesteps"], dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    a, o = y // len(OBJS), y % len(OBJS)
    a = torch.where(keep[:, 0], a, torch.full_like(a, -1))
    o = torch.where(keep[:, 1], o, torch.full_like(o, -1))
    eps_hat = model(x_t, t, model.condition(a, o))
    assert torch.allclose(loss, ((eps_hat - noise) ** 2).mean(), atol=1e-5)
    assert (~keep).any()  # dropout of 0.3 over 12 words drops some (seeded)
    # the EMA moves toward the trained weights by (1 - decay) after a step
    ema_before = [p.clone() for p in method.ema_model.parameters()]
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    method.on_after_step({}, {})
    for before, ema, p in zip(ema_before, method.ema_model.parameters(), model.parameters()):
        assert torch.allclose(ema, 0.9 * before + 0.1 * p.detach(), atol=1e-6)


def test_compositional_condition_gives_every_pair_including_held_out_ones_a_vector():
    model = tiny_denoiser()
    enc = model.encoder
    conditions = model.pair_conditions()
    assert conditions.shape == (len(ATTRS) * len(OBJS), model.condition_dim)
    # "green c" (label 1 * 4 + 2) never needs to be seen: c = MLP(E_attr[green] + E_obj[c])
    by_hand = enc.mlp(enc.attribute_embedding.weight[1] + enc.object_embedding.weight[2])
    assert torch.allclose(conditions[6], by_hand, atol=1e-6)
    assert torch.allclose(model.condition(torch.tensor([-1]), torch.tensor([2]))[0],
                          enc.mlp(enc.object_embedding.weight[2]), atol=1e-6)
    assert torch.allclose(model.condition(torch.tensor([-1]), torch.tensor([-1]))[0],
                          enc.mlp(torch.zeros(model.condition_dim)), atol=1e-6)
    assert torch.unique(conditions, dim=0).shape[0] == conditions.shape[0]


def test_minilm_condition_reads_the_offline_text_tower_and_the_identifier_is_a_new_token():
    from classlab.methods.generative.ddpm import build_denoiser, minilm_identifier_features, \
        minilm_placeholder_embedding
    from classlab.models.text import encode_texts

    garments = ["trouser", "sneaker"]
    torch.manual_seed(0)
    model = build_denoiser(denoiser_spec({**TINY, "condition": "minilm"}, ["red", "blue"], garments, [3, 8, 8]))
    enc = model.encoder
    # f(a, o) is the frozen MiniLM embedding of the phrase; an absent word drops out of the phrase
    expected = encode_texts(["blue sneaker", "sneaker", ""]).float()
    got = enc.features(torch.tensor([1, -1, -1]), torch.tensor([1, 1, -1]))
    assert torch.allclose(got, expected, atol=1e-5)
    assert model.pair_conditions().shape == (4, model.condition_dim)
    # with the placeholder's own input embedding, "red v trouser" is exactly the text tower's sentence;
    # a learned identifier changes it, and the gradient reaches the identifier
    identifier = minilm_placeholder_embedding().requires_grad_(True)
    same = minilm_identifier_features(["red v trouser"], identifier)
    assert torch.allclose(same, encode_texts(["red v trouser"]).float(), atol=1e-5)
    # (a random direction: the embedding LayerNorm makes a constant shift of the token vanish)
    moved = minilm_identifier_features(["red v trouser"],
                                       identifier.detach() + torch.randn(identifier.shape[0]) * identifier.detach().std())
    assert not torch.allclose(moved, same, atol=1e-3)
    same.sum().backward()
    assert identifier.grad is not None and identifier.grad.abs().sum() > 0


# --- diffusion_classifier -----------------------------------------------------------------------------

class RiggedDenoiser(torch.nn.Module):
    """Predicts the noise exactly when conditioned on the class whose template x0 is: x0 = template[c] gives
    eps_hat = (x_t - sqrt(abar) template[c]) / sqrt(1 - abar), the true eps for the right class only. It
    records every noised input it sees."""

    def __init__(self, templates, scheduler):
        super().__init__()
        self.templates, self.scheduler, self.seen = templates, scheduler, []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x_t, t, condition):
        self.seen.append((x_t.clone(), t.clone(), condition.argmax(1).clone()))
        abar = self.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        return (x_t - abar.sqrt() * self.templates[condition.argmax(1)]) / (1 - abar).sqrt()


def test_diffusion_classifier_picks_the_class_whose_condition_denoises_best_with_shared_draws():
    scheduler = build_scheduler({"num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02,
                                 "beta_schedule": "linear"})
    templates = torch.rand(5, 3, 4, 4) * 2 - 1
    model = RiggedDenoiser(templates, scheduler)
    timesteps = stratified_timesteps(100, 4)
    truth = torch.tensor([3, 0, 4])
    noise = shared_noise([10, 11, 12], 4, (3, 4, 4), seed=0)
    errors = class_errors(model, scheduler, templates[truth], torch.eye(5), timesteps, noise, batch_size=7)
    assert errors.shape == (3, 5, 4)
    assert torch.equal(predict(errors, uniform_weights(4)), truth)
    assert torch.allclose(errors[torch.arange(3), truth], torch.zeros(3, 4), atol=1e-8)
    # shared (t, eps): every candidate class saw the same noised images at the same timesteps
    x_all = torch.cat([s[0] for s in model.seen])
    t_all = torch.cat([s[1] for s in model.seen])
    c_all = torch.cat([s[2] for s in model.seen])
    per_image = x_all.view(3, 5 * 4, -1)
    for n in range(3):
        rows = per_image[n].view(5 * 4, -1)
        classes, times = c_all.view(3, 20)[n], t_all.view(3, 20)[n]
        for k in range(4):
            same_t = rows[times == timesteps[k]]
            assert same_t.shape[0] == 5 and sorted(classes[times == timesteps[k]].tolist()) == list(range(5))
            assert torch.allclose(same_t, same_t[0].expand_as(same_t))
    # an image's draws depend on its key only, not on the other images of the batch
    assert torch.equal(shared_noise([11], 4, (3, 4, 4), seed=0)[0], noise[1])
    assert not torch.equal(shared_noise([11], 4, (3, 4, 4), seed=1)[0], noise[1])


def test_timestep_sets_and_each_weighting_formula():
    assert stratified_timesteps(1000, 10).tolist() == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert stratified_timesteps(7, 7).tolist() == list(range(7))
    scheduler = build_scheduler({"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                                 "beta_schedule": "linear"})
    ts = torch.tensor([0, 10, 500, 999])
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    w = betas[ts] / (2 * (1 - betas[ts]) * (1 - abar[ts]))  # beta_t / (2 alpha_t (1 - abar_t))
    assert torch.allclose(elbo_weights(scheduler, ts).double(), w / w.mean(), rtol=2e-3)  # float32 abar near t = 0
    assert elbo_weights(scheduler, ts)[0] > elbo_weights(scheduler, ts)[-1]  # the ELBO stresses small t
    a = torch.tensor([0.5, -1.0, 0.25, 2.0])
    tau = torch.linspace(-1, 1, 5)
    assert torch.allclose(polynomial_weights(a, 5), torch.exp(0.5 - tau + 0.25 * tau ** 2 + 2 * tau ** 3))
    assert torch.allclose(polynomial_weights(a, 5, positive=False), 0.5 - tau + 0.25 * tau ** 2 + 2 * tau ** 3)
    errors = torch.tensor([[[1.0, 4.0], [2.0, 1.0]]])
    assert torch.allclose(weighted_scores(errors, torch.tensor([1.0, 1.0])), torch.tensor([[2.5, 1.5]]))
    assert torch.allclose(weighted_scores(errors, torch.tensor([2.0, 0.0])), torch.tensor([[1.0, 2.0]]))
    assert predict(errors, torch.tensor([1.0, 1.0])).item() == 1
    assert predict(errors, torch.tensor([2.0, 0.0])).item() == 0


def test_learned_weighting_moves_weight_to_the_informative_timestep():
    # timestep 0 separates the classes (the true class lowest); timestep 2 is large and misleading
    gen = torch.Generator().manual_seed(0)
    n, p = 60, 4
    labels = torch.randint(p, (n,), generator=gen)
    errors = torch.ones(n, p, 3)
    errors[:, :, 0] += 0.2 * torch.rand(n, p, generator=gen)
    errors[torch.arange(n), labels, 0] -= 0.3
    errors[:, :, 2] += 2.0 * torch.rand(n, p, generator=gen)
    uniform_acc = (predict(errors, uniform_weights(3)) == labels).float().mean()
    coefficients, weights = fit_timestep_weights(errors, labels, degree=3, steps=300, lr=0.05)
    learned_acc = (predict(errors, weights) == labels).float().mean()
    assert coefficients.shape == (4,) and bool((weights > 0).all())
    assert weights[0] > 5 * weights[2]
    assert learned_acc == 1.0 and uniform_acc < 0.8
    # with a selection set the best step is kept: never below the uniform start on that set
    _, kept = fit_timestep_weights(errors[:40], labels[:40], degree=3, steps=300, lr=0.05,
                                   select_errors=errors[40:], select_labels=labels[40:])
    select_uniform = (predict(errors[40:], uniform_weights(3)) == labels[40:]).float().mean()
    assert (predict(errors[40:], kept) == labels[40:]).float().mean() >= max(select_uniform, 0.95)
    _, start = fit_timestep_weights(errors, labels, degree=3, steps=0)
    assert torch.allclose(start, torch.full((3,), math.e))  # a = (1, 0, 0, 0): uniform weights e


# --- classdiffusion -------------------------------------------------------------------------------------

def test_classdiffusion_semantic_preservation_loss_by_hand_and_its_gradient_reaches_the_identifier_only():
    model = tiny_denoiser()
    hp = {"spl_weight": 1.0, "finetune": "condition_layers", "lr": 0.001, "optimizer": "adamw"}
    torch.manual_seed(5)
    learner = ClassDiffusion(model, hp, 12)
    learner.set_instance(2)
    enc = model.encoder
    personal, class_condition = learner.personal_and_class_conditions()
    v = learner.identifier.detach()
    by_hand_personal = enc.mlp(enc.object_embedding.weight[2] + v)           # E("V* c")
    by_hand_class = enc.mlp(enc.object_embedding.weight[2])                  # E("c")
    cos = (by_hand_personal @ by_hand_class) / (by_hand_personal.norm() * by_hand_class.norm())
    assert torch.allclose(personal[0], by_hand_personal, atol=1e-6)
    spl = semantic_preservation_loss(personal, class_condition)
    assert torch.allclose(spl, 1 - cos, atol=1e-6) and 0 < float(spl.detach()) < 2
    assert math.isclose(float(semantic_preservation_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))), 1.0)
    assert float(semantic_preservation_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]]))) < 1e-6
    # the identifier starts with the norm of a trained word; the encoder and the UNet body are frozen
    norms = torch.cat([enc.attribute_embedding.weight, enc.object_embedding.weight]).norm(dim=1)
    assert math.isclose(float(v.norm()), float(norms.mean()), rel_tol=1e-5)
    spl.backward()
    assert learner.identifier.grad is not None and float(learner.identifier.grad.norm()) > 0
    assert all(p.grad is None for p in enc.parameters())
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("time_emb_proj" in n for n in trained)
    # "<colour> V* <garment>" adds the colour word to the same sum
    f = learner.identifier_features(torch.tensor([0]), torch.tensor([2]))
    assert torch.allclose(f[0], enc.attribute_embedding.weight[0] + v + enc.object_embedding.weight[2], atol=1e-6)


def test_personalize_is_classdiffusion_without_the_loss():
    cls = get_method("generative", "personalize")
    assert issubclass(cls, ClassDiffusion)
    from classlab.config import method_defaults

    assert method_defaults("generative", "personalize")["spl_weight"] == 0
    assert method_defaults("generative", "classdiffusion")["spl_weight"] == 1.0
    model = tiny_denoiser()
    torch.manual_seed(5)
    plain = cls(model, {**method_defaults("generative", "personalize")}, 12)
    plain.set_instance(1)
    x0 = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.manual_seed(2)
    loss, logs = plain.training_step({"x": x0, "y": torch.zeros(3, dtype=torch.long)})
    assert torch.allclose(loss, logs["recon"]) and float(logs["spl"]) > 0
    for name in ("ddpm", "diffusion_classifier", "classdiffusion"):
        assert get_method("generative", name).name == name


# --- timestep counts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["num_train_timesteps", "timestep_samples", "sample_steps", "noise_per_timestep"])
@pytest.mark.parametrize("value", [0, -3, 1.5, True])
def test_a_timestep_count_below_one_is_refused_in_code_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        check_step_counts({key: value}, (key,))
    check_step_counts({key: 1}, (key,))


def test_classifier_refuses_more_timestep_samples_than_the_model_has():
    with pytest.raises(ConfigError, match="timestep_samples"):
        DiffusionClassifier(tiny_denoiser(), {"timestep_samples": 51}, 12)
    with pytest.raises(ConfigError, match="timestep_samples"):
        DiffusionClassifier(tiny_denoiser(), {"timestep_samples": 0}, 12)


# --- the protocols end to end on digits_pairs ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs_prepared(tmp_path_factory):
    raw = tmp_path_factory.mktemp("digits_pairs_raw")
    get_dataset("digits_pairs").download(raw)
    out = tmp_path_factory.mktemp("digits_pairs") / "prepared"
    prepare("digits_pairs", raw, out)
    return out


TINY_TRAIN = {"num_train_timesteps": 20, "block_out_channels": [8, 16], "norm_num_groups": 4, "epochs": 1,
              "sample_steps": 4, "val_images": 50}


@pytest.fixture(scope="module")
def trained(pairs_prepared, tmp_path_factory):
    from classlab.protocols.generative import train_diffusion

    out = tmp_path_factory.mktemp("ddpm")
    record = train_diffusion(pairs_prepared, 0, out, TINY_TRAIN, threads=1)
    return out, record


def test_train_diffusion_writes_a_weights_only_model_of_the_seen_pairs(trained, pairs_prepared, tmp_path):
    from classlab.protocols.generative import generate_samples

    out, record = trained
    blob = torch.load(out / "model.pt", weights_only=True)
    assert blob["kind"] == "generative/ddpm" and blob["meta"]["unseen"] and blob["meta"]["weights"] == "ema"
    assert sorted(blob["meta"]["seen"] + blob["meta"]["unseen"]) == list(range(40))
    assert (out / "history.json").exists() and not (out / "last.pt").exists()
    assert math.isfinite(record["val_loss"]) and record["train_steps"] >= 1
    info = generate_samples(out / "model.pt", tmp_path / "s.npz", 0, {"samples_per_pair": 1, "sample_steps": 3},
                            png_path=tmp_path / "s.png")
    import numpy as np

    samples = np.load(tmp_path / "s.npz")
    assert samples["images"].shape == (40, 1, 3, 8, 8) and samples["images"].dtype == np.uint8
    assert int(samples["unseen"].sum()) == len(blob["meta"]["unseen"]) and info["n_pairs"] == 40
    assert (tmp_path / "s.png").stat().st_size > 0
    # without overrides it samples as the model was trained to (sample_steps 4 of its 20 timesteps; the
    # YAML's 25 would exceed them), samples_per_pair included
    info = generate_samples(out / "model.pt", tmp_path / "d.npz", 0)
    assert info["samples_per_pair"] == blob["meta"]["hparams"]["samples_per_pair"]


@pytest.fixture(scope="module")
def classified(trained, pairs_prepared, tmp_path_factory):
    from classlab.protocols.generative import classify_compositions

    out, _ = trained
    target = tmp_path_factory.mktemp("classify")
    metrics = classify_compositions(out / "model.pt", pairs_prepared, 0, target,
                                    {"timestep_samples": 2, "eval_per_unseen_pair": 2, "eval_per_seen_pair": 1,
                                     "fit_per_pair": 1, "learned_steps": 5},
                                    threads=1)
    return target, metrics


@pytest.fixture(scope="module")
def personalised(trained, pairs_prepared, tmp_path_factory):
    from classlab.protocols.generative import personalize

    out, _ = trained
    small = {"finetune_steps": 3, "samples_per_colour": 2, "sample_steps": 2, "evaluator_epochs": 1,
             "evaluator_per_object": 20, "instance_screen_samples": 1}
    runs = {}
    for method in ("classdiffusion", "personalize"):
        target = tmp_path_factory.mktemp(method)
        runs[method] = (target, personalize(out / "model.pt", pairs_prepared, 0, target, small, method=method,
                                            threads=1))
    return runs


def test_classify_compositions_reports_every_weighting_and_chance(classified):
    target, m = classified
    assert m["chance_pair"] == 1 / 40 and m["candidates"] == 40 and m["n_test_images"] == 30 + 2 * 10
    for w in ("uniform", "learned", "elbo"):
        assert 0 <= m[f"accuracy_unseen_{w}"] <= 1 and f"object_accuracy_unseen_{w}" in m
    assert m["n_unseen_uniform"] == 2 * len(m["unseen_pairs"]) and (target / "errors.npz").exists()
    assert "disagreement_learned_vs_uniform" in m and (target / "metrics.json").exists()


def test_personalize_runs_both_variants_on_the_same_instance(personalised):
    with_spl, without = personalised["classdiffusion"][1], personalised["personalize"][1]
    assert with_spl["instance_index"] == without["instance_index"] and len(with_spl["instance_index"]) == 5
    assert with_spl["spl_weight"] == 1.0 and without["spl_weight"] == 0.0
    assert len(with_spl["composed_colours"]) == 3 and 0 <= with_spl["composition_accuracy"] <= 1
    assert with_spl["base_composition_accuracy"] == without["base_composition_accuracy"]  # same noise, same base
    assert with_spl["evaluator_colour_val_accuracy"] == 1.0  # pixel statistics name every real colour
    # the screen depends on the base model and the seed only: both arms read the same rates
    assert with_spl["instance_screen"] == without["instance_screen"] and len(with_spl["instance_screen"]) == 10
    assert with_spl["instance_screen_fallback"] == (not with_spl["eligible_garments"])


def test_aggregate_generative_tables_claims_and_personalised_figure(trained, classified, personalised, tmp_path):
    import pandas as pd

    from classlab.cli import main

    metrics = [str(classified[0] / "metrics.json")] + [str(personalised[m][0] / "metrics.json")
                                                      for m in ("classdiffusion", "personalize")]
    t = tmp_path / "tables"
    rc = main(["aggregate-generative", "--metrics", *metrics, "--histories", str(trained[0] / "history.json"),
               "--runs-csv", str(t / "runs.csv"), "--summary-csv", str(t / "summary.csv"), "--summary-md",
               str(t / "summary.md"), "--claims-csv", str(t / "claims.csv")])
    assert rc in (0, None)
    runs = pd.read_csv(t / "runs.csv")
    classification = runs[runs.scenario == "classification"].set_index("method")
    # one row per weighting, read from the run's own keys, and the chance row at 1 / 40 pairs
    for w in ("uniform", "learned", "elbo"):
        assert classification.loc[f"diffusion_classifier_{w}", "accuracy_unseen"] == \
            pytest.approx(classified[1][f"accuracy_unseen_{w}"])
    assert classification.loc["chance", "accuracy_unseen"] == pytest.approx(1 / 40)
    assert set(runs[runs.scenario == "personalisation"].method) == {"classdiffusion", "personalize"}
    assert runs[runs.scenario == "ddpm"].val_loss.iloc[0] == pytest.approx(trained[1]["val_loss"])
    claims = pd.read_csv(t / "claims.csv")
    assert len(claims) == 4 and (claims.n_seeds == 1).all()  # every claim of config/claims/generative.yaml
    above = claims[claims.baseline == "chance"].iloc[0]
    assert above.effect == pytest.approx(classified[1]["accuracy_unseen_uniform"] - 1 / 40)
    assert "held-out pairs" in (t / "summary.md").read_text()
    rc = main(["plot-personalised", "--metrics", *metrics[1:], "--samples",
               *[str(personalised[m][0] / "samples.npz") for m in ("classdiffusion", "personalize")],
               "--figure", str(tmp_path / "p.png")])
    assert rc in (0, None) and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_instance_screen_keeps_the_garments_the_base_model_composes(monkeypatch):
    """screen_garments reads the base model's samples of every pair with the evaluator: here garment 1 is
    always misread, so its rate is 0 and the others' 1; with no samples every garment is eligible."""
    import classlab.methods.generative.ddpm as ddpm_module
    from classlab.protocols.generative import screen_garments

    palette = torch.tensor([[255, 0, 0], [0, 0, 255]])

    class Encoder:
        def features(self, a, o):
            return torch.stack([a, o], dim=1).float()

    class Base:
        num_attributes, num_objects, encoder = 2, 3, Encoder()

    def fake_samples(base, features, steps, scale, generator, eta=1.0):
        a, o = features[:, 0].long(), features[:, 1].long()
        images = palette[a].float().view(-1, 3, 1, 1).expand(-1, 3, 8, 8).clone()
        images[:, 0, 0, 0] = 10.0 * torch.where(o == 1, (o + 1) % 3, o)  # dark: outside the colour read
        return images / 127.5 - 1.0

    class Evaluator:
        def garment_of(self, images):
            return (images[:, 0, 0, 0].float() / 10.0).round().long()

    monkeypatch.setattr(ddpm_module, "sample_images", fake_samples)
    rates = screen_garments(Base(), Evaluator(), palette, 3, 4, 4.0, 1.0, torch.Generator().manual_seed(0))
    assert rates == [1.0, 0.0, 1.0]
    assert screen_garments(Base(), Evaluator(), palette, 0, 4, 4.0, 1.0, torch.Generator()) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("call, key", [("train", "num_train_timesteps"), ("classify", "timestep_samples"),
                                       ("samples", "sample_steps"), ("personalize", "sample_steps")])
def test_a_timestep_count_below_one_is_rejected_and_nothing_is_written(call, key, trained, pairs_prepared, tmp_path):
    from classlab.protocols import generative

    out, _ = trained
    target = tmp_path / "never"
    with pytest.raises(ConfigError, match=key):
        if call == "train":
            generative.train_diffusion(pairs_prepared, 0, target, {**TINY_TRAIN, key: 0})
        elif call == "classify":
            generative.classify_compositions(out / "model.pt", pairs_prepared, 0, target, {key: 0})
        elif call == "samples":
            generative.generate_samples(out / "model.pt", target / "s.npz", 0, {key: 0}, png_path=target / "s.png")
        else:
            generative.personalize(out / "model.pt", pairs_prepared, 0, target, {key: 0})
    assert not target.exists()
