# Config validation, the experiment grid, and path helpers (no lambdas in rules).
import json
from pathlib import Path

from classlab.config import ConfigError, resolve_hparams, supervised_pretrain_overrides, validate_config_cached
from classlab.workflow import ensure_cli_on_path

try:
    # skipped when the config and everything validation reads are unchanged since it last passed
    validate_config_cached(config, Path(".snakemake") / "classlab-validated-config.json")
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


DISCOVERY = FAMILIES.get("discovery", {})
EXPLAIN = FAMILIES.get("explain", {})
# datasets a discovery split names for itself (tabular NCD on digits, mnist1d) and the explain family's
# scene datasets and the vlm family's pairs and label-noise datasets join the data rules
ALL_DATASETS = sorted(
    set(DATASETS)
    | {d for s in DISCOVERY.get("splits", {}).values() for d in s.get("datasets", [])}
    | set(EXPLAIN.get("datasets", []))
    | set((FAMILIES.get("vlm", {}).get("compositional") or {}).get("datasets", []))
    | set((FAMILIES.get("vlm", {}).get("label_noise") or {}).get("datasets", []))
    | set(((FAMILIES.get("metric", {}).get("scenes") or {}).get("datasets", [])))
    | ({FAMILIES["single_paper"].get("dataset", "fashion_mnist")} if "single_paper" in FAMILIES else set())
    | {d for group in (FAMILIES.get("ssl", {}).get("groups") or {}).values() for d in group["datasets"]}
    | set(FAMILIES.get("dense", {}).get("datasets", []))
    | set(FAMILIES.get("generative", {}).get("datasets", []))
)


# families that name their own seeds (the cheap protocols run more of them)
ALL_SEEDS = sorted(set(SEEDS) | {str(s) for spec in FAMILIES.values() for s in spec.get("seeds", [])}, key=int)


wildcard_constraints:
    dataset=_alternatives(ALL_DATASETS),
    seed=_alternatives(ALL_SEEDS),
    backbone=_alternatives(["convnet", "resnet18", "vit_tiny", "deep_mlp", "convnet_dc"]),
    pretrain=_alternatives([PRETRAIN] + list(config["pretrain"]["others"])),


def family_methods(family):
    return FAMILIES.get(family, {}).get("methods", [])


def method_overrides(family, method):
    """JSON of the config's hyperparameter overrides: a params value, so edits trigger reruns."""
    return json.dumps(FAMILIES[family].get("overrides", {}).get(method, {}), sort_keys=True)


def backbone_kwargs_json(wildcards):
    return json.dumps(config["backbone_kwargs"].get(wildcards.backbone, {}), sort_keys=True)


def pretrain_overrides_json(wildcards):
    node = getattr(wildcards, "pretrain", PRETRAIN)  # pretrain_first_task has no such wildcard
    if node != PRETRAIN:  # another pretraining node (pretrain.others: simclr)
        return json.dumps(config["pretrain"]["others"][node], sort_keys=True)
    return json.dumps(supervised_pretrain_overrides(config, wildcards.backbone), sort_keys=True)


def mirror_option(wildcards):
    # a scene dataset downloads its base dataset's raw files, from the base dataset's mirror
    # (a pairs dataset likewise)
    mirror = config["mirrors"].get(wildcards.dataset) or config["mirrors"].get(scene_base(wildcards.dataset))
    return f"--mirror {mirror}" if mirror else ""


def scene_base(dataset):
    """The registry dataset a scene, pairs or dense (long-tailed scenes) dataset is built from (None for
    any other dataset)."""
    from classlab.data.registry import DENSE_BASES, PAIRS_BASES, SCENE_BASES

    return SCENE_BASES.get(dataset) or PAIRS_BASES.get(dataset) or DENSE_BASES.get(dataset)


def scene_recipe_option(wildcards):
    """`--recipe '<json>'` of a scene dataset from the config's `scene_recipes` (a params value,
    so editing the recipe re-prepares the scenes); empty where the config sets none."""
    import shlex

    recipe = config.get("scene_recipes", {}).get(wildcards.dataset)
    return f"--recipe {shlex.quote(json.dumps(recipe, sort_keys=True))}" if recipe else ""


def pretrained_flag(wildcards):
    return "--pretrained-weights" if config["pretrained_weights"] else ""


def pretrained_backbone(wildcards):
    # DVC-tracked checkpoints: ancient() so that a `dvc pull` (fresh mtimes) retrains nothing
    return ancient(
        f"results/checkpoints/pretrain/{wildcards.dataset}/{wildcards.backbone}/{PRETRAIN}/seed{wildcards.seed}/model.pt"
    )


def all_targets():
    targets = ["results/claims.csv"]
    if "incremental" in FAMILIES:
        targets += ["results/tables/incremental/summary.md", "results/tables/incremental/summary.csv"]
        targets += incremental_figure_targets()
    if "explain" in FAMILIES:
        targets += explain_targets()
    if "shift" in FAMILIES:
        targets += shift_targets()
    if "condense" in FAMILIES:
        targets += ["results/tables/condense/summary.md", "results/tables/condense/summary.csv"]
    if "vlm" in FAMILIES:
        targets += ["results/tables/vlm/summary.md", "results/tables/vlm/summary.csv"]
        if VLM.get("epoch_curve"):
            targets += ["results/figures/vlm/accuracy_vs_epochs.png"]
    if "metric" in FAMILIES:
        targets += ["results/tables/metric/summary.md", "results/tables/metric/summary.csv"]
        targets += metric_figure_targets()
    if "ssl" in FAMILIES:
        targets += ["results/tables/ssl/summary.md", "results/tables/ssl/summary.csv",
                    "results/figures/ssl/probes.png"]
    if "dense" in FAMILIES:
        targets += ["results/tables/dense/summary.md", "results/tables/dense/summary.csv"]
        targets += dense_figure_targets()
    if "generative" in FAMILIES:
        targets += ["results/tables/generative/summary.md", "results/tables/generative/summary.csv"]
        targets += generative_figure_targets()
    if "single_paper" in FAMILIES:
        targets += ["results/tables/single_paper/summary.md", "results/tables/single_paper/summary.csv"]
        targets += single_paper_figure_targets()
    if "discovery" in FAMILIES:
        targets += ["results/tables/discovery/summary.md", "results/tables/discovery/summary.csv"]
        targets += expand("results/figures/discovery/{name}.png", name=DISCOVERY_FIGURES)
    for family in CLASSIFIER_FAMILIES:
        targets += [f"results/tables/{family}/summary.md", f"results/tables/{family}/summary.csv"]
        for backbone in sorted({b for m in family_methods(family) for b in classifier_backbones(family, m)}):
            targets += expand(
                "results/figures/{family}/{dataset}/{backbone}/{name}.png",
                family=family,
                dataset=DATASETS,
                backbone=backbone,
                name=FIGURES,
            )
    return targets


FIGURES = ["learning_curves", "accuracy_by_method", "reliability", "confusion", "feature_norms"]


# --- classifier families: `supervised` and `distill` (one classifier per run) ---------------

CLASSIFIER_FAMILIES = [f for f in ("supervised", "distill") if f in FAMILIES]


def classifier_hparams(family, method):
    return resolve_hparams(family, method, FAMILIES[family].get("overrides", {}).get(method))


def classifier_backbones(family, method):
    """A method whose paper fixes the architecture names it (`backbone: deep_mlp`); the others
    run on the config's backbones."""
    named = classifier_hparams(family, method).get("backbone")
    return [named] if named else BACKBONES


def classifier_init(family, method, backbone, dataset, seed):
    """The model.pt a run starts from, or None (scratch): the shared pretraining node, or another
    pretraining node the method names (`init: simclr`) where the config has it (else the shared one)."""
    init = classifier_hparams(family, method).get("init", "pretrained")
    if init == "scratch":
        return None
    node = init if init in config["pretrain"]["others"] else PRETRAIN
    return f"results/checkpoints/pretrain/{dataset}/{backbone}/{node}/seed{seed}/model.pt"


def classifier_inputs(wildcards):
    family, method = wildcards.cls_family, wildcards.cls_method
    inputs = {
        "manifest": ancient(f"data/prepared/{wildcards.dataset}/manifest.json"),
        "hparams": f"config/methods/{family}/{method}.yaml",
    }
    init = classifier_init(family, method, wildcards.backbone, wildcards.dataset, wildcards.seed)
    if init:
        # DVC-tracked checkpoints: ancient() so that a `dvc pull` (fresh mtimes) retrains nothing
        inputs["init"] = ancient(init)
    if family == "distill" and classifier_hparams(family, method).get("uses_teacher"):
        inputs["teacher"] = ancient(
            f"results/checkpoints/teacher/{wildcards.dataset}/{TEACHER['backbone']}/seed{wildcards.seed}/model.pt"
        )
    return inputs


def classifier_options(wildcards, input):
    """--init / --teacher of a run, from its inputs."""
    options = [f"--init {input.init}"] if "init" in input.keys() else []
    options += [f"--teacher {input.teacher}"] if "teacher" in input.keys() else []
    return " ".join(options)


def classifier_overrides(wildcards):
    return method_overrides(wildcards.cls_family, wildcards.cls_method)


def classifier_training_params(wildcards):
    # no file paths in here: Snakemake ignores a param that names an input file when it compares params
    return json.dumps([classifier_overrides(wildcards), backbone_kwargs_json(wildcards)])


def classifier_runs(family, kind, dataset=None, backbone=None):
    """Per-run files of a classifier family: metrics.json, predictions.npz (results/eval) or
    history.json (results/checkpoints), each method on its backbones."""
    pattern = {
        "history.json": "results/checkpoints/{family}/{dataset}/{backbone}/{method}/seed{seed}/history.json",
        "metrics.json": "results/eval/{family}/{dataset}/{backbone}/{method}/seed{seed}/metrics.json",
        "predictions.npz": "results/eval/{family}/{dataset}/{backbone}/{method}/seed{seed}/predictions.npz",
    }[kind]
    out = []
    for method in family_methods(family):
        backbones = [b for b in classifier_backbones(family, method) if backbone is None or b == backbone]
        out += expand(
            pattern,
            family=family,
            dataset=[dataset] if dataset else DATASETS,
            backbone=backbones,
            method=[method],
            seed=SEEDS,
        )
    return out


def classifier_metrics(wildcards):
    return classifier_runs(wildcards.cls_family, "metrics.json")


def classifier_figure_inputs(wildcards):
    family = wildcards.cls_family
    return {
        "metrics": classifier_runs(family, "metrics.json", wildcards.dataset, wildcards.backbone),
        "predictions": classifier_runs(family, "predictions.npz", wildcards.dataset, wildcards.backbone),
        "histories": classifier_runs(family, "history.json", wildcards.dataset, wildcards.backbone),
    }


# --- family `distill`: the shared teacher ------------------------------------------------------

TEACHER = FAMILIES.get("distill", {}).get("teacher", {})


def teacher_backbone_kwargs_json(wildcards):
    return json.dumps(TEACHER.get("backbone_kwargs", {}), sort_keys=True)


def teacher_overrides_json(wildcards):
    return json.dumps(TEACHER.get("overrides", {}), sort_keys=True)


# --- family `incremental` ------------------------------------------------------------------

INCREMENTAL = FAMILIES.get("incremental", {})
INCREMENTAL_SCENARIOS = INCREMENTAL.get("scenarios", {})
INCREMENTAL_RUNS = INCREMENTAL.get("runs", {})
FORGETTING = INCREMENTAL.get("forgetting", {})
MULTILABEL_RUNS = INCREMENTAL.get("multilabel_runs", {})


def scenes_json(wildcards):
    return json.dumps(INCREMENTAL.get("scenes", {}), sort_keys=True)


def multilabel_metrics():
    out = []
    for scen, methods in MULTILABEL_RUNS.items():
        for method in methods:
            out += expand(
                "results/eval/multilabel/{dataset}/{backbone}/{scenario}/{method}/seed{seed}/metrics.json",
                dataset=DATASETS,
                backbone=incremental_backbones(method),
                scenario=[scen],
                method=[method],
                seed=SEEDS,
            )
    return out


def scenario_params_json(wildcards):
    return json.dumps(INCREMENTAL_SCENARIOS[wildcards.scenario], sort_keys=True)


def incremental_overrides(wildcards):
    return method_overrides("incremental", wildcards.inc_method)


def incremental_training_params(wildcards):
    return json.dumps([incremental_overrides(wildcards), backbone_kwargs_json(wildcards)])


def incremental_init_inputs(wildcards):
    """The scenario, the data and the backbone a run starts from: none (scratch) or supervised
    pretraining on the first task's classes only (so that later classes' labels are never seen)."""
    inputs = {
        "scenario": f"results/scenarios/{wildcards.dataset}/{wildcards.scenario}/seed{wildcards.seed}.json",
        "manifest": ancient(f"data/prepared/{wildcards.dataset}/manifest.json"),
        "hparams": f"config/methods/incremental/{wildcards.inc_method}.yaml",
    }
    if INCREMENTAL_SCENARIOS[wildcards.scenario]["init"] != "scratch":
        inputs["init"] = ancient(
            f"results/checkpoints/pretrain_first_task/{wildcards.dataset}/{wildcards.backbone}/"
            f"{wildcards.scenario}/seed{wildcards.seed}/model.pt"
        )
    return inputs


def incremental_init_option(wildcards, input):
    return f"--init {input.init}" if "init" in input.keys() else ""


def incremental_backbones(method):
    """A method whose paper fixes the architecture (prompts and LoRA need a ViT) names it in
    its hyperparameters (`backbone: vit_tiny`); the others run on the config's backbones."""
    named = resolve_hparams("incremental", method, INCREMENTAL.get("overrides", {}).get(method)).get("backbone")
    return [named] if named else BACKBONES


def forget_tasks_json(wildcards):
    return json.dumps(FORGETTING[wildcards.forgetting]["forget_tasks"])


def forgetting_metrics():
    out = []
    for name, spec in FORGETTING.items():
        for method in spec["methods"]:
            out += expand(
                "results/eval/forgetting/{dataset}/{backbone}/{forgetting}/{method}/seed{seed}/metrics.json",
                dataset=DATASETS,
                backbone=incremental_backbones(method),
                forgetting=[name],
                method=[method],
                seed=SEEDS,
            )
    return out


def incremental_metrics(dataset=None, backbone=None, scenario=None):
    out = []
    for scen, methods in INCREMENTAL_RUNS.items():
        if scenario and scen != scenario:
            continue
        for method in methods:
            backbones = [b for b in incremental_backbones(method) if backbone is None or b == backbone]
            out += expand(
                "results/eval/incremental/{dataset}/{backbone}/{scenario}/{method}/seed{seed}/metrics.json",
                dataset=[dataset] if dataset else DATASETS,
                backbone=backbones,
                scenario=[scen],
                method=[method],
                seed=SEEDS,
            )
    return out


def incremental_figure_targets():
    """One figure set per dataset x backbone x scenario that has runs."""
    targets = []
    for scen, methods in INCREMENTAL_RUNS.items():
        backbones = sorted({b for m in methods for b in incremental_backbones(m)})
        targets += expand(
            "results/figures/incremental/{dataset}/{backbone}/{scenario}/{name}.png",
            dataset=DATASETS,
            backbone=backbones,
            scenario=[scen],
            name=["accuracy_curves", "accuracy_matrix"],
        )
    return targets


def incremental_figure_inputs(wildcards):
    return incremental_metrics(wildcards.dataset, wildcards.backbone, wildcards.scenario)


# --- family `discovery` --------------------------------------------------------------------

DISCOVERY_SPLITS = DISCOVERY.get("splits", {})
DISCOVERY_RUNS = DISCOVERY.get("runs", {})
DISCOVERY_FIGURES = ["discovery_accuracy", "discovery_projection", "discovery_confusion", "discovery_stages",
                     "discovery_queries"]


def split_datasets(split):
    return DISCOVERY_SPLITS[split].get("datasets") or DATASETS


def split_backbones(split, method):
    """The split's backbones (default the config's), or the one a method pins (`backbone: deep_mlp`)."""
    named = resolve_hparams("discovery", method, DISCOVERY.get("overrides", {}).get(method)).get("backbone")
    return [named] if named else DISCOVERY.get("backbones", {}).get(split, BACKBONES)


def pretrain_known_overrides_json(wildcards):
    return json.dumps(supervised_pretrain_overrides(config, wildcards.backbone, DISCOVERY.get("pretrain_known")),
                      sort_keys=True)


def split_params_json(wildcards):
    params = dict(DISCOVERY_SPLITS[wildcards.split])
    params["name"] = wildcards.split
    return json.dumps(params, sort_keys=True)


def discovery_overrides(wildcards):
    return method_overrides("discovery", wildcards.disc_method)


def discovery_training_params(wildcards):
    # no file paths in here: Snakemake ignores a param that names an input file when it compares params
    return json.dumps([discovery_overrides(wildcards), backbone_kwargs_json(wildcards),
                       DISCOVERY_SPLITS[wildcards.split]["init"]])


def discovery_inputs(wildcards):
    """The split, the data and the backbone a run starts from: the simclr node (no labels), a
    supervised model of the split's labelled known classes, or none (scratch)."""
    inputs = {
        "split": f"results/splits/discovery/{wildcards.dataset}/{wildcards.split}/seed{wildcards.seed}.json",
        "manifest": ancient(f"data/prepared/{wildcards.dataset}/manifest.json"),
        "hparams": f"config/methods/discovery/{wildcards.disc_method}.yaml",
    }
    init = DISCOVERY_SPLITS[wildcards.split]["init"]
    if init == "simclr":
        inputs["init"] = ancient(
            f"results/checkpoints/pretrain/{wildcards.dataset}/{wildcards.backbone}/simclr/seed{wildcards.seed}/model.pt"
        )
    elif init == "supervised_known":
        inputs["init"] = ancient(
            f"results/checkpoints/pretrain_known/{wildcards.dataset}/{wildcards.backbone}/{wildcards.split}/"
            f"seed{wildcards.seed}/model.pt"
        )
    return inputs


def discovery_init_option(wildcards, input):
    return f"--init {input.init}" if "init" in input.keys() else ""


def discovery_runs(kind):
    pattern = {
        "metrics.json": "results/eval/discovery/{dataset}/{backbone}/{split}/{method}/seed{seed}/metrics.json",
        "predictions.npz": "results/eval/discovery/{dataset}/{backbone}/{split}/{method}/seed{seed}/predictions.npz",
    }[kind]
    out = []
    for split, methods in DISCOVERY_RUNS.items():
        for method in methods:
            out += expand(
                pattern,
                dataset=split_datasets(split),
                backbone=split_backbones(split, method),
                split=[split],
                method=[method],
                seed=SEEDS,
            )
    return out


def discovery_figure_predictions(wildcards):
    """The first seed of every run group: the projections and confusions show one seed each."""
    first = f"seed{SEEDS[0]}/"
    return [p for p in discovery_runs("predictions.npz") if first in p]


# --- family `explain`: scene models, readouts and saliency jobs --------------------------------------

EXPLAIN_MODELS = EXPLAIN.get("models", {})
EXPLAIN_METHODS = EXPLAIN.get("methods", [])
EXPLAIN_READOUTS = ["promptcam", "linear_probe"]


def explain_model_checkpoint(dataset, model, seed):
    spec = EXPLAIN_MODELS[model]
    if "checkpoint" in spec:
        return spec["checkpoint"].format(dataset=scene_base(dataset), seed=seed)
    return f"results/checkpoints/explain/{dataset}/{model}/seed{seed}/model.pt"


def explain_checkpoint(wildcards):
    """The checkpoint a saliency job explains: the model's, or its Prompt-CAM readout's."""
    if wildcards.xmethod == "promptcam":
        return ancient(f"results/checkpoints/explain/{wildcards.dataset}/{wildcards.xmodel}/promptcam/seed{wildcards.seed}/model.pt")
    return ancient(explain_model_checkpoint(wildcards.dataset, wildcards.xmodel, wildcards.seed))


def explain_runs_of(model):
    """The saliency methods run on ``model``: promptcam only where the model has that readout."""
    readouts = EXPLAIN_MODELS[model].get("readouts", [])
    return [m for m in EXPLAIN_METHODS if m != "promptcam" or "promptcam" in readouts]


def explain_files(name):
    return [
        f"results/explain/{d}/{model}/{method}/seed{s}/{name}"
        for d in EXPLAIN.get("datasets", [])
        for model in EXPLAIN_MODELS
        for method in explain_runs_of(model)
        for s in SEEDS
    ]


def explain_accuracy_files():
    """metrics.json of each scene-trained model and readout (test accuracy on the scenes)."""
    out = []
    for d in EXPLAIN.get("datasets", []):
        for model, spec in EXPLAIN_MODELS.items():
            for run in ["model"] * ("checkpoint" not in spec) + list(spec.get("readouts", [])):
                out += [f"results/eval/explain/{d}/{model}/{run}/seed{s}/metrics.json" for s in SEEDS]
    return out


def explain_targets():
    targets = ["results/tables/explain/summary.md", "results/tables/explain/summary.csv"]
    for d in EXPLAIN.get("datasets", []):
        for model in EXPLAIN_MODELS:
            targets += [
                f"results/figures/explain/{d}/{model}/saliency_maps.png",
                f"results/figures/explain/{d}/{model}/randomisation.png",
            ]
    return targets


def scene_model_params(wildcards):
    spec = EXPLAIN_MODELS[wildcards.xmodel]
    overrides = {"init": "scratch", **spec.get("overrides", {})}
    return {
        "method": spec.get("method", "erm"),
        "backbone": spec["backbone"],
        "overrides": json.dumps(overrides, sort_keys=True),
        "backbone_kwargs": json.dumps(spec.get("backbone_kwargs", {}), sort_keys=True),
    }


def readout_params(wildcards):
    spec = EXPLAIN_MODELS[wildcards.xmodel]
    if wildcards.readout == "promptcam":
        family, overrides = "explain", EXPLAIN.get("overrides", {}).get("promptcam", {})
    else:  # a fresh head on the frozen backbone: the probe is not the model's own head
        family, overrides = "supervised", {"head_init": "fresh", **EXPLAIN.get("probe_overrides", {})}
    return {
        "family": family,
        "backbone": spec["backbone"],
        "overrides": json.dumps(overrides, sort_keys=True),
        "backbone_kwargs": json.dumps(spec.get("backbone_kwargs", {}), sort_keys=True),
    }


def explain_eval_checkpoint(wildcards):
    if wildcards.xrun == "model":
        return ancient(f"results/checkpoints/explain/{wildcards.dataset}/{wildcards.xmodel}/seed{wildcards.seed}/model.pt")
    return ancient(f"results/checkpoints/explain/{wildcards.dataset}/{wildcards.xmodel}/{wildcards.xrun}/seed{wildcards.seed}/model.pt")


def saliency_params(wildcards):
    spec = EXPLAIN_MODELS[wildcards.xmodel]
    return {
        "layers": ",".join(spec["layers"]),
        "overrides": json.dumps(EXPLAIN.get("overrides", {}).get(wildcards.xmethod, {}), sort_keys=True),
        "options": (
            f"--images {EXPLAIN.get('images', 200)} --image-seed {EXPLAIN.get('image_seed', 0)} "
            f"--randomisation-images {EXPLAIN.get('randomisation_images', 50)} "
            f"--perturbation-steps {EXPLAIN.get('perturbation_steps', 20)}"
        ),
    }


def explain_figure_inputs(wildcards):
    model = wildcards.xmodel
    first = SEEDS[0]
    methods = explain_runs_of(model)
    base = f"results/explain/{wildcards.dataset}/{model}"
    return {
        "maps": [f"{base}/{m}/seed{first}/maps.npz" for m in methods],
        "metrics": [f"{base}/{m}/seed{s}/metrics.json" for m in methods for s in SEEDS],
    }


# --- family `shift`: domain generalisation (DomainBed) --------------------------------------

SHIFT = FAMILIES.get("shift", {})
SHIFT_DG = SHIFT.get("dg", {})
SHIFT_SUITES = SHIFT_DG.get("suites", {})


def suite_domains(suite):
    """The domain names of a suite (classlab.data.domains), known at parse time from its recipe."""
    from classlab.data.domains import domain_names, resolve_recipe

    recipe = dict(SHIFT_SUITES[suite])
    kind = recipe.pop("kind")
    return domain_names(kind, resolve_recipe(kind, recipe))


def suite_test_domains(suite):
    return SHIFT_DG.get("test_domains", {}).get(suite) or suite_domains(suite)


def suite_params_json(wildcards):
    return json.dumps(SHIFT_SUITES[wildcards.suite], sort_keys=True)


def dg_overrides(wildcards):
    return json.dumps(SHIFT.get("overrides", {}).get(wildcards.dg_method, {}), sort_keys=True)


def dg_training_params(wildcards):
    return json.dumps([dg_overrides(wildcards), backbone_kwargs_json(wildcards), SHIFT_DG.get("n_draws", 4)])


def dg_records():
    out = []
    for suite in SHIFT_SUITES:
        out += expand(
            "results/eval/shift/dg/{dataset}/{backbone}/{suite}/{test_domain}/{method}/trial{seed}/records.json",
            dataset=DATASETS,
            backbone=BACKBONES,
            suite=[suite],
            test_domain=suite_test_domains(suite),
            method=SHIFT_DG.get("methods", []),
            seed=SEEDS,
        )
    return out


# --- family `shift`: test-time adaptation ------------------------------------------------------

SHIFT_TTA = SHIFT.get("tta", {})


def tta_source_checkpoint(wildcards):
    # DVC-tracked checkpoints: ancient() so that a `dvc pull` (fresh mtimes) recomputes nothing
    return ancient(
        f"results/checkpoints/supervised/{wildcards.dataset}/{wildcards.backbone}/{SHIFT_TTA['source']}/seed{wildcards.seed}/model.pt"
    )


def tta_inputs(wildcards):
    # every method gets the source statistics (one cheap node per seed; CAFA reads them, the others
    # ignore them), so the DAG needs no method import at parse time
    return {
        "checkpoint": tta_source_checkpoint(wildcards),
        "manifest": ancient(f"data/prepared/{wildcards.dataset}/manifest.json"),
        "hparams": f"config/methods/shift/{wildcards.tta_method}.yaml",
        "stats": f"results/checkpoints/shift/source_stats/{wildcards.dataset}/{wildcards.backbone}/seed{wildcards.seed}/stats.pt",
    }


def tta_overrides(wildcards):
    return json.dumps(SHIFT.get("overrides", {}).get(wildcards.tta_method, {}), sort_keys=True)


def tta_streams_json(wildcards):
    return json.dumps([[c, s] for c in SHIFT_TTA["corruptions"] for s in SHIFT_TTA["severities"]])


def tta_metrics():
    if not SHIFT_TTA:
        return []
    return expand(
        "results/eval/shift/tta/{dataset}/{backbone}/{method}/seed{seed}/metrics.json",
        dataset=DATASETS,
        backbone=BACKBONES,
        method=SHIFT_TTA["methods"],
        seed=SEEDS,
    )


def shift_targets():
    return ["results/tables/shift/summary.md", "results/tables/shift/summary.csv"] if SHIFT_DG or SHIFT_TTA else []


# --- family `condense` ---------------------------------------------------------------------

CONDENSE = FAMILIES.get("condense", {})


def condense_variants():
    return ["plain", *CONDENSE.get("variants", {})]


def condense_variant_methods(variant):
    return CONDENSE.get("variant_methods", {}).get(variant) or CONDENSE.get("methods", [])


def condense_overrides(wildcards):
    return json.dumps(CONDENSE.get("overrides", {}).get(wildcards.cond_method, {}), sort_keys=True)


def condense_pattern_json(wildcards):
    return json.dumps(CONDENSE.get("variants", {}).get(wildcards.variant, {}), sort_keys=True)


def condense_backbone_kwargs_json(wildcards):
    return json.dumps(CONDENSE.get("backbone_kwargs", {}), sort_keys=True)


def condense_ipc_methods(ipc):
    by_ipc = {str(k): v for k, v in CONDENSE.get("ipc_methods", {}).items()}
    return by_ipc.get(str(ipc)) or CONDENSE.get("methods", [])


def condense_metrics():
    out = []
    for variant in condense_variants():
        for ipc in CONDENSE.get("images_per_class", []):
            methods = [m for m in condense_variant_methods(variant) if m in condense_ipc_methods(ipc)]
            out += expand(
                "results/condense/{dataset}/{variant}/{method}/ipc{ipc}/seed{seed}/metrics.json",
                dataset=DATASETS,
                variant=[variant],
                method=methods,
                ipc=[ipc],
                seed=SEEDS,
            )
    return out


# --- family `vlm` --------------------------------------------------------------------------

VLM = FAMILIES.get("vlm", {})


def vlm_backbone():
    # the offline CLIP's image encoder: the config's first backbone
    return config["backbones"][0]


VLM_PAIRS = VLM.get("compositional") or {}
VLM_NOISE = VLM.get("label_noise") or {}


def vlm_image_sides():
    # what the offline CLIP's image side sees: the base classes only (the issue's default) and/or all
    # classes (CLIP's own situation: the new classes are new only to the prompt learning)
    return VLM.get("image_sides", ["base"])


def vlm_pretrain_overrides_json(wildcards):
    from classlab.data.registry import get_dataset
    from classlab.metrics.vlm import base_new_split

    spec = get_dataset(wildcards.dataset)
    if wildcards.image_side == "seen":  # a pairs dataset: the seen pairs only (the unseen have no training image)
        from classlab.data.pairs import resolve_pairs_recipe

        seen = resolve_pairs_recipe(None, get_dataset(spec.pairs_base).class_names, spec.pairs_defaults)["seen_labels"]
        return json.dumps({**VLM_PAIRS.get("pretrain", VLM.get("pretrain", {})), "classes": seen}, sort_keys=True)
    base, _ = base_new_split(spec.num_classes)
    classes = base if wildcards.image_side == "base" else []  # []: every class
    return json.dumps({**VLM.get("pretrain", {}), "classes": classes}, sort_keys=True)


def vlm_pretrained(wildcards):
    # the offline CLIP this job adapts (a pretrain node), or nothing where families.vlm.clip names real CLIP
    if VLM.get("clip"):
        return []
    side = getattr(wildcards, "image_side", "seen")  # adapt_pairs: the CLIP of the seen pairs
    return ancient(f"results/checkpoints/vlm_pretrain/{wildcards.dataset}/{wildcards.backbone}/saw_{side}/"
                   f"seed{wildcards.seed}/model.pt")


def vlm_pretrained_arg(wildcards, input):
    return VLM.get("clip") or input.pretrained


def vlm_overrides(wildcards):
    return json.dumps(VLM.get("overrides", {}).get(wildcards.vlm_method, {}), sort_keys=True)


def vlm_epoch_overrides(wildcards):
    return json.dumps({**VLM.get("overrides", {}).get(wildcards.vlm_method, {}), "epochs": int(wildcards.epochs)},
                      sort_keys=True)


def vlm_metrics():
    return expand(
        "results/eval/vlm/{dataset}/{backbone}/saw_{image_side}/{method}/seed{seed}/metrics.json",
        dataset=DATASETS,
        backbone=[vlm_backbone()] if VLM else [],
        image_side=vlm_image_sides(),
        method=VLM.get("methods", []),
        seed=SEEDS,
    )


def vlm_pairs_metrics():
    # compositional zero-shot: each method on each pairs dataset, on the CLIP of its seen pairs
    return expand(
        "results/eval/vlm_pairs/{dataset}/{backbone}/{method}/seed{seed}/metrics.json",
        dataset=VLM_PAIRS.get("datasets", []),
        backbone=[vlm_backbone()] if VLM else [],
        method=VLM_PAIRS.get("methods", []),
        seed=SEEDS,
    )


def vlm_noise_metrics():
    # CAPro's protocol: each method at each injected noise rate, a fresh backbone per run
    return expand(
        "results/eval/vlm_noise/{dataset}/{backbone}/{kind}_noise{rate}/{method}/seed{seed}/metrics.json",
        dataset=VLM_NOISE.get("datasets", DATASETS) if VLM_NOISE else [],
        backbone=[vlm_backbone()] if VLM_NOISE else [],
        kind=[VLM_NOISE.get("kind", "web")],
        rate=[f"{r:g}" for r in VLM_NOISE.get("rates", [])],
        method=VLM_NOISE.get("methods", []),
        seed=SEEDS,
    )


def vlm_all_metrics():
    return vlm_metrics() + vlm_pairs_metrics() + vlm_noise_metrics()


def vlm_epoch_metrics():
    # the long-training curve (OGEN's case): each method of `epoch_curve` at each epoch budget
    curve = VLM.get("epoch_curve") or {}
    return expand(
        "results/eval/vlm_epochs/{dataset}/{backbone}/saw_{image_side}/{method}/epochs{epochs}/seed{seed}/metrics.json",
        dataset=DATASETS,
        backbone=[vlm_backbone()] if VLM else [],
        image_side=curve.get("image_sides") or vlm_image_sides(),
        method=curve.get("methods", []),
        epochs=curve.get("epochs", []),
        seed=SEEDS,
    )


# --- family `metric` (deep metric learning) ---------------------------------------------------

METRIC = FAMILIES.get("metric", {})
METRIC_SCENES = METRIC.get("scenes") or {}


def family_seeds(spec):
    return [str(s) for s in spec.get("seeds", [])] or SEEDS


def metric_overrides(wildcards):
    return json.dumps(METRIC.get("overrides", {}).get(wildcards.metric_method, {}), sort_keys=True)


def metric_backbone_kwargs(wildcards):
    kwargs = METRIC.get("backbone_kwargs")
    return json.dumps(config["backbone_kwargs"].get(wildcards.backbone, {}) if kwargs is None else kwargs, sort_keys=True)


def metric_scene_backbone_kwargs(wildcards):
    kwargs = METRIC_SCENES.get("backbone_kwargs")
    return json.dumps(config["backbone_kwargs"].get(wildcards.backbone, {}) if kwargs is None else kwargs, sort_keys=True)


def metric_select_flag(wildcards):
    return "--select" if wildcards.metric_split == "select" else ""


def metric_splits():
    return ["test", "select"] if METRIC.get("selection") else ["test"]


def metric_retrieval_metrics():
    return expand(
        "results/eval/metric/{dataset}/{backbone}/{split}/{method}/seed{seed}/metrics.json",
        dataset=DATASETS if METRIC else [],
        backbone=BACKBONES[:1],
        split=metric_splits(),
        method=METRIC.get("methods", []),
        seed=family_seeds(METRIC),
    )


def metric_scene_metrics():
    return expand(
        "results/eval/metric_scenes/{dataset}/{backbone}/{method}/seed{seed}/metrics.json",
        dataset=METRIC_SCENES.get("datasets", []),
        backbone=BACKBONES[:1],
        method=METRIC_SCENES.get("methods", []),
        seed=family_seeds(METRIC),
    )


def metric_figure_targets():
    targets = expand("results/figures/metric/{dataset}_retrieval.png", dataset=DATASETS) if METRIC else []
    return targets + expand("results/figures/metric/{dataset}_retrieval.png", dataset=METRIC_SCENES.get("datasets", []))


def metric_example_runs(wildcards):
    """The first seed's test run of every method on one dataset, for the retrieval-examples figure."""
    seed = family_seeds(METRIC)[0]
    if wildcards.dataset in METRIC_SCENES.get("datasets", []):
        return expand("results/eval/metric_scenes/{dataset}/{backbone}/{method}/seed{seed}/metrics.json",
                      dataset=wildcards.dataset, backbone=BACKBONES[:1], method=METRIC_SCENES["methods"], seed=seed)
    return expand("results/eval/metric/{dataset}/{backbone}/test/{method}/seed{seed}/metrics.json",
                  dataset=wildcards.dataset, backbone=BACKBONES[:1], method=METRIC.get("methods", []), seed=seed)


# --- family `single_paper` (each method its own protocol) ---------------------------------------

SINGLE_PAPER = FAMILIES.get("single_paper", {})
SINGLE_PAPER_DATASET = SINGLE_PAPER.get("dataset", "fashion_mnist")


def single_paper_overrides(wildcards):
    return json.dumps(SINGLE_PAPER.get("overrides", {}).get(wildcards.sp_method, {}), sort_keys=True)


def single_paper_reads_data(method):
    from classlab.protocols.single_paper import needs_data

    return needs_data(method)


def single_paper_inputs(wildcards):
    inputs = {"hparams": f"config/methods/single_paper/{wildcards.sp_method}.yaml"}
    if single_paper_reads_data(wildcards.sp_method):
        inputs["manifest"] = ancient(f"data/prepared/{SINGLE_PAPER_DATASET}/manifest.json")
    return inputs


def single_paper_data_option(wildcards):
    return f"--data data/prepared/{SINGLE_PAPER_DATASET}" if single_paper_reads_data(wildcards.sp_method) else ""


def single_paper_metrics():
    return expand("results/eval/single_paper/{method}/seed{seed}/metrics.json",
                  method=SINGLE_PAPER.get("methods", []), seed=family_seeds(SINGLE_PAPER))


def output_folder(wildcards, output):
    """The folder of a rule's first output (a command that writes several files into it)."""
    return str(Path(output[0]).parent)


def single_paper_figure_targets():
    from classlab.protocols.single_paper import protocol_of

    kinds = {protocol_of(m) for m in SINGLE_PAPER.get("methods", [])}
    names = {"icl_regression": "icl_gd_loss", "active": "aspl_accuracy_vs_labels"}
    return [f"results/figures/single_paper/{names[k]}.png" for k in sorted(kinds) if k in names]


# --- family `ssl` (self-supervised pretraining, probed frozen) ------------------------------------

SSL = FAMILIES.get("ssl", {})
SSL_GROUPS = SSL.get("groups", {})


def ssl_group(wildcards):
    return SSL_GROUPS[wildcards.ssl_group]


def ssl_pretrain_overrides(wildcards):
    """The method's own options, then the group's budget (the same for every method of the group)."""
    overrides = dict(SSL.get("overrides", {}).get(wildcards.ssl_method, {}))
    overrides.update(ssl_group(wildcards).get("budget", {}))
    return json.dumps(overrides, sort_keys=True)


def ssl_backbone(wildcards):
    return ssl_group(wildcards)["backbone"]


def ssl_backbone_kwargs(wildcards):
    return json.dumps(ssl_group(wildcards).get("backbone_kwargs", {}), sort_keys=True)


def ssl_probe_command(wildcards):
    return "ssl-segmentation-probe" if ssl_group(wildcards).get("probe", "image") == "segmentation" else "ssl-probe"


def ssl_probe_settings(wildcards):
    return json.dumps(SSL.get("probe_settings", {}), sort_keys=True)


def ssl_probe_metrics():
    return [f"results/eval/ssl/{name}/{dataset}/{method}/seed{seed}/metrics.json"
            for name, group in SSL_GROUPS.items() for dataset in group["datasets"] for method in group["methods"]
            for seed in family_seeds(SSL)]


def ssl_datasets():
    return sorted({d for group in SSL_GROUPS.values() for d in group["datasets"]})


# --- family `dense` (detection and segmentation on long-tailed scenes) ------------------------------

DENSE = FAMILIES.get("dense", {})


def dense_overrides(wildcards):
    return json.dumps(DENSE.get("overrides", {}).get(wildcards.dense_method, {}), sort_keys=True)


def dense_backbone_kwargs(wildcards):
    return json.dumps(DENSE.get("backbone_kwargs", {}), sort_keys=True)


def dense_backbone(wildcards):
    return DENSE.get("backbone", "convnet")


def dense_run_metrics():
    return expand("results/eval/dense/{dataset}/{method}/seed{seed}/metrics.json",
                  dataset=DENSE.get("datasets", []), method=DENSE.get("methods", []), seed=family_seeds(DENSE))


def dense_figure_targets():
    return expand("results/figures/dense/{dataset}_examples.png", dataset=DENSE.get("datasets", []))


def dense_example_runs(wildcards):
    """The first seed's run of every method on one dataset, for the figure of drawn predictions."""
    return {name: expand("results/eval/dense/{dataset}/{method}/seed{seed}/{file}", dataset=wildcards.dataset,
                         method=DENSE.get("methods", []), seed=family_seeds(DENSE)[0], file=file)
            for name, file in (("metrics", "metrics.json"), ("predictions", "predictions.npz"))}


# --- family `generative` (a class-conditional DDPM, the diffusion classifier, personalisation) -------------

GENERATIVE = FAMILIES.get("generative", {})
# the methods that fine-tune the shared DDPM on one instance (the rest classify with it)
PERSONALISATION_METHODS = ["classdiffusion", "personalize"]


def generative_overrides(wildcards):
    method = getattr(wildcards, "gen_method", "ddpm")
    return json.dumps(GENERATIVE.get("overrides", {}).get(method, {}), sort_keys=True)


def generative_personalisation_methods():
    return [m for m in GENERATIVE.get("methods", []) if m in PERSONALISATION_METHODS]


def generative_run_metrics():
    runs = []
    if "diffusion_classifier" in GENERATIVE.get("methods", []):
        runs += expand("results/eval/generative/{dataset}/diffusion_classifier/seed{seed}/metrics.json",
                       dataset=GENERATIVE.get("datasets", []), seed=family_seeds(GENERATIVE))
    runs += expand("results/eval/generative/{dataset}/{method}/seed{seed}/metrics.json",
                   dataset=GENERATIVE.get("datasets", []), method=generative_personalisation_methods(),
                   seed=family_seeds(GENERATIVE))
    return runs


def generative_histories():
    return expand("results/generative/{dataset}/ddpm/seed{seed}/history.json",
                  dataset=GENERATIVE.get("datasets", []), seed=family_seeds(GENERATIVE))


def generative_figure_targets():
    """Samples of every pair from the first seed's DDPM; the personalised samples where both arms ran."""
    seed = family_seeds(GENERATIVE)[0]
    targets = expand("results/figures/generative/{dataset}_seed{seed}_samples.png",
                     dataset=GENERATIVE.get("datasets", []), seed=seed)
    if generative_personalisation_methods():
        targets += expand("results/figures/generative/{dataset}_personalised.png", dataset=GENERATIVE.get("datasets", []))
    return targets


def generative_personalised_runs(wildcards):
    seed = family_seeds(GENERATIVE)[0]
    return {name: expand("results/eval/generative/{dataset}/{method}/seed{seed}/{file}", dataset=wildcards.dataset,
                         method=generative_personalisation_methods(), seed=seed, file=file)
            for name, file in (("metrics", "metrics.json"), ("samples", "samples.npz"))}
