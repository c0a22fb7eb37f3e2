"""Family ``vlm``: prompt learning and its successors on a pretrained image-text model.

Every method subclasses ``classlab.methods.vlm_learner.PromptMethod`` and says what differs: its
learnable parts (``build``), its class text features (``text_features``) and any regulariser
(``extra_loss``). The protocols are ``classlab.protocols.vlm``.
"""
