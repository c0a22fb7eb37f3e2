"""Family ``incremental``: class-incremental, few-shot incremental and online continual learning.

Each module is one method, a subclass of ``classlab.protocols.incremental.IncrementalLearner``.
"""
