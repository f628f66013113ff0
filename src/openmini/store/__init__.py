"""Persistent state for the Responses API: the ``ResponseStore`` protocol and its SQLite
implementation (see ``openmini.store.base`` for the contract)."""

from openmini.store.base import (
    UNFINISHED_STATUSES,
    InputItemPage,
    ResponseStore,
    StoreError,
)
from openmini.store.sqlite import SCHEMA_VERSION, SQLiteResponseStore

__all__ = ["ResponseStore", "SQLiteResponseStore", "InputItemPage", "StoreError",
           "UNFINISHED_STATUSES", "SCHEMA_VERSION"]
