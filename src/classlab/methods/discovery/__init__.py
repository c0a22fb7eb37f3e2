"""Family ``discovery``: novel and generalized category discovery.

Each module is one method, a subclass of ``classlab.methods.discovery_learner.DiscoveryLearner``;
the protocol (split, tasks, hidden labels, evaluation) is ``classlab.protocols.discovery``.
"""
