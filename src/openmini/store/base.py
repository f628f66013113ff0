"""The ``ResponseStore`` protocol: durable state of the Responses API.

The store keeps, per response id, the latest JSON snapshot of the OpenAI ``response``
object (shared/API.md section 4) and the ordered list of *input items* the model saw for it
(the items rebuilt from a ``previous_response_id`` chain followed by the request's own new
input). It knows nothing about generation: the serving layer decides what to write, the
store makes every write atomic and durable.

Contract every implementation keeps:

* One transaction per state change. ``create`` writes the response row and all its input
  items together; ``update`` replaces the snapshot and re-indexes its output items
  together. A reader never sees a response without its input items or a snapshot whose
  output items are not indexed (a half-written response is never visible).
* ``update`` never resurrects a deleted response (it returns False instead).
* ``get`` returns exactly the JSON value last written (so a restart changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

UNFINISHED_STATUSES = ("queued", "in_progress")
"""Response statuses that mean work is still going on (left behind by a crash)."""


class StoreError(Exception):
    """A store operation failed (I/O error, corrupt file, duplicate id)."""


@dataclass
class InputItemPage:
    """One page of ``GET /v1/responses/{id}/input_items``.

    Attributes:
        data: the items of this page, in the requested order.
        has_more: more items follow in that order.
    """

    data: list[dict[str, Any]] = field(default_factory=list)
    has_more: bool = False

    @property
    def first_id(self) -> str | None:
        return self.data[0]["id"] if self.data else None

    @property
    def last_id(self) -> str | None:
        return self.data[-1]["id"] if self.data else None


class ResponseStore(Protocol):
    """Persistent Responses API state (see the module docstring for the contract)."""

    def create(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """Insert a new response snapshot and its ordered input items (each with an ``id``).

        Raises:
            StoreError: a response with this id exists already, or the write failed.
        """
        ...

    def update(self, response: dict[str, Any]) -> bool:
        """Replace the snapshot of an existing response (and index its output items).

        Returns:
            False when the response does not exist (e.g. it was deleted meanwhile).
        """
        ...

    def get(self, response_id: str) -> dict[str, Any] | None:
        """The latest snapshot, or None when unknown or deleted."""
        ...

    def delete(self, response_id: str) -> bool:
        """Remove a response and its items; False when it did not exist."""
        ...

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        """All input items of a response in input order, or None when unknown."""
        ...

    def list_input_items(self, response_id: str, *, limit: int = 20,
                         order: Literal["asc", "desc"] = "desc",
                         after: str | None = None) -> InputItemPage | None:
        """A page of input items: at most ``limit`` items following the item ``after`` in
        ``order`` (``desc`` = newest first). None when the response is unknown.

        Raises:
            KeyError: ``after`` is not an input item of this response.
        """
        ...

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        """Any stored input or output item with this id (for ``item_reference``)."""
        ...

    def unfinished(self) -> list[dict[str, Any]]:
        """Snapshots whose status is ``queued`` or ``in_progress``."""
        ...

    def close(self) -> None:
        """Release the underlying resources; further calls fail."""
        ...
