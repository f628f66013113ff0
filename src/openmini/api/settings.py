"""Server settings (everything the HTTP layer needs besides the engine)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

DEFAULT_MODEL_ALIASES = ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14")
"""Model ids that client code sends everywhere; they resolve to the served model."""


@dataclass(frozen=True)
class ServerSettings:
    """How the server presents the engine.

    Attributes:
        served_model_name: the model id in ``/v1/models`` and in every response.
        model_aliases: other ids that resolve to the served model (others -> 404).
        api_keys: accepted bearer keys; empty means no authentication.
        max_num_seqs: requests the engine runs at once (used to size the waiting queue).
        max_queue: requests allowed to wait beyond ``max_num_seqs``; one more gets
            429 ``rate_limit_exceeded``. None means unbounded.
        retry_after_s: the ``Retry-After`` value sent with 429, in seconds.
        owned_by: ``owned_by`` of the model objects.
        created: unix seconds reported as the model's ``created``.
    """

    served_model_name: str
    model_aliases: tuple[str, ...] = DEFAULT_MODEL_ALIASES
    api_keys: tuple[str, ...] = ()
    max_num_seqs: int = 32
    max_queue: int | None = 256
    retry_after_s: int = 1
    owned_by: str = "openmini"
    created: int = field(default_factory=lambda: int(time.time()))

    def resolve_model(self, model: str) -> str | None:
        """The served model name for ``model`` (itself or an alias), else None."""
        if model == self.served_model_name or model in self.model_aliases:
            return self.served_model_name
        return None

    @property
    def model_ids(self) -> tuple[str, ...]:
        """Every id ``/v1/models`` lists: the served name first, then the aliases."""
        return (self.served_model_name,) + tuple(
            a for a in self.model_aliases if a != self.served_model_name)
