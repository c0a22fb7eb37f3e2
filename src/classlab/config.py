"""Config validation and hyperparameter resolution.

A config is checked against ``workflow/schemas/config.schema.yaml`` and then against the
method registry (method names, hyperparameter keys) before any job starts. Errors name the
offending key and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
METHOD_CONFIGS = ROOT / "config" / "methods"


class ConfigError(ValueError):
    """The experiment config is invalid; the message names the key and what is allowed."""


def _key_path(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _format_error(err) -> str:
    where = _key_path(err.absolute_path)
    if err.validator == "additionalProperties":
        allowed = sorted(err.schema.get("properties", {}))
        extra = sorted(set(err.instance) - set(allowed)) if isinstance(err.instance, dict) else []
        keys = ", ".join(f"{where + '.' if where != '<top level>' else ''}{k}" for k in extra)
        return f"unknown config key {keys}; allowed keys here: {allowed}"
    if err.validator == "enum":
        return f"config key {where}: {err.instance!r} is not allowed; allowed values: {err.validator_value}"
    if err.validator == "required":
        return f"config key {where}: {err.message}"
    return f"config key {where}: {err.message}"


def method_config_path(family: str, method: str) -> Path:
    return METHOD_CONFIGS / family / f"{method}.yaml"


def method_defaults(family: str, method: str) -> dict[str, Any]:
    """The method's hyperparameters with the paper's defaults, from config/methods/."""
    path = method_config_path(family, method)
    if not path.exists():
        raise ConfigError(f"no hyperparameter file {path} for method {family}/{method}")
    doc = yaml.safe_load(path.read_text()) or {}
    hparams = {}
    if doc.get("extends"):
        # an ablation or variant: another method's defaults of the same family, then its changes
        base = str(doc["extends"])
        if base == method:
            raise ConfigError(f"{path}: extends names the method itself")
        hparams = method_defaults(family, base)
    hparams.update(doc.get("hparams") or {})
    return hparams


def resolve_hparams(family: str, method: str, overrides: dict | None) -> dict[str, Any]:
    hp = method_defaults(family, method)
    for key, value in (overrides or {}).items():
        if key not in hp:
            raise ConfigError(f"unknown hyperparameter {key!r} for {family}/{method}; known: {sorted(hp)}")
        hp[key] = value
    return hp


def validate_config(config: dict) -> dict:
    """Validate ``config`` in place (filling schema defaults) or raise ConfigError."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_format_error(e) for e in errors))
    config.setdefault("backbone_kwargs", {})
    config.setdefault("pretrained_weights", False)
    config.setdefault("mirrors", {})
    config["pretrain"].setdefault("overrides", {})
    config["pretrain"].setdefault("backbone_overrides", {})
    from classlab.methods.registry import list_methods

    problems = []
    try:
        resolve_hparams("pretrain", config["pretrain"]["method"], config["pretrain"]["overrides"])
        for backbone, overrides in config["pretrain"]["backbone_overrides"].items():
            resolve_hparams("pretrain", config["pretrain"]["method"], overrides)
    except ConfigError as exc:
        problems.append(f"config key pretrain.overrides: {exc}")
    if "incremental" in config["families"]:
        problems += _validate_incremental(config)
    for family, spec in config["families"].items():
        known = list_methods(family)
        spec.setdefault("overrides", {})
        for i, method in enumerate(spec["methods"]):
            if method not in known:
                problems.append(f"config key families.{family}.methods[{i}]: {method!r} is not a method of "
                                f"family {family!r}; allowed values: {known}")
        for method, overrides in spec["overrides"].items():
            if method not in spec["methods"]:
                problems.append(f"config key families.{family}.overrides.{method}: {method!r} is not in "
                                f"families.{family}.methods {spec['methods']}")
                continue
            try:
                resolve_hparams(family, method, overrides)
            except ConfigError as exc:
                problems.append(f"config key families.{family}.overrides.{method}: {exc}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


SCENARIO_PARAMS = {
    "class_incremental": {"initial", "increment", "samples_per_class", "test_samples_per_class"},
    "few_shot": {"base_classes", "ways", "shots", "samples_per_class", "test_samples_per_class"},
    "si_blurry": {"num_tasks", "disjoint_class_ratio", "blurry_sample_ratio", "samples_per_class",
                  "test_samples_per_class"},
}


def _validate_incremental(config: dict) -> list[str]:
    """Scenario parameters against the datasets' class counts (a dry build), method names per
    scenario, and memory budgets (at least one exemplar per class). Fills ``methods``."""
    import numpy as np

    from classlab.data.registry import get_dataset
    from classlab.data.scenarios import ScenarioError, build_scenario, validate_forget_tasks

    problems = []
    spec = config["families"]["incremental"]
    for name, scenario in spec["scenarios"].items():
        scenario.setdefault("init", "scratch")
        kind = scenario["kind"]
        params = {k: v for k, v in scenario.items() if k not in ("kind", "init")}
        unknown = set(params) - SCENARIO_PARAMS[kind]
        if unknown:
            problems.append(f"config key families.incremental.scenarios.{name}: {sorted(unknown)} do not apply to "
                            f"kind {kind!r}; allowed: {sorted(SCENARIO_PARAMS[kind])}")
            continue
        for dataset in config["datasets"]:
            k = get_dataset(dataset).num_classes
            # structural dry run on synthetic labels (shots are checked on the real data at build time)
            labels = np.repeat(np.arange(k), max(int(params.get("shots", 1)), 2))
            try:
                build_scenario(kind, dataset, labels, k, 0, test_labels=labels, **params)
            except ScenarioError as exc:
                problems.append(f"config key families.incremental.scenarios.{name} on {dataset}: {exc}")

    spec.setdefault("forgetting", {})
    methods: list[str] = []
    for name, forgetting in spec["forgetting"].items():
        for dataset in config["datasets"]:
            try:
                validate_forget_tasks(forgetting["forget_tasks"], get_dataset(dataset).num_classes)
            except ScenarioError as exc:
                problems.append(f"config key families.incremental.forgetting.{name} on {dataset}: {exc}")
        methods += [m for m in forgetting["methods"] if m not in methods]
    spec.setdefault("multilabel_runs", {})
    spec.setdefault("scenes", {})
    for name, run_methods in list(spec["runs"].items()) + list(spec["multilabel_runs"].items()):
        if name not in spec["scenarios"]:
            problems.append(f"config key families.incremental.runs.{name}: no such scenario; "
                            f"allowed values: {sorted(spec['scenarios'])}")
        methods += [m for m in run_methods if m not in methods]
    spec["methods"] = methods
    spec.setdefault("overrides", {})
    largest = max(get_dataset(d).num_classes for d in config["datasets"])
    for method in methods:
        try:
            hp = resolve_hparams("incremental", method, spec["overrides"].get(method))
        except ConfigError:
            continue  # reported by the generic check
        if "memory_size" in hp and int(hp["memory_size"]) < largest:
            problems.append(f"config key families.incremental.overrides.{method}.memory_size: {hp['memory_size']} "
                            f"is below one exemplar per class ({largest} classes)")
    return problems
