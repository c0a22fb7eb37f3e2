"""classlab: a workflow-orchestrated experiment pipeline for class-centric deep learning research."""

__version__ = "0.1.0"
