"""Launch settings of the Triton kernels, read from `kernels/tuning/launch.json`.

The file maps op → mode → settings, where mode is "interpreter" (TRITON_INTERPRET=1 on
the CPU: few, big programs, since each program costs ~24 µs of Python) or "cuda".
A missing op or mode falls back to the launcher's default, logged once, so a retuned
file never breaks a launch.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path

from vlmserve.kernels._interpreter import INTERPRET

logger = logging.getLogger(__name__)
_PATH = Path(__file__).with_name("launch.json")
_logged_defaults: set[tuple[str, str]] = set()  # (op, mode) whose default was logged


@lru_cache(maxsize=1)
def _table() -> dict:
    if not _PATH.exists():
        return {}
    with _PATH.open() as f:
        return json.load(f)


@lru_cache(maxsize=None)
def _lookup(op: str, mode: str) -> dict | None:
    return _table().get(op, {}).get(mode)


def launch_config(op: str, default: dict) -> dict:
    """Settings for `op` in the current mode, each key falling back to `default`."""
    mode = "interpreter" if INTERPRET else "cuda"
    found = _lookup(op, mode)
    if found is None:
        if (op, mode) not in _logged_defaults:
            logger.info("no tuned launch settings for %s/%s in %s; using %s", op, mode, _PATH, default)
            _logged_defaults.add((op, mode))
        return dict(default)
    return {**default, **found}
