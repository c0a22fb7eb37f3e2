"""Family ``vlm``: prompt learning and its successors on a pretrained image-text model.

Three protocols, one method registry:

- base-to-novel (``classlab.protocols.vlm``) and compositional zero-shot
  (``classlab.protocols.compositional``): the method subclasses
  ``classlab.methods.vlm_learner.PromptMethod`` and says what differs: its learnable parts
  (``build``), its class text features (``text_features``), any regulariser (``extra_loss``), and for
  the training-free caches the support set (``needs_support`` / ``fit_support``);
- label noise (``classlab.protocols.label_noise``, CAPro's): ``noisy_ce`` and ``capro`` train an image
  classifier from scratch on noisy labels (``classlab.methods.base.Method``); the text side only
  supplies each class's anchor embedding (``build(class_names, text_features)``).
"""
