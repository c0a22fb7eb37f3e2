"""The `single_paper` family: each method brings its own protocol, named by its YAML's ``scenario_kinds``.

- ``icl_regression`` (``classlab.protocols.icl_gd``): linear regression tasks in context; a trained linear
  self-attention layer against the one-step gradient-descent construction (von Oswald et al., ICML 2023);
- ``mil_bags`` (``classlab.protocols.mil``): bags of images, a positive bag holding at least one instance
  of the target class; an instance classifier with pseudo-labels against attention pooling;
- ``active`` (``classlab.protocols.aspl``): pool-based active learning, accuracy against labels queried
  (active self-paced learning, uncertainty queries alone, random queries).

``run_single_paper`` looks the protocol up from the method's YAML (no method module imported to choose)
and calls it; one job is one (method, seed) and writes ``out_dir/metrics.json`` last.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from classlab.config import ConfigError, method_scenario_kinds

FAMILY = "single_paper"
# scenario kind -> (module, function, whether it reads a prepared dataset)
PROTOCOLS = {
    "icl_regression": ("classlab.protocols.icl_gd", "run_icl_gd", False),
    "mil_bags": ("classlab.protocols.mil", "run_mil", True),
    "active": ("classlab.protocols.aspl", "run_aspl", True),
}


def protocol_of(method: str) -> str:
    """The protocol (scenario kind) a single_paper method runs on, from its YAML."""
    kinds = method_scenario_kinds(FAMILY, method) or []
    known = [k for k in kinds if k in PROTOCOLS]
    if len(known) != 1:
        raise ConfigError(f"config/methods/{FAMILY}/{method}.yaml: scenario_kinds {list(kinds)} must name exactly one "
                          f"of {sorted(PROTOCOLS)}")
    return known[0]


def needs_data(method: str) -> bool:
    return PROTOCOLS[protocol_of(method)][2]


def run_single_paper(method: str, data_dir: Path | None, seed: int, out_dir: Path, overrides: dict | None = None,
                     threads: int | None = None, device: str | None = None, progress: bool = False) -> dict:
    """Run ``method`` on its protocol. Each method's YAML owns its model (backbone and kwargs), so the
    config changes it through the method's overrides only."""
    module, function, reads_data = PROTOCOLS[protocol_of(method)]
    run = getattr(importlib.import_module(module), function)
    common = dict(overrides=overrides, threads=threads, device=device, progress=progress)
    if not reads_data:
        return run(method, seed, Path(out_dir), **common)
    if data_dir is None:
        raise ConfigError(f"data: {method} runs on a prepared image dataset; pass --data")
    return run(method, Path(data_dir), seed, Path(out_dir), **common)
