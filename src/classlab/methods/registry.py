"""Method registry: (family, name) maps to a Method class, nothing else.

Method modules register themselves on import; ``load_family`` imports every module of a
family package so that adding a method is adding one file.

What a method accepts is data, read from its YAML without importing the class: a registered
class takes its ``scenario_kinds`` from ``config/methods/<family>/<method>.yaml`` (inherited
through ``extends``), so the parse-time check of a config and the run-time check of a protocol
read the same declaration.
"""
from __future__ import annotations

import importlib
import pkgutil

from classlab.config import ConfigError, method_config_path, method_modules, method_scenario_kinds, method_spec

METHODS: dict[tuple[str, str], type] = {}
# families whose methods run inside a protocol and declare the protocol kinds they run on
PROTOCOL_FAMILIES = ("incremental", "discovery", "shift", "single_paper")


def _declared_scenario_kinds(family: str, name: str) -> tuple[str, ...] | None:
    """The YAML's ``scenario_kinds``; an incremental method whose YAML is missing, broken or
    silent gets ``()`` (it runs on nothing; the config check names the cause)."""
    try:
        kinds = method_scenario_kinds(family, name)
    except ConfigError:
        kinds = None
    if kinds is None and family in PROTOCOL_FAMILIES:
        return ()
    return kinds


def register_method(family: str, name: str):
    def wrap(cls):
        key = (family, name)
        if key in METHODS and METHODS[key] is not cls:
            raise ValueError(f"method {family}/{name} registered twice")
        cls.family, cls.name = family, name
        kinds = _declared_scenario_kinds(family, name)
        if kinds is not None:
            cls.scenario_kinds = kinds
        METHODS[key] = cls
        return cls
    return wrap


def load_family(family: str) -> None:
    package = importlib.import_module(f"classlab.methods.{family}")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def _variant(family: str, name: str) -> type | None:
    """A YAML-only variant (``extends:`` and no module of its own): a subclass, registered under
    its own name, of the class of the nearest method of its chain that has one."""
    if not method_config_path(family, name).exists():
        return None
    chain = method_spec(family, name)["chain"]  # raises ConfigError on a cycle or a missing base
    for base in chain[1:]:
        if (family, base) in METHODS:
            parent = METHODS[(family, base)]
            attrs = {"__module__": parent.__module__,
                     "__doc__": f"{family}/{name}: {parent.__name__} with the hyperparameters of {name}.yaml "
                                f"(extends {chain[1]})"}
            return register_method(family, name)(type(f"{parent.__name__}_{name}", (parent,), attrs))
    return None


def get_method(family: str, name: str) -> type:
    load_family(family)
    if (family, name) not in METHODS and _variant(family, name) is None:
        known = sorted(set(n for f, n in METHODS if f == family))
        raise KeyError(f"unknown method {name!r} in family {family!r}; known: {known}")
    cls = METHODS[(family, name)]
    if family in PROTOCOL_FAMILIES:
        kinds = method_scenario_kinds(family, name)  # read again: raises ConfigError naming a broken YAML
        if kinds is None:
            raise ConfigError(f"{method_config_path(family, name)} declares no scenario_kinds (nor does a method it "
                              f"extends): the {family} protocols need it")
        cls.scenario_kinds = kinds
    return cls


def list_methods(family: str) -> list[str]:
    """The module names of a family (one method each); the names a config may use, YAML-only
    variants included, are ``classlab.config.list_methods``."""
    return method_modules(family)
