"""Family ``supervised``: training recipes for one classifier on one dataset."""
