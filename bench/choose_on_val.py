"""``make choices``: re-measure, on the validation split, the settings the README reports choosing.

Each choice is a pair of settings of one run, trained over seeds 0, 1, 2 with everything else
equal; the score is read on the validation split that ``prepare`` holds out from train (the
test split is never read here). Prints one JSON line per choice (the per-seed scores of both
settings, the mean paired difference with its 95% t-interval, and which setting the
validation split prefers) and writes them to ``results/choices/choices.jsonl``.

- ``pretrain_epochs``: the shared supervised pretraining at 5 epochs (the default) vs 4;
  score: the pretrained model's own ``val_top1``.
- ``head_init``: ``erm`` fine-tuned from the 5-epoch backbone with the pretraining head
  (``auto``, the default) vs a fresh head; score: ``val_top1``.
- ``slca_freeze_bn_stats``, ``ovor_augment_pad``, ``prd_prototypes_lr``: the three
  incremental options first chosen on the test split, on the scenarios of
  ``config/incremental_cpu.yaml``; score: ``val_last_accuracy`` (the validation split's seen
  classes after the last task).
- ``happy_lr_incremental``, ``simgcd_continual_lr_incremental``: the learning rate of the continual
  stages for each arm of the Happy claim, on ``config/discovery_cpu.yaml``'s ``fmnist_continual``
  split: 0.005 (the YAML) vs 0.01 (Happy's paper: a tenth of stage 0's rate); score:
  ``val_acc_all`` (clustering accuracy of the validation split's samples after the last stage,
  one Hungarian matching).
- ``recipe_erm_lr``, ``noprop_lr``, ``noprop_lr_high``: the from-scratch learning rates of the recipes grid
  (``config/recipes_cpu.yaml``'s settings: 300 images per class, 6 epochs). erm: 0.01 (its YAML,
  a fine-tuning rate) vs 0.05 (He et al.'s from-scratch 0.1 at batch 128, scaled to batch 64; the
  distillation students of the same grid use it); NoProp, its backprop twin and its backprop
  baseline of the same size (``noprop_blocks_ce``), each on its own: AdamW at 1e-3 (the paper) vs
  3e-3, then 3e-3 vs 1e-2 (``noprop_lr_high``, NoProp and the baseline); score: ``val_top1``.

Runs are cached under ``results/choices/``: a rerun skips what is done. ``CHOICES=a,b`` runs
only those choices, ``CHOICE_SEEDS`` sets the seeds, ``CHOICE_THREADS`` the threads per job.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "choices"
DATA = ROOT / "data" / "prepared" / "fashion_mnist"
SEEDS = [int(s) for s in os.environ.get("CHOICE_SEEDS", "0,1,2").split(",")]
ONLY = set(filter(None, os.environ.get("CHOICES", "").split(",")))
THREADS = os.environ.get("CHOICE_THREADS", "2")  # threads per training job


def _config(name: str) -> dict:
    return yaml.safe_load((ROOT / "config" / name).read_text())


def cli(*args: str, log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        # training commands (train, train-incremental, train-discovery) take threads and a progress switch
        extra = ["--threads", THREADS, "--no-progress"] if args[0].startswith("train") else []
        subprocess.run([sys.executable, "-m", "classlab.cli", *args, *extra], check=True, stdout=fh, stderr=fh, cwd=ROOT)


def convnet() -> str:
    return json.dumps(_config("config.yaml")["backbone_kwargs"]["convnet"])


def supervised_model(name: str, seed: int, overrides: dict, family: str = "pretrain", method: str = "supervised",
                     init: Path | None = None, dag_model: Path | None = None) -> dict:
    """Train (unless done) and evaluate one run. ``dag_model``: the default DAG's model.pt of the very
    same computation; where `make run` has made it, it is evaluated instead of trained again."""
    out = OUT / name / f"seed{seed}"
    if dag_model is not None and dag_model.exists() and not (out / "model.pt").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.pt").symlink_to(dag_model.resolve())
    if not (out / "model.pt").exists():
        args = ["train", "--family", family, "--method", method, "--data", str(DATA), "--backbone", "convnet",
                "--backbone-kwargs", convnet(), "--seed", str(seed), "--out-dir", str(out),
                "--overrides", json.dumps(overrides)]
        cli(*args, *(["--init", str(init)] if init else []), log=out / "train.log")
    if not (out / "eval" / "metrics.json").exists():
        cli("evaluate", "--model", str(out / "model.pt"), "--data", str(DATA), "--out-dir", str(out / "eval"),
            log=out / "eval.log")
    return json.loads((out / "eval" / "metrics.json").read_text())


def pretrain_on_classes(out: Path, backbone: str, kwargs: str, seed: int, overrides: dict, classes_flag: str,
                        classes_from: Path) -> Path:
    """Supervised pretraining on the classes a scenario's first task or a split's labelled set names
    (``classes_flag``: ``--classes-from-scenario`` or ``--classes-from-split``), unless done."""
    if not (out / "model.pt").exists():
        cli("train", "--family", "pretrain", "--method", "supervised", "--data", str(DATA), "--backbone", backbone,
            "--backbone-kwargs", kwargs, "--seed", str(seed), "--out-dir", str(out),
            "--overrides", json.dumps(overrides, sort_keys=True), classes_flag, str(classes_from), log=out / "train.log")
    return out / "model.pt"


def protocol_run(family: str, run: Path, method: str, protocol: tuple[str, Path], backbone: str, kwargs: str,
                 seed: int, overrides: dict, init: list[str]) -> dict:
    """Train one run of a protocol family and evaluate it, unless done (``protocol``: the scenario or
    split option and its file); returns its metrics.json."""
    if not (run / "metrics.json").exists():
        flag, path = protocol
        cli(f"train-{family}", "--method", method, "--data", str(DATA), flag, str(path), "--backbone", backbone,
            "--backbone-kwargs", kwargs, "--seed", str(seed), "--ckpt-dir", str(run / "ck"), "--eval-dir", str(run / "ev"),
            "--overrides", json.dumps(overrides), *init, log=run / "train.log")
        cli(f"evaluate-{family}", "--predictions", str(run / "ev" / "predictions.npz"), "--history",
            str(run / "ck" / "history.json"), flag, str(path), "--out", str(run / "metrics.json"), log=run / "eval.log")
    return json.loads((run / "metrics.json").read_text())


def incremental_run(name: str, seed: int, scenario: str, method: str, overrides: dict) -> dict:
    """One run of ``config/incremental_cpu.yaml``'s scenario, on the backbone the method pins (OVOR's
    prompts need the ViT) or the ConvNet, from that backbone's first-task pretraining as the DAG does."""
    from classlab.config import resolve_hparams, supervised_pretrain_overrides

    cfg = _config("incremental_cpu.yaml")
    spec = dict(cfg["families"]["incremental"]["scenarios"][scenario])
    merged = dict(cfg["families"]["incremental"].get("overrides", {}).get(method, {}), **overrides)
    backbone = resolve_hparams("incremental", method, merged).get("backbone") or "convnet"
    kwargs = json.dumps(cfg["backbone_kwargs"].get(backbone, {}), sort_keys=True)
    base = OUT / "incremental" / scenario / f"seed{seed}"
    scen = base / "scenario.json"
    if not scen.exists():
        cli("build-scenario", "--data", str(DATA), "--params", json.dumps(spec),
            "--seed", str(seed), "--out", str(scen), log=base / "scenario.log")
    init = []
    if spec["init"] != "scratch":
        pre = base / ("pretrain_first_task" if backbone == "convnet" else f"pretrain_first_task_{backbone}")
        init = ["--init", str(pretrain_on_classes(pre, backbone, kwargs, seed, supervised_pretrain_overrides(cfg, backbone),
                                                  "--classes-from-scenario", scen))]
    return protocol_run("incremental", base / name, method, ("--scenario", scen), backbone, kwargs, seed, merged, init)


def discovery_run(name: str, seed: int, split: str, method: str, overrides: dict) -> dict:
    """One run of ``config/discovery_cpu.yaml``'s split from the init it names (the SimCLR node or the
    split's known-class supervised model), as the DAG builds it."""
    from classlab.config import resolve_hparams, supervised_pretrain_overrides

    cfg = _config("discovery_cpu.yaml")
    disc = cfg["families"]["discovery"]
    spec = disc["splits"][split]
    merged = dict(disc.get("overrides", {}).get(method, {}), **overrides)
    backbone = (resolve_hparams("discovery", method, merged).get("backbone")
                or disc.get("backbones", {}).get(split, cfg["backbones"])[0])
    kwargs = json.dumps(cfg["backbone_kwargs"].get(backbone, {}), sort_keys=True)
    base = OUT / "discovery" / split / f"seed{seed}"
    split_json = base / "split.json"
    if not split_json.exists():
        cli("build-discovery-split", "--data", str(DATA), "--params", json.dumps(dict(spec, name=split), sort_keys=True),
            "--seed", str(seed), "--out", str(split_json), log=base / "split.log")
    init = []
    if spec["init"] == "simclr":  # the shared no-label node: one per seed, as in the DAG
        pre = OUT / "discovery" / "pretrain_simclr" / backbone / f"seed{seed}"
        if not (pre / "model.pt").exists():
            cli("train", "--family", "pretrain", "--method", "simclr", "--data", str(DATA), "--backbone", backbone,
                "--backbone-kwargs", kwargs, "--seed", str(seed), "--out-dir", str(pre),
                "--overrides", json.dumps(cfg["pretrain"]["others"]["simclr"], sort_keys=True), log=pre / "train.log")
        init = ["--init", str(pre / "model.pt")]
    elif spec["init"] == "supervised_known":
        known = supervised_pretrain_overrides(cfg, backbone, disc.get("pretrain_known"))
        init = ["--init", str(pretrain_on_classes(base / f"pretrain_known_{backbone}", backbone, kwargs, seed, known,
                                                  "--classes-from-split", split_json))]
    return protocol_run("discovery", base / name, method, ("--split", split_json), backbone, kwargs, seed, merged, init)


def compare(choice: str, default: str, alternative: str, score, metric: str) -> dict:
    a = np.array([score(default, s)[metric] for s in SEEDS])
    b = np.array([score(alternative, s)[metric] for s in SEEDS])
    d = a - b
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    lo, hi = d.mean() - half, d.mean() + half
    verdict = ("keeps the default" if lo > 0 else "prefers the alternative" if hi < 0 else "inconclusive")
    row = {"choice": choice, "metric": metric, "seeds": SEEDS, "default": default, "alternative": alternative,
           "default_scores": a.round(4).tolist(), "alternative_scores": b.round(4).tolist(),
           "mean_difference": round(float(d.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
           "validation": verdict}
    print(json.dumps(row), flush=True)
    with open(OUT / "choices.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if not (DATA / "manifest.json").exists():
        sys.exit(f"{DATA} is not prepared: run `make run` (or snakemake data/prepared/fashion_mnist/manifest.json)")
    pre = _config("config.yaml")["pretrain"]["overrides"]
    epochs5 = dict(pre)  # the default node's settings (5 epochs from the method YAML)

    dag = ROOT / "results" / "checkpoints"

    def pretrain(setting: str, seed: int) -> dict:
        default = dag / "pretrain" / "fashion_mnist" / "convnet" / "supervised" / f"seed{seed}" / "model.pt"
        return supervised_model(f"pretrain_{setting}", seed, dict(epochs5, **({"epochs": 4} if setting == "4ep" else {})),
                                dag_model=default if setting == "5ep" else None)

    def erm(setting: str, seed: int) -> dict:
        init = OUT / "pretrain_5ep" / f"seed{seed}" / "model.pt"
        pretrain("5ep", seed)
        default = dag / "supervised" / "fashion_mnist" / "convnet" / "erm" / f"seed{seed}" / "model.pt"
        return supervised_model(f"erm_head_{setting}", seed, {"head_init": setting}, "supervised", "erm", init,
                                dag_model=default if setting == "auto" else None)

    recipes = _config("recipes_cpu.yaml")["families"]["supervised"]["overrides"]

    def recipe(method: str, lr: float, seed: int) -> dict:
        return supervised_model(f"recipe_{method}_lr{lr:g}", seed, dict(recipes[method], lr=lr), "supervised", method)

    def noprop_lr(method: str):
        return lambda setting, seed: recipe(method, float(setting[2:]), seed)

    choices = {
        "pretrain_epochs": lambda: compare("pretrain_epochs", "5ep", "4ep", pretrain, "val_top1"),
        "head_init": lambda: compare("head_init", "auto", "fresh", erm, "val_top1"),
        "slca_freeze_bn_stats": lambda: compare(
            "slca_freeze_bn_stats", "frozen", "updated",
            lambda s, seed: incremental_run(f"slca_{s}", seed, "b4inc2_small", "slca",
                                            {"freeze_bn_stats": s == "frozen"}), "val_last_accuracy"),
        "ovor_augment_pad": lambda: compare(
            "ovor_augment_pad", "pad0", "pad2",
            lambda s, seed: incremental_run(f"ovor_{s}", seed, "b4inc2_small", "ovor",
                                            {"augment_pad": int(s[-1])}), "val_last_accuracy"),
        "prd_prototypes_lr": lambda: compare(
            "prd_prototypes_lr", "lr0.1", "lr0.01",
            lambda s, seed: incremental_run(f"prd_{s}", seed, "b0inc2_small", "prd",
                                            {"prototypes_lr": float(s[2:])}), "val_last_accuracy"),
        "recipe_erm_lr": lambda: compare("recipe_erm_lr", "lr0.01", "lr0.05",
                                         lambda s, seed: recipe("erm", float(s[2:]), seed), "val_top1"),
        # the paper's 1e-3 against 3e-3, then 3e-3 (chosen by the first) against 1e-2, for NoProp and both
        # of its backprop baselines (each arm of the claim gets its own validated rate)
        "noprop_lr": lambda: [compare(f"{method}_lr", "lr0.001", "lr0.003", noprop_lr(method), "val_top1")
                              for method in ("noprop", "noprop_backprop", "noprop_blocks_ce")],
        "noprop_lr_high": lambda: [compare(f"{method}_lr_high", "lr0.003", "lr0.01", noprop_lr(method), "val_top1")
                                   for method in ("noprop", "noprop_blocks_ce")],
    }
    for method in ("happy", "simgcd_continual"):  # each arm of the Happy claim gets its own validated rate
        choices[f"{method}_lr_incremental"] = lambda method=method: compare(
            f"{method}_lr_incremental", "lr0.005", "lr0.01",
            lambda s, seed: discovery_run(f"{method}_{s}", seed, "fmnist_continual", method,
                                          {"lr_incremental": float(s[2:])}), "val_acc_all")
    for name, run in choices.items():
        if not ONLY or name in ONLY:
            run()


if __name__ == "__main__":
    main()
