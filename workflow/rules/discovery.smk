# Family `discovery`: splits as JSON manifests (known/novel classes, the labelled subset), one job per
# method x split x seed that trains through the split's tasks and saves cluster assignments, then
# metrics, tables, claims and figures.


wildcard_constraints:
    split=_alternatives(list(DISCOVERY_SPLITS) or ["none"]),
    disc_method=_alternatives(family_methods("discovery") or ["none"]),


rule build_discovery_split:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        train=ancient("data/prepared/{dataset}/train.pt"),
    output:
        "results/splits/discovery/{dataset}/{split}/seed{seed}.json",
    params:
        spec=split_params_json,
    log:
        "logs/build_discovery_split/{dataset}/{split}/seed{seed}.log",
    conda:
        ENV
    shell:
        "classlab build-discovery-split --data data/prepared/{wildcards.dataset} --params '{params.spec}' "
        "--seed {wildcards.seed} --out {output} > {log} 2>&1"


# The NCD papers' first stage: supervised pretraining on the split's labelled known-class samples only.
rule pretrain_known:
    input:
        split="results/splits/discovery/{dataset}/{split}/seed{seed}.json",
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/pretrain/supervised.yaml",
    output:
        model="results/checkpoints/pretrain_known/{dataset}/{backbone}/{split}/seed{seed}/model.pt",
        history="results/checkpoints/pretrain_known/{dataset}/{backbone}/{split}/seed{seed}/history.json",
    params:
        overrides=pretrain_known_overrides_json,
        backbone_kwargs=backbone_kwargs_json,
    log:
        "logs/pretrain_known/{dataset}/{backbone}/{split}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family pretrain --method supervised --data data/prepared/{wildcards.dataset} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--overrides '{params.overrides}' --classes-from-split {input.split} --threads {threads} "
        "--out-dir results/checkpoints/pretrain_known/{wildcards.dataset}/{wildcards.backbone}/{wildcards.split}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule train_discovery:
    input:
        unpack(discovery_inputs),
    output:
        model="results/checkpoints/discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}/model.pt",
        history="results/checkpoints/discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}/history.json",
        predictions="results/eval/discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}/predictions.npz",
    params:
        overrides=discovery_overrides,
        backbone_kwargs=backbone_kwargs_json,
        init=discovery_init_option,
    log:
        "logs/train_discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    shell:
        "classlab train-discovery --method {wildcards.disc_method} --data data/prepared/{wildcards.dataset} "
        "--split {input.split} --backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' "
        "--seed {wildcards.seed} --overrides '{params.overrides}' {params.init} --threads {threads} "
        "--ckpt-dir results/checkpoints/discovery/{wildcards.dataset}/{wildcards.backbone}/{wildcards.split}/{wildcards.disc_method}/seed{wildcards.seed} "
        "--eval-dir results/eval/discovery/{wildcards.dataset}/{wildcards.backbone}/{wildcards.split}/{wildcards.disc_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule evaluate_discovery:
    input:
        predictions=ancient(
            "results/eval/discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}/predictions.npz"
        ),
        history=ancient(
            "results/checkpoints/discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}/history.json"
        ),
        split="results/splits/discovery/{dataset}/{split}/seed{seed}.json",
    output:
        "results/eval/discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}/metrics.json",
    params:
        # the training run's settings: its checkpoints are ancient() inputs (a `dvc pull` must not
        # re-evaluate), so a retrain under edited settings re-evaluates through this instead
        trained_with=discovery_training_params,
    log:
        "logs/evaluate_discovery/{dataset}/{backbone}/{split}/{disc_method}/seed{seed}.log",
    conda:
        ENV
    shell:
        "classlab evaluate-discovery --predictions {input.predictions} --split {input.split} "
        "--history {input.history} --out {output} > {log} 2>&1"


rule aggregate_discovery:
    input:
        metrics=discovery_runs("metrics.json"),
        claims="config/claims/discovery.yaml",
    output:
        runs="results/tables/discovery/runs.csv",
        summary="results/tables/discovery/summary.csv",
        md="results/tables/discovery/summary.md",
        table=report(
            "results/tables/discovery/summary_table.csv",
            caption="../report/discovery_summary.rst",
            category="discovery",
            subcategory="tables",
        ),
        claims="results/tables/discovery/claims.csv",
    log:
        "logs/aggregate_discovery.log",
    conda:
        ENV
    shell:
        "classlab aggregate-discovery --metrics {input.metrics} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.md} --claims-csv {output.claims} > {log} 2>&1"


rule plot_discovery:
    input:
        metrics=discovery_runs("metrics.json"),
        predictions=discovery_figure_predictions,
    output:
        accuracy=report("results/figures/discovery/discovery_accuracy.png", caption="../report/discovery_accuracy.rst",
                        category="discovery", subcategory="figures"),
        projection=report("results/figures/discovery/discovery_projection.png",
                          caption="../report/discovery_projection.rst", category="discovery", subcategory="figures"),
        confusion=report("results/figures/discovery/discovery_confusion.png",
                         caption="../report/discovery_confusion.rst", category="discovery", subcategory="figures"),
        stages=report("results/figures/discovery/discovery_stages.png", caption="../report/discovery_stages.rst",
                      category="discovery", subcategory="figures"),
        queries=report("results/figures/discovery/discovery_queries.png", caption="../report/discovery_queries.rst",
                       category="discovery", subcategory="figures"),
    log:
        "logs/plot_discovery.log",
    conda:
        ENV
    shell:
        "classlab figures-discovery --metrics {input.metrics} --predictions {input.predictions} "
        "--out-dir results/figures/discovery > {log} 2>&1"
