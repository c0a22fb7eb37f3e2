# Family `dense`: detection (COCO AP by frequency band) and semantic segmentation (mIoU, rare-class F1,
# pixel ECE) on long-tailed scenes; each method trained from scratch at its task's shared budget, scored
# on val and test; then the tables, the claims and a figure of the predictions drawn on test scenes.


wildcard_constraints:
    dense_method=_alternatives(DENSE.get("methods") or ["none"]),


rule train_dense:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/dense/{dense_method}.yaml",
    output:
        metrics="results/eval/dense/{dataset}/{dense_method}/seed{seed}/metrics.json",
        predictions="results/eval/dense/{dataset}/{dense_method}/seed{seed}/predictions.npz",
    params:
        overrides=dense_overrides,
        backbone=dense_backbone,
        backbone_kwargs=dense_backbone_kwargs,
        out_dir=output_folder,
    log:
        "logs/train_dense/{dataset}/{dense_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab dense-run --method {wildcards.dense_method} --data data/prepared/{wildcards.dataset} "
        "--seed {wildcards.seed} --backbone {params.backbone} --backbone-kwargs '{params.backbone_kwargs}' "
        "--overrides '{params.overrides}' --threads {threads} --out-dir {params.out_dir} --no-progress > {log} 2>&1"


rule aggregate_dense:
    input:
        metrics=dense_run_metrics(),
        claims="config/claims/dense.yaml",
    output:
        runs="results/tables/dense/runs.csv",
        summary=report("results/tables/dense/summary.csv", caption="../report/dense_summary.rst",
                       category="dense", subcategory="tables"),
        markdown="results/tables/dense/summary.md",
        claims="results/tables/dense/claims.csv",
    log:
        "logs/aggregate_dense.log",
    conda:
        ENV
    shell:
        "classlab aggregate-dense --metrics {input.metrics} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.markdown} --claims-csv {output.claims} > {log} 2>&1"


rule plot_dense_examples:
    input:
        unpack(dense_example_runs),
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
    output:
        figure=report("results/figures/dense/{dataset}_examples.png", caption="../report/dense_examples.rst",
                      category="dense", subcategory="figures"),
    log:
        "logs/plot_dense_examples/{dataset}.log",
    conda:
        ENV
    shell:
        "classlab plot-dense-examples --metrics {input.metrics} --predictions {input.predictions} "
        "--data data/prepared/{wildcards.dataset} --figure {output.figure} > {log} 2>&1"
