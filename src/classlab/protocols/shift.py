"""The shift family's protocols: DomainBed's domain generalisation, and online test-time adaptation.

**Domain generalisation** (Gulrajani and Lopez-Paz, "In Search of Lost Domain Generalization",
ICLR 2021). One job is one (domain suite, test domain, method, trial):

- each environment is split into "in" (80%) and "out" (20%) by the trial's seed
  (``classlab.data.domains.in_out_split``);
- for each of ``n_draws`` hyperparameter draws (``classlab.config.draw_hparams``: draw 0 is the
  paper's defaults, the rest are sampled from the method's ``search:`` distributions with a seed
  of (method, draw, trial)), a fresh model trains on the "in" parts of every environment but the
  test one, through the engine's loop, each step one equal minibatch per training environment;
- after training, accuracy on every environment's "in" and "out" parts is recorded with the
  draw's hyperparameters. Nothing is selected here: ``records.json`` holds every draw, and the
  report selects afterwards (``select_draws``), by training-domain validation (mean "out"
  accuracy over the training environments) or, reported apart, by the oracle (the test
  environment's "out" accuracy). Either way the reported number is the test environment's "in"
  accuracy of the selected draw, as DomainBed reports it.

Each draw's record is written as soon as it is done, with the fingerprint of its computation; a
killed job resumes at the first draw without a matching record (and inside a draw at the
engine's last epoch checkpoint).

**Test-time adaptation** (TENT's protocol, Wang et al. ICLR 2021). One job is one (source model,
method, seed). The source is a classifier of the supervised family (its ``model.pt``); CAFA also
reads the source model's class-conditional feature statistics (``source_statistics``, their own
DAG node). For every (corruption, severity) of the grid, a stream is built by code
(``classlab.data.corruptions``) from a seeded, class-balanced subset of the test split in a
seeded order, the same images in the same order for every method; the method is reset to the
source model and meets the stream batch by batch, online: each batch is predicted by the forward
pass its one adaptation step uses (``TestTimeMethod.forward_and_adapt``), and the stream's
accuracy is the fraction of those predictions that are right. Nothing is chosen on the test
split: each method runs at its paper's settings.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, draw_hparams
from classlab.data.domains import DomainError, in_out_split, load_domains
from classlab.engine import Trainer, TrainConfig, predict_logits
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import file_digest, make_fingerprint
from classlab.io import read_json, write_json
from classlab.methods.registry import get_method
from classlab.models import build_classifier
from classlab.provenance import run_provenance

DG_KIND = "domain_generalization"


def _check_method(method: str, kind: str):
    cls = get_method("shift", method)
    if kind not in cls.scenario_kinds:
        raise ConfigError(f"method: shift/{method} runs on {list(cls.scenario_kinds)}, not {kind!r}")
    return cls


def run_domain_generalization(method: str, domains_dir: Path, test_domain: str, backbone: str, trial: int,
                              n_draws: int, out: Path, work_dir: Path, overrides: dict | None = None,
                              backbone_kwargs: dict | None = None, threads: int | None = None,
                              device: str | None = None, progress: bool = False) -> dict:
    """Train and evaluate ``n_draws`` draws of ``method``; write ``out`` (records.json)."""
    if not isinstance(n_draws, int) or n_draws < 1:
        raise ConfigError(f"n_draws: {n_draws!r}; the sweep needs at least one draw")
    set_threads(threads)
    cls = _check_method(method, DG_KIND)
    domains = load_domains(Path(domains_dir))
    test_index = domains.index_of(test_domain)
    train_envs = [k for k in range(len(domains.names)) if k != test_index]
    ins, outs = in_out_split(domains, trial)
    dev = pick_device(device)
    mean, std = domains.manifest["channel_mean"], domains.manifest["channel_std"]
    data_id = file_digest(Path(domains_dir) / "manifest.json")
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for draw in range(n_draws):
        hp = draw_hparams("shift", method, draw, trial, overrides)
        seed = int(trial) * 1000 + draw
        fingerprint = make_fingerprint(protocol=DG_KIND, method=method, hparams=hp, data=data_id,
                                       test_domain=test_domain, backbone=backbone,
                                       backbone_kwargs=backbone_kwargs or {}, seed=seed)
        record_path = work_dir / f"draw{draw}.json"
        if record_path.exists():
            saved = read_json(record_path)
            if saved.get("fingerprint") == fingerprint:
                records.append(saved)
                continue
            record_path.unlink()
        records.append(_run_draw(cls, method, hp, draw, seed, fingerprint, domains, train_envs, ins, outs, backbone,
                                 backbone_kwargs, mean, std, dev, work_dir, progress))
        write_json(record_path, records[-1])
    result = {"method": method, "trial": int(trial), "test_domain": test_domain,
              "train_domains": [domains.names[k] for k in train_envs], "domains": domains.names,
              "suite": domains.manifest["kind"], "dataset": domains.manifest.get("dataset", ""),
              "backbone": backbone, "n_draws": n_draws, "draws": records, "provenance": run_provenance()}
    write_json(out, result)
    return result


def _run_draw(cls, method, hp, draw, seed, fingerprint, domains, train_envs, ins, outs, backbone, backbone_kwargs,
              mean, std, dev, work_dir: Path, progress: bool) -> dict:
    t0 = time.perf_counter()
    seed_everything(seed)
    model = build_classifier(backbone, domains.manifest["in_chans"], domains.num_classes,
                             img_size=int(domains.manifest["img_size"][0]), backbone_kwargs=backbone_kwargs)
    # DomainBed fixes the number of steps, not epochs: whole passes over the first training domain's
    # "in" part (the mixed loader's epoch) until at least `steps` optimizer steps
    per_epoch = max(1, len(ins[train_envs[0]]) // int(hp["batch_size"]))
    hp = {**hp, "epochs": max(1, -(-int(hp.get("steps", per_epoch)) // per_epoch))}
    learner = cls(model, hp, domains.num_classes)
    learner.num_domains = len(train_envs)
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, seed, work_dir / f"draw{draw}_last.pt", progress,
                      fingerprint=fingerprint)
    sources = {domains.names[k]: torch.from_numpy(ins[k]) for k in train_envs}
    loader = trainer.make_mixed_loader(domains.x, domains.y, mean, std, sources)
    history = trainer.fit(loader)
    accs = {}
    learner.eval()
    for k, name in enumerate(domains.names):
        for part, pos in (("in", ins[k]), ("out", outs[k])):
            idx = torch.from_numpy(pos)
            logits = predict_logits(learner, domains.x[idx], mean, std, dev)
            accs[f"{name}_{part}"] = float((logits.argmax(1) == domains.y[idx]).float().mean())
    (work_dir / f"draw{draw}_last.pt").unlink(missing_ok=True)
    final = history[-1] if history else {}
    return {"draw": draw, "seed": seed, "hparams": hp, "epochs": hp["epochs"], "accuracy": accs, "train_steps": int(trainer.steps_done),
            "train_loss": final.get("loss"), "seconds": time.perf_counter() - t0, "fingerprint": fingerprint}


# --- model selection (DomainBed) ---------------------------------------------------------------

SELECTIONS = ("training_domain", "oracle")


def select_draws(result: dict) -> dict:
    """For one job's records: the selected draw and its test-domain "in" accuracy, per selection.

    training_domain: argmax over draws of the mean "out" accuracy of the training environments;
    oracle: argmax of the test environment's "out" accuracy. Ties go to the earlier draw."""
    test = result["test_domain"]
    out = {}
    for selection in SELECTIONS:
        def score(rec):
            acc = rec["accuracy"]
            if selection == "oracle":
                return acc[f"{test}_out"]
            return float(np.mean([acc[f"{d}_out"] for d in result["train_domains"]]))
        best = max(result["draws"], key=lambda rec: (score(rec), -rec["draw"]))
        out[selection] = {"draw": best["draw"], "val_acc": score(best), "test_acc": best["accuracy"][f"{test}_in"],
                          "train_steps": best["train_steps"], "hparams": best["hparams"]}
    return out


# --- test-time adaptation --------------------------------------------------------------------

TTA_KIND = "test_time"


def stream_seed(seed: int, corruption: str, severity: int) -> int:
    """The corruption noise of one stream: the same for every method, different per stream."""
    from classlab.data.corruptions import CORRUPTIONS
    from classlab.data.loader import mix_seed

    return mix_seed(int(seed), sorted(CORRUPTIONS).index(corruption), int(severity), 4)


def compute_source_statistics_file(checkpoint: Path, data_dir: Path, out: Path, per_class: int = 0,
                                   eps: float | None = None, threads: int | None = None,
                                   device: str | None = None) -> dict:
    """The source model's class-conditional feature statistics on its dataset's train split (or a
    seeded ``per_class`` subset of it), written to ``out``."""
    from classlab.data.prepare import load_prepared
    from classlab.data.scenarios import test_subset
    from classlab.methods.source_stats import DEFAULT_EPS, save_source_statistics, source_statistics
    from classlab.train import load_model

    set_threads(threads)
    model, meta = load_model(checkpoint)
    data = load_prepared(Path(data_dir))
    if int(meta["num_classes"]) != data.num_classes:
        raise ConfigError(f"source model {checkpoint}: {meta['num_classes']} classes, dataset {data_dir}: "
                          f"{data.num_classes}")
    x, y = data.train.x, data.train.y
    if per_class:
        idx = torch.tensor(test_subset(y.numpy(), data.num_classes, per_class, 0))
        x, y = x[idx], y[idx]
    stats = source_statistics(model, x, y, data.num_classes, data.manifest["channel_mean"],
                              data.manifest["channel_std"], pick_device(device),
                              eps=DEFAULT_EPS if eps is None else eps)
    meta_out = {"checkpoint": str(checkpoint), "checkpoint_sha256": file_digest(checkpoint),
                "dataset": data.manifest["dataset"], "samples": int(len(y)), "split": "train"}
    save_source_statistics(out, stats, meta_out)
    return meta_out


def run_test_time(method: str, checkpoint: Path, data_dir: Path, seed: int, streams: list[tuple[str, int]],
                  out: Path, test_per_class: int, batch_size: int, source_stats: Path | None = None,
                  overrides: dict | None = None, threads: int | None = None, device: str | None = None) -> dict:
    """Accuracy of ``method`` over each corrupted stream; writes ``out`` (metrics.json)."""
    from classlab.config import resolve_hparams
    from classlab.data.corruptions import check_corruption, corrupt
    from classlab.data.prepare import load_prepared
    from classlab.data.scenarios import test_subset
    from classlab.methods.source_stats import load_source_statistics
    from classlab.train import load_model

    for name, severity in streams:
        try:
            check_corruption(name, severity)
        except ValueError as exc:
            raise ConfigError(f"streams: {exc}") from None
    if batch_size < 1 or test_per_class < 1:
        raise ConfigError(f"batch_size {batch_size} and test_samples_per_class {test_per_class} must be >= 1")
    set_threads(threads)
    seed_everything(seed)
    cls = _check_method(method, TTA_KIND)
    hp = resolve_hparams("shift", method, overrides)
    data = load_prepared(Path(data_dir))
    model, meta = load_model(checkpoint)
    if int(meta["num_classes"]) != data.num_classes:
        raise ConfigError(f"source model {checkpoint}: {meta['num_classes']} classes, dataset {data_dir}: "
                          f"{data.num_classes}")
    stats = load_source_statistics(source_stats)[0] if source_stats else None
    dev = pick_device(device)
    learner = cls(model.to(dev), hp, data.num_classes,
                  source_stats={k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in stats.items()}
                  if stats else None)
    mean = torch.tensor(data.manifest["channel_mean"], device=dev).view(1, -1, 1, 1)
    std = torch.tensor(data.manifest["channel_std"], device=dev).view(1, -1, 1, 1)
    idx = torch.tensor(test_subset(data.test.y.numpy(), data.num_classes, test_per_class, seed))
    order = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(int(seed) + 77))]
    x_clean, y = data.test.x[order], data.test.y[order]
    results, seen, seconds = [], 0, 0.0
    for name, severity in [("clean", 0)] + list(streams):
        x = x_clean if name == "clean" else corrupt(x_clean, name, severity, stream_seed(seed, name, severity))
        learner.reset()
        correct = 0
        t0 = time.perf_counter()
        for start in range(0, len(y), batch_size):
            xb = (x[start:start + batch_size].to(dev).float() / 255 - mean) / std
            logits = learner.forward_and_adapt(xb)
            correct += int((logits.argmax(1).cpu() == y[start:start + batch_size]).sum())
        seconds += time.perf_counter() - t0
        seen += len(y)
        results.append({"corruption": name, "severity": int(severity), "accuracy": correct / len(y), "images": len(y)})
    corrupted = [r["accuracy"] for r in results if r["corruption"] != "clean"]
    metrics = {"family": "shift", "protocol": TTA_KIND, "method": method, "seed": int(seed),
               "dataset": data.manifest["dataset"], "backbone": meta["backbone"],
               "source": f"{meta.get('family', '')}/{meta.get('method', '')}", "source_checkpoint": str(checkpoint),
               "hparams": hp, "batch_size": int(batch_size), "stream_length": int(len(y)), "streams": results,
               "mean_corrupted_accuracy": float(np.mean(corrupted)) if corrupted else None,
               "images_per_s": seen / max(seconds, 1e-9), "provenance": run_provenance()}
    write_json(out, metrics)
    return metrics


__all__ = ["run_domain_generalization", "select_draws", "SELECTIONS", "DG_KIND", "DomainError", "run_test_time",
           "compute_source_statistics_file", "TTA_KIND"]
