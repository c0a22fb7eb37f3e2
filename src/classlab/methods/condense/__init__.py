"""Family ``condense``: dataset condensation, a few learned (or selected) images per class.

Every method subclasses ``classlab.methods.condense_learner.CondensationMethod``: the synthetic set
is its parameter, the engine's loop runs the outer (image) updates, and one shared helper
(``CondensationMethod.bilevel_update``) runs the inner loop for all of them. A method states only its
outer loss and its initial set. Selections (``random``, ``herding``) learn nothing. The protocol is
``classlab.protocols.condense.run_condensation``; evaluation trains a fresh ``convnet_dc`` on the set
(``classlab.methods.condense_learner.evaluate_condensed``).
"""
