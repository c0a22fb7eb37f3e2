"""Method implementations, one file per method, grouped by family (one package per family)."""
from classlab.methods.base import Method  # noqa: F401
from classlab.methods.registry import get_method, list_methods, register_method  # noqa: F401
