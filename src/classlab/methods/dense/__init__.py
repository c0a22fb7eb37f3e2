"""Detection and segmentation on scenes (dense family)."""
