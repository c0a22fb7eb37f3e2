# Raw files (checksummed, from a local mirror or the official URLs) and prepared tensors.


rule download_dataset:
    output:
        "data/raw/{dataset}/files.json",
    params:
        mirror=mirror_option,
    log:
        "logs/download_dataset/{dataset}.log",
    conda:
        ENV
    shell:
        "classlab download --dataset {wildcards.dataset} --out-dir data/raw/{wildcards.dataset} {params.mirror} > {log} 2>&1"


rule prepare_dataset:
    input:
        # data/ is DVC-tracked: a pull gives fresh mtimes, which must not trigger work
        ancient("data/raw/{dataset}/files.json"),
    output:
        manifest="data/prepared/{dataset}/manifest.json",
        train="data/prepared/{dataset}/train.pt",
        val="data/prepared/{dataset}/val.pt",
        test="data/prepared/{dataset}/test.pt",
    params:
        recipe=scene_recipe_option,
    log:
        "logs/prepare_dataset/{dataset}.log",
    conda:
        ENV
    shell:
        "classlab prepare --dataset {wildcards.dataset} --raw-dir data/raw/{wildcards.dataset} "
        "--out-dir data/prepared/{wildcards.dataset} {params.recipe} > {log} 2>&1"
