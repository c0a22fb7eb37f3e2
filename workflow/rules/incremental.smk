# Family `incremental`: scenarios as JSON manifests, one job per method x scenario x seed that
# trains through every task and saves per-task test predictions, then metrics, tables, figures.


wildcard_constraints:
    scenario=_alternatives(list(INCREMENTAL_SCENARIOS) or ["none"]),
    inc_method=_alternatives(family_methods("incremental") or ["none"]),
    forgetting=_alternatives(list(FORGETTING) or ["none"]),


rule build_scenario:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        train=ancient("data/prepared/{dataset}/train.pt"),
    output:
        "results/scenarios/{dataset}/{scenario}/seed{seed}.json",
    params:
        spec=scenario_params_json,
    log:
        "logs/build_scenario/{dataset}/{scenario}/seed{seed}.log",
    conda:
        ENV
    shell:
        "classlab build-scenario --data data/prepared/{wildcards.dataset} --params '{params.spec}' "
        "--seed {wildcards.seed} --out {output} > {log} 2>&1"


rule pretrain_first_task:
    input:
        scenario="results/scenarios/{dataset}/{scenario}/seed{seed}.json",
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/pretrain/supervised.yaml",
    output:
        model="results/checkpoints/pretrain_first_task/{dataset}/{backbone}/{scenario}/seed{seed}/model.pt",
        history="results/checkpoints/pretrain_first_task/{dataset}/{backbone}/{scenario}/seed{seed}/history.json",
    params:
        overrides=pretrain_overrides_json,
        backbone_kwargs=backbone_kwargs_json,
    log:
        "logs/pretrain_first_task/{dataset}/{backbone}/{scenario}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family pretrain --method supervised --data data/prepared/{wildcards.dataset} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--overrides '{params.overrides}' --classes-from-scenario {input.scenario} --threads {threads} "
        "--out-dir results/checkpoints/pretrain_first_task/{wildcards.dataset}/{wildcards.backbone}/{wildcards.scenario}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule train_incremental:
    input:
        unpack(incremental_init_inputs),
    output:
        model="results/checkpoints/incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/model.pt",
        history="results/checkpoints/incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/history.json",
        predictions="results/eval/incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/predictions.npz",
    params:
        overrides=incremental_overrides,
        backbone_kwargs=backbone_kwargs_json,
        init=incremental_init_option,
    log:
        "logs/train_incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    shell:
        "classlab train-incremental --method {wildcards.inc_method} --data data/prepared/{wildcards.dataset} "
        "--scenario {input.scenario} --backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' "
        "--seed {wildcards.seed} --overrides '{params.overrides}' {params.init} --threads {threads} "
        "--ckpt-dir results/checkpoints/incremental/{wildcards.dataset}/{wildcards.backbone}/{wildcards.scenario}/{wildcards.inc_method}/seed{wildcards.seed} "
        "--eval-dir results/eval/incremental/{wildcards.dataset}/{wildcards.backbone}/{wildcards.scenario}/{wildcards.inc_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule train_forgetting:
    input:
        # the shared pretrained model of ALL classes: forgetting starts from it
        init=pretrained_backbone,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/incremental/{inc_method}.yaml",
    output:
        model="results/checkpoints/forgetting/{dataset}/{backbone}/{forgetting}/{inc_method}/seed{seed}/model.pt",
        history="results/checkpoints/forgetting/{dataset}/{backbone}/{forgetting}/{inc_method}/seed{seed}/history.json",
        predictions="results/eval/forgetting/{dataset}/{backbone}/{forgetting}/{inc_method}/seed{seed}/predictions.npz",
        metrics="results/eval/forgetting/{dataset}/{backbone}/{forgetting}/{inc_method}/seed{seed}/metrics.json",
    params:
        overrides=incremental_overrides,
        backbone_kwargs=backbone_kwargs_json,
        forget_tasks=forget_tasks_json,
    log:
        "logs/train_forgetting/{dataset}/{backbone}/{forgetting}/{inc_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    shell:
        "classlab train-forgetting --method {wildcards.inc_method} --data data/prepared/{wildcards.dataset} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--init {input.init} --forget-tasks '{params.forget_tasks}' --overrides '{params.overrides}' --threads {threads} "
        "--ckpt-dir results/checkpoints/forgetting/{wildcards.dataset}/{wildcards.backbone}/{wildcards.forgetting}/{wildcards.inc_method}/seed{wildcards.seed} "
        "--eval-dir results/eval/forgetting/{wildcards.dataset}/{wildcards.backbone}/{wildcards.forgetting}/{wildcards.inc_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule train_multilabel:
    input:
        unpack(incremental_init_inputs),
    output:
        model="results/checkpoints/multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/model.pt",
        history="results/checkpoints/multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/history.json",
        predictions="results/eval/multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/predictions.npz",
    params:
        overrides=incremental_overrides,
        backbone_kwargs=backbone_kwargs_json,
        init=incremental_init_option,
        scenes=scenes_json,
    log:
        "logs/train_multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    shell:
        "classlab train-multilabel --method {wildcards.inc_method} --data data/prepared/{wildcards.dataset} "
        "--scenario {input.scenario} --scenes '{params.scenes}' --backbone {wildcards.backbone} "
        "--backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} --overrides '{params.overrides}' "
        "{params.init} --threads {threads} "
        "--ckpt-dir results/checkpoints/multilabel/{wildcards.dataset}/{wildcards.backbone}/{wildcards.scenario}/{wildcards.inc_method}/seed{wildcards.seed} "
        "--eval-dir results/eval/multilabel/{wildcards.dataset}/{wildcards.backbone}/{wildcards.scenario}/{wildcards.inc_method}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule evaluate_multilabel:
    input:
        predictions=ancient(
            "results/eval/multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/predictions.npz"
        ),
        history=ancient(
            "results/checkpoints/multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/history.json"
        ),
    output:
        "results/eval/multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/metrics.json",
    params:
        # the training run's settings: its checkpoints are ancient() inputs (a `dvc pull` must not
        # re-evaluate), so a retrain under edited settings re-evaluates through this instead
        trained_with=incremental_training_params,
    log:
        "logs/evaluate_multilabel/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}.log",
    conda:
        ENV
    shell:
        "classlab evaluate-multilabel --predictions {input.predictions} --history {input.history} "
        "--out {output} > {log} 2>&1"


rule evaluate_incremental:
    input:
        predictions=ancient(
            "results/eval/incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/predictions.npz"
        ),
        history=ancient(
            "results/checkpoints/incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/history.json"
        ),
        scenario="results/scenarios/{dataset}/{scenario}/seed{seed}.json",
    output:
        "results/eval/incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}/metrics.json",
    params:
        # the training run's settings: its checkpoints are ancient() inputs (a `dvc pull` must not
        # re-evaluate), so a retrain under edited settings re-evaluates through this instead
        trained_with=incremental_training_params,
    log:
        "logs/evaluate_incremental/{dataset}/{backbone}/{scenario}/{inc_method}/seed{seed}.log",
    conda:
        ENV
    shell:
        "classlab evaluate-incremental --predictions {input.predictions} --scenario {input.scenario} "
        "--history {input.history} --out {output} > {log} 2>&1"


rule aggregate_incremental:
    input:
        metrics=incremental_metrics() + forgetting_metrics() + multilabel_metrics(),
        claims="config/claims/incremental.yaml",
    output:
        runs="results/tables/incremental/runs.csv",
        summary="results/tables/incremental/summary.csv",
        md="results/tables/incremental/summary.md",
        table=report(
            "results/tables/incremental/summary_table.csv",
            caption="../report/incremental_summary.rst",
            category="incremental",
            subcategory="tables",
        ),
        claims="results/tables/incremental/claims.csv",
    log:
        "logs/aggregate_incremental.log",
    conda:
        ENV
    shell:
        "classlab aggregate-incremental --metrics {input.metrics} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.md} --claims-csv {output.claims} > {log} 2>&1"


rule plot_incremental:
    input:
        incremental_figure_inputs,
    output:
        curves=report(
            "results/figures/incremental/{dataset}/{backbone}/{scenario}/accuracy_curves.png",
            caption="../report/incremental_curves.rst",
            category="incremental",
            subcategory="{dataset} {scenario}",
        ),
        matrix=report(
            "results/figures/incremental/{dataset}/{backbone}/{scenario}/accuracy_matrix.png",
            caption="../report/incremental_matrix.rst",
            category="incremental",
            subcategory="{dataset} {scenario}",
        ),
    log:
        "logs/plot_incremental/{dataset}/{backbone}/{scenario}.log",
    conda:
        ENV
    shell:
        "classlab figures-incremental --metrics {input} "
        "--out-dir results/figures/incremental/{wildcards.dataset}/{wildcards.backbone}/{wildcards.scenario} > {log} 2>&1"
