"""Environment variables set for the duration of a ``with`` block."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def scoped(values: dict[str, str | None]):
    """Set each ``values[name]`` (``None``: unset it) inside the block; restore all after."""
    saved = {name: os.environ.get(name) for name in values}
    try:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(value)
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
