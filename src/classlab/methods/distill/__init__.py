"""Family ``distill``: a student classifier trained from a frozen teacher (or from offline aspect scores)."""
