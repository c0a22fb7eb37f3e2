# Classifier families, `supervised` (training recipes) and `distill` (students of a shared teacher):
# each run trains one classifier, from the shared pretraining node, another pretraining node
# (`init: simclr`) or scratch, as the method's YAML says; then evaluate, tables, figures.


wildcard_constraints:
    cls_family=_alternatives(CLASSIFIER_FAMILIES or ["none"]),
    cls_method=_alternatives(sorted({m for f in CLASSIFIER_FAMILIES for m in family_methods(f)}) or ["none"]),


rule train_classifier:
    input:
        unpack(classifier_inputs),
    output:
        model="results/checkpoints/{cls_family}/{dataset}/{backbone}/{cls_method}/seed{seed}/model.pt",
        history="results/checkpoints/{cls_family}/{dataset}/{backbone}/{cls_method}/seed{seed}/history.json",
    params:
        overrides=classifier_overrides,
        backbone_kwargs=backbone_kwargs_json,
        options=classifier_options,
    log:
        "logs/train_classifier/{cls_family}/{dataset}/{backbone}/{cls_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family {wildcards.cls_family} --method {wildcards.cls_method} "
        "--data data/prepared/{wildcards.dataset} --backbone {wildcards.backbone} "
        "--backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} {params.options} "
        "--overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/checkpoints/{wildcards.cls_family}/{wildcards.dataset}/{wildcards.backbone}/{wildcards.cls_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule evaluate_classifier:
    input:
        model=ancient("results/checkpoints/{cls_family}/{dataset}/{backbone}/{cls_method}/seed{seed}/model.pt"),
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
    output:
        predictions="results/eval/{cls_family}/{dataset}/{backbone}/{cls_method}/seed{seed}/predictions.npz",
        metrics="results/eval/{cls_family}/{dataset}/{backbone}/{cls_method}/seed{seed}/metrics.json",
    params:
        # the training run's settings: its model.pt is an ancient() input (a `dvc pull` must not
        # re-evaluate), so a retrain under edited settings re-evaluates through this instead
        trained_with=classifier_training_params,
    log:
        "logs/evaluate_classifier/{cls_family}/{dataset}/{backbone}/{cls_method}/seed{seed}.log",
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "classlab evaluate --model {input.model} --data data/prepared/{wildcards.dataset} --threads {threads} "
        "--out-dir results/eval/{wildcards.cls_family}/{wildcards.dataset}/{wildcards.backbone}/{wildcards.cls_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule aggregate_classifiers:
    input:
        metrics=classifier_metrics,
        claims="config/claims/{cls_family}.yaml",
    output:
        runs=report(
            "results/tables/{cls_family}/runs.csv",
            caption="../report/runs.rst",
            category="{cls_family}",
            subcategory="tables",
        ),
        summary="results/tables/{cls_family}/summary.csv",
        md="results/tables/{cls_family}/summary.md",
        table=report(
            "results/tables/{cls_family}/summary_table.csv",
            caption="../report/summary.rst",
            category="{cls_family}",
            subcategory="tables",
        ),
        claims="results/tables/{cls_family}/claims.csv",
    log:
        "logs/aggregate_classifiers/{cls_family}.log",
    conda:
        ENV
    shell:
        "classlab aggregate --family {wildcards.cls_family} --metrics {input.metrics} --runs-csv {output.runs} "
        "--summary-csv {output.summary} --summary-md {output.md} --claims-csv {output.claims} > {log} 2>&1"


rule plot_classifiers:
    input:
        unpack(classifier_figure_inputs),
    output:
        curves=report(
            "results/figures/{cls_family}/{dataset}/{backbone}/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="{cls_family}",
            subcategory="{dataset} {backbone}",
        ),
        accuracy=report(
            "results/figures/{cls_family}/{dataset}/{backbone}/accuracy_by_method.png",
            caption="../report/accuracy_by_method.rst",
            category="{cls_family}",
            subcategory="{dataset} {backbone}",
        ),
        reliability=report(
            "results/figures/{cls_family}/{dataset}/{backbone}/reliability.png",
            caption="../report/reliability.rst",
            category="{cls_family}",
            subcategory="{dataset} {backbone}",
        ),
        confusion=report(
            "results/figures/{cls_family}/{dataset}/{backbone}/confusion.png",
            caption="../report/confusion.rst",
            category="{cls_family}",
            subcategory="{dataset} {backbone}",
        ),
        feature_norms=report(
            "results/figures/{cls_family}/{dataset}/{backbone}/feature_norms.png",
            caption="../report/feature_norms.rst",
            category="{cls_family}",
            subcategory="{dataset} {backbone}",
        ),
    log:
        "logs/plot_classifiers/{cls_family}/{dataset}/{backbone}.log",
    conda:
        ENV
    shell:
        "classlab figures --metrics {input.metrics} --predictions {input.predictions} "
        "--histories {input.histories} --out-dir results/figures/{wildcards.cls_family}/{wildcards.dataset}/{wildcards.backbone} "
        "> {log} 2>&1"
