# Family `condense`: one job per dataset x data variant x method x images per class x seed learns the
# synthetic set (the bi-level loop through the engine) and evaluates it by training fresh ConvNets on
# it; then the tables (next to the DC and DSA papers' numbers) and the claims.


wildcard_constraints:
    variant=_alternatives(condense_variants()),
    cond_method=_alternatives(CONDENSE.get("methods") or ["none"]),
    ipc=_alternatives(CONDENSE.get("images_per_class") or ["0"]),


rule condense_dataset:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        train=ancient("data/prepared/{dataset}/train.pt"),
        hparams="config/methods/condense/{cond_method}.yaml",
    output:
        images="results/condense/{dataset}/{variant}/{cond_method}/ipc{ipc}/seed{seed}/images.pt",
        manifest="results/condense/{dataset}/{variant}/{cond_method}/ipc{ipc}/seed{seed}/manifest.json",
        metrics="results/condense/{dataset}/{variant}/{cond_method}/ipc{ipc}/seed{seed}/metrics.json",
        grid=report(
            "results/condense/{dataset}/{variant}/{cond_method}/ipc{ipc}/seed{seed}/grid.png",
            caption="../report/condense_grid.rst",
            category="condense",
            subcategory="{variant}, {ipc} images per class",
        ),
    params:
        overrides=condense_overrides,
        pattern=condense_pattern_json,
        backbone_kwargs=condense_backbone_kwargs_json,
    log:
        "logs/condense_dataset/{dataset}/{variant}/{cond_method}/ipc{ipc}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=720,
    conda:
        ENV
    shell:
        "classlab condense --method {wildcards.cond_method} --data data/prepared/{wildcards.dataset} "
        "--images-per-class {wildcards.ipc} --seed {wildcards.seed} --overrides '{params.overrides}' "
        "--backbone-kwargs '{params.backbone_kwargs}' --pattern '{params.pattern}' --threads {threads} "
        "--out-dir results/condense/{wildcards.dataset}/{wildcards.variant}/{wildcards.cond_method}/ipc{wildcards.ipc}/seed{wildcards.seed} "
        "--no-progress > {log} 2>&1"


rule aggregate_condense:
    input:
        metrics=condense_metrics(),
        claims="config/claims/condense.yaml",
    output:
        runs="results/tables/condense/runs.csv",
        summary=report("results/tables/condense/summary.csv", caption="../report/condense_summary.rst",
                       category="condense", subcategory="tables"),
        markdown="results/tables/condense/summary.md",
        claims="results/tables/condense/claims.csv",
    log:
        "logs/aggregate_condense.log",
    conda:
        ENV
    shell:
        "classlab aggregate-condense --metrics {input.metrics} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.markdown} --claims-csv {output.claims} > {log} 2>&1"
