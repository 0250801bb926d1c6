"""Victims as a service on Ray Serve (this package may import Ray; the core library never does).

- :mod:`.spec` — the typed serve spec (victims, scaling, batching, clients) read from ``deployments/*.yaml``;
- :mod:`.ledger` — API keys, budgets and the Parquet query log (plain Python);
- :mod:`.codec` — the request/answer wire format (plain Python);
- :mod:`.app` — the Serve deployments and ``build_app``;
- :mod:`.clients` — HTTP and handle Oracles;
- :mod:`.runtime` — starting Ray + Serve on loopback and deploying a spec.

Import submodules directly; this ``__init__`` imports nothing so that ``serving.clients.HttpOracle`` stays Ray-free.
"""
