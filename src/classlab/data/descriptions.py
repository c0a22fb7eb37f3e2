"""Class descriptions shipped with the project (``config/descriptions/<dataset>.yaml``), for the vlm
family's description-based methods: ``generic`` descriptions per class (a description ensemble) and
``differential`` ones for confusable pairs (what tells ``first`` from ``second``; FuDD).

``load_descriptions`` checks the file against the dataset's class names before any method uses it:
every class needs at least one generic description, and every pair must name two known, different
classes. The error names the file and the class."""
from __future__ import annotations

from pathlib import Path

import yaml

from classlab.config import ROOT, ConfigError

DESCRIPTIONS_DIR = ROOT / "config" / "descriptions"


def descriptions_path(dataset: str) -> Path:
    return DESCRIPTIONS_DIR / f"{dataset}.yaml"


def load_descriptions(dataset: str, class_names: list[str], path: Path | None = None) -> dict:
    """``{"generic": {class: [str, ...]}, "differential": {(first, second): str}}`` for ``class_names``."""
    path = Path(path) if path is not None else descriptions_path(dataset)
    if not path.exists():
        raise ConfigError(f"descriptions: no file {path} for dataset {dataset!r}; write one like "
                          f"{descriptions_path('fashion_mnist')}")
    spec = yaml.safe_load(path.read_text()) or {}
    generic = spec.get("generic") or {}
    missing = [name for name in class_names if not generic.get(name)]
    if missing:
        raise ConfigError(f"descriptions: {path} has no generic description of class {missing[0]!r}"
                          + (f" (nor of {missing[1:]})" if len(missing) > 1 else ""))
    unknown = sorted(set(generic) - set(class_names))
    if unknown:
        raise ConfigError(f"descriptions: {path} describes {unknown}, not classes of {dataset} {class_names}")
    pairs = {}
    for i, row in enumerate(spec.get("differential") or []):
        first, second, tells = row.get("first"), row.get("second"), row.get("tells")
        if first not in class_names or second not in class_names or first == second or not tells:
            raise ConfigError(f"descriptions: {path} differential[{i}]: {row!r} must name two different classes "
                              f"of {class_names} and what tells them apart")
        pairs[(first, second)] = str(tells)
    return {"generic": {name: [str(t) for t in generic[name]] for name in class_names}, "differential": pairs}
