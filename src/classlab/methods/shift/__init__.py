"""Family ``shift``: domain generalisation (DomainBed protocol) and test-time adaptation.

Domain generalisation methods subclass ``DomainGeneralizationMethod`` and train through the
engine's loop on batches that hold an equal share of every training domain; test-time methods
subclass ``TestTimeMethod`` and adapt online, one step per batch of a corrupted test stream.
The protocols are ``classlab.protocols.shift``.
"""
