"""Backbones (through timm) and the classifier that wraps them."""
from classlab.models.backbones import BACKBONES, build_backbone, Classifier, build_classifier  # noqa: F401
