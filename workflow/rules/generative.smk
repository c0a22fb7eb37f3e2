# Family `generative`: one class-conditional DDPM per (pairs dataset, seed), trained on the seen colour x
# garment pairs as a shared node; the diffusion classifier reads it on held-out compositions, the two
# personalisation methods fine-tune copies of it on one instance; then samples, tables, claims, figures.


wildcard_constraints:
    gen_method=_alternatives(PERSONALISATION_METHODS),


rule train_ddpm:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/generative/ddpm.yaml",
    output:
        model="results/generative/{dataset}/ddpm/seed{seed}/model.pt",
        history="results/generative/{dataset}/ddpm/seed{seed}/history.json",
    params:
        overrides=generative_overrides,
        out_dir=output_folder,
    log:
        "logs/train_ddpm/{dataset}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab generative-train --data data/prepared/{wildcards.dataset} --seed {wildcards.seed} "
        "--overrides '{params.overrides}' --threads {threads} --out-dir {params.out_dir} --no-progress > {log} 2>&1"


rule sample_ddpm:
    input:
        model="results/generative/{dataset}/ddpm/seed{seed}/model.pt",
    output:
        samples="results/generative/{dataset}/ddpm/seed{seed}/samples.npz",
        figure=report("results/figures/generative/{dataset}_seed{seed}_samples.png",
                      caption="../report/generative_samples.rst", category="generative", subcategory="figures"),
    log:
        "logs/sample_ddpm/{dataset}/seed{seed}.log",
    threads: 2
    conda:
        ENV
    shell:
        "classlab generative-samples --model {input.model} --seed {wildcards.seed} --out {output.samples} "
        "--png {output.figure} --threads {threads} > {log} 2>&1"


rule classify_compositions:
    input:
        model="results/generative/{dataset}/ddpm/seed{seed}/model.pt",
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/generative/diffusion_classifier.yaml",
    output:
        metrics="results/eval/generative/{dataset}/diffusion_classifier/seed{seed}/metrics.json",
        errors="results/eval/generative/{dataset}/diffusion_classifier/seed{seed}/errors.npz",
    params:
        overrides=lambda wildcards: json.dumps(GENERATIVE.get("overrides", {}).get("diffusion_classifier", {}),
                                               sort_keys=True),
        out_dir=output_folder,
    log:
        "logs/classify_compositions/{dataset}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab generative-classify --method diffusion_classifier --model {input.model} "
        "--data data/prepared/{wildcards.dataset} --seed {wildcards.seed} --overrides '{params.overrides}' "
        "--threads {threads} --out-dir {params.out_dir} > {log} 2>&1"


rule personalize_ddpm:
    input:
        model="results/generative/{dataset}/ddpm/seed{seed}/model.pt",
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/generative/{gen_method}.yaml",
    output:
        metrics="results/eval/generative/{dataset}/{gen_method}/seed{seed}/metrics.json",
        samples="results/eval/generative/{dataset}/{gen_method}/seed{seed}/samples.npz",
    params:
        overrides=generative_overrides,
        out_dir=output_folder,
    log:
        "logs/personalize_ddpm/{dataset}/{gen_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab generative-personalize --method {wildcards.gen_method} --model {input.model} "
        "--data data/prepared/{wildcards.dataset} --seed {wildcards.seed} --overrides '{params.overrides}' "
        "--threads {threads} --out-dir {params.out_dir} > {log} 2>&1"


rule aggregate_generative:
    input:
        metrics=generative_run_metrics(),
        histories=generative_histories(),
        claims="config/claims/generative.yaml",
    output:
        runs="results/tables/generative/runs.csv",
        summary=report("results/tables/generative/summary.csv", caption="../report/generative_summary.rst",
                       category="generative", subcategory="tables"),
        markdown="results/tables/generative/summary.md",
        claims="results/tables/generative/claims.csv",
    log:
        "logs/aggregate_generative.log",
    conda:
        ENV
    shell:
        "classlab aggregate-generative --metrics {input.metrics} --histories {input.histories} "
        "--runs-csv {output.runs} --summary-csv {output.summary} --summary-md {output.markdown} "
        "--claims-csv {output.claims} > {log} 2>&1"


rule plot_personalised:
    input:
        unpack(generative_personalised_runs),
    output:
        figure=report("results/figures/generative/{dataset}_personalised.png",
                      caption="../report/generative_personalised.rst", category="generative", subcategory="figures"),
    log:
        "logs/plot_personalised/{dataset}.log",
    conda:
        ENV
    shell:
        "classlab plot-personalised --metrics {input.metrics} --samples {input.samples} --figure {output.figure} "
        "> {log} 2>&1"
