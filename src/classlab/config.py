"""Config validation and hyperparameter resolution.

A config is checked against ``workflow/schemas/config.schema.yaml`` and then against the
method YAMLs under ``config/methods/`` before any job starts: method names, which scenario kinds
each method runs on, hyperparameter keys, types and ranges, backbone keywords, ``extends``
chains, scenario shapes. Errors name the offending key and what is allowed.

Everything here runs when the Snakefile is parsed, so this module imports neither torch nor any
method module: method names are file names, and what a method accepts is data in its YAML.

A method YAML (``config/methods/<family>/<method>.yaml``) has these top-level keys:

- ``paper``: the paper the defaults come from;
- ``extends``: another method of the family whose YAML this one starts from (a variant lists
  only what differs; ``hparams``, ``schema`` and ``scenario_kinds`` are inherited);
- ``scenario_kinds``: the scenario kinds the method runs on (incremental family); the learner
  class takes its ``scenario_kinds`` from here when it is registered;
- ``hparams``: the hyperparameters with the paper's defaults;
- ``schema``: the type and range of each hyperparameter the method adds (a JSON Schema
  fragment per key). Keys shared by many methods are declared once, in
  ``config/methods/_schema.yaml`` (the engine's training keys, every family) and
  ``config/methods/<family>/_schema.yaml`` (the family's).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "workflow" / "schemas" / "config.schema.yaml"
METHOD_CONFIGS = ROOT / "config" / "methods"
METHOD_PACKAGES = Path(__file__).resolve().parent / "methods"
SCHEMA_FILE = "_schema.yaml"  # the shared declarations: config/methods/_schema.yaml, config/methods/<family>/_schema.yaml

METHOD_KEYS = ("paper", "extends", "scenario_kinds", "hparams", "schema", "search")
# the scenario kinds of the incremental family's protocols (the last two build their own scenario)
SCENARIO_KINDS = ("class_incremental", "few_shot", "si_blurry", "multilabel", "continual_forgetting")
# the split kinds of the discovery protocol (classlab.data.discovery_split; latent_shift: LLS's domains)
DISCOVERY_KINDS = ("gcd", "ncd", "continual", "active", "latent_shift")
# the shift family's protocols (classlab.protocols.shift): DomainBed's leave-one-domain-out and online TTA
SHIFT_KINDS = ("domain_generalization", "test_time")
# the single_paper family: each method's own protocol (classlab.protocols.single_paper.PROTOCOLS)
SINGLE_PAPER_KINDS = ("icl_regression", "mil_bags", "active")
PROTOCOL_KINDS = {"incremental": SCENARIO_KINDS, "discovery": DISCOVERY_KINDS, "shift": SHIFT_KINDS,
                  "single_paper": SINGLE_PAPER_KINDS}
# the distributions of a method's random hyperparameter search (`search:` in its YAML, DomainBed's sweep)
SEARCH_DISTRIBUTIONS = ("log10_uniform", "uniform", "choice", "int_log2_uniform", "int_uniform")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def _rel(path: Path) -> str:
    return _rel_cached(str(path))


@functools.lru_cache(maxsize=None)
def _rel_cached(path: str) -> str:
    # cached: validation names a file's origin once per hyperparameter (thousands of calls in the
    # default DAG), and resolve() walks the file system each time
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


_YAML_CACHE: dict[str, tuple[int, int, Any]] = {}


def _read_yaml(path: Path) -> Any:
    """Parsed YAML, cached per (path, mtime, size): the Snakefile resolves the same files often."""
    stat = os.stat(path)
    key = str(path)
    hit = _YAML_CACHE.get(key)
    if hit is not None and hit[:2] == (stat.st_mtime_ns, stat.st_size):
        return hit[2]
    doc = yaml.load(Path(path).read_text(), Loader=_Loader)
    _YAML_CACHE[key] = (stat.st_mtime_ns, stat.st_size, doc)
    return doc


# --- method names and method YAMLs -----------------------------------------------------------

def method_modules(family: str) -> list[str]:
    """The module names of a family's package: one module per method, named after it.

    Read from the file system so that validating a config imports no method module (nor torch);
    a test checks that every module registers exactly the method it is named after.
    """
    package = METHOD_PACKAGES / family
    if not (package / "__init__.py").exists():
        return []
    return sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_"))


def list_methods(family: str) -> list[str]:
    """The method names a config may use: the family's modules, and the YAML-only variants
    (``config/methods/<family>/<name>.yaml`` with ``extends:``, run by the class of the method
    they extend; ``classlab.methods.registry.get_method`` builds that class)."""
    modules = method_modules(family)
    if not modules:
        return []
    variants = []
    for path in (METHOD_CONFIGS / family).glob("*.yaml"):
        if path.stem.startswith("_") or path.stem in modules:
            continue
        doc = _read_yaml(path)
        if isinstance(doc, dict) and doc.get("extends"):
            variants.append(path.stem)
    return sorted(modules + variants)


def method_config_path(family: str, method: str) -> Path:
    return METHOD_CONFIGS / family / f"{method}.yaml"


def method_spec(family: str, method: str, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The method's YAML with its ``extends`` chain resolved.

    Returns ``hparams`` (defaults), ``origin`` (hyperparameter -> the file that set it),
    ``schema`` (the method-level declarations of the chain), ``scenario_kinds`` (a tuple, or None
    where no file of the chain declares it) and ``chain`` (method names, this one first).
    """
    path = method_config_path(family, method)
    if method in _chain:
        cycle = " -> ".join(_chain + (method,))
        hint = " (extends names the method itself)" if len(_chain) == 1 else ""
        raise ConfigError(f"{_rel(method_config_path(family, _chain[0]))}: extends cycle {cycle}{hint}")
    if not path.exists():
        if _chain:
            raise ConfigError(f"{_rel(method_config_path(family, _chain[-1]))}: extends {method!r}, which has no "
                              f"hyperparameter file {_rel(path)}")
        raise ConfigError(f"no hyperparameter file {_rel(path)} for method {family}/{method}")
    doc = _read_yaml(path) or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{_rel(path)}: a mapping with keys {list(METHOD_KEYS)} expected")
    unknown = sorted(set(doc) - set(METHOD_KEYS))
    if unknown:
        raise ConfigError(f"{_rel(path)}: unknown top-level key(s) {unknown}; allowed: {list(METHOD_KEYS)}")
    if doc.get("extends"):
        # an ablation or variant: another method's YAML of the same family, then its changes
        spec = method_spec(family, str(doc["extends"]), _chain + (method,))
        spec = {"hparams": dict(spec["hparams"]), "origin": dict(spec["origin"]), "schema": dict(spec["schema"]),
                "search": dict(spec["search"]), "scenario_kinds": spec["scenario_kinds"], "chain": [method] + spec["chain"]}
    else:
        spec = {"hparams": {}, "origin": {}, "schema": {}, "search": {}, "scenario_kinds": None, "chain": [method]}
    for key, value in (doc.get("hparams") or {}).items():
        spec["hparams"][key] = value
        spec["origin"][key] = _rel(path)
    own_schema = doc.get("schema") or {}
    if not isinstance(own_schema, dict) or not all(isinstance(v, dict) for v in own_schema.values()):
        raise ConfigError(f"{_rel(path)}: schema: a mapping of hyperparameter -> JSON Schema fragment expected")
    spec["schema"].update(own_schema)
    search = doc.get("search") or {}
    for key, dist in (search.items() if isinstance(search, dict) else [(None, None)]):
        ok = isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in SEARCH_DISTRIBUTIONS
        if ok:
            kind, args = next(iter(dist.items()))
            ok = isinstance(args, list) and len(args) >= 1 and (kind == "choice" or (
                len(args) == 2 and all(isinstance(a, (int, float)) for a in args) and args[0] <= args[1]))
        if not ok:
            raise ConfigError(f"{_rel(path)}: search.{key}: one of {list(SEARCH_DISTRIBUTIONS)} with its "
                              f"arguments expected ([lo, hi] with lo <= hi, or a list of choices), got {dist!r}")
    spec["search"].update(search)
    if "scenario_kinds" in doc:
        kinds = doc["scenario_kinds"]
        allowed = PROTOCOL_KINDS.get(family, ())
        if not isinstance(kinds, list) or not kinds or any(k not in allowed for k in kinds):
            raise ConfigError(f"{_rel(path)}: scenario_kinds: {kinds!r} is not allowed; give a non-empty list of "
                              f"{list(allowed)}")
        spec["scenario_kinds"] = tuple(kinds)
    return spec


def method_defaults(family: str, method: str) -> dict[str, Any]:
    """The method's hyperparameters with the paper's defaults, from config/methods/."""
    return dict(method_spec(family, method)["hparams"])


def method_scenario_kinds(family: str, method: str) -> tuple[str, ...] | None:
    """The scenario kinds the method's YAML (or one it extends) declares; None if none does."""
    return method_spec(family, method)["scenario_kinds"]


def supervised_pretrain_overrides(config: dict, backbone: str, extra: dict | None = None) -> dict[str, Any]:
    """The overrides of a supervised pretraining run on ``backbone``: the config's
    ``pretrain.overrides``, then that backbone's ``pretrain.backbone_overrides``, then ``extra``
    (a family's own pretraining, e.g. discovery's ``pretrain_known``). One place for the DAG and
    ``make choices``, so that both train the same node."""
    pretrain = config.get("pretrain") or {}
    merged = dict(pretrain.get("overrides") or {})
    merged.update((pretrain.get("backbone_overrides") or {}).get(backbone, {}))
    merged.update(extra or {})
    return merged


def resolve_hparams(family: str, method: str, overrides: dict | None) -> dict[str, Any]:
    hp = method_defaults(family, method)
    unknown = [key for key in (overrides or {}) if key not in hp]
    if unknown:
        declared = hparam_schema(family, method)  # engine and family keys may be set without a default
        for key in unknown:
            if key not in declared:
                raise ConfigError(f"unknown hyperparameter {key!r} for {family}/{method}; known: {sorted(hp)}")
    hp.update(overrides or {})
    return hp


# --- hyperparameter types and ranges ---------------------------------------------------------

def _shared_schema(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    doc = _read_yaml(path) or {}
    if not isinstance(doc, dict) or not all(isinstance(v, dict) for v in doc.values()):
        raise ConfigError(f"{_rel(path)}: a mapping of hyperparameter -> JSON Schema fragment expected")
    return doc


def hparam_schema(family: str, method: str) -> dict[str, tuple[dict, str]]:
    """Hyperparameter -> (JSON Schema fragment, the file that declares it): the engine's keys,
    then the family's, then the method's own (a later declaration narrows an earlier one)."""
    out: dict[str, tuple[dict, str]] = {}
    for path in (METHOD_CONFIGS / SCHEMA_FILE, METHOD_CONFIGS / family / SCHEMA_FILE):
        out.update({k: (v, _rel(path)) for k, v in _shared_schema(path).items()})
    spec = method_spec(family, method)
    # the method's declarations, attributed to the file of the chain that wrote them
    for name in reversed(spec["chain"]):
        doc = _read_yaml(method_config_path(family, name)) or {}
        out.update({k: (v, _rel(method_config_path(family, name))) for k, v in (doc.get("schema") or {}).items()})
    return out


_VALIDATORS: dict[str, Any] = {}


def _fragment_errors(fragment: dict, value: Any) -> list[str]:
    import json

    import jsonschema

    key = json.dumps(fragment, sort_keys=True, default=str)
    validator = _VALIDATORS.get(key)
    if validator is None:
        validator = _VALIDATORS[key] = jsonschema.Draft202012Validator(fragment)
    return [e.message for e in validator.iter_errors(value)]


def resolve_checked_hparams(family: str, method: str, overrides: dict | None = None) -> dict[str, Any]:
    """``resolve_hparams`` then ``check_hparams``, each problem named at its override
    (``overrides.<key>``) or at the YAML that set it; raises ConfigError before anything runs."""
    hp = resolve_hparams(family, method, overrides)
    problems = check_hparams(family, method, hp, where={k: f"overrides.{k}" for k in (overrides or {})})
    if problems:
        raise ConfigError("; ".join(problems))
    return hp


def check_hparams(family: str, method: str, hparams: dict, where: dict[str, str] | None = None) -> list[str]:
    """Problems of ``hparams`` (a resolved set) against the declared types and ranges.

    ``where`` maps a hyperparameter to the config key that set it (an override); the others are
    reported at the YAML file and key that set their default. An undeclared hyperparameter is a
    problem too: every hyperparameter has a declared type.
    """
    schema = hparam_schema(family, method)
    origin = method_spec(family, method)["origin"]
    where = where or {}
    problems = []
    for key, value in hparams.items():
        at = f"config key {where[key]}" if key in where else f"{origin.get(key, _rel(method_config_path(family, method)))}: hparams.{key}"
        if key not in schema:
            problems.append(f"{at}: hyperparameter {key!r} of {family}/{method} has no declared type; declare it "
                            f"under `schema:` in {_rel(method_config_path(family, method))} or in "
                            f"{_rel(METHOD_CONFIGS / family / SCHEMA_FILE)}")
            continue
        fragment, declared_in = schema[key]
        for message in _fragment_errors(fragment, value):
            problems.append(f"{at}: {message} (declared in {declared_in})")
    return problems


def _check_method(family: str, method: str, overrides: dict | None, key_prefix: str,
                  extra: list[tuple[dict, str]] = ()) -> list[str]:
    """Resolve ``method`` with ``overrides`` (at config key ``key_prefix``) and further override
    layers ``extra`` [(overrides, key prefix)], then check the result; problems name the key."""
    try:
        hp = method_defaults(family, method)
    except ConfigError as exc:
        return [f"config key {key_prefix}: {exc}"]
    where = {}
    problems = []
    declared = None
    for layer, prefix in [(overrides or {}, key_prefix)] + list(extra):
        for key, value in layer.items():
            if key not in hp and declared is None:
                try:
                    declared = hparam_schema(family, method)
                except ConfigError:
                    declared = {}
            # an engine or family key (samples_per_class, init, ...) may be set without a default
            if key not in hp and key not in declared:
                problems.append(f"config key {prefix}.{key}: unknown hyperparameter {key!r} for {family}/{method}; "
                                f"known: {sorted(hp)}")
                continue
            hp[key] = value
            where[key] = f"{prefix}.{key}"
    try:
        problems += check_hparams(family, method, hp, where)
    except ConfigError as exc:
        problems.append(f"config key {key_prefix}: {exc}")
    return problems


# --- the config ------------------------------------------------------------------------------

def _backbone_kwargs_problems(backbone: str, kwargs: dict, prefix: str) -> list[str]:
    """Keywords of ``backbone`` not declared in backbone_specs.py, or of the wrong type (at config key ``prefix``)."""
    from classlab.backbone_specs import BACKBONE_KWARGS

    declared, problems = BACKBONE_KWARGS[backbone], []
    for key, value in kwargs.items():
        if key not in declared:
            problems.append(f"config key {prefix}.{key}: {backbone} accepts no keyword {key!r}; "
                            f"allowed: {sorted(declared)} (src/classlab/backbone_specs.py)")
            continue
        problems += [f"config key {prefix}.{key}: {message}" for message in _fragment_errors(declared[key], value)]
    return problems


def _check_backbone_kwargs(config: dict) -> list[str]:
    from classlab.backbone_specs import BACKBONE_KWARGS

    problems = []
    for backbone, kwargs in config["backbone_kwargs"].items():
        if backbone not in BACKBONE_KWARGS:
            problems.append(f"config key backbone_kwargs.{backbone}: {backbone!r} is not a backbone; allowed values: "
                            f"{sorted(BACKBONE_KWARGS)}")
            continue
        problems += _backbone_kwargs_problems(backbone, kwargs, f"backbone_kwargs.{backbone}")
    return problems


def _validate_teacher(teacher: dict) -> list[str]:
    """The distillation teacher: its backbone's keywords and its pretraining overrides."""
    problems = _backbone_kwargs_problems(teacher["backbone"], teacher.get("backbone_kwargs", {}),
                                         "families.distill.teacher.backbone_kwargs")
    return problems + _check_method("pretrain", "supervised", teacher.get("overrides"),
                                    "families.distill.teacher.overrides")


def validate_config(config: dict) -> dict:
    """Validate ``config`` in place (filling schema defaults) or raise ConfigError.

    Imports neither torch nor any method module (tested): it runs when the Snakefile is parsed.
    """
    import jsonschema

    schema = _read_yaml(SCHEMA)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_format_error(e) for e in errors))
    config.setdefault("backbone_kwargs", {})
    config.setdefault("pretrained_weights", False)
    config.setdefault("mirrors", {})
    config["pretrain"].setdefault("overrides", {})
    config["pretrain"].setdefault("backbone_overrides", {})
    config["pretrain"].setdefault("others", {})
    if "distill" in config["families"]:
        teacher = config["families"]["distill"]["teacher"]
        teacher.setdefault("backbone_kwargs", {})
        teacher.setdefault("overrides", {})

    problems = _check_backbone_kwargs(config)
    pretrain = config["pretrain"]
    problems += _check_method("pretrain", pretrain["method"], pretrain["overrides"], "pretrain.overrides")
    for backbone, overrides in pretrain["backbone_overrides"].items():  # overrides, then the backbone's own
        problems += _check_method("pretrain", pretrain["method"], pretrain["overrides"], "pretrain.overrides",
                                  [(overrides, f"pretrain.backbone_overrides.{backbone}")])
    for name, overrides in pretrain["others"].items():
        problems += _check_method("pretrain", name, overrides, f"pretrain.others.{name}")
    if "incremental" in config["families"]:
        problems += _validate_incremental(config)
    if "discovery" in config["families"]:
        problems += _validate_discovery(config)
    if "distill" in config["families"]:
        problems += _validate_teacher(config["families"]["distill"]["teacher"])
    if "explain" in config["families"]:
        problems += _validate_explain(config)
    if "shift" in config["families"]:
        problems += _validate_shift(config)
    if "condense" in config["families"]:
        problems += _validate_condense(config)
    if "vlm" in config["families"]:
        problems += _validate_vlm(config)
    if "ssl" in config["families"]:
        problems += _validate_ssl(config)
    if "dense" in config["families"]:
        problems += _validate_dense(config)
    for family, spec in config["families"].items():
        if family in OWN_GRID_FAMILIES:  # checked by its own validator above
            continue
        known = list_methods(family)
        spec.setdefault("overrides", {})
        for i, method in enumerate(spec["methods"]):
            if method not in known:
                problems.append(f"config key families.{family}.methods[{i}]: {method!r} is not a method of "
                                f"family {family!r}; allowed values: {known}")
        run = list(spec["methods"])
        if family == "vlm":  # the vlm family's other protocols name their own methods
            run += [m for part in ("compositional", "label_noise", "epoch_curve")
                    for m in (spec.get(part) or {}).get("methods", [])]
        if family == "metric":  # scene retrieval names its own methods (cfcd, cfcd_global)
            scene_methods = (spec.get("scenes") or {}).get("methods", [])
            for i, method in enumerate(scene_methods):
                if method not in known:
                    problems.append(f"config key families.metric.scenes.methods[{i}]: {method!r} is not a method of "
                                    f"family 'metric'; allowed values: {known}")
                elif method not in spec["methods"]:
                    problems += _check_method(family, method, spec["overrides"].get(method),
                                              f"families.metric.overrides.{method}")
            run += scene_methods
        if family == "generative":  # the shared node every generative method reads
            run.append("ddpm")
            problems += _check_method(family, "ddpm", spec["overrides"].get("ddpm"), "families.generative.overrides.ddpm")
        for method, overrides in spec["overrides"].items():
            if method not in run:
                problems.append(f"config key families.{family}.overrides.{method}: {method!r} is not in "
                                f"families.{family}.methods {spec['methods']}"
                                + (" nor in the compositional, label_noise or epoch_curve methods" if family == "vlm" else "")
                                + (" nor in families.metric.scenes.methods" if family == "metric" else "")
                                + (" nor the shared node ddpm" if family == "generative" else ""))
        for method in spec["methods"]:
            if method in known:
                problems += _check_method(family, method, spec["overrides"].get(method),
                                          f"families.{family}.overrides.{method}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return config


def _validation_inputs_key(config: dict) -> str:
    """A digest of everything ``validate_config`` reads: the config itself, and the path and bytes
    of every YAML under ``config/`` and ``workflow/schemas/`` and of every module of the package
    (method names are module names; datasets and scenario builders are code). Bytes, not mtimes:
    an edit within one timestamp tick must still change the digest."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=repr).encode())
    for top, pattern in ((ROOT / "config", "*.yaml"), (SCHEMA.parent, "*.yaml"), (Path(__file__).parent, "*.py")):
        for path in sorted(top.rglob(pattern)):
            digest.update(f"{path}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def validate_config_cached(config: dict, cache: Path) -> dict:
    """``validate_config``, skipped when nothing it reads changed since it last passed.

    Every Snakemake invocation parses the Snakefile, and a no-op rerun spends most of its own time
    there; validation is its largest part (jsonschema's import and about 130 YAML reads). A pass
    writes the validated config (defaults filled) under a digest of its inputs to ``cache`` (the
    Snakefile's: ``.snakemake/classlab-validated-config.json`` in the working directory); the next
    parse with the same digest takes that config instead of validating again. A failed validation
    writes nothing, so an invalid config is reported on every parse.
    """
    import json

    key = _validation_inputs_key(config)
    try:
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            config.clear()
            config.update(stored["config"])
            return config
    except (OSError, ValueError, AttributeError, KeyError):
        pass  # no cache, or unreadable: validate
    validate_config(config)
    try:  # best effort: a read-only checkout validates on every parse
        text = json.dumps({"key": key, "config": config})
        if json.loads(text)["config"] != config:
            return config  # not exactly JSON (tuples, non-string keys): not cached
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, cache)
    except (OSError, TypeError, ValueError):
        pass
    return config


SCENARIO_PARAMS = {
    "class_incremental": {"initial", "increment", "samples_per_class", "test_samples_per_class"},
    "few_shot": {"base_classes", "ways", "shots", "samples_per_class", "test_samples_per_class"},
    "si_blurry": {"num_tasks", "disjoint_class_ratio", "blurry_sample_ratio", "samples_per_class",
                  "test_samples_per_class", "eval_period"},
}


def _kinds_problem(method: str, kinds: tuple[str, ...] | None, kind: str, key: str) -> str | None:
    if kinds is None:
        return (f"config key {key}: {_rel(method_config_path('incremental', method))} declares no scenario_kinds "
                f"(nor does a method it extends); allowed values: {list(SCENARIO_KINDS)}")
    if kind not in kinds:
        return (f"config key {key}: {method} runs on {list(kinds)} (scenario_kinds in "
                f"{_rel(method_config_path('incremental', method))}), not on {kind!r}")
    return None


def _validate_incremental(config: dict) -> list[str]:
    """Scenario parameters against the datasets' class counts (a dry build on synthetic labels),
    method names and scenario kinds per run, and memory budgets (at least one exemplar per
    class). Fills ``methods``. Imports numpy and the torch-free data modules only."""
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

    known = list_methods("incremental")
    methods: list[str] = []

    def use(method: str, key: str, kind: str) -> None:
        """A method named at config ``key`` runs on a scenario of ``kind``."""
        if method not in known:
            problems.append(f"config key {key}: {method!r} is not a method of family 'incremental'; "
                            f"allowed values: {known}")
            return
        try:
            problem = _kinds_problem(method, method_scenario_kinds("incremental", method), kind, key)
        except ConfigError as exc:
            problem = f"config key {key}: {exc}"
        if problem:
            problems.append(problem)
        if method not in methods:
            methods.append(method)

    spec.setdefault("forgetting", {})
    for name, forgetting in spec["forgetting"].items():
        for dataset in config["datasets"]:
            try:
                validate_forget_tasks(forgetting["forget_tasks"], get_dataset(dataset).num_classes)
            except ScenarioError as exc:
                problems.append(f"config key families.incremental.forgetting.{name} on {dataset}: {exc}")
        for i, method in enumerate(forgetting["methods"]):
            use(method, f"families.incremental.forgetting.{name}.methods[{i}]", "continual_forgetting")
    spec.setdefault("multilabel_runs", {})
    spec.setdefault("scenes", {})
    for group, runs in (("runs", spec["runs"]), ("multilabel_runs", spec["multilabel_runs"])):
        for name, run_methods in runs.items():
            if name not in spec["scenarios"]:
                problems.append(f"config key families.incremental.{group}.{name}: no such scenario; "
                                f"allowed values: {sorted(spec['scenarios'])}")
                continue
            kind = spec["scenarios"][name]["kind"]
            if group == "multilabel_runs":
                if kind != "class_incremental":
                    problems.append(f"config key families.incremental.multilabel_runs.{name}: the multi-label "
                                    f"protocol takes its tasks from a class_incremental scenario, not {kind!r}")
                kind = "multilabel"
            for i, method in enumerate(run_methods):
                use(method, f"families.incremental.{group}.{name}[{i}]", kind)
    spec["methods"] = methods
    spec.setdefault("overrides", {})
    largest = max(get_dataset(d).num_classes for d in config["datasets"])
    for method in methods:
        try:
            hp = resolve_hparams("incremental", method, spec["overrides"].get(method))
        except ConfigError:
            continue  # reported by the generic check
        if "memory_size" in hp and isinstance(hp["memory_size"], int) and hp["memory_size"] < largest:
            problems.append(f"config key families.incremental.overrides.{method}.memory_size: {hp['memory_size']} "
                            f"is below one exemplar per class ({largest} classes)")
    return problems


def _validate_explain(config: dict) -> list[str]:
    """Scene datasets, each model's layers (against its backbone's stage names; a dotted submodule
    name is checked when the job runs), its training method or checkpoint pattern, readouts and the
    methods that need them. Fills the schema's defaults. Imports neither torch nor a method module."""
    from classlab.backbone_specs import check_backbone_kwargs, stage_names
    from classlab.data.registry import DATASETS

    spec = config["families"]["explain"]
    for key, default in (("overrides", {}), ("probe_overrides", {}), ("images", 200), ("image_seed", 0),
                         ("randomisation_images", 50), ("perturbation_steps", 20), ("tolerance", 0)):
        spec.setdefault(key, default)
    problems = []
    for i, dataset in enumerate(spec["datasets"]):
        if dataset not in DATASETS:
            problems.append(f"config key families.explain.datasets[{i}]: unknown dataset {dataset!r}; known: "
                            f"{sorted(DATASETS)}")
        elif not dataset.endswith("_scenes"):
            problems.append(f"config key families.explain.datasets[{i}]: {dataset!r} has no boxes; explain needs a "
                            f"scenes dataset ({sorted(d for d in DATASETS if d.endswith('_scenes'))})")
    for name, model in spec["models"].items():
        key = f"families.explain.models.{name}"
        model.setdefault("backbone_kwargs", {})
        model.setdefault("method", "erm")
        model.setdefault("overrides", {})
        model.setdefault("readouts", [])
        try:
            check_backbone_kwargs(model["backbone"], model["backbone_kwargs"])
        except ValueError as exc:
            problems.append(f"config key {key}.backbone_kwargs: {exc}")
            continue
        valid = stage_names(model["backbone"], model["backbone_kwargs"])
        for j, layer in enumerate(model["layers"]):
            if layer not in valid and "." not in layer:
                problems.append(f"config key {key}.layers[{j}]: {model['backbone']} has no layer {layer!r}; its layers: "
                                f"{valid} (or a dotted submodule name such as backbone.features.3)")
        if "checkpoint" in model:
            if "{seed}" not in model["checkpoint"]:
                problems.append(f"config key {key}.checkpoint: the path needs a {{seed}} field (one model per seed)")
            if model["readouts"]:
                problems.append(f"config key {key}.readouts: readouts train on a scene-trained model, not on a "
                                f"checkpoint of another family")
        else:
            problems += _check_method("supervised", model["method"], model["overrides"], f"{key}.overrides")
        if "promptcam" in model["readouts"] and model["backbone"] != "vit_tiny":
            problems.append(f"config key {key}.readouts: promptcam needs a ViT (backbone vit_tiny), not "
                            f"{model['backbone']}")
    if "promptcam" in spec["methods"] and not any("promptcam" in m["readouts"] for m in spec["models"].values()):
        problems.append("config key families.explain.methods: promptcam explains its own trained readout; add "
                        "`readouts: [promptcam]` to a vit_tiny model")
    if any("linear_probe" in m["readouts"] for m in spec["models"].values()):
        problems += _check_method("supervised", "linear_probe", spec["probe_overrides"],
                                  "families.explain.probe_overrides")
    return problems


def _validate_discovery(config: dict) -> list[str]:
    """Split parameters against the datasets' class counts (a dry build on synthetic labels), method
    names and split kinds per run, and the pretraining node a split starts from. Fills ``methods``.
    Imports numpy and the torch-free data modules only."""
    import numpy as np

    from classlab.data.discovery_split import SplitError, build_discovery_split
    from classlab.data.registry import get_dataset

    problems = []
    spec = config["families"]["discovery"]
    for name, split in spec["splits"].items():
        split.setdefault("init", "simclr")
        if split["init"] == "simclr" and "simclr" not in config["pretrain"]["others"]:
            problems.append(f"config key families.discovery.splits.{name}.init: simclr needs the pretraining node "
                            f"pretrain.others.simclr (add `simclr: {{}}` there, or use init: supervised_known)")
        if split["init"] == "supervised_known" and split["kind"] == "latent_shift":
            problems.append(f"config key families.discovery.splits.{name}.init: a latent_shift split has no labelled "
                            f"classes to pretrain on; use simclr or scratch")
        params = {k: v for k, v in split.items() if k not in ("kind", "init", "datasets")}
        for dataset in split.get("datasets") or config["datasets"]:
            try:
                k = get_dataset(dataset).num_classes
            except KeyError as exc:
                problems.append(f"config key families.discovery.splits.{name}.datasets: {exc}")
                continue
            # the cut, or a structural stand-in (latent_shift draws whole domains from the class pools: a
            # generous stand-in, the real counts are checked when the split is built on the data)
            per = int(params.get("samples_per_class", 0) or 0) or (7000 if split["kind"] == "latent_shift" else 200)
            labels = np.repeat(np.arange(k), per)
            try:
                build_discovery_split(split["kind"], dataset, labels, k, 0, test_labels=labels, **params)
            except (SplitError, TypeError, ImportError) as exc:
                problems.append(f"config key families.discovery.splits.{name} on {dataset}: {exc}")
    known = list_methods("discovery")
    methods: list[str] = []
    for name, run_methods in spec["runs"].items():
        if name not in spec["splits"]:
            problems.append(f"config key families.discovery.runs.{name}: no such split; allowed values: "
                            f"{sorted(spec['splits'])}")
            continue
        kind = spec["splits"][name]["kind"]
        for i, method in enumerate(run_methods):
            key = f"families.discovery.runs.{name}[{i}]"
            if method not in known:
                problems.append(f"config key {key}: {method!r} is not a method of family 'discovery'; "
                                f"allowed values: {known}")
                continue
            try:
                kinds = method_scenario_kinds("discovery", method)
            except ConfigError as exc:
                problems.append(f"config key {key}: {exc}")
                continue
            if kinds is None:
                problems.append(f"config key {key}: {_rel(method_config_path('discovery', method))} declares no "
                                f"scenario_kinds; allowed values: {list(DISCOVERY_KINDS)}")
            elif kind not in kinds:
                problems.append(f"config key {key}: {method} runs on {list(kinds)} (scenario_kinds in "
                                f"{_rel(method_config_path('discovery', method))}), not on the {kind!r} split {name!r}")
            if method not in methods:
                methods.append(method)
    for name in spec.get("backbones", {}):
        if name not in spec["splits"]:
            problems.append(f"config key families.discovery.backbones.{name}: no such split")
    spec["methods"] = methods
    spec.setdefault("overrides", {})
    spec.setdefault("backbones", {})
    spec.setdefault("pretrain_known", {})
    problems += _check_method("pretrain", "supervised", {**config["pretrain"]["overrides"], **spec["pretrain_known"]},
                              "families.discovery.pretrain_known")
    return problems


def _validate_shift(config: dict) -> list[str]:
    """Domain suites, their test domains, the methods' protocol kinds and every hyperparameter draw
    of the sweep (a search range outside a key's schema is caught here, not in the 40th job)."""
    from classlab.data.domains import DomainError, domain_names, resolve_recipe

    spec = config["families"]["shift"]
    problems: list[str] = []
    dg = spec.get("dg")
    methods: list[str] = []
    if dg:
        dg.setdefault("test_domains", {})
        dg.setdefault("n_draws", 4)
        for name, recipe in dg["suites"].items():
            recipe = dict(recipe)
            kind = recipe.pop("kind")
            try:
                names = domain_names(kind, resolve_recipe(kind, recipe, f"families.shift.dg.suites.{name}"))
            except DomainError as exc:
                problems.append(f"config key {exc}")
                continue
            for domain in dg["test_domains"].get(name, []):
                if domain not in names:
                    problems.append(f"config key families.shift.dg.test_domains.{name}: test domain {domain!r} is "
                                    f"not among the domains of suite {name!r}: {names}")
        for name in dg["test_domains"]:
            if name not in dg["suites"]:
                problems.append(f"config key families.shift.dg.test_domains.{name}: no such suite; allowed values: "
                                f"{sorted(dg['suites'])}")
        known = list_methods("shift")
        for i, method in enumerate(dg["methods"]):
            key = f"families.shift.dg.methods[{i}]"
            if method not in known:
                continue  # named by the generic check below
            kinds = method_scenario_kinds("shift", method) or ()
            if "domain_generalization" not in kinds:
                problems.append(f"config key {key}: {method!r} runs on {list(kinds)}, not on domain_generalization")
                continue
            overrides = spec.get("overrides", {}).get(method) or {}
            for draw in range(1, dg["n_draws"]):
                for seed in config["seeds"]:
                    try:
                        hp = draw_hparams("shift", method, draw, int(seed), overrides)
                        bad = check_hparams("shift", method, hp, {})
                    except ConfigError as exc:
                        bad = [str(exc)]
                    problems += [f"config key {key}: draw {draw} of its search ({_rel(method_config_path('shift', method))}"
                                 f" search:) gives {b}" for b in bad]
        methods += dg["methods"]
    tta = spec.get("tta")
    if tta:
        from classlab.data.corruptions import CORRUPTIONS

        for key, value in (("source", "erm"), ("test_samples_per_class", 200), ("batch_size", 64),
                           ("stats_samples_per_class", 1000)):
            tta.setdefault(key, value)
        for i, name in enumerate(tta["corruptions"]):
            if name not in CORRUPTIONS:
                problems.append(f"config key families.shift.tta.corruptions[{i}]: corruption {name!r} does not exist; "
                                f"valid: {sorted(CORRUPTIONS)}")
        supervised = config["families"].get("supervised", {}).get("methods", [])
        if tta["source"] not in supervised:
            problems.append(f"config key families.shift.tta.source: {tta['source']!r} is not in "
                            f"families.supervised.methods {supervised}: the source model is that family's checkpoint")
        known = list_methods("shift")
        for i, method in enumerate(tta["methods"]):
            if method in known and "test_time" not in (method_scenario_kinds("shift", method) or ()):
                problems.append(f"config key families.shift.tta.methods[{i}]: {method!r} runs on "
                                f"{list(method_scenario_kinds('shift', method) or ())}, not on test_time")
        methods += tta["methods"]
    spec["methods"] = list(dict.fromkeys(methods))
    return problems


# the ssl probes' settings (classlab.protocols.ssl_probe), here so that validating a config imports no torch
# probe settings: the papers' evaluation defaults where they have one, CPU sizes otherwise
PROBE_DEFAULTS = {
    "knn_k": 20,                          # Wu et al. 2018 / DINO
    "knn_temperature": 0.07,              # Wu et al. 2018 / DINO
    "linear_c": [0.01, 0.1, 1.0, 10.0],   # chosen on val
    "linear_max_iter": 300,
    "train_per_class": 0,                 # 0: the whole train split (a seeded subset otherwise)
    "seg_epochs": 20,                     # the epoch is chosen on val mIoU
    "seg_lr": 0.01,
    "seg_batch_size": 32,
}


def probe_settings(probe: dict | None) -> dict:
    """PROBE_DEFAULTS with ``probe`` over them, each checked (the error names ``probe.<key>``)."""
    probe = dict(probe or {})
    unknown = sorted(set(probe) - set(PROBE_DEFAULTS))
    if unknown:
        raise ConfigError(f"probe: unknown key(s) {unknown}; known: {sorted(PROBE_DEFAULTS)}")
    s = {**PROBE_DEFAULTS, **probe}
    for key in ("knn_k", "linear_max_iter", "seg_epochs", "seg_batch_size"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ConfigError(f"probe.{key}: {s[key]!r}; give an integer >= 1")
    if isinstance(s["train_per_class"], bool) or not isinstance(s["train_per_class"], int) or s["train_per_class"] < 0:
        raise ConfigError(f"probe.train_per_class: {s['train_per_class']!r}; give an integer >= 0 (0: all)")
    for key in ("knn_temperature", "seg_lr"):
        if not isinstance(s[key], (int, float)) or isinstance(s[key], bool) or not s[key] > 0:
            raise ConfigError(f"probe.{key}: {s[key]!r}; give a number > 0")
    if (not isinstance(s["linear_c"], list) or not s["linear_c"]
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in s["linear_c"])):
        raise ConfigError(f"probe.linear_c: {s['linear_c']!r}; give a non-empty list of numbers > 0")
    return s


# families whose config is not `methods` + `overrides` but a grid of their own, checked by their validator
OWN_GRID_FAMILIES = ("ssl",)
SSL_PROBES = ("image", "segmentation")
# what every method of an ssl group shares (equal pretraining budget): the group's `budget`, never a
# method's override
SSL_BUDGET_KEYS = ("epochs", "batch_size", "samples_per_class", "classes")


def _validate_ssl(config: dict) -> list[str]:
    """The ssl family: groups of pretrain-stage methods, each group pretrained at one budget on its
    datasets with one backbone and read by one probe (image: linear + k-NN; segmentation: a per-pixel
    linear head on a dense scenes dataset's masks)."""
    from classlab.data.registry import DENSE_BASES

    spec = config["families"]["ssl"]
    spec.setdefault("overrides", {})
    spec.setdefault("probe_settings", {})
    problems: list[str] = []
    known = list_methods("pretrain")
    in_groups: set[str] = set()
    for name, group in spec["groups"].items():
        key = f"families.ssl.groups.{name}"
        group.setdefault("budget", {})
        group.setdefault("backbone_kwargs", {})
        group.setdefault("probe", "image")
        problems += _backbone_kwargs_problems(group["backbone"], group["backbone_kwargs"], f"{key}.backbone_kwargs")
        for i, method in enumerate(group["methods"]):
            if method not in known:
                problems.append(f"config key {key}.methods[{i}]: {method!r} is not a pretrain-stage method; "
                                f"allowed values: {known}")
                continue
            in_groups.add(method)
            overrides = spec["overrides"].get(method) or {}
            shared = sorted(set(overrides) & set(SSL_BUDGET_KEYS))
            if shared:
                problems.append(f"config key families.ssl.overrides.{method}: {shared} belong to the groups' "
                                f"budget (every method of a group pretrains at the same budget); set them in "
                                f"{key}.budget")
            problems += _check_method("pretrain", method, overrides, f"families.ssl.overrides.{method}",
                                      [(group["budget"], f"{key}.budget")])
        unknown_budget = sorted(set(group["budget"]) - set(SSL_BUDGET_KEYS))
        if unknown_budget:
            problems.append(f"config key {key}.budget: {unknown_budget} are not budget keys; allowed: "
                            f"{list(SSL_BUDGET_KEYS)} (a method's own options go in families.ssl.overrides)")
        if group["probe"] == "segmentation":
            flat = [d for d in group["datasets"] if d not in DENSE_BASES]
            if flat:
                problems.append(f"config key {key}.datasets: {flat} have no semantic masks; the segmentation "
                                f"probe reads a dense scenes dataset ({sorted(DENSE_BASES)})")
        elif any(d in DENSE_BASES for d in group["datasets"]):
            problems.append(f"config key {key}.probe: the image probes need one class per image; "
                            f"{[d for d in group['datasets'] if d in DENSE_BASES]} are multi-label scenes "
                            f"(probe: segmentation reads them)")
    for method in spec["overrides"]:
        if method not in in_groups:
            problems.append(f"config key families.ssl.overrides.{method}: {method!r} is in no group's methods")
    try:
        probe_settings(spec["probe_settings"])
    except ConfigError as exc:
        problems.append(f"config key families.ssl.probe_settings: {exc}")
    return problems


def _validate_dense(config: dict) -> list[str]:
    """The dense family trains one backbone per run from scratch; its kwargs must fit that backbone."""
    spec = config["families"]["dense"]
    spec.setdefault("backbone", "convnet")
    spec.setdefault("backbone_kwargs", {})
    return _backbone_kwargs_problems(spec["backbone"], spec["backbone_kwargs"], "families.dense.backbone_kwargs")


def _validate_condense(config: dict) -> list[str]:
    """Variants named by `variant_methods` exist and list only the family's methods; `ipc_methods`
    names only images-per-class values of the grid and the family's methods."""
    spec = config["families"]["condense"]
    problems: list[str] = []
    spec.setdefault("variants", {})
    spec.setdefault("variant_methods", {})
    # YAML reads a key 10 as an integer; the Snakefile looks the values up by string
    spec["ipc_methods"] = {str(k): v for k, v in spec.get("ipc_methods", {}).items()}
    spec.setdefault("backbone_kwargs", {})
    if "plain" in spec["variants"]:
        problems.append("config key families.condense.variants.plain: `plain` is the prepared dataset itself; "
                        "name a variant otherwise")
    variants = ["plain", *sorted(spec["variants"])]
    ipcs = [str(n) for n in spec.get("images_per_class", [])]
    for key, allowed, what in (("variant_methods", variants, "no such variant; allowed values"),
                               ("ipc_methods", ipcs, "not in families.condense.images_per_class")):
        for name, methods in spec[key].items():
            if name not in allowed:
                problems.append(f"config key families.condense.{key}.{name}: {what} {allowed}")
            problems += [f"config key families.condense.{key}.{name}[{i}]: {method!r} is not in "
                         f"families.condense.methods {spec['methods']}"
                         for i, method in enumerate(methods) if method not in spec["methods"]]
    return problems


def _validate_vlm(config: dict) -> list[str]:
    """The offline CLIP's overrides are image_text's; its classes are the protocol's (the base classes)."""
    spec = config["families"]["vlm"]
    spec.setdefault("pretrain", {})
    spec.setdefault("shots", 16)
    spec.setdefault("test_per_class", 0)
    if "classes" in spec["pretrain"]:
        return ["config key families.vlm.pretrain.classes: the offline CLIP trains on the base classes (the first "
                "half of the sorted labels) or on all of them, as families.vlm.image_sides says; the protocol sets them"]
    problems = _check_method("pretrain", "image_text", spec["pretrain"], "families.vlm.pretrain")
    if spec.get("clip") and list(spec.get("image_sides") or ["base"]) != ["all"]:
        problems.append(f"config key families.vlm.image_sides: real CLIP ({spec['clip']}) saw the web in pretraining, "
                        "not the base classes only; set image_sides: [all]")
    for part in ("compositional", "label_noise"):
        for i, method in enumerate((spec.get(part) or {}).get("methods", [])):
            problems += _check_method("vlm", method, (spec.get("overrides") or {}).get(method, {}),
                                      f"families.vlm.{part}.methods[{i}]")
    if (spec.get("compositional") or {}).get("pretrain"):
        problems += _check_method("pretrain", "image_text", spec["compositional"]["pretrain"],
                                  "families.vlm.compositional.pretrain")
    curve = spec.get("epoch_curve") or {}
    for i, method in enumerate(curve.get("methods", [])):
        problems += _check_method("vlm", method, {**(spec.get("overrides") or {}).get(method, {}),
                                                  "epochs": max(curve.get("epochs") or [1])},
                                  f"families.vlm.epoch_curve.methods[{i}]")
    return problems


# --- random hyperparameter search (DomainBed's sweep) ---------------------------------------------

def method_search(family: str, method: str) -> dict[str, dict]:
    """The method's ``search:`` distributions, through its ``extends`` chain."""
    return dict(method_spec(family, method)["search"])


def draw_hparams(family: str, method: str, draw: int, trial: int, overrides: dict | None = None) -> dict[str, Any]:
    """Draw ``draw`` of the method's random search for ``trial``: draw 0 is the defaults (as
    DomainBed's hparams seed 0), draw k > 0 samples every ``search:`` entry from a generator seeded by
    (method, draw, trial), so that each trial gets its own draws, the same on every machine.
    ``overrides`` (the config's) are applied last and are never searched over."""
    if not isinstance(draw, int) or draw < 0:
        raise ConfigError(f"draw: {draw!r}; give an integer >= 0")
    import hashlib

    import numpy as np

    hp = resolve_hparams(family, method, overrides)
    if draw == 0:
        return hp
    digest = hashlib.sha256(f"{family}/{method}/{draw}/{trial}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    for key, dist in sorted(method_search(family, method).items()):
        kind, args = next(iter(dist.items()))
        if kind == "log10_uniform":
            value = float(10 ** rng.uniform(args[0], args[1]))
        elif kind == "uniform":
            value = float(rng.uniform(args[0], args[1]))
        elif kind == "int_log2_uniform":
            value = int(2 ** rng.uniform(args[0], args[1]))
        elif kind == "int_uniform":  # an integer in [lo, hi]
            value = int(rng.integers(int(args[0]), int(args[1]) + 1))
        else:  # choice
            value = args[int(rng.integers(len(args)))]
        if key not in (overrides or {}):
            hp[key] = value
    return hp
