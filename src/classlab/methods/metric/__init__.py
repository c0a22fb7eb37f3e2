"""Deep metric learning: losses and regularisers trained on half the classes, retrieval on the other half."""
