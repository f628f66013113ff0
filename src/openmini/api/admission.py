"""A bounded waiting queue for generation requests: beyond it, 429 with ``Retry-After``."""

from __future__ import annotations

from openmini.serving.errors import OpenAIError


class AdmissionControl:
    """Counts admitted generation requests (the server runs on one event loop: no lock).

    Args:
        capacity: most requests admitted at once (running + waiting); None = unbounded.
        retry_after_s: the ``Retry-After`` header of a 429, in seconds.
    """

    def __init__(self, capacity: int | None, retry_after_s: int = 1):
        self.capacity = capacity
        self.retry_after_s = retry_after_s
        self.in_flight = 0

    def acquire(self) -> None:
        """Admit one request.

        Raises:
            OpenAIError: 429 ``rate_limit_exceeded`` when ``capacity`` requests are in flight.
        """
        if self.capacity is not None and self.in_flight >= self.capacity:
            raise OpenAIError(
                f"The server is at capacity ({self.in_flight} requests running or queued). "
                f"Please retry after {self.retry_after_s} s.", status=429, type="requests",
                code="rate_limit_exceeded", headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight += 1

    def release(self) -> None:
        """Mark one admitted request as done."""
        self.in_flight = max(0, self.in_flight - 1)
