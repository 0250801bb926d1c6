"""Victims as a service on Ray Serve (this package may import Ray; the core library never does).

- :mod:`.spec` — the typed serve spec (victims, scaling, batching, clients) read from ``deployments/*.yaml``;
- :mod:`.ledger` — API keys, budgets and the Parquet query log (plain Python);
- :mod:`.codec` — the request/answer wire format (plain Python);
- :mod:`.app` — the Serve deployments and ``build_app``;
- :mod:`.clients` — HTTP and handle Oracles;
- :mod:`.runtime` — starting Ray + Serve on loopback and deploying a spec.

Import submodules directly; this ``__init__`` imports nothing so that ``serving.clients.HttpOracle`` stays Ray-free.
"""

import os as _os

# Ray reads this when it is imported: 0 keeps a private cluster's node address on 127.0.0.1 (see STACK-NOTES).
# Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 yourself to run a driver that must be reachable from other nodes.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Serve copies every request's access-log line to the driver's terminal; on small machines that costs real CPU.
# The lines still go to Ray's log files (RAY_SERVE_LOG_TO_STDERR=1 brings them back).
_os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
