# classlab: download -> prepare -> pretrain -> <family> runs -> evaluate -> tables -> figures -> report.
# `snakemake -c2` runs the default config; `--configfile config/smoke.yaml` the tiny test run;
# `--workflow-profile workflow/profiles/slurm` sends training jobs to a SLURM cluster.
from snakemake.utils import min_version

min_version("9.0")


# The default experiment, unless another config is given with --configfile (configs are
# complete experiments: they replace the default rather than being merged into it).
if not config:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/classifiers.smk"
include: "workflow/rules/incremental.smk"
include: "workflow/rules/discovery.smk"
include: "workflow/rules/explain.smk"
include: "workflow/rules/shift.smk"
include: "workflow/rules/condense.smk"
include: "workflow/rules/vlm.smk"
include: "workflow/rules/metric.smk"
include: "workflow/rules/single_paper.smk"
include: "workflow/rules/ssl.smk"
include: "workflow/rules/dense.smk"
include: "workflow/rules/generative.smk"
include: "workflow/rules/report.smk"


report: "workflow/report/workflow.rst"


# Cheap rules stay on the submitting host under a cluster executor.
localrules:
    all,
    download_dataset,
    aggregate_classifiers,
    merge_claims,
    plot_classifiers,
    build_scenario,
    evaluate_incremental,
    evaluate_multilabel,
    aggregate_incremental,
    plot_incremental,
    build_discovery_split,
    evaluate_discovery,
    aggregate_discovery,
    plot_discovery,
    evaluate_saliency,
    aggregate_explain,
    plot_explain,
    build_domains,
    aggregate_shift,
    aggregate_condense,
    aggregate_vlm,
    aggregate_metric,
    plot_retrieval,
    aggregate_single_paper,
    plot_single_paper,
    aggregate_ssl,
    plot_ssl_probes,
    aggregate_dense,
    plot_dense_examples,
    aggregate_generative,
    plot_personalised,


rule all:
    default_target: True
    input:
        all_targets(),
