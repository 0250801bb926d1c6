"""What ``dme … --help`` says about names: the registered strategies, architectures, optimizers, output policies,
datasets and pools, read from the registries when the parser is built.

Generated rather than typed out, so that a new registry entry (or a plugin's, when ``--plugin`` loaded it before the
parser was built) shows in every help text at once, and no help text can name something that no longer exists.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Callable

from .attacks import ATTACKS
from .data import DATASETS, POOLS
from .defenses import DETECTORS, KITS, POLICIES
from .models import MODELS
from .registry import Registry
from .train import OPTIMIZERS

#: the registries a user may name, under the word the help texts use for each
REGISTRIES: dict[str, Registry] = {
    "strategies": ATTACKS,
    "architectures": MODELS,
    "optimizers": OPTIMIZERS,
    "output policies": POLICIES,
    "defense kits": KITS,
    "detectors": DETECTORS,
    "datasets": DATASETS,
    "pools": POOLS,
}


def names(kind: str, keep: Callable[[str], bool] | None = None) -> str:
    """The registered names of ``kind`` (a key of :data:`REGISTRIES`), comma-separated; ``keep`` filters them."""
    return ", ".join(n for n in REGISTRIES[kind].names() if keep is None or keep(n))


def preparing_strategies() -> str:
    """Strategies with a once-per-sweep preparation step (what ``dme pool features`` can run)."""
    return names("strategies", lambda n: ATTACKS.get(n).prepares()) or "none"


def _block(title: str, text: str, width: int = 100) -> str:
    body = textwrap.fill(text, width=width, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False,
                         break_long_words=False)
    return f"{title}:\n{body}"


def sweep_epilog() -> str:
    """What a sweep file may name, for ``dme sweep --help``."""
    return "\n\n".join([
        "names a sweep file may use (registered now; a sweep's `plugins` may add more):",
        _block("attack.strategy", names("strategies")),
        _block("attack.arch", names("architectures")),
        _block("attack.optimizer", names("optimizers")),
        _block("policies (chains such as round:2,topk:1)", names("output policies")),
        _block("pool (or a path)", f"{names('pools')}; datasets: {names('datasets')}"),
        "victims[].source: 'embedded', a bundle folder, a registered victim name or a models:/ URI",
    ])


def serve_epilog() -> str:
    """What a serve config may name, for ``dme serve --help``."""
    return "\n\n".join([
        _block("victims[].output_policy (chains such as round:2,topk:1)", names("output policies")),
        "victims[].source: 'embedded', a bundle folder, a registered victim name or a models:/ URI",
    ])


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's formatter, except that option help never breaks a name at a hyphen (``activethief-kcenter`` stays
    one word, so it can be searched for and copied), and descriptions and epilogs keep their own line breaks."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False, break_long_words=False)
