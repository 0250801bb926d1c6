"""Pools at scale on Ray Data (this package may import Ray; the core library never does).

- :mod:`.features` — SwiftTheft's reference-model feature pass over a whole pool, as Ray Data ``map_batches`` on an
  actor pool, written as Parquet keyed by sample id.

Building the shards themselves (``dme pool build``) is plain pyarrow in :mod:`distributed_me.data.parquet`: writing
directly measured ~9x faster than ``ray.data.write_parquet`` here (STACK-NOTES), and needs no cluster.
"""

import os as _os

# Ray reads this when it is imported: 0 keeps a private cluster's node address on 127.0.0.1 (see STACK-NOTES).
_os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
