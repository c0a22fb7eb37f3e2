"""Family ``explain``: saliency methods judged on the same trained models and scenes with known boxes.

Every module but ``promptcam`` holds a ``SaliencyMethod`` (``classlab.methods.saliency_method``):
not trained, constructed from its hyperparameters alone, ``attribute``/``explain`` a given model.
``promptcam`` is an engine ``Method`` (class prompts trained on a frozen ViT) that also speaks the
saliency interface.
"""
