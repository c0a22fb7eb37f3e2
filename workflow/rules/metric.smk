# Family `metric`: deep metric learning on the CUB/Cars split (train on the first half of the classes,
# retrieve the other half: Recall@K, NMI, MAP@R), optionally the Reality Check's validation runs on
# held-out training classes, and CFCD's scene retrieval (mAP); then the tables, figures and claims.


wildcard_constraints:
    metric_method=_alternatives(sorted(set(METRIC.get("methods") or ["none"]) | set(METRIC_SCENES.get("methods", [])))),
    metric_split="test|select",


rule train_metric:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/metric/{metric_method}.yaml",
    output:
        metrics="results/eval/metric/{dataset}/{backbone}/{metric_split}/{metric_method}/seed{seed}/metrics.json",
        embeddings="results/eval/metric/{dataset}/{backbone}/{metric_split}/{metric_method}/seed{seed}/embeddings.npz",
    params:
        overrides=metric_overrides,
        backbone_kwargs=metric_backbone_kwargs,
        select=metric_select_flag,
    log:
        "logs/train_metric/{dataset}/{backbone}/{metric_split}/{metric_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab metric-retrieval --method {wildcards.metric_method} --data data/prepared/{wildcards.dataset} "
        "--seed {wildcards.seed} --backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' "
        "--overrides '{params.overrides}' {params.select} --threads {threads} "
        "--out-dir results/eval/metric/{wildcards.dataset}/{wildcards.backbone}/{wildcards.metric_split}/{wildcards.metric_method}/seed{wildcards.seed} "
        "--no-progress > {log} 2>&1"


rule train_metric_scenes:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/metric/{metric_method}.yaml",
    output:
        metrics="results/eval/metric_scenes/{dataset}/{backbone}/{metric_method}/seed{seed}/metrics.json",
    params:
        overrides=metric_overrides,
        backbone_kwargs=metric_scene_backbone_kwargs,
    log:
        "logs/train_metric_scenes/{dataset}/{backbone}/{metric_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab metric-scenes --method {wildcards.metric_method} --data data/prepared/{wildcards.dataset} "
        "--seed {wildcards.seed} --backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' "
        "--overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/eval/metric_scenes/{wildcards.dataset}/{wildcards.backbone}/{wildcards.metric_method}/seed{wildcards.seed} "
        "--no-progress > {log} 2>&1"


rule plot_retrieval:
    input:
        metrics=metric_example_runs,
    output:
        figure=report("results/figures/metric/{dataset}_retrieval.png", caption="../report/metric_retrieval.rst",
                      category="metric", subcategory="figures"),
    log:
        "logs/plot_retrieval/{dataset}.log",
    conda:
        ENV
    shell:
        "classlab plot-retrieval --metrics {input.metrics} --figure {output.figure} > {log} 2>&1"


rule aggregate_metric:
    input:
        metrics=metric_retrieval_metrics() + metric_scene_metrics(),
        claims="config/claims/metric.yaml",
    output:
        runs="results/tables/metric/runs.csv",
        summary=report("results/tables/metric/summary.csv", caption="../report/metric_summary.rst",
                       category="metric", subcategory="tables"),
        markdown="results/tables/metric/summary.md",
        claims="results/tables/metric/claims.csv",
    log:
        "logs/aggregate_metric.log",
    conda:
        ENV
    shell:
        "classlab aggregate-metric --metrics {input.metrics} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.markdown} --claims-csv {output.claims} > {log} 2>&1"
