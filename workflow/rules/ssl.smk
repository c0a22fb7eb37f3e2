# Family `ssl`: self-supervised pretraining, each method a pretrain node (a pretrain-stage method of
# config/methods/pretrain/) trained at its group's budget, then probed on the frozen backbone (linear
# probe + k-NN, or a linear segmentation probe on a dense scenes dataset's masks); tables, figure, claims.


wildcard_constraints:
    ssl_group=_alternatives(list(SSL_GROUPS) or ["none"]),
    ssl_method=_alternatives(sorted({m for g in SSL_GROUPS.values() for m in g["methods"]}) or ["none"]),


rule pretrain_ssl_backbone:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        train=ancient("data/prepared/{dataset}/train.pt"),
        hparams="config/methods/pretrain/{ssl_method}.yaml",
    output:
        model="results/checkpoints/ssl/{ssl_group}/{dataset}/{ssl_method}/seed{seed}/model.pt",
        history="results/checkpoints/ssl/{ssl_group}/{dataset}/{ssl_method}/seed{seed}/history.json",
    params:
        overrides=ssl_pretrain_overrides,
        backbone=ssl_backbone,
        backbone_kwargs=ssl_backbone_kwargs,
        out_dir=output_folder,
    log:
        "logs/pretrain_ssl_backbone/{ssl_group}/{dataset}/{ssl_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=180,
    conda:
        ENV
    shell:
        "classlab train --family pretrain --method {wildcards.ssl_method} --data data/prepared/{wildcards.dataset} "
        "--backbone {params.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--overrides '{params.overrides}' --threads {threads} --out-dir {params.out_dir} > {log} 2>&1"


rule probe_ssl_backbone:
    input:
        model="results/checkpoints/ssl/{ssl_group}/{dataset}/{ssl_method}/seed{seed}/model.pt",
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
    output:
        metrics="results/eval/ssl/{ssl_group}/{dataset}/{ssl_method}/seed{seed}/metrics.json",
    params:
        command=ssl_probe_command,
        settings=ssl_probe_settings,
        out_dir=output_folder,
    log:
        "logs/probe_ssl_backbone/{ssl_group}/{dataset}/{ssl_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    conda:
        ENV
    shell:
        "classlab {params.command} --model {input.model} --data data/prepared/{wildcards.dataset} "
        "--seed {wildcards.seed} --probe '{params.settings}' --threads {threads} --out-dir {params.out_dir} > {log} 2>&1"


rule aggregate_ssl:
    input:
        metrics=ssl_probe_metrics(),
        claims="config/claims/ssl.yaml",
    output:
        runs="results/tables/ssl/runs.csv",
        summary=report("results/tables/ssl/summary.csv", caption="../report/ssl_summary.rst",
                       category="ssl", subcategory="tables"),
        markdown="results/tables/ssl/summary.md",
        claims="results/tables/ssl/claims.csv",
    log:
        "logs/aggregate_ssl.log",
    conda:
        ENV
    shell:
        "classlab aggregate-ssl --metrics {input.metrics} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.markdown} --claims-csv {output.claims} > {log} 2>&1"


rule plot_ssl_probes:
    input:
        metrics=ssl_probe_metrics(),
    output:
        figure=report("results/figures/ssl/probes.png", caption="../report/ssl_probes.rst",
                      category="ssl", subcategory="figures"),
    log:
        "logs/plot_ssl_probes.log",
    conda:
        ENV
    shell:
        "classlab plot-ssl-probes --metrics {input.metrics} --figure {output.figure} > {log} 2>&1"
