"""Config validation: a bad key or value names the key and what is allowed; no job runs."""
import copy

import pytest
import yaml

from classlab.config import ROOT, ConfigError, validate_config
from tests.conftest import copy_repo, snakemake


def _smoke():
    return yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())


def test_shipped_configs_are_valid():
    for name in ("config.yaml", "smoke.yaml", "incremental.yaml", "incremental_cpu.yaml", "incremental_b0inc2.yaml", "shift_cpu.yaml", "shift.yaml", "condense_cpu.yaml", "condense.yaml",
                 "metric_cpu.yaml", "metric.yaml", "single_paper_cpu.yaml", "single_paper.yaml", "dense_cpu.yaml",
                 "dense.yaml", "dense_cpu_nacl7.yaml", "generative_cpu.yaml", "generative.yaml", "generative_cpu_7seeds.yaml",
                 "ssl_cpu_7seeds.yaml"):
        validate_config(yaml.safe_load((ROOT / "config" / name).read_text()))


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c.update(epochs=3), "unknown config key epochs"),
    (lambda c: c.update(datasets=["imagenet"]), "config key datasets[0]: 'imagenet' is not allowed"),
    (lambda c: c.update(seeds=[-1]), "config key seeds[0]"),
    (lambda c: c["families"]["supervised"].update(methods=["erm", "sgdd"]),
     "config key families.supervised.methods[1]: 'sgdd' is not a method"),
    (lambda c: c["families"]["supervised"]["overrides"]["erm"].update(lrr=0.1),
     "unknown hyperparameter 'lrr' for supervised/erm"),
    (lambda c: c["pretrain"].update(method="dino"), "config key pretrain.method"),
    (lambda c: c["families"].update(nonexistent_family={"methods": ["x"]}), "nonexistent_family"),
    (lambda c: c["families"]["metric"].update(scenes={"datasets": ["digits_scenes"], "methods": ["cfcdd"]}),
     "config key families.metric.scenes.methods[0]: 'cfcdd' is not a method of family 'metric'"),
    (lambda c: c["families"]["metric"].update(methods=["metrix"], overrides={"metrix": {"mix": "pixels"}}),
     "families.metric.overrides.metrix.mix"),
    (lambda c: c["families"]["ssl"]["groups"]["sorting"].update(methods=["sortin"]),
     "config key families.ssl.groups.sorting.methods[0]: 'sortin' is not a pretrain-stage method"),
    (lambda c: c["families"]["single_paper"].update(methods=["icl"]),
     "config key families.single_paper.methods[0]: 'icl' is not a method"),
    (lambda c: c["families"]["single_paper"]["overrides"]["aspl"].update(query_budget=-1),
     "families.single_paper.overrides.aspl.query_budget"),
])
def test_bad_config_names_the_key(mutate, needle):
    config = copy.deepcopy(_smoke())
    mutate(config)
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert needle in str(info.value)


def test_snakemake_refuses_bad_config_before_any_job(tmp_path):
    work = copy_repo(tmp_path / "repo")
    bad = yaml.safe_load((work / "config" / "smoke.yaml").read_text())
    bad["families"]["supervised"]["overrides"]["erm"]["epochz"] = 2
    (work / "config" / "bad.yaml").write_text(yaml.safe_dump(bad))
    proc = snakemake(work, "-c1", "--configfile", "config/bad.yaml", check=False)
    assert proc.returncode != 0
    assert "epochz" in proc.stderr + proc.stdout
    assert not (work / "results").exists() and not (work / "data").exists()


# --- parse-time checks of what used to surface only when a job ran ---------------------------

def _raises(config, *needles):
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


def test_validation_imports_neither_torch_nor_a_method_module():
    import subprocess
    import sys

    code = (
        "import sys, yaml\n"
        "from classlab.config import ROOT, validate_config\n"
        "for name in ('config.yaml', 'incremental_cpu.yaml'):\n"
        "    validate_config(yaml.safe_load((ROOT / 'config' / name).read_text()))\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'timm', 'classlab.methods',"
        " 'classlab.models', 'classlab.protocols', 'classlab.engine'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert proc.stdout.strip() == "[]", proc.stdout


def _incremental_config():
    config = copy.deepcopy(_smoke())
    inc = config["families"]["incremental"]
    inc["scenarios"]["blurry"] = {"kind": "si_blurry", "num_tasks": 3, "disjoint_class_ratio": 0.5,
                                  "blurry_sample_ratio": 0.1}
    inc["scenarios"]["fscil"] = {"kind": "few_shot", "base_classes": 4, "ways": 2, "shots": 5}
    return config


@pytest.mark.parametrize("mutate,key,kind", [
    # MVP is online only; TEEN few-shot only; GS-LoRA forgets; MULTI-LANE is multi-label
    (lambda inc: inc["runs"]["b0inc2"].append("mvp"), "families.incremental.runs.b0inc2[2]", "class_incremental"),
    (lambda inc: inc["runs"].update(blurry=["finetune", "lwf"]), "families.incremental.runs.blurry[1]", "si_blurry"),
    (lambda inc: inc["runs"].update(fscil=["teen", "gs_lora"]), "families.incremental.runs.fscil[1]", "few_shot"),
    (lambda inc: inc.update(multilabel_runs={"b0inc2": ["multi_lane", "finetune"]}),
     "families.incremental.multilabel_runs.b0inc2[1]", "multilabel"),
    (lambda inc: inc.update(forgetting={"f": {"forget_tasks": [[0]], "methods": ["multi_lane"]}}),
     "families.incremental.forgetting.f.methods[0]", "continual_forgetting"),
])
def test_a_method_on_a_scenario_kind_it_does_not_declare_fails_at_parse_time(mutate, key, kind):
    config = _incremental_config()
    mutate(config["families"]["incremental"])
    message = _raises(config, f"config key {key}", f"not on {kind!r}", "scenario_kinds in config/methods/incremental/")
    assert message.count("config key") == 1, message  # the methods that do run there pass


def test_multilabel_runs_need_a_class_incremental_scenario():
    config = _incremental_config()
    config["families"]["incremental"]["multilabel_runs"] = {"fscil": ["multi_lane"]}
    _raises(config, "config key families.incremental.multilabel_runs.fscil", "class_incremental scenario")


def test_the_method_yaml_is_the_one_source_of_scenario_kinds(tmp_path, monkeypatch):
    import shutil

    import classlab.config as cfg
    from classlab.methods.registry import get_method

    sources = (ROOT / "src" / "classlab" / "methods" / "incremental").glob("*.py")
    assert not [p.name for p in sources if "scenario_kinds =" in p.read_text()]  # no class attribute left
    assert get_method("incremental", "teen").scenario_kinds == ("few_shot",)
    assert get_method("incremental", "oneprompt").scenario_kinds == ("class_incremental", "few_shot")  # extends ovor
    # an edit of the YAML is what the class (run time) and the config check (parse time) both see
    shutil.copytree(ROOT / "config" / "methods", tmp_path / "methods")
    lwf = tmp_path / "methods" / "incremental" / "lwf.yaml"
    lwf.write_text(lwf.read_text().replace("scenario_kinds: [class_incremental, few_shot]", "scenario_kinds: [few_shot]"))
    monkeypatch.setattr(cfg, "METHOD_CONFIGS", tmp_path / "methods")
    try:
        assert get_method("incremental", "lwf").scenario_kinds == ("few_shot",)
        config = copy.deepcopy(_smoke())
        config["families"]["incremental"]["runs"]["b0inc2"].append("lwf")
        _raises(config, "config key families.incremental.runs.b0inc2[2]: lwf runs on ['few_shot']")
        lwf.write_text(lwf.read_text().replace("scenario_kinds: [few_shot]\n", ""))
        _raises(copy.deepcopy(config), "families.incremental.runs.b0inc2[2]", "declares no scenario_kinds")
        lwf.write_text(lwf.read_text().replace("hparams:", "scenario_kinds: [class_incremental, offline]\nhparams:"))
        _raises(copy.deepcopy(config), "families.incremental.runs.b0inc2[2]", "scenario_kinds: ['class_incremental', 'offline'] is not allowed")
    finally:
        monkeypatch.undo()
        get_method("incremental", "lwf")  # back to the shipped declaration for later tests


@pytest.mark.parametrize("mutate,needle", [
    (lambda c: c["families"]["incremental"]["overrides"]["finetune"].update(lr="fast"),
     "config key families.incremental.overrides.finetune.lr: 'fast' is not of type 'number'"),
    (lambda c: c["families"]["incremental"]["overrides"]["joint"].update(batch_size=0),
     "config key families.incremental.overrides.joint.batch_size: 0 is less than the minimum of 1"),
    (lambda c: c["families"]["incremental"]["overrides"]["joint"].update(epochs=2.5),
     "config key families.incremental.overrides.joint.epochs: 2.5 is not of type 'integer'"),
    (lambda c: c["families"]["supervised"]["overrides"]["erm"].update(schedule="cosin"),
     "config key families.supervised.overrides.erm.schedule: 'cosin' is not one of"),
    (lambda c: c["families"]["supervised"]["overrides"]["erm"].update(augment_hflip="no"),
     "config key families.supervised.overrides.erm.augment_hflip: 'no' is not of type 'boolean'"),
    (lambda c: c["pretrain"]["overrides"].update(momentum=1.5),
     "config key pretrain.overrides.momentum: 1.5 is greater than the maximum of 1"),
    (lambda c: c["pretrain"].update(backbone_overrides={"convnet": {"optimizer": "adamm"}}),
     "config key pretrain.backbone_overrides.convnet.optimizer: 'adamm' is not one of"),
    # a method's own declaration (ovor's prefixes are half key, half value)
    (lambda c: c["families"]["incremental"].update(runs={"b0inc2": ["ovor"]}, overrides={"ovor": {"g_length": 5}}),
     "config key families.incremental.overrides.ovor.g_length: 5 is not a multiple of 2"),
    (lambda c: c["families"]["incremental"].update(runs={"b0inc2": ["ewc"]}, overrides={"ewc": {"fisher_alpha": "max"}}),
     "config key families.incremental.overrides.ewc.fisher_alpha"),
])
def test_a_hyperparameter_of_the_wrong_type_or_range_fails_at_parse_time(mutate, needle):
    config = copy.deepcopy(_smoke())
    mutate(config)
    _raises(config, needle, "(declared in config/methods/")


def _method_yamls():
    for path in sorted((ROOT / "config" / "methods").glob("*/*.yaml")):
        if not path.name.startswith("_"):
            yield path.parent.name, path.stem


def test_every_hyperparameter_of_every_method_yaml_is_declared_and_its_default_validates():
    import jsonschema

    from classlab.config import check_hparams, hparam_schema, method_defaults

    checked = 0
    for family, method in _method_yamls():
        for key, (fragment, where) in hparam_schema(family, method).items():
            jsonschema.Draft202012Validator.check_schema(fragment)  # a well-formed declaration
        assert check_hparams(family, method, method_defaults(family, method)) == [], (family, method)
        checked += 1
    assert checked >= 20


def test_an_undeclared_or_invalid_default_names_its_file_and_key(tmp_path, monkeypatch):
    import shutil

    import classlab.config as cfg

    shutil.copytree(ROOT / "config" / "methods", tmp_path / "methods")
    joint = tmp_path / "methods" / "incremental" / "joint.yaml"
    text = joint.read_text().replace("hparams:\n", "hparams:\n  new_knob: 3\n", 1).replace("  lr: 0.05", "  lr: -0.1")
    joint.write_text(text)
    monkeypatch.setattr(cfg, "METHOD_CONFIGS", tmp_path / "methods")
    config = copy.deepcopy(_smoke())
    del config["families"]["incremental"]["overrides"]["joint"]
    _raises(config, "joint.yaml: hparams.new_knob: hyperparameter 'new_knob' of incremental/joint has no declared type",
            "joint.yaml: hparams.lr: -0.1 is less than or equal to the minimum of 0")


def test_declared_optimizers_and_schedules_exist_in_the_engine():
    from timm.optim import list_optimizers

    from classlab.config import hparam_schema
    from classlab.engine.schedule import SCHEDULES

    schema = hparam_schema("supervised", "erm")
    assert set(schema["optimizer"][0]["enum"]) <= set(list_optimizers())
    assert set(schema["schedule"][0]["enum"]) == set(SCHEDULES)


@pytest.mark.parametrize("kwargs,needle", [
    ({"convnet": {"widths": [16, 32], "pool_after": [0], "widht": 8}}, "config key backbone_kwargs.convnet.widht"),
    ({"convnet": {"widths": [16, 0]}}, "config key backbone_kwargs.convnet.widths: 0 is less than the minimum of 1"),
    ({"vit_tiny": {"depth": 2, "patch_size": 0}},
     "config key backbone_kwargs.vit_tiny.patch_size: 0 is less than the minimum of 1"),
    ({"vit_tiny": {"depth": 2, "patch_sise": 2}}, "config key backbone_kwargs.vit_tiny.patch_sise"),
    ({"vgg": {}}, "config key backbone_kwargs.vgg: 'vgg' is not a backbone"),
])
def test_unknown_backbone_kwargs_fail_at_parse_time(kwargs, needle):
    config = copy.deepcopy(_smoke())
    config["backbone_kwargs"] = kwargs
    _raises(config, needle)


def test_the_backbone_constructor_refuses_undeclared_kwargs_too():
    from classlab.backbone_specs import BACKBONE_KWARGS
    from classlab.models.backbones import BACKBONES, build_backbone

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert set(BACKBONE_KWARGS) == set(BACKBONES) == set(schema["properties"]["backbones"]["items"]["enum"])
    build_backbone("convnet", 1, widths=[4], pool_after=[0])
    with pytest.raises(ValueError, match="backbone_kwargs.convnet.widht"):
        build_backbone("convnet", 1, widths=[4], widht=8)  # SmallConvNet would swallow it
    with pytest.raises(ValueError, match="backbone_kwargs.vit_tiny.depht"):
        build_backbone("vit_tiny", 1, img_size=8, depht=2)


@pytest.mark.parametrize("links,cycle", [
    ({"joint": "joint"}, "joint -> joint"),
    ({"joint": "finetune", "finetune": "joint"}, "joint -> finetune -> joint"),
    ({"joint": "lwf", "lwf": "finetune", "finetune": "joint"}, "joint -> lwf -> finetune -> joint"),
])
def test_an_extends_cycle_of_any_length_fails_naming_the_chain(tmp_path, monkeypatch, links, cycle):
    import shutil

    import classlab.config as cfg

    shutil.copytree(ROOT / "config" / "methods", tmp_path / "methods")
    for method, base in links.items():
        path = tmp_path / "methods" / "incremental" / f"{method}.yaml"
        path.write_text(path.read_text().replace("\nhparams:", f"\nextends: {base}\nhparams:", 1))
    monkeypatch.setattr(cfg, "METHOD_CONFIGS", tmp_path / "methods")
    config = copy.deepcopy(_smoke())
    del config["families"]["incremental"]["overrides"]  # a cycle is found without any override too
    _raises(config, "config key families.incremental", f"extends cycle {cycle}")


# --- reproducible installs: requirements.txt, the lock constraints.txt, environment.yml --------

def _pins(lines):
    """{canonical name: version} of ``name==version`` lines (markers and quotes dropped)."""
    import re

    out = {}
    for line in lines:
        line = line.strip().strip("'")
        if not line or line.startswith("#"):
            continue
        requirement = line.split(";")[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!_-]+)", requirement)
        assert match, f"not an exact pin: {line!r}"
        out[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return out


def test_requirements_are_pinned_and_the_lock_pins_everything_they_pull_in():
    import importlib.metadata as md

    requirements = _pins((ROOT / "requirements.txt").read_text().splitlines())
    lock = _pins((ROOT / "constraints.txt").read_text().splitlines())
    for name in ("scipy", "jsonschema", "pyyaml", "tqdm", "tabulate", "torch"):
        assert name in requirements
    assert {n: lock.get(n) for n in requirements} == requirements  # the lock agrees with every pin
    assert "classlab" not in lock and "pip" not in lock and "setuptools" in lock
    # this environment is the lock: every locked package that is installed has the locked version
    installed = {d.metadata["Name"]: d.version for d in md.distributions()}
    installed = {n.replace("_", "-").replace(".", "-").lower(): v for n, v in installed.items()}
    drift = {n: (v, installed[n]) for n, v in lock.items() if n in installed and installed[n] != v}
    assert not drift, f"installed versions differ from constraints.txt (run make lock?): {drift}"
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install -q -r requirements.txt -c constraints.txt" in makefile and "\nlock:" in makefile


def test_environment_yml_carries_the_same_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = [p for p in pip_section if not p.startswith("-e")]
    assert _pins(pins) == _pins((ROOT / "constraints.txt").read_text().splitlines())
    assert all("linux" in p for p in pins if p.startswith(("nvidia-", "'nvidia-", "'cuda-", "'triton")))


def test_project_files_do_not_point_at_the_shared_folder():
    import subprocess

    needle = ".." + "/shared"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = [f for f in files if (ROOT / f).is_file() and needle in (ROOT / f).read_text(errors="ignore")]
    assert not hits, hits


def test_supervised_pretrain_overrides_merge_in_order_config_backbone_then_family():
    from classlab.config import supervised_pretrain_overrides

    cfg = {"pretrain": {"overrides": {"epochs": 5, "lr": 0.1},
                        "backbone_overrides": {"vit_tiny": {"lr": 0.001, "batch_size": 64}}}}
    assert supervised_pretrain_overrides(cfg, "convnet") == {"epochs": 5, "lr": 0.1}
    assert supervised_pretrain_overrides(cfg, "vit_tiny") == {"epochs": 5, "lr": 0.001, "batch_size": 64}
    # a family's own pretraining (discovery's pretrain_known) wins over both
    assert supervised_pretrain_overrides(cfg, "vit_tiny", {"epochs": 15}) == {"epochs": 15, "lr": 0.001,
                                                                             "batch_size": 64}
    assert cfg["pretrain"]["overrides"] == {"epochs": 5, "lr": 0.1}  # the config is not modified


def test_parse_time_validation_is_cached_by_a_digest_of_everything_it_reads(tmp_path, monkeypatch):
    import classlab.config as cfg

    cache = tmp_path / ".snakemake" / "classlab-validated-config.json"
    first = cfg.validate_config_cached(_smoke(), cache)
    assert cache.exists() and first == validate_config(_smoke())  # the defaults are filled either way

    calls = []
    real = cfg.validate_config
    monkeypatch.setattr(cfg, "validate_config", lambda c: calls.append(1) or real(c))
    again = cfg.validate_config_cached(_smoke(), cache)
    assert again == first and calls == []  # unchanged: not validated again

    changed = _smoke()
    changed["seeds"] = [11]
    cfg.validate_config_cached(changed, cache)
    assert calls == [1]  # a config edit validates again

    # an edit of a file validation reads (here a comment added to a method YAML) validates again
    import shutil

    shutil.copytree(ROOT / "config", tmp_path / "config")
    monkeypatch.setattr(cfg, "ROOT", tmp_path)
    cfg.validate_config_cached(_smoke(), cache)
    assert calls == [1, 1]
    erm = tmp_path / "config" / "methods" / "supervised" / "erm.yaml"
    erm.write_text(erm.read_text() + "#")
    cfg.validate_config_cached(_smoke(), cache)
    assert calls == [1, 1, 1]

    bad = _smoke()
    bad["families"]["supervised"]["overrides"]["erm"]["epochz"] = 2
    before = cache.read_text()
    with pytest.raises(ConfigError, match="epochz"):
        cfg.validate_config_cached(bad, cache)
    assert cache.read_text() == before  # a failed validation writes nothing
    with pytest.raises(ConfigError, match="epochz"):
        cfg.validate_config_cached(bad, cache)  # and is reported on every parse
