"""What an output policy costs the defender, remembered on disk between sweeps.

:meth:`~distributed_me.extraction.Evaluator.defense_cost` (utility, agreement, KL on the test and training images)
does not depend on the attack, so a sweep measures it once in its driver. Sweeps on the same victims measure the
same numbers again each time: about a second per sweep for the embedded victim's three policies (a bundle load, two
forward passes per policy), far more for MAD (a Jacobian per test image). This cache keeps the result under
``$DME_HOME/defense-costs/``, named by everything that decides it:

- the victim bundle (absolute path, size, modification time): a victim retrained in place gets a new entry;
- the policy string, seeds and parameters included;
- the files of the policy's defense kits (a kit rebuilt by ``dme defense train`` gets a new entry);
- the data folder the judge's splits come from (``$DME_DATA``);
- this package's source files (path, size, modification time): changed code never reads an old number.

Nothing else is trusted: an unreadable or malformed entry is measured again and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..data.registry import DATA_ENV
from ..tracking import dme_home

log = logging.getLogger(__name__)


def costs_dir() -> Path:
    return dme_home() / "defense-costs"


def _stamp(path: Path) -> list[Any]:
    if not path.exists():
        return [str(path)]
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


@lru_cache(maxsize=1)
def code_stamp() -> str:
    """A digest of the package's source files as they are on disk (stat only: a few milliseconds)."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        st = f.stat()
        h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cost_key(bundle: str, policy: str, kit_paths: list[str]) -> str:
    """The cache entry's name for ``policy`` on the victim bundle ``bundle`` with the kits at ``kit_paths``."""
    kits = []
    for k in sorted(kit_paths):
        p = Path(k)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        kits.append([_stamp(f) for f in files])
    doc = {"bundle": _stamp(Path(bundle)), "policy": policy, "kits": kits, "data": os.environ.get(DATA_ENV),
           "code": code_stamp()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def load_cost(key: str) -> dict[str, Any] | None:
    path = costs_dir() / f"{key}.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        return {k: doc[k] for k in ("utility", "agreement", "kl_test", "kl_train")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("defense cost cache entry %s unreadable (%s): measuring again", path, e)
        return None


def save_cost(key: str, cost: dict[str, Any], policy: str) -> None:
    """Write an entry atomically (a concurrent sweep reads a whole entry or none)."""
    costs_dir().mkdir(parents=True, exist_ok=True)
    path = costs_dir() / f"{key}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**cost, "policy": policy}))
    os.replace(tmp, path)
