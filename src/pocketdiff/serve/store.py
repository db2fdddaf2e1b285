"""Images answered by URL: kept in memory, oldest first out once their total size passes a bound."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict


class ImageStore:
    def __init__(self, max_bytes: int = 64 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        """Store ``data``; its id (unguessable, so one client cannot list another's images)."""
        key = secrets.token_urlsafe(16)
        with self._lock:
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return key

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._items.get(key)

    @property
    def total_bytes(self) -> int:
        return self._bytes
