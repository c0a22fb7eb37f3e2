# Family `vlm`: the offline CLIP (one per dataset x backbone x seed, its image side trained on the base
# classes only), then one job per method x seed adapting it on few-shot base classes and testing base /
# new / H; then the tables and the claims.


wildcard_constraints:
    vlm_method=_alternatives(sorted(set(VLM.get("methods") or ["none"]) | set((VLM.get("epoch_curve") or {}).get("methods", []))
                                    | set(VLM_PAIRS.get("methods", [])) | set(VLM_NOISE.get("methods", [])))),
    image_side="base|all|seen",
    noise_kind="web|symmetric",
    noise_rate=r"0(\.\d+)?",
    epochs=r"\d+",


rule pretrain_image_text:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/pretrain/image_text.yaml",
    output:
        model="results/checkpoints/vlm_pretrain/{dataset}/{backbone}/saw_{image_side}/seed{seed}/model.pt",
        history="results/checkpoints/vlm_pretrain/{dataset}/{backbone}/saw_{image_side}/seed{seed}/history.json",
    params:
        overrides=vlm_pretrain_overrides_json,
        backbone_kwargs=backbone_kwargs_json,
    log:
        "logs/pretrain_image_text/{dataset}/{backbone}/saw_{image_side}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family pretrain --method image_text --data data/prepared/{wildcards.dataset} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/checkpoints/vlm_pretrain/{wildcards.dataset}/{wildcards.backbone}/saw_{wildcards.image_side}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule adapt_prompts:
    input:
        pretrained=vlm_pretrained,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/vlm/{vlm_method}.yaml",
    output:
        metrics="results/eval/vlm/{dataset}/{backbone}/saw_{image_side}/{vlm_method}/seed{seed}/metrics.json",
        predictions="results/eval/vlm/{dataset}/{backbone}/saw_{image_side}/{vlm_method}/seed{seed}/predictions.npz",
    params:
        pretrained=vlm_pretrained_arg,
        overrides=vlm_overrides,
        shots=VLM.get("shots", 16),
        test_per_class=VLM.get("test_per_class", 0),
    log:
        "logs/adapt_prompts/{dataset}/{backbone}/saw_{image_side}/{vlm_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab base-to-novel --method {wildcards.vlm_method} --pretrained {params.pretrained} "
        "--data data/prepared/{wildcards.dataset} --seed {wildcards.seed} --shots {params.shots} "
        "--test-per-class {params.test_per_class} --image-side {wildcards.image_side} --overrides '{params.overrides}' "
        "--threads {threads} "
        "--out-dir results/eval/vlm/{wildcards.dataset}/{wildcards.backbone}/saw_{wildcards.image_side}/{wildcards.vlm_method}/seed{wildcards.seed} "
        "--no-progress > {log} 2>&1"


rule adapt_pairs:
    input:
        pretrained=vlm_pretrained,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/vlm/{vlm_method}.yaml",
    output:
        metrics="results/eval/vlm_pairs/{dataset}/{backbone}/{vlm_method}/seed{seed}/metrics.json",
        predictions="results/eval/vlm_pairs/{dataset}/{backbone}/{vlm_method}/seed{seed}/predictions.npz",
    params:
        pretrained=vlm_pretrained_arg,
        overrides=vlm_overrides,
        shots=VLM_PAIRS.get("shots", 16),
    log:
        "logs/adapt_pairs/{dataset}/{backbone}/{vlm_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab compositional --method {wildcards.vlm_method} --pretrained {params.pretrained} "
        "--data data/prepared/{wildcards.dataset} --seed {wildcards.seed} --shots {params.shots} "
        "--overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/eval/vlm_pairs/{wildcards.dataset}/{wildcards.backbone}/{wildcards.vlm_method}/seed{wildcards.seed} "
        "--no-progress > {log} 2>&1"


rule train_noisy_labels:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/vlm/{vlm_method}.yaml",
    output:
        metrics="results/eval/vlm_noise/{dataset}/{backbone}/{noise_kind}_noise{noise_rate}/{vlm_method}/seed{seed}/metrics.json",
        predictions="results/eval/vlm_noise/{dataset}/{backbone}/{noise_kind}_noise{noise_rate}/{vlm_method}/seed{seed}/predictions.npz",
    params:
        overrides=vlm_overrides,
        backbone_kwargs=backbone_kwargs_json,
        samples_per_class=VLM_NOISE.get("samples_per_class", 0),
    log:
        "logs/train_noisy_labels/{dataset}/{backbone}/{noise_kind}_noise{noise_rate}/{vlm_method}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    shell:
        "classlab label-noise --method {wildcards.vlm_method} --data data/prepared/{wildcards.dataset} "
        "--seed {wildcards.seed} --noise-rate {wildcards.noise_rate} --noise-kind {wildcards.noise_kind} "
        "--samples-per-class {params.samples_per_class} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' "
        "--overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/eval/vlm_noise/{wildcards.dataset}/{wildcards.backbone}/{wildcards.noise_kind}_noise{wildcards.noise_rate}/{wildcards.vlm_method}/seed{wildcards.seed} "
        "--no-progress > {log} 2>&1"


rule adapt_prompts_epochs:
    input:
        pretrained=vlm_pretrained,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/vlm/{vlm_method}.yaml",
    output:
        metrics="results/eval/vlm_epochs/{dataset}/{backbone}/saw_{image_side}/{vlm_method}/epochs{epochs}/seed{seed}/metrics.json",
        predictions="results/eval/vlm_epochs/{dataset}/{backbone}/saw_{image_side}/{vlm_method}/epochs{epochs}/seed{seed}/predictions.npz",
    params:
        pretrained=vlm_pretrained_arg,
        overrides=vlm_epoch_overrides,
        shots=VLM.get("shots", 16),
        test_per_class=VLM.get("test_per_class", 0),
    log:
        "logs/adapt_prompts_epochs/{dataset}/{backbone}/saw_{image_side}/{vlm_method}/epochs{epochs}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    shell:
        "classlab base-to-novel --method {wildcards.vlm_method} --pretrained {params.pretrained} "
        "--data data/prepared/{wildcards.dataset} --seed {wildcards.seed} --shots {params.shots} "
        "--test-per-class {params.test_per_class} --image-side {wildcards.image_side} --overrides '{params.overrides}' "
        "--threads {threads} "
        "--out-dir results/eval/vlm_epochs/{wildcards.dataset}/{wildcards.backbone}/saw_{wildcards.image_side}/{wildcards.vlm_method}/epochs{wildcards.epochs}/seed{wildcards.seed} "
        "--no-progress > {log} 2>&1"


rule plot_vlm_epochs:
    input:
        metrics=vlm_epoch_metrics(),
    output:
        figure=report("results/figures/vlm/accuracy_vs_epochs.png", caption="../report/vlm_epochs.rst",
                      category="vlm", subcategory="figures"),
        table="results/tables/vlm/accuracy_vs_epochs.csv",
    log:
        "logs/plot_vlm_epochs.log",
    conda:
        ENV
    shell:
        "classlab plot-vlm-epochs --metrics {input.metrics} --figure {output.figure} --table {output.table} > {log} 2>&1"


rule aggregate_vlm:
    input:
        metrics=vlm_all_metrics(),
        epoch_metrics=vlm_epoch_metrics(),
        claims="config/claims/vlm.yaml",
    output:
        runs="results/tables/vlm/runs.csv",
        summary=report("results/tables/vlm/summary.csv", caption="../report/vlm_summary.rst",
                       category="vlm", subcategory="tables"),
        markdown="results/tables/vlm/summary.md",
        claims="results/tables/vlm/claims.csv",
    log:
        "logs/aggregate_vlm.log",
    conda:
        ENV
    shell:
        "classlab aggregate-vlm --metrics {input.metrics} --epoch-metrics {input.epoch_metrics} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.markdown} --claims-csv {output.claims} > {log} 2>&1"


# Not in any default target: regenerates a dataset's class descriptions with a language model (needs
# internet for the model the first time); read the result before copying it over config/descriptions/.
rule generate_descriptions:
    output:
        "results/descriptions/{dataset}.yaml",
    params:
        model=VLM.get("description_model", "Qwen/Qwen2.5-0.5B-Instruct"),
    log:
        "logs/generate_descriptions/{dataset}.log",
    conda:
        ENV
    shell:
        "classlab describe-classes --dataset {wildcards.dataset} --model {params.model} "
        "--out results/descriptions/{wildcards.dataset}.yaml > {log} 2>&1"
