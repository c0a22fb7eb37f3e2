# Family `explain`: saliency maps of models on scenes with known boxes. The explained models are DAG
# nodes shared by every saliency method: trained on the scenes by a supervised-family method
# (train_scene_model), or another family's checkpoint named in the config (e.g. the supervised erm);
# readouts (Prompt-CAM, a linear probe) train on a scene model's frozen ViT. Then one job per model,
# method and seed computes the maps (compute_saliency), the metrics come from the saved maps
# (evaluate_saliency), and tables, claims and figures follow.


wildcard_constraints:
    xmodel=_alternatives(list(EXPLAIN_MODELS) or ["none"]),
    xmethod=_alternatives(EXPLAIN_METHODS or ["none"]),
    readout=_alternatives(EXPLAIN_READOUTS),


rule train_scene_model:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
    output:
        model="results/checkpoints/explain/{dataset}/{xmodel}/seed{seed}/model.pt",
        history="results/checkpoints/explain/{dataset}/{xmodel}/seed{seed}/history.json",
    params:
        p=scene_model_params,
    log:
        "logs/train_scene_model/{dataset}/{xmodel}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family supervised --method {params.p[method]} --data data/prepared/{wildcards.dataset} "
        "--backbone {params.p[backbone]} --backbone-kwargs '{params.p[backbone_kwargs]}' --seed {wildcards.seed} "
        "--overrides '{params.p[overrides]}' --threads {threads} "
        "--out-dir results/checkpoints/explain/{wildcards.dataset}/{wildcards.xmodel}/seed{wildcards.seed} > {log} 2>&1"


rule train_readout:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        init=ancient("results/checkpoints/explain/{dataset}/{xmodel}/seed{seed}/model.pt"),
    output:
        model="results/checkpoints/explain/{dataset}/{xmodel}/{readout}/seed{seed}/model.pt",
        history="results/checkpoints/explain/{dataset}/{xmodel}/{readout}/seed{seed}/history.json",
    params:
        p=readout_params,
    log:
        "logs/train_readout/{dataset}/{xmodel}/{readout}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family {params.p[family]} --method {wildcards.readout} --data data/prepared/{wildcards.dataset} "
        "--backbone {params.p[backbone]} --backbone-kwargs '{params.p[backbone_kwargs]}' --seed {wildcards.seed} "
        "--init {input.init} --overrides '{params.p[overrides]}' --threads {threads} "
        "--out-dir results/checkpoints/explain/{wildcards.dataset}/{wildcards.xmodel}/{wildcards.readout}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule evaluate_scene_model:
    input:
        model=explain_eval_checkpoint,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
    output:
        predictions="results/eval/explain/{dataset}/{xmodel}/{xrun}/seed{seed}/predictions.npz",
        metrics="results/eval/explain/{dataset}/{xmodel}/{xrun}/seed{seed}/metrics.json",
    wildcard_constraints:
        xrun="model|promptcam|linear_probe",
    log:
        "logs/evaluate_scene_model/{dataset}/{xmodel}/{xrun}/seed{seed}.log",
    threads: 1
    conda:
        ENV
    shell:
        "classlab evaluate --model {input.model} --data data/prepared/{wildcards.dataset} --threads {threads} "
        "--out-dir results/eval/explain/{wildcards.dataset}/{wildcards.xmodel}/{wildcards.xrun}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule compute_saliency:
    input:
        checkpoint=explain_checkpoint,
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        hparams="config/methods/explain/{xmethod}.yaml",
    output:
        maps="results/explain/{dataset}/{xmodel}/{xmethod}/seed{seed}/maps.npz",
        info="results/explain/{dataset}/{xmodel}/{xmethod}/seed{seed}/explain.json",
    params:
        p=saliency_params,
    log:
        "logs/compute_saliency/{dataset}/{xmodel}/{xmethod}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,
    conda:
        ENV
    shell:
        "classlab explain --checkpoint {input.checkpoint} --data data/prepared/{wildcards.dataset} "
        "--method {wildcards.xmethod} --layer {params.p[layers]} --overrides '{params.p[overrides]}' "
        "{params.p[options]} --seed {wildcards.seed} --threads {threads} "
        "--out-dir results/explain/{wildcards.dataset}/{wildcards.xmodel}/{wildcards.xmethod}/seed{wildcards.seed} "
        "> {log} 2>&1"


rule evaluate_saliency:
    input:
        maps="results/explain/{dataset}/{xmodel}/{xmethod}/seed{seed}/maps.npz",
        info="results/explain/{dataset}/{xmodel}/{xmethod}/seed{seed}/explain.json",
    output:
        "results/explain/{dataset}/{xmodel}/{xmethod}/seed{seed}/metrics.json",
    params:
        tolerance=EXPLAIN.get("tolerance", 0),
    log:
        "logs/evaluate_saliency/{dataset}/{xmodel}/{xmethod}/seed{seed}.log",
    conda:
        ENV
    shell:
        "classlab evaluate-explain --maps {input.maps} --info {input.info} --tolerance {params.tolerance} "
        "--out {output} > {log} 2>&1"


rule aggregate_explain:
    input:
        metrics=explain_files("metrics.json"),
        accuracy=explain_accuracy_files(),
        claims="config/claims/explain.yaml",
    output:
        runs="results/tables/explain/runs.csv",
        summary="results/tables/explain/summary.csv",
        md="results/tables/explain/summary.md",
        table=report(
            "results/tables/explain/summary_table.csv",
            caption="../report/explain_summary.rst",
            category="explain",
            subcategory="tables",
        ),
        claims="results/tables/explain/claims.csv",
    params:
        tolerance=EXPLAIN.get("tolerance", 0),
    log:
        "logs/aggregate_explain.log",
    conda:
        ENV
    shell:
        "classlab aggregate-explain --metrics {input.metrics} --accuracy {input.accuracy} "
        "--tolerance {params.tolerance} --runs-csv {output.runs} --summary-csv {output.summary} "
        "--summary-md {output.md} --claims-csv {output.claims} > {log} 2>&1"


rule plot_explain:
    input:
        unpack(explain_figure_inputs),
    output:
        maps=report(
            "results/figures/explain/{dataset}/{xmodel}/saliency_maps.png",
            caption="../report/explain_maps.rst",
            category="explain",
            subcategory="{dataset} {xmodel}",
        ),
        randomisation=report(
            "results/figures/explain/{dataset}/{xmodel}/randomisation.png",
            caption="../report/explain_randomisation.rst",
            category="explain",
            subcategory="{dataset} {xmodel}",
        ),
    log:
        "logs/plot_explain/{dataset}/{xmodel}.log",
    conda:
        ENV
    shell:
        "classlab figures-explain --maps {input.maps} --metrics {input.metrics} --out-maps {output.maps} "
        "--out-randomisation {output.randomisation} > {log} 2>&1"
