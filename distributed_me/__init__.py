"""distributed_me: benchmark model-extraction attacks and defenses at cluster scale.

The core library (data, models, victims, defenses, attacks, train, metrics, oracle) imports no Ray;
Ray lives only in the thin adapters ``serving/``, ``sweep/`` and ``pools/``.
"""

__version__ = "0.1.0"
