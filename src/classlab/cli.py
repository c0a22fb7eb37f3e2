"""``classlab <stage> ...``: what every Snakemake rule calls, and what a person can run by hand."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _download(a):
    from classlab.data.registry import get_dataset
    from classlab.data.download import md5_of
    from classlab.io import write_json

    spec = get_dataset(a.dataset)
    files = spec.download(Path(a.out_dir), a.mirror)
    # the listing is written last: its presence means every file verified
    write_json(Path(a.out_dir) / "files.json",
               {"dataset": a.dataset, "files": {p.name: md5_of(p) for p in files}})


def _prepare(a):
    from classlab.data.prepare import prepare
    from classlab.data.scenes import SceneError

    recipe = None
    if a.recipe is not None:
        try:
            recipe = json.loads(a.recipe)
        except json.JSONDecodeError as exc:
            raise SceneError(f"scenes: --recipe is not valid JSON ({exc})") from None
    prepare(a.dataset, Path(a.raw_dir), Path(a.out_dir), a.seed, recipe=recipe)


def _train(a):
    from classlab.train import train

    overrides, indices = json.loads(a.overrides), None
    if a.classes_from_scenario:
        from classlab.data.scenarios import ClassIncrementalScenario

        # the first task's samples only (its subset, where the scenario keeps one): later tasks'
        # classes and the first task's unused samples are never seen
        first = ClassIncrementalScenario.load(Path(a.classes_from_scenario)).tasks[0]
        if not len(first.train_indices):
            # Si-Blurry draws task boundaries with replacement, so a first task can be empty
            raise SystemExit(f"{a.classes_from_scenario}: the first task holds no training samples, so there is "
                             f"nothing to pretrain on; use init: scratch for this scenario or another seed")
        overrides["classes"], indices = first.classes, sorted(first.train_indices)
    if a.classes_from_split:
        from classlab.data.discovery_split import load_discovery_split

        # the labelled samples of the known classes only: a novel class's label never reaches this model
        split = load_discovery_split(Path(a.classes_from_split))
        overrides["classes"], indices = list(split["known_classes"]), list(split["labelled"])
    train(a.family, a.method, Path(a.data), a.backbone, a.seed, Path(a.out_dir),
          overrides=overrides, indices=indices, init=Path(a.init) if a.init else None,
          backbone_kwargs=json.loads(a.backbone_kwargs), pretrained_weights=a.pretrained_weights,
          threads=a.threads, device=a.device, progress=not a.no_progress,
          teacher=Path(a.teacher) if a.teacher else None)


def _evaluate(a):
    from classlab.train import evaluate

    evaluate(Path(a.model), Path(a.data), Path(a.out_dir), a.device, a.threads)


def _aggregate(a):
    from classlab.io import write_text
    from classlab.report.claims import evaluate_claims, load_claims
    from classlab.report.tables import collect_runs, write_tables

    claims = load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    write_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    table = evaluate_claims(collect_runs(a.metrics), a.family, claims=claims)
    write_text(a.claims_csv, table.to_csv(index=False))


def _merge_claims(a):
    from classlab.io import write_text
    from classlab.report.verdicts import merge_claim_tables, verdicts_html, write_metadata

    claims = merge_claim_tables(a.inputs)
    write_text(a.out, claims.to_csv(index=False))
    if a.verdicts_html:
        write_text(a.verdicts_html, verdicts_html(claims))
    if a.report_metadata:
        write_metadata(a.report_metadata, claims)


def _figures(a):
    from classlab.io import read_json
    from classlab.report import figures
    from classlab.report.tables import collect_runs

    out = Path(a.out_dir)
    runs = collect_runs(a.metrics)
    figures.learning_curves([Path(p) for p in a.histories], out / "learning_curves.png")
    figures.accuracy_by_method(runs, out / "accuracy_by_method.png")
    figures.reliability_diagram([Path(p) for p in a.predictions], out / "reliability.png")
    class_names = read_json(a.metrics[0])["class_names"]
    figures.confusion_matrices([Path(p) for p in a.predictions], class_names, out / "confusion.png")
    figures.feature_norm_histograms([Path(p) for p in a.predictions], out / "feature_norms.png")


def _build_scenario(a):
    from classlab.data.prepare import load_prepared
    from classlab.data.scenarios import build_scenario

    data = load_prepared(Path(a.data))
    params = json.loads(a.params)
    kind = params.pop("kind")
    params.pop("init", None)
    scenario = build_scenario(kind, data.manifest["dataset"], data.train.y.numpy(), data.num_classes, a.seed,
                              test_labels=data.test.y.numpy(), **params)
    scenario.save(Path(a.out))


def _build_discovery_split(a):
    from classlab.data.discovery_split import build_discovery_split, write_discovery_split
    from classlab.data.prepare import load_prepared

    data = load_prepared(Path(a.data))
    params = json.loads(a.params)
    kind = params.pop("kind")
    init = params.pop("init", None)
    params.pop("datasets", None)
    name = params.pop("name", kind)
    manifest = build_discovery_split(kind, data.manifest["dataset"], data.train.y.numpy(), data.num_classes, a.seed,
                                     test_labels=data.test.y.numpy(), **params)
    manifest["params"]["name"] = name
    if init:  # which pretraining the split's runs start from (simclr: no labels; supervised_known: known only)
        manifest["params"]["init"] = init
    write_discovery_split(manifest, Path(a.out))


def _train_discovery(a):
    from classlab.protocols.discovery import run_discovery

    run_discovery(a.method, Path(a.data), Path(a.split), a.backbone, a.seed, Path(a.ckpt_dir), Path(a.eval_dir),
                  overrides=json.loads(a.overrides), init=Path(a.init) if a.init else None,
                  backbone_kwargs=json.loads(a.backbone_kwargs), threads=a.threads, device=a.device,
                  progress=not a.no_progress)


def _evaluate_discovery(a):
    from classlab.io import write_json
    from classlab.report.discovery import discovery_metrics

    write_json(a.out, discovery_metrics(a.predictions, a.split, a.history))


def _aggregate_discovery(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.discovery import discovery_claims, write_discovery_tables

    claims = load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    runs = write_discovery_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, discovery_claims(runs, claims).to_csv(index=False))


def _build_domains(a):
    from classlab.data.domains import build_domains, save_domains
    from classlab.data.prepare import load_prepared

    params = json.loads(a.params)
    kind = params.pop("kind", None)
    data = load_prepared(Path(a.data))
    domains = build_domains(kind, data.train.x, data.train.y, data.num_classes, params,
                            dataset=data.manifest["dataset"])
    save_domains(Path(a.out_dir), domains)


def _train_dg(a):
    from classlab.protocols.shift import run_domain_generalization

    run_domain_generalization(a.method, Path(a.domains), a.test_domain, a.backbone, a.trial, a.n_draws,
                              Path(a.out), Path(a.work_dir), json.loads(a.overrides), json.loads(a.backbone_kwargs),
                              a.threads, a.device, progress=not a.no_progress)


def _aggregate_shift(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.shift import shift_claims, write_shift_tables

    claims = load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    runs = write_shift_tables(a.records, a.tta_metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md),
                              Path(a.dg_table) if a.dg_table else None, Path(a.tta_table) if a.tta_table else None)
    write_text(a.claims_csv, shift_claims(runs, claims).to_csv(index=False))


def _condense(a):
    from classlab.protocols.condense import run_condensation

    run_condensation(a.method, Path(a.data), a.images_per_class, a.seed, Path(a.out_dir), json.loads(a.overrides),
                     json.loads(a.backbone_kwargs), a.threads, a.device, pattern=json.loads(a.pattern) or None,
                     progress=not a.no_progress)


def _aggregate_condense(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.condense import condense_claims, write_condense_tables

    claims = load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    runs = write_condense_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, condense_claims(runs, claims).to_csv(index=False))


def _base_to_novel(a):
    from classlab.protocols.vlm import run_base_to_novel

    run_base_to_novel(a.method, Path(a.pretrained), Path(a.data), a.seed, Path(a.out_dir), shots=a.shots,
                      overrides=json.loads(a.overrides), test_per_class=a.test_per_class, threads=a.threads,
                      device=a.device, progress=not a.no_progress, image_side=a.image_side)


def _compositional(a):
    from classlab.protocols.compositional import run_compositional

    run_compositional(a.method, Path(a.pretrained), Path(a.data), a.seed, Path(a.out_dir), shots=a.shots,
                      overrides=json.loads(a.overrides), threads=a.threads, device=a.device,
                      progress=not a.no_progress)


def _label_noise(a):
    from classlab.protocols.label_noise import run_label_noise

    run_label_noise(a.method, Path(a.data), a.seed, Path(a.out_dir), noise_rate=a.noise_rate, noise_kind=a.noise_kind,
                    backbone=a.backbone, backbone_kwargs=json.loads(a.backbone_kwargs),
                    overrides=json.loads(a.overrides), threads=a.threads, device=a.device,
                    progress=not a.no_progress, samples_per_class=a.samples_per_class)


def _add_adaptation_options(p, pretrained_help: str, data_help: str, shots_help: str) -> None:
    """The options of a vlm protocol that adapts a pretrained image-text model on few shots."""
    p.add_argument("--method", required=True, help="a method of config/methods/vlm/")
    p.add_argument("--pretrained", required=True, help=pretrained_help)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--shots", type=int, default=16, help=shots_help)
    p.add_argument("--overrides", default="{}")
    p.add_argument("--out-dir", required=True)
    _add_execution_options(p)


def _describe_classes(a):
    from classlab.data.describe import generate_descriptions, language_model_generator, write_descriptions
    from classlab.data.registry import get_dataset

    names = list(get_dataset(a.dataset).class_names)
    spec = generate_descriptions(a.dataset, names, language_model_generator(a.model, seed=a.seed), per_class=a.per_class)
    write_descriptions(spec, names, Path(a.out), source=a.model)


def _plot_vlm_epochs(a):
    from classlab.report.vlm import write_epoch_curve

    write_epoch_curve(a.metrics, Path(a.figure), Path(a.table))


def _aggregate_vlm(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.vlm import vlm_claims, write_vlm_tables

    claims = load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    runs = write_vlm_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md),
                            epoch_files=a.epoch_metrics or [])
    write_text(a.claims_csv, vlm_claims(runs, claims).to_csv(index=False))


def _single_paper(a):
    from classlab.protocols.single_paper import run_single_paper

    run_single_paper(a.method, Path(a.data) if a.data else None, a.seed, Path(a.out_dir),
                     overrides=json.loads(a.overrides), threads=a.threads, device=a.device,
                     progress=not a.no_progress)


def _aggregate_single_paper(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.single_paper import single_paper_claims, write_single_paper_tables

    claims = load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    runs = write_single_paper_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, single_paper_claims(runs, claims).to_csv(index=False))


def _plot_single_paper(a):
    from classlab.report.single_paper import plot_single_paper

    plot_single_paper(a.metrics, Path(a.figure_dir))


def _metric_retrieval(a):
    from classlab.protocols.metric import run_metric

    run_metric(a.method, Path(a.data), a.seed, Path(a.out_dir), overrides=json.loads(a.overrides),
               backbone=a.backbone, backbone_kwargs=json.loads(a.backbone_kwargs), select=a.select,
               threads=a.threads, device=a.device, progress=not a.no_progress)


def _metric_scenes(a):
    from classlab.protocols.metric_scenes import run_metric_scenes

    run_metric_scenes(a.method, Path(a.data), a.seed, Path(a.out_dir), overrides=json.loads(a.overrides),
                      backbone=a.backbone, backbone_kwargs=json.loads(a.backbone_kwargs), threads=a.threads,
                      device=a.device, progress=not a.no_progress)


def _aggregate_metric(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.metric import metric_claims, write_metric_tables

    claims = load_claims(a.claims_dir)
    runs = write_metric_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, metric_claims(runs, claims).to_csv(index=False))


def _ssl_probe(a):
    from classlab.protocols.ssl_probe import run_probe, run_segmentation_probe

    run = run_segmentation_probe if a.dense else run_probe
    run(Path(a.model), Path(a.data), a.seed, Path(a.out_dir), probe=json.loads(a.probe), threads=a.threads)


def _aggregate_ssl(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.ssl import ssl_claims, write_ssl_tables

    claims = load_claims(a.claims_dir)
    runs = write_ssl_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, ssl_claims(runs, claims).to_csv(index=False))


def _plot_ssl_probes(a):
    from classlab.report.ssl import plot_ssl_probes

    plot_ssl_probes(a.metrics, Path(a.figure))


def _dense_run(a):
    from classlab.protocols.dense import run_dense

    run_dense(a.method, Path(a.data), a.seed, Path(a.out_dir), backbone=a.backbone,
              backbone_kwargs=json.loads(a.backbone_kwargs), overrides=json.loads(a.overrides), threads=a.threads,
              device=a.device, progress=not a.no_progress)


def _aggregate_dense(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.dense import dense_claims, write_dense_tables

    claims = load_claims(a.claims_dir)
    runs = write_dense_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, dense_claims(runs, claims).to_csv(index=False))


def _plot_dense_examples(a):
    from classlab.report.dense import plot_dense_examples

    plot_dense_examples(a.metrics, a.predictions, Path(a.data), Path(a.figure))


def _generative_train(a):
    from classlab.protocols.generative import train_diffusion

    train_diffusion(Path(a.data), a.seed, Path(a.out_dir), overrides=json.loads(a.overrides), threads=a.threads,
                    device=a.device, progress=not a.no_progress)


def _generative_samples(a):
    from classlab.protocols.generative import generate_samples

    generate_samples(Path(a.model), Path(a.out), a.seed, overrides=json.loads(a.overrides),
                     png_path=Path(a.png) if a.png else None, threads=a.threads, device=a.device)


def _generative_classify(a):
    from classlab.protocols.generative import classify_compositions

    classify_compositions(Path(a.model), Path(a.data), a.seed, Path(a.out_dir), overrides=json.loads(a.overrides),
                          method=a.method, threads=a.threads, device=a.device)


def _generative_personalize(a):
    from classlab.protocols.generative import personalize

    personalize(Path(a.model), Path(a.data), a.seed, Path(a.out_dir), overrides=json.loads(a.overrides),
                method=a.method, threads=a.threads, device=a.device)


def _aggregate_generative(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.generative import generative_claims, write_generative_tables

    claims = load_claims(a.claims_dir)
    runs = write_generative_tables(a.metrics, a.histories, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, generative_claims(runs, claims).to_csv(index=False))


def _plot_personalised(a):
    from classlab.report.generative import plot_personalised_samples

    plot_personalised_samples(a.metrics, a.samples, Path(a.figure))


def _plot_retrieval(a):
    from classlab.report.metric import plot_retrieval_examples

    plot_retrieval_examples(a.metrics, Path(a.figure))


def _source_statistics(a):
    from classlab.protocols.shift import compute_source_statistics_file

    compute_source_statistics_file(Path(a.checkpoint), Path(a.data), Path(a.out), a.per_class, threads=a.threads,
                                   device=a.device)


def _adapt_test_time(a):
    from classlab.protocols.shift import run_test_time

    streams = [(name, int(sev)) for name, sev in json.loads(a.streams)]
    run_test_time(a.method, Path(a.checkpoint), Path(a.data), a.seed, streams, Path(a.out), a.test_per_class,
                  a.batch_size, Path(a.source_stats) if a.source_stats else None, json.loads(a.overrides),
                  a.threads, a.device)


def _figures_discovery(a):
    from classlab.report import discovery

    out = Path(a.out_dir)
    discovery.accuracy_bars(a.metrics, out / "discovery_accuracy.png")
    discovery.projections(a.predictions, out / "discovery_projection.png")
    discovery.confusions(a.predictions, out / "discovery_confusion.png")
    discovery.stage_curves(a.metrics, out / "discovery_stages.png")
    discovery.query_curves(a.metrics, out / "discovery_queries.png")


def _explain(a):
    from classlab.protocols.explain import check_layers, describe, parse_layers, run_explain

    layers = parse_layers(a.layer)
    check_layers(Path(a.checkpoint), layers)  # before any work: a misspelt layer lists the valid names
    info = run_explain(Path(a.checkpoint), Path(a.data), a.method, layers, Path(a.out_dir),
                       overrides=json.loads(a.overrides), n_images=a.images, image_seed=a.image_seed,
                       randomisation_images=a.randomisation_images, perturbation_steps=a.perturbation_steps,
                       threads=a.threads, seed=a.seed)
    print(describe(info))


def _evaluate_explain(a):
    from classlab.io import write_json
    from classlab.report.explain import explain_metrics

    write_json(a.out, explain_metrics(a.maps, a.info, a.tolerance))


def _aggregate_explain(a):
    from classlab.report.claims import load_claims
    from classlab.report.explain import run_rows, write_tables

    load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    runs = run_rows(a.metrics, a.accuracy or [])
    write_tables(runs, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md), Path(a.claims_csv), a.tolerance)


def _figures_explain(a):
    from classlab.report import explain

    labels = [Path(p).parts[-3] for p in a.maps]
    explain.map_grid(a.maps, labels, Path(a.out_maps))
    explain.randomisation_curves(a.metrics, [Path(p).parts[-3] for p in a.metrics], Path(a.out_randomisation))


def _train_incremental(a):
    from classlab.protocols.incremental import run_incremental

    run_incremental(a.method, Path(a.data), Path(a.scenario), a.backbone, a.seed, Path(a.ckpt_dir), Path(a.eval_dir),
                    overrides=json.loads(a.overrides), init=Path(a.init) if a.init else None,
                    backbone_kwargs=json.loads(a.backbone_kwargs), threads=a.threads, device=a.device,
                    progress=not a.no_progress)


def _train_forgetting(a):
    from classlab.protocols.forgetting import run_continual_forgetting

    run_continual_forgetting(a.method, Path(a.data), a.backbone, a.seed, Path(a.ckpt_dir), Path(a.eval_dir),
                             init=Path(a.init), overrides=json.loads(a.overrides),
                             forget_tasks=json.loads(a.forget_tasks), backbone_kwargs=json.loads(a.backbone_kwargs),
                             threads=a.threads, device=a.device, progress=not a.no_progress)


def _train_multilabel(a):
    from classlab.protocols.multilabel import run_multilabel

    run_multilabel(a.method, Path(a.data), Path(a.scenario), json.loads(a.scenes), a.backbone, a.seed,
                   Path(a.ckpt_dir), Path(a.eval_dir), overrides=json.loads(a.overrides),
                   init=Path(a.init) if a.init else None, backbone_kwargs=json.loads(a.backbone_kwargs),
                   threads=a.threads, device=a.device, progress=not a.no_progress)


def _evaluate_multilabel(a):
    from classlab.protocols.multilabel import evaluate_multilabel

    evaluate_multilabel(Path(a.predictions), Path(a.history), Path(a.out))


def _evaluate_incremental(a):
    import numpy as np

    from classlab.data.scenarios import ClassIncrementalScenario
    from classlab.io import read_json, write_json
    from classlab.metrics.incremental import summarize_incremental

    scenario = ClassIncrementalScenario.load(Path(a.scenario))
    meta = read_json(a.history)["meta"]
    with np.load(a.predictions) as z:
        steps = [(z[f"logits_task{t}"].argmax(1), z[f"labels_task{t}"]) for t in range(scenario.num_tasks)]
        curves = [f"anytime_task{t}" for t in range(scenario.num_tasks) if f"anytime_task{t}" in z.files]
        anytime = np.concatenate([z[k] for k in curves]) if curves else None  # in task order, not name order
        val = (z["val_logits_last"].argmax(1), z["val_labels_last"]) if "val_logits_last" in z.files else None
    metrics = summarize_incremental(steps, scenario.task_of_class(), scenario.kind, anytime)
    if val is not None and len(val[1]):
        # accuracy on the validation split's seen classes after the last task: options are chosen here
        metrics["val_last_accuracy"] = float((val[0] == val[1]).mean())
    metrics.update({k: meta[k] for k in ("dataset", "method", "seed", "backbone", "scenario", "scenario_kind")})
    metrics.update({k: meta[k] for k in ("provenance", "train_steps", "batch_size") if k in meta})
    metrics["task_classes"] = [t.classes for t in scenario.tasks]
    metrics["init"] = meta["init"]
    metrics["init_kind"] = meta.get("init_kind", "scratch")
    write_json(a.out, metrics)


def _aggregate_incremental(a):
    from classlab.io import write_text
    from classlab.report.claims import load_claims
    from classlab.report.incremental import incremental_claims, write_incremental_tables

    claims = load_claims(a.claims_dir)  # first: a malformed claims file fails before any table is written
    runs = write_incremental_tables(a.metrics, Path(a.runs_csv), Path(a.summary_csv), Path(a.summary_md))
    write_text(a.claims_csv, incremental_claims(runs, claims).to_csv(index=False))


def _figures_incremental(a):
    from classlab.report.incremental import accuracy_curves, accuracy_matrix_heatmaps

    out = Path(a.out_dir)
    accuracy_curves([Path(p) for p in a.metrics], out / "accuracy_curves.png")
    accuracy_matrix_heatmaps([Path(p) for p in a.metrics], out / "accuracy_matrix.png")


def _validate(a):
    import yaml

    from classlab.config import validate_config

    config = {}
    for path in a.configfile:
        config.update(yaml.safe_load(Path(path).read_text()) or {})
    validate_config(config)
    print("config ok")


def _add_model_options(p, init_help: str, init_required: bool = False) -> None:
    """What every training command takes: the method, data, backbone, seed, overrides and init."""
    p.add_argument("--method", required=True)
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--backbone", required=True)
    p.add_argument("--backbone-kwargs", default="{}")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--overrides", default="{}", help="JSON hyperparameter overrides")
    p.add_argument("--init", default=None, required=init_required, help=init_help)


def _add_execution_options(p) -> None:
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")


def _add_run_options(p, init_help: str, init_required: bool = False) -> None:
    """Options every protocol run takes (train-incremental, -multilabel, -forgetting)."""
    _add_model_options(p, init_help, init_required)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--eval-dir", required=True)
    _add_execution_options(p)


def _add_metric_options(p, method_help: str, data_help: str) -> None:
    """What a metric- or dense-family run takes (metric-retrieval, metric-scenes, dense-run)."""
    p.add_argument("--method", required=True, help=method_help)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--backbone-kwargs", default="{}")
    p.add_argument("--overrides", default="{}")
    p.add_argument("--out-dir", required=True)
    _add_execution_options(p)


def _add_table_outputs(p) -> None:
    """What every aggregate command writes: per-run rows, the summary (CSV and markdown), the claims."""
    p.add_argument("--runs-csv", required=True)
    p.add_argument("--summary-csv", required=True)
    p.add_argument("--summary-md", required=True)
    p.add_argument("--claims-csv", required=True)
    p.add_argument("--claims-dir", default=None, help="directory of <family>.yaml claims (default: config/claims)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="classlab", description=__doc__)
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("download", help="place checksummed raw files of a dataset")
    p.add_argument("--dataset", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--mirror", default=None, help="local directory tried before the official URLs")
    p.set_defaults(func=_download)

    p = sub.add_parser("prepare", help="raw files -> uint8 tensors + manifest.json")
    p.add_argument("--dataset", required=True)
    p.add_argument("--raw-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipe", default=None,
                   help="scene datasets: JSON scene recipe over the dataset's defaults (seed, grid, n_distractors, "
                        "target_classes, distractor_classes, n_train, n_test); long-tailed dense scenes "
                        "(fashion_mnist_lt_scenes): seed, colors, objects, profile, imbalance_ratio, eval_profile, "
                        "grid, k_min, k_max, n_train, n_val, n_test, mask_threshold, rare_max, common_max")
    p.set_defaults(func=_prepare)

    p = sub.add_parser("train", help="train one method (resumes from out-dir/last.pt)")
    p.add_argument("--family", required=True)
    _add_model_options(p, init_help="model.pt whose backbone initialises this run")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--classes-from-scenario", default=None,
                   help="scenario JSON: train on its first task's samples only (labels of later tasks unseen)")
    p.add_argument("--classes-from-split", default=None,
                   help="discovery split JSON: train on its labelled known-class samples only (novel labels unseen)")
    p.add_argument("--pretrained-weights", action="store_true")
    p.add_argument("--teacher", default=None, help="model.pt of a teacher on the same dataset and classes (distillation)")
    _add_execution_options(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="test-set predictions.npz + metrics.json")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("aggregate", help="tables and claims of one family")
    p.add_argument("--family", required=True)
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate)

    p = sub.add_parser("merge-claims", help="one claims table from every family's, and the report's first screen")
    p.add_argument("--inputs", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--verdicts-html", default=None,
                   help="write the verdicts across families as an HTML fragment (the report's first screen)")
    p.add_argument("--report-metadata", default=None,
                   help="write the verdict counts as YAML for snakemake --report-metadata")
    p.set_defaults(func=_merge_claims)

    p = sub.add_parser("figures", help="figures of one family on one dataset")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--predictions", nargs="+", required=True)
    p.add_argument("--histories", nargs="+", required=True)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_figures)

    p = sub.add_parser("build-scenario", help="write a task sequence as a JSON manifest of indices")
    p.add_argument("--data", required=True)
    p.add_argument("--params", required=True, help="JSON: kind and the builder's parameters")
    p.add_argument("--seed", type=int, required=True, help="class-order seed")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_build_scenario)

    p = sub.add_parser("train-incremental", help="run an incremental method through a scenario")
    _add_run_options(p, init_help="model.pt whose backbone starts the run")
    p.add_argument("--scenario", required=True)
    p.set_defaults(func=_train_incremental)

    p = sub.add_parser("train-forgetting", help="continual forgetting: forget class sets in turn from an all-class model")
    _add_run_options(p, init_help="model.pt trained on all classes", init_required=True)
    p.add_argument("--forget-tasks", required=True, help='JSON list of class-id lists, e.g. "[[3,7],[1,5]]"')
    p.set_defaults(func=_train_forgetting)

    p = sub.add_parser("train-multilabel", help="a multi-label incremental method on scenes of a dataset")
    _add_run_options(p, init_help="model.pt whose backbone starts the run")
    p.add_argument("--scenario", required=True, help="class_incremental scenario JSON: class order and tasks")
    p.add_argument("--scenes", default="{}", help="JSON scene recipe: seed, k_min, k_max, grid, n_train, n_test")
    p.set_defaults(func=_train_multilabel)

    p = sub.add_parser("evaluate-multilabel", help="mAP metrics.json from per-task multi-label predictions")
    p.add_argument("--predictions", required=True)
    p.add_argument("--history", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_evaluate_multilabel)

    p = sub.add_parser("evaluate-incremental", help="metrics.json from per-task predictions")
    p.add_argument("--predictions", required=True)
    p.add_argument("--scenario", required=True)
    p.add_argument("--history", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_evaluate_incremental)

    p = sub.add_parser("aggregate-incremental", help="tables and claims of the incremental family")
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_incremental)

    p = sub.add_parser("figures-incremental", help="accuracy curves and accuracy-matrix heat maps")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_figures_incremental)

    p = sub.add_parser("build-discovery-split", help="write a discovery split (known/novel classes, labelled set) as JSON")
    p.add_argument("--data", required=True)
    p.add_argument("--params", required=True, help="JSON: kind and the split builder's parameters")
    p.add_argument("--seed", type=int, required=True, help="class-order and labelled-subset seed")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_build_discovery_split)

    p = sub.add_parser("train-discovery", help="run a discovery method through a split")
    _add_run_options(p, init_help="model.pt whose backbone starts the run (simclr or supervised on known classes)")
    p.add_argument("--split", required=True)
    p.set_defaults(func=_train_discovery)

    p = sub.add_parser("evaluate-discovery", help="clustering metrics.json (All/Old/New, v1, balanced, NMI, ARI)")
    p.add_argument("--predictions", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--history", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_evaluate_discovery)

    p = sub.add_parser("aggregate-discovery", help="tables and claims of the discovery family")
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_discovery)

    p = sub.add_parser("figures-discovery", help="accuracy bars, 2-D projections, confusions, stage and query curves")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--predictions", nargs="+", required=True)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_figures_discovery)

    p = sub.add_parser("build-domains", help="write domain-generalisation environments (rotated, colored) and their manifest")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--params", required=True, help="JSON: kind and the domain recipe")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_build_domains)

    p = sub.add_parser("train-dg", help="one DomainBed job: every hyperparameter draw of a method for one test domain and trial")
    p.add_argument("--method", required=True)
    p.add_argument("--domains", required=True, help="directory of build-domains")
    p.add_argument("--test-domain", required=True)
    p.add_argument("--backbone", required=True)
    p.add_argument("--backbone-kwargs", default="{}")
    p.add_argument("--trial", type=int, required=True, help="seeds the 80/20 split, the draws and the models")
    p.add_argument("--n-draws", type=int, required=True, help="hyperparameter draws (draw 0: the defaults)")
    p.add_argument("--overrides", default="{}", help="JSON hyperparameter overrides (never searched over)")
    p.add_argument("--work-dir", required=True, help="per-draw records and resume checkpoints")
    p.add_argument("--out", required=True, help="records.json")
    _add_execution_options(p)
    p.set_defaults(func=_train_dg)

    p = sub.add_parser("condense", help="condense a prepared dataset into N images per class and evaluate them")
    p.add_argument("--method", required=True)
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--images-per-class", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--overrides", default="{}")
    p.add_argument("--backbone-kwargs", default="{}", help="JSON kwargs of convnet_dc (width, depth)")
    p.add_argument("--pattern", default="{}", help='JSON data variant, e.g. {"strength": 0.6, "seed": 0}')
    p.add_argument("--out-dir", required=True)
    _add_execution_options(p)
    p.set_defaults(func=_condense)

    p = sub.add_parser("aggregate-condense", help="tables (next to the papers' numbers) and claims of the condense family")
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_condense)

    p = sub.add_parser("base-to-novel", help="adapt the offline image-text model on few-shot base classes; base / new / H")
    _add_adaptation_options(p, "the pretrain stage's image_text model.pt, or real CLIP as open_clip:<model>:<tag>",
                            "prepared dataset directory", "training images per base class (drawn per seed)")
    p.add_argument("--test-per-class", type=int, default=0, help="a seeded subset of the test split (0: all)")
    p.add_argument("--image-side", default="base", choices=["base", "all"],
                   help="what the pretrained model's image side may have seen (base: a model that saw a new class is refused)")
    p.set_defaults(func=_base_to_novel)

    p = sub.add_parser("compositional", help="compositional zero-shot on a pairs dataset: seen / unseen / H, AUC")
    _add_adaptation_options(p, "the pretrain stage's image_text model.pt of the seen pairs, or real CLIP",
                            "prepared pairs dataset directory (fashion_mnist_pairs, digits_pairs)",
                            "training images per seen pair (drawn per seed)")
    p.set_defaults(func=_compositional)

    p = sub.add_parser("label-noise", help="train on labels with injected noise (CAPro's protocol); test accuracy")
    p.add_argument("--method", required=True, help="a method of config/methods/vlm/ (noisy_ce, capro)")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--noise-rate", type=float, required=True, help="share of training labels flipped, in [0, 1)")
    p.add_argument("--noise-kind", default="web", choices=["web", "symmetric"])
    p.add_argument("--samples-per-class", type=int, default=0, help="a seeded training subset per class (0: all)")
    p.add_argument("--backbone", default="convnet")
    p.add_argument("--backbone-kwargs", default="{}")
    p.add_argument("--overrides", default="{}")
    p.add_argument("--out-dir", required=True)
    _add_execution_options(p)
    p.set_defaults(func=_label_noise)

    p = sub.add_parser("describe-classes", help="regenerate a dataset's class descriptions with a language model "
                                               "(needs internet for the model on first use)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="a transformers causal language model, e.g. Qwen/Qwen2.5-0.5B-Instruct")
    p.add_argument("--per-class", type=int, default=3, help="generic descriptions per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the YAML to write (config/descriptions/<dataset>.yaml's form)")
    p.set_defaults(func=_describe_classes)

    p = sub.add_parser("plot-vlm-epochs", help="base / new / H against training epochs (OGEN's long-training case)")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--figure", required=True)
    p.add_argument("--table", required=True)
    p.set_defaults(func=_plot_vlm_epochs)

    p = sub.add_parser("aggregate-vlm", help="base / new / H tables and the vlm family's claims")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--epoch-metrics", nargs="*", default=[], help="the long-training curve's runs (scenario .../<E>ep)")
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_vlm)

    p = sub.add_parser("single-paper", help="a single_paper method on its own protocol (icl_gd, mil, aspl, ...)")
    p.add_argument("--method", required=True, help="a method of config/methods/single_paper/")
    p.add_argument("--data", default=None, help="prepared dataset directory (the image protocols: mil, aspl)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--overrides", default="{}", help="hyperparameter overrides (the method's YAML owns its model)")
    p.add_argument("--out-dir", required=True)
    _add_execution_options(p)
    p.set_defaults(func=_single_paper)

    p = sub.add_parser("aggregate-single-paper", help="tables and claims of the single_paper protocols")
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_single_paper)

    p = sub.add_parser("plot-single-paper", help="the ICL loss curves against GD and ASPL's accuracy against labels")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--figure-dir", required=True)
    p.set_defaults(func=_plot_single_paper)

    p = sub.add_parser("metric-retrieval", help="deep metric learning: train on half the classes, retrieve the rest")
    _add_metric_options(p, "a method of config/methods/metric/", "prepared dataset directory")
    p.add_argument("--select", action="store_true",
                   help="hold out the last val_classes training classes and score on them (choosing options)")
    p.set_defaults(func=_metric_retrieval)

    p = sub.add_parser("metric-scenes", help="scene retrieval (CFCD): the query object among distractors, mAP")
    _add_metric_options(p, "a method of config/methods/metric/ (cfcd, cfcd_global)", "prepared scenes dataset directory")
    p.set_defaults(func=_metric_scenes)

    p = sub.add_parser("aggregate-metric", help="Recall@K / NMI / MAP@R and mAP tables and the metric family's claims")
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_metric)

    p = sub.add_parser("plot-retrieval", help="retrieval examples: queries and their nearest neighbours")
    p.add_argument("--metrics", nargs="+", required=True,
                   help="the runs' metrics.json (embeddings.npz or retrieval_examples.npz beside each)")
    p.add_argument("--figure", required=True)
    p.set_defaults(func=_plot_retrieval)

    for name, dense, text in (("ssl-probe", False, "linear probe and k-NN on a frozen pretrained backbone"),
                              ("ssl-segmentation-probe", True,
                               "a linear segmentation probe on a frozen backbone's feature maps (dense scenes)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", required=True, help="a pretrain node's model.pt")
        p.add_argument("--data", required=True, help="prepared dataset directory")
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--probe", default="{}", help="JSON probe settings over classlab.protocols.ssl_probe.PROBE_DEFAULTS")
        p.add_argument("--out-dir", required=True)
        p.add_argument("--threads", type=int, default=None)
        p.set_defaults(func=_ssl_probe, dense=dense)

    p = sub.add_parser("aggregate-ssl", help="probe tables and the ssl family's claims")
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_ssl)

    p = sub.add_parser("plot-ssl-probes", help="probe accuracy / mIoU per ssl method")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--figure", required=True)
    p.set_defaults(func=_plot_ssl_probes)

    p = sub.add_parser("dense-run", help="detection or segmentation on long-tailed scenes: train, score val and test")
    _add_metric_options(p, "a method of config/methods/dense/", "prepared dense scenes dataset directory")
    p.set_defaults(func=_dense_run)

    p = sub.add_parser("aggregate-dense", help="AP / mIoU / rare-class F1 / pixel ECE tables and the dense family's claims")
    p.add_argument("--metrics", nargs="+", required=True)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_dense)

    p = sub.add_parser("plot-dense-examples", help="test scenes with each dense method's detections or masks drawn")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--predictions", nargs="+", required=True)
    p.add_argument("--data", required=True, help="prepared dense scenes dataset directory")
    p.add_argument("--figure", required=True)
    p.set_defaults(func=_plot_dense_examples)

    p = sub.add_parser("generative-train", help="train the shared class-conditional DDPM on a pairs dataset's seen pairs")
    p.add_argument("--data", required=True, help="prepared pairs dataset directory")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--overrides", default="{}", help="JSON overrides of config/methods/generative/ddpm.yaml")
    p.add_argument("--out-dir", required=True)
    _add_execution_options(p)
    p.set_defaults(func=_generative_train)

    p = sub.add_parser("generative-samples", help="samples of every pair of the grid from a trained DDPM (npz and PNG)")
    p.add_argument("--model", required=True, help="the DDPM's model.pt")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--overrides", default="{}", help="JSON: sample_steps, guidance_scale, sample_eta, samples_per_pair")
    p.add_argument("--out", required=True, help="samples.npz")
    p.add_argument("--png", default=None, help="the samples as a PNG grid (rows = pairs, held-out rows framed)")
    _add_execution_options(p)
    p.set_defaults(func=_generative_samples)

    for name, func, text in (
            ("generative-classify", _generative_classify,
             "the diffusion classifier on held-out compositions, per timestep weighting"),
            ("generative-personalize", _generative_personalize,
             "personalise the DDPM on one instance (classdiffusion or personalize) and test its compositions")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--method", required=True, help="a method of config/methods/generative/")
        p.add_argument("--model", required=True, help="the DDPM's model.pt")
        p.add_argument("--data", required=True, help="prepared pairs dataset directory")
        p.add_argument("--seed", type=int, required=True)
        p.add_argument("--overrides", default="{}")
        p.add_argument("--out-dir", required=True)
        _add_execution_options(p)
        p.set_defaults(func=func)

    p = sub.add_parser("aggregate-generative", help="DDPM, diffusion-classifier and personalisation tables and claims")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--histories", nargs="*", default=[], help="the DDPM nodes' history.json")
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_generative)

    p = sub.add_parser("plot-personalised", help="personalised samples with and without the preservation loss")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--samples", nargs="+", required=True)
    p.add_argument("--figure", required=True)
    p.set_defaults(func=_plot_personalised)

    p = sub.add_parser("source-statistics", help="class-conditional feature statistics of a source model on its train split")
    p.add_argument("--checkpoint", required=True, help="the source model.pt")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--per-class", type=int, default=0, help="a seeded subset of this many train images per class (0: all)")
    p.add_argument("--out", required=True)
    _add_execution_options(p)
    p.set_defaults(func=_source_statistics)

    p = sub.add_parser("adapt-test-time", help="online test-time adaptation of a source model over corrupted test streams")
    p.add_argument("--method", required=True)
    p.add_argument("--checkpoint", required=True, help="the source model.pt")
    p.add_argument("--data", required=True, help="prepared dataset directory (its test split)")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--streams", required=True, help='JSON list of [corruption, severity], e.g. [["fog", 3]]')
    p.add_argument("--test-per-class", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--source-stats", default=None)
    p.add_argument("--overrides", default="{}")
    p.add_argument("--out", required=True)
    _add_execution_options(p)
    p.set_defaults(func=_adapt_test_time)

    p = sub.add_parser("aggregate-shift", help="DomainBed tables (both selections), TTA tables and the shift family's claims")
    p.add_argument("--records", nargs="*", default=[])
    p.add_argument("--tta-metrics", nargs="*", default=[])
    p.add_argument("--dg-table", default=None, help="the DomainBed tables as one CSV (HTML report)")
    p.add_argument("--tta-table", default=None, help="TTA accuracy by corruption as a CSV (HTML report)")
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_shift)

    p = sub.add_parser("explain", help="saliency maps of a checkpoint on the test scenes of a scenes dataset")
    p.add_argument("--checkpoint", required=True, help="a model.pt of any family (or a promptcam run's)")
    p.add_argument("--data", required=True, help="a prepared scenes dataset (data/prepared/<name>_scenes)")
    p.add_argument("--method", required=True, help="a method of config/methods/explain/")
    p.add_argument("--layer", default="", help="comma-separated layer names (classlab.models.backbones.layer_names)")
    p.add_argument("--overrides", default="{}", help="JSON hyperparameter overrides of the method's YAML")
    p.add_argument("--images", type=int, default=200, help="explained test scenes (a fixed, seeded set)")
    p.add_argument("--image-seed", type=int, default=0)
    p.add_argument("--randomisation-images", type=int, default=50)
    p.add_argument("--perturbation-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="seeds the randomisation cascade and random maps")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_explain)

    p = sub.add_parser("evaluate-explain", help="saliency metrics.json from a job's maps.npz")
    p.add_argument("--maps", required=True)
    p.add_argument("--info", required=True)
    p.add_argument("--tolerance", type=int, default=0, help="pointing game tolerance in pixels")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_evaluate_explain)

    p = sub.add_parser("aggregate-explain", help="tables and claims of the explain family")
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--accuracy", nargs="*", default=[])
    p.add_argument("--tolerance", type=int, default=0)
    _add_table_outputs(p)
    p.set_defaults(func=_aggregate_explain)

    p = sub.add_parser("figures-explain", help="the map grid and the randomisation curves of one model")
    p.add_argument("--maps", nargs="+", required=True)
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--out-maps", required=True)
    p.add_argument("--out-randomisation", required=True)
    p.set_defaults(func=_figures_explain)

    p = sub.add_parser("validate-config", help="check config files against the schema and registry")
    p.add_argument("configfile", nargs="+")
    p.set_defaults(func=_validate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    from classlab.config import ConfigError
    from classlab.data.download import ChecksumError
    from classlab.data.discovery_split import SplitError
    from classlab.data.scenarios import ScenarioError
    from classlab.engine.checkpoint import CheckpointError
    from classlab.data.domains import DomainError
    from classlab.protocols.explain import ExplainError

    try:
        args.func(args)
    except (ConfigError, ChecksumError, CheckpointError, ScenarioError, SplitError, ExplainError, DomainError) as exc:
        print(f"classlab {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
