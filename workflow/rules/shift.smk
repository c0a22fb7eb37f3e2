# Family `shift`. Domain generalisation: domain suites built by code from each prepared dataset, one
# DomainBed job per suite x test domain x method x trial (every hyperparameter draw inside it).
# Test-time adaptation: the supervised family's source model per seed, its class statistics, one job
# per method x seed over every corrupted stream. Then the tables (both DG selections, TTA by
# corruption and severity) and the claims.


wildcard_constraints:
    suite=_alternatives(list(SHIFT_SUITES) or ["none"]),
    test_domain=_alternatives(sorted({d for s in SHIFT_SUITES for d in suite_domains(s)}) or ["none"]),
    dg_method=_alternatives(SHIFT_DG.get("methods") or ["none"]),
    tta_method=_alternatives(SHIFT_TTA.get("methods") or ["none"]),


rule build_domains:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        train=ancient("data/prepared/{dataset}/train.pt"),
    output:
        manifest="data/domains/{dataset}/{suite}/manifest.json",
        domains="data/domains/{dataset}/{suite}/domains.pt",
    params:
        spec=suite_params_json,
    log:
        "logs/build_domains/{dataset}/{suite}.log",
    conda:
        ENV
    shell:
        "classlab build-domains --data data/prepared/{wildcards.dataset} --params '{params.spec}' "
        "--out-dir data/domains/{wildcards.dataset}/{wildcards.suite} > {log} 2>&1"


rule train_dg:
    input:
        manifest="data/domains/{dataset}/{suite}/manifest.json",
        domains="data/domains/{dataset}/{suite}/domains.pt",
        hparams="config/methods/shift/{dg_method}.yaml",
    output:
        "results/eval/shift/dg/{dataset}/{backbone}/{suite}/{test_domain}/{dg_method}/trial{seed}/records.json",
    params:
        overrides=dg_overrides,
        backbone_kwargs=backbone_kwargs_json,
        n_draws=SHIFT_DG.get("n_draws", 4),
        training=dg_training_params,
    log:
        "logs/train_dg/{dataset}/{backbone}/{suite}/{test_domain}/{dg_method}/trial{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train-dg --method {wildcards.dg_method} --domains data/domains/{wildcards.dataset}/{wildcards.suite} "
        "--test-domain {wildcards.test_domain} --backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' "
        "--trial {wildcards.seed} --n-draws {params.n_draws} --overrides '{params.overrides}' --threads {threads} "
        "--work-dir results/checkpoints/shift/dg/{wildcards.dataset}/{wildcards.backbone}/{wildcards.suite}/{wildcards.test_domain}/{wildcards.dg_method}/trial{wildcards.seed} "
        "--out {output} --no-progress > {log} 2>&1"


rule compute_source_statistics:
    input:
        checkpoint=tta_source_checkpoint,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
    output:
        "results/checkpoints/shift/source_stats/{dataset}/{backbone}/seed{seed}/stats.pt",
    params:
        per_class=SHIFT_TTA.get("stats_samples_per_class", 1000),
    log:
        "logs/compute_source_statistics/{dataset}/{backbone}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "classlab source-statistics --checkpoint {input.checkpoint} --data data/prepared/{wildcards.dataset} "
        "--per-class {params.per_class} --threads {threads} --out {output} > {log} 2>&1"


rule adapt_test_time:
    input:
        unpack(tta_inputs),
    output:
        "results/eval/shift/tta/{dataset}/{backbone}/{tta_method}/seed{seed}/metrics.json",
    params:
        overrides=tta_overrides,
        streams=tta_streams_json,
        per_class=SHIFT_TTA.get("test_samples_per_class", 200),
        batch_size=SHIFT_TTA.get("batch_size", 64),
    log:
        "logs/adapt_test_time/{dataset}/{backbone}/{tta_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    shell:
        "classlab adapt-test-time --method {wildcards.tta_method} --checkpoint {input.checkpoint} "
        "--data data/prepared/{wildcards.dataset} --seed {wildcards.seed} --streams '{params.streams}' "
        "--test-per-class {params.per_class} --batch-size {params.batch_size} --source-stats {input.stats} "
        "--overrides '{params.overrides}' --threads {threads} --out {output} > {log} 2>&1"


rule aggregate_shift:
    input:
        records=dg_records(),
        tta=tta_metrics(),
        claims="config/claims/shift.yaml",
    output:
        runs="results/tables/shift/runs.csv",
        summary="results/tables/shift/summary.csv",
        markdown="results/tables/shift/summary.md",
        dg_table=report(
            "results/tables/shift/dg_table.csv",
            caption="../report/shift_dg.rst",
            category="shift",
            subcategory="tables",
        ),
        tta_table=report(
            "results/tables/shift/tta_table.csv",
            caption="../report/shift_tta.rst",
            category="shift",
            subcategory="tables",
        ),
        claims="results/tables/shift/claims.csv",
    log:
        "logs/aggregate_shift.log",
    conda:
        ENV
    shell:
        "classlab aggregate-shift --records {input.records} --tta-metrics {input.tta} --runs-csv {output.runs} "
        "--summary-csv {output.summary} --summary-md {output.markdown} --claims-csv {output.claims} "
        "--dg-table {output.dg_table} --tta-table {output.tta_table} > {log} 2>&1"
