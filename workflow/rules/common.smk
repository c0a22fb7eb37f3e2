# Config validation, the experiment grid, and path helpers (no lambdas in rules).
import json

from classlab.config import ConfigError, validate_config
from classlab.workflow import ensure_cli_on_path

try:
    validate_config(config)
except ConfigError as exc:
    # Fails at parse time: no job starts and nothing under results/ is touched.
    raise WorkflowError(str(exc))


ensure_cli_on_path()


DATASETS = config["datasets"]
SEEDS = [str(s) for s in config["seeds"]]
BACKBONES = config["backbones"]
PRETRAIN = config["pretrain"]["method"]
FAMILIES = config["families"]
ENV = "../../environment.yml"


def _alternatives(values):
    return "|".join(sorted(str(v) for v in values))


wildcard_constraints:
    dataset=_alternatives(DATASETS),
    seed=_alternatives(SEEDS),
    backbone=_alternatives(BACKBONES),
    pretrain=_alternatives([PRETRAIN]),


def family_methods(family):
    return FAMILIES.get(family, {}).get("methods", [])


def method_overrides(family, method):
    """JSON of the config's hyperparameter overrides: a params value, so edits trigger reruns."""
    return json.dumps(FAMILIES[family].get("overrides", {}).get(method, {}), sort_keys=True)


def backbone_kwargs_json(wildcards):
    return json.dumps(config["backbone_kwargs"].get(wildcards.backbone, {}), sort_keys=True)


def pretrain_overrides_json(wildcards):
    return json.dumps(config["pretrain"]["overrides"], sort_keys=True)


def mirror_option(wildcards):
    mirror = config["mirrors"].get(wildcards.dataset)
    return f"--mirror {mirror}" if mirror else ""


def pretrained_flag(wildcards):
    return "--pretrained-weights" if config["pretrained_weights"] else ""


def pretrained_backbone(wildcards):
    # DVC-tracked checkpoints: ancient() so that a `dvc pull` (fresh mtimes) retrains nothing
    return ancient(
        f"results/checkpoints/pretrain/{wildcards.dataset}/{wildcards.backbone}/{PRETRAIN}/seed{wildcards.seed}/model.pt"
    )


def all_targets():
    targets = ["results/claims.csv"]
    for family in FAMILIES:
        targets += [f"results/tables/{family}/summary.md", f"results/tables/{family}/summary.csv"]
        targets += expand(
            "results/figures/{family}/{dataset}/{backbone}/{name}.png",
            family=family,
            dataset=DATASETS,
            backbone=BACKBONES,
            name=FIGURES,
        )
    return targets


FIGURES = ["learning_curves", "accuracy_by_method", "reliability", "confusion"]


# --- family `supervised` -------------------------------------------------------------------


def supervised_overrides(wildcards):
    return method_overrides("supervised", wildcards.sup_method)


def supervised_runs(kind, dataset=None, backbone=None):
    """Per-run files of the family: metrics.json, predictions.npz (results/eval) or history.json
    (results/checkpoints)."""
    pattern = {
        "history.json": "results/checkpoints/supervised/{dataset}/{backbone}/{method}/seed{seed}/history.json",
        "metrics.json": "results/eval/supervised/{dataset}/{backbone}/{method}/seed{seed}/metrics.json",
        "predictions.npz": "results/eval/supervised/{dataset}/{backbone}/{method}/seed{seed}/predictions.npz",
    }[kind]
    return expand(
        pattern,
        dataset=[dataset] if dataset else DATASETS,
        backbone=[backbone] if backbone else BACKBONES,
        method=family_methods("supervised"),
        seed=SEEDS,
    )


def supervised_figure_inputs(wildcards):
    return {
        "metrics": supervised_runs("metrics.json", wildcards.dataset, wildcards.backbone),
        "predictions": supervised_runs("predictions.npz", wildcards.dataset, wildcards.backbone),
        "histories": supervised_runs("history.json", wildcards.dataset, wildcards.backbone),
    }
