# Family `shift`, domain generalisation: domain suites built by code from each prepared dataset, one
# DomainBed job per suite x test domain x method x trial (every hyperparameter draw inside it), then
# the tables under both model selections and the claims.


wildcard_constraints:
    suite=_alternatives(list(SHIFT_SUITES) or ["none"]),
    test_domain=_alternatives(sorted({d for s in SHIFT_SUITES for d in suite_domains(s)}) or ["none"]),
    dg_method=_alternatives(SHIFT_DG.get("methods") or ["none"]),


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


rule aggregate_shift:
    input:
        records=dg_records(),
        claims="config/claims/shift.yaml",
    output:
        runs="results/tables/shift/runs.csv",
        summary=report("results/tables/shift/summary.csv", category="shift"),
        markdown="results/tables/shift/summary.md",
        claims="results/tables/shift/claims.csv",
    log:
        "logs/aggregate_shift.log",
    conda:
        ENV
    shell:
        "classlab aggregate-shift --records {input.records} --runs-csv {output.runs} "
        "--summary-csv {output.summary} --summary-md {output.markdown} --claims-csv {output.claims} > {log} 2>&1"
