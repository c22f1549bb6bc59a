"""The scheduler's waiting queue: first-come-first-served, by priority, or by a key that
changes over time (the policies of ``core/policies``)."""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from kvasir.core.request import Request


class RequestQueue(ABC):
    """Waiting requests in the order the scheduler admits them.

    ``add`` enqueues a new arrival; ``prepend`` puts back a request that was already
    ahead of the others (a preempted request, or one skipped for this step) so it keeps
    its turn.
    """

    @abstractmethod
    def add(self, request: Request) -> None: ...

    @abstractmethod
    def prepend(self, request: Request) -> None: ...

    @abstractmethod
    def peek(self) -> Request: ...

    @abstractmethod
    def pop(self) -> Request: ...

    @abstractmethod
    def remove(self, request: Request) -> None: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Request]:
        """Requests in admission order."""

    def __bool__(self) -> bool:
        return len(self) > 0


class FCFSRequestQueue(RequestQueue):
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)


class PriorityRequestQueue(RequestQueue):
    """Lowest ``priority`` first, then earliest arrival (``arrival_seq`` breaks ties)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Request]] = []

    def add(self, request: Request) -> None:
        # arrival_seq is unique, so the Request itself is never compared.
        entry = (request.priority, request.arrival_time, request.arrival_seq, request)
        heapq.heappush(self._heap, entry)

    def prepend(self, request: Request) -> None:
        # A request's key never changes, so re-adding restores its place.
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][3]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> None:
        for i, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[i] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return
        raise ValueError(f"request {request.request_id} is not waiting")

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return iter(entry[3] for entry in sorted(self._heap, key=lambda e: e[:3]))


class KeyedRequestQueue(RequestQueue):
    """Smallest ``key(request)`` first, the key read at ``peek`` time: a policy whose
    order moves while requests wait (prefix-cache hits, tenants' service, deadlines,
    aging) re-ranks the queue at every admission instead of freezing it at arrival.
    ``prepend`` is ``add``: a request's place is its key. O(n) per ``peek``."""

    def __init__(self, key: Callable[[Request], Any]) -> None:
        self._key = key
        self._items: list[Request] = []
        self._head: Request | None = None  # the last peek, until the queue changes

    def add(self, request: Request) -> None:
        self._items.append(request)
        self._head = None

    def prepend(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request:
        if self._head is None:
            if not self._items:
                raise IndexError("peek from an empty queue")
            self._head = min(self._items, key=self._key)
        return self._head

    def pop(self) -> Request:
        head = self.peek()
        self.remove(head)
        return head

    def remove(self, request: Request) -> None:
        for i, r in enumerate(self._items):
            if r is request:
                del self._items[i]
                self._head = None
                return
        raise ValueError(f"request {request.request_id} is not waiting")

    def invalidate(self) -> None:
        """Keys changed (a new step): the next ``peek`` ranks again."""
        self._head = None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(sorted(self._items, key=self._key))
