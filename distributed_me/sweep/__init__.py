"""Sweeps on Ray Tune (this package may import Ray; the core library never does).

- :mod:`.spec` — the typed sweep spec and its grid (plain Python);
- :mod:`.tracking` — MLflow parent/child runs (plain Python);
- :mod:`.trial` — the Tune trainable: one attack through a Serve handle;
- :mod:`.service` — the victims as a Serve app: the sweep's own, or a long-lived service sweeps join;
- :mod:`.runner` — ``run_sweep``: deploy (or join) victims, run Tune, record in MLflow, resume.
"""

import os as _os

# Ray reads this when it is imported: 0 keeps a private cluster's node address on 127.0.0.1 (see STACK-NOTES).
# Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 yourself to run a driver that must be reachable from other nodes.
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tune's console output is ours to choose: verbose=0 with its older output engine prints nothing (the newer one still
# prints a configuration box and TensorBoard hints); `dme sweep` prints one line per trial state change instead
_os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
