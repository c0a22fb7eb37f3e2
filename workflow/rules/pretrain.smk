# One backbone per dataset x backbone x pretrain method x seed, shared by every downstream method.


rule pretrain_backbone:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        train=ancient("data/prepared/{dataset}/train.pt"),
        hparams="config/methods/pretrain/{pretrain}.yaml",
    output:
        model="results/checkpoints/pretrain/{dataset}/{backbone}/{pretrain}/seed{seed}/model.pt",
        history="results/checkpoints/pretrain/{dataset}/{backbone}/{pretrain}/seed{seed}/history.json",
    params:
        overrides=pretrain_overrides_json,
        backbone_kwargs=backbone_kwargs_json,
        pretrained=pretrained_flag,
    log:
        "logs/pretrain_backbone/{dataset}/{backbone}/{pretrain}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=120,
    conda:
        ENV
    shell:
        "classlab train --family pretrain --method {wildcards.pretrain} --data data/prepared/{wildcards.dataset} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--overrides '{params.overrides}' {params.pretrained} --threads {threads} "
        "--out-dir results/checkpoints/pretrain/{wildcards.dataset}/{wildcards.backbone}/{wildcards.pretrain}/seed{wildcards.seed} "
        "> {log} 2>&1"


# The distillation teacher: the supervised pretraining method from scratch on a larger backbone
# (families.distill.teacher), once per dataset x seed, shared by every student that uses one.
rule train_teacher:
    input:
        manifest=ancient("data/prepared/{dataset}/manifest.json"),
        train=ancient("data/prepared/{dataset}/train.pt"),
        hparams="config/methods/pretrain/supervised.yaml",
    output:
        model="results/checkpoints/teacher/{dataset}/{backbone}/seed{seed}/model.pt",
        history="results/checkpoints/teacher/{dataset}/{backbone}/seed{seed}/history.json",
    params:
        overrides=teacher_overrides_json,
        backbone_kwargs=teacher_backbone_kwargs_json,
    log:
        "logs/train_teacher/{dataset}/{backbone}/seed{seed}.log",
    threads: 2
    resources:
        mem_mb=6000,
        runtime=240,
    conda:
        ENV
    shell:
        "classlab train --family pretrain --method supervised --data data/prepared/{wildcards.dataset} "
        "--backbone {wildcards.backbone} --backbone-kwargs '{params.backbone_kwargs}' --seed {wildcards.seed} "
        "--overrides '{params.overrides}' --threads {threads} "
        "--out-dir results/checkpoints/teacher/{wildcards.dataset}/{wildcards.backbone}/seed{wildcards.seed} "
        "> {log} 2>&1"
