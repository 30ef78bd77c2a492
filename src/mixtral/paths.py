"""Where mixtral keeps what it builds once per machine: the demo model and the compiled CPU kernels."""

from __future__ import annotations

import os


def cache_root() -> str:
    """$MIXTRAL_CACHE, else $XDG_CACHE_HOME/mixtral, else ~/.cache/mixtral."""
    if os.environ.get("MIXTRAL_CACHE"):
        return os.environ["MIXTRAL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mixtral")
