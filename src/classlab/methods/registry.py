"""Method registry: (family, name) maps to a Method class, nothing else.

Method modules register themselves on import; ``load_family`` imports every module of a
family package so that adding a method is adding one file.
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

METHODS: dict[tuple[str, str], type] = {}


def register_method(family: str, name: str):
    def wrap(cls):
        key = (family, name)
        if key in METHODS and METHODS[key] is not cls:
            raise ValueError(f"method {family}/{name} registered twice")
        cls.family, cls.name = family, name
        METHODS[key] = cls
        return cls
    return wrap


def load_family(family: str) -> None:
    package = importlib.import_module(f"classlab.methods.{family}")
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def get_method(family: str, name: str) -> type:
    load_family(family)
    if (family, name) not in METHODS:
        known = sorted(n for f, n in METHODS if f == family)
        raise KeyError(f"unknown method {name!r} in family {family!r}; known: {known}")
    return METHODS[(family, name)]


def list_methods(family: str) -> list[str]:
    """Method names of a family: by convention the module names of its package.

    Read from the file system so that validating a config does not import torch; a test
    checks that every module registers exactly the method it is named after.
    """
    package = Path(__file__).parent / family
    if not (package / "__init__.py").exists():
        return []
    return sorted(p.stem for p in package.glob("*.py") if not p.stem.startswith("_"))
