"""State stores behind the ``StateStore`` seam, and the factory that picks one.

Usage::

    store = create_store(settings)
    await store.open()
"""

from __future__ import annotations

from ..settings import Settings
from .base import ExecutionRecord, StateStore, StoreUnavailable

__all__ = ["ExecutionRecord", "StateStore", "StoreUnavailable", "create_store"]

AVAILABLE = ("sqlite", "memory", "redis")


def create_store(settings: Settings) -> StateStore:
    """The store ``settings.store`` names; ``StoreUnavailable`` if it cannot be built.

    Nothing is connected or created yet: ``await store.open()`` does that (and
    reports an unreachable server or an unwritable data dir).
    """
    if settings.store == "memory":
        from .memory import MemoryStore

        return MemoryStore()
    if settings.store == "sqlite":
        from .sqlite import SqliteStore

        return SqliteStore(settings.data_dir / "executions.db")
    if settings.store == "redis":
        from .redis import RedisStore

        return RedisStore(settings.redis_url, namespace=settings.redis_namespace)
    raise StoreUnavailable(
        f"store {settings.store!r} is not available; choose one of: {', '.join(AVAILABLE)}"
    )
