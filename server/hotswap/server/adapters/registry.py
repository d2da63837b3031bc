"""Which adapter ids exist and where their files are. In memory for now; the
gRPC server's persistent registry (SQLite) replaces this behind the same calls."""
from __future__ import annotations

import re
import threading
from pathlib import Path

from ..errors import InvalidArgument, NotFound

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}(@[0-9]+)?$")


def check_adapter_id(adapter_id: str) -> str:
    """Ids are plain names (optionally name@version): no slashes, no '..', so an id can
    never address a file outside the adapter store."""
    if not _ID.match(adapter_id) or ".." in adapter_id:
        raise InvalidArgument(
            f"invalid adapter id {adapter_id!r}: use letters, digits, '.', '_', '-' (at most 128), optionally @version",
            field="adapter_id",
        )
    return adapter_id


class AdapterRegistry:
    def __init__(self) -> None:
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()

    def add(self, adapter_id: str, path: Path) -> None:
        with self._lock:
            self._paths[check_adapter_id(adapter_id)] = Path(path)

    def remove(self, adapter_id: str) -> None:
        with self._lock:
            if self._paths.pop(adapter_id, None) is None:
                raise NotFound(f"unknown adapter {adapter_id!r}", field="adapter_id")

    def path(self, adapter_id: str) -> Path:
        with self._lock:
            try:
                return self._paths[adapter_id]
            except KeyError:
                raise NotFound(f"unknown adapter {adapter_id!r}", field="adapter_id") from None

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)
