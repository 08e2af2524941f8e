"""The K2-architecture model engine. ``from model import Engine``.

Imported lazily so plain-Python modules (``common.pages``) stay usable without torch.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from model.engine import Engine

        return Engine
    raise AttributeError(name)
