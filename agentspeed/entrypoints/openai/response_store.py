"""The bounded in-memory store behind the Responses API's `store` / `previous_response_id`."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from agentspeed.entrypoints.errors import APIError


@dataclass(slots=True)
class Stored:
    response: dict[str, Any]
    history: list[dict[str, Any]]  # template messages through this response's output


class ResponseStore:
    """The newest `size` stored responses; the oldest is dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rid: str, item: Stored) -> None:
        self.items[rid] = item
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, rid: str) -> Stored:
        item = self.items.get(rid)
        if item is None:
            raise APIError(404, f"Previous response with id '{rid}' not found (not stored, or dropped from "
                                f"the newest {self.size} this server keeps).", param="previous_response_id",
                           code="previous_response_not_found")
        return item
