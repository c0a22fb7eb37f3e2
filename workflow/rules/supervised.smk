# Family `supervised`: fine-tune methods from the shared pretrained backbone, then evaluate.


wildcard_constraints:
    sup_method=_alternatives(family_methods("supervised") or ["none"]),


rule finetune_supervised:
    input:
        init=pretrained_backbone,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/supervised/{sup_method}.yaml",
    output:
        model="results/checkpoints/supervised/{dataset}/{backbone}/{sup_method}/seed{seed}/model.pt",
        history="results/checkpoints/supervised/{dataset}/{backbone}/{sup_method}/seed{seed}/history.json",
    params:
        overrides=supervised_overrides,
        backbone_kwargs=backbone_kwargs_json,
    log:
        "logs/finetune_supervised/{dataset}/{backbone}/{sup_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family supervised --method {wildcards.sup_method} --data data/prepared/{wildcards.dataset} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--init {input.init} --overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/checkpoints/supervised/{wildcards.dataset}/{wildcards.backbone}/{wildcards.sup_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule evaluate_supervised:
    input:
        model=ancient("results/checkpoints/supervised/{dataset}/{backbone}/{sup_method}/seed{seed}/model.pt"),
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
    output:
        predictions="results/eval/supervised/{dataset}/{backbone}/{sup_method}/seed{seed}/predictions.npz",
        metrics="results/eval/supervised/{dataset}/{backbone}/{sup_method}/seed{seed}/metrics.json",
    log:
        "logs/evaluate_supervised/{dataset}/{backbone}/{sup_method}/seed{seed}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "classlab evaluate --model {input.model} --data data/prepared/{wildcards.dataset} --threads {threads} "
        "--out-dir results/eval/supervised/{wildcards.dataset}/{wildcards.backbone}/{wildcards.sup_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule aggregate_supervised:
    input:
        metrics=supervised_runs("metrics.json"),
        claims="config/claims/supervised.yaml",
    output:
        runs=report(
            "results/tables/supervised/runs.csv",
            caption="../report/runs.rst",
            category="supervised",
            subcategory="tables",
        ),
        summary="results/tables/supervised/summary.csv",
        md="results/tables/supervised/summary.md",
        table=report(
            "results/tables/supervised/summary_table.csv",
            caption="../report/summary.rst",
            category="supervised",
            subcategory="tables",
        ),
        claims="results/tables/supervised/claims.csv",
    log:
        "logs/aggregate_supervised.log",
    conda:
        ENV
    shell:
        "classlab aggregate --family supervised --metrics {input.metrics} --runs-csv {output.runs} "
        "--summary-csv {output.summary} --summary-md {output.md} --claims-csv {output.claims} > {log} 2>&1"


rule plot_supervised:
    input:
        unpack(supervised_figure_inputs),
    output:
        curves=report(
            "results/figures/supervised/{dataset}/{backbone}/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="supervised",
            subcategory="{dataset} {backbone}",
        ),
        accuracy=report(
            "results/figures/supervised/{dataset}/{backbone}/accuracy_by_method.png",
            caption="../report/accuracy_by_method.rst",
            category="supervised",
            subcategory="{dataset} {backbone}",
        ),
        reliability=report(
            "results/figures/supervised/{dataset}/{backbone}/reliability.png",
            caption="../report/reliability.rst",
            category="supervised",
            subcategory="{dataset} {backbone}",
        ),
        confusion=report(
            "results/figures/supervised/{dataset}/{backbone}/confusion.png",
            caption="../report/confusion.rst",
            category="supervised",
            subcategory="{dataset} {backbone}",
        ),
    log:
        "logs/plot_supervised/{dataset}/{backbone}.log",
    conda:
        ENV
    shell:
        "classlab figures --metrics {input.metrics} --predictions {input.predictions} "
        "--histories {input.histories} --out-dir results/figures/supervised/{wildcards.dataset}/{wildcards.backbone} "
        "> {log} 2>&1"
