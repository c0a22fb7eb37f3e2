"""Config validation: a bad key or value names the key and what is allowed; no job runs."""
import copy

import pytest
import yaml

from classlab.config import ROOT, ConfigError, validate_config
from tests.conftest import copy_repo, snakemake


def _smoke():
    return yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())


def test_shipped_configs_are_valid():
    for name in ("config.yaml", "smoke.yaml", "incremental.yaml", "incremental_cpu.yaml", "incremental_b0inc2.yaml"):
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
