"""An approximate radix tree of the prompts each replica has recently seen.

The router cannot see the replicas' prefix caches; it remembers which replica it sent
which prompt (as characters) and assumes that replica still holds that prefix's KV
blocks. One tree is shared by all replicas ("tenants"): every node records, per tenant,
when it last routed a prompt through that node. Bounded: each tenant holds at most
``max_chars`` characters (least recently used leaves go first), and entries older than
``max_age_s`` are dropped, as the replica's own LRU cache would have dropped them.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class _Node:
    __slots__ = ("children", "edge", "parent", "tenants")

    def __init__(self, edge: str, parent: _Node | None) -> None:
        self.edge = edge  # the characters on the edge from the parent to this node
        self.parent = parent
        self.children: dict[str, _Node] = {}  # first char of the child's edge -> child
        self.tenants: dict[str, float] = {}  # tenant -> last access time


class RadixTree:
    """``insert(text, tenant)`` after routing; ``match(text)`` before: the longest
    prefix of ``text`` some tenant holds, and those tenants."""

    def __init__(
        self,
        max_chars: int = 2**20,
        max_age_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = _Node("", None)
        self.max_chars = max_chars
        self.max_age_s = max_age_s
        self.clock = clock
        self.num_chars: dict[str, int] = {}  # tenant -> characters it holds

    def insert(self, text: str, tenant: str) -> None:
        now = self.clock()
        node = self.root
        node.tenants[tenant] = now
        i = 0
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                leaf = _Node(text[i:], node)
                node.children[text[i]] = leaf
                leaf.tenants[tenant] = now
                self._add(tenant, len(text) - i)
                break
            k = _common(child.edge, text, i)
            if k < len(child.edge):
                child = self._split(child, k)
            if tenant not in child.tenants:
                self._add(tenant, len(child.edge))
            child.tenants[tenant] = now
            node = child
            i += k
        if self.num_chars.get(tenant, 0) > self.max_chars:
            self.evict(tenant)

    def match(self, text: str, tenants: set[str] | None = None) -> tuple[int, list[str]]:
        """Characters of ``text`` matched, and the tenants (among ``tenants``, if given)
        that hold that whole prefix, most recently used first."""
        now = self.clock()
        node = self.root
        i = 0
        best: tuple[int, _Node] = (0, node)
        while i < len(text):
            child = node.children.get(text[i])
            if child is None:
                break
            k = _common(child.edge, text, i)
            live = self._live(child, now, tenants)
            if not live:
                break
            i += k
            best = (i, child)
            if k < len(child.edge):
                break
            node = child
        matched, at = best
        live = self._live(at, now, tenants)
        return matched, sorted(live, key=lambda t: -at.tenants[t])

    def evict(self, tenant: str) -> None:
        """Drop ``tenant``'s least recently used leaves until it is under the bound."""
        leaves = [
            n for n in self._nodes() if tenant in n.tenants and not self._held_below(n, tenant)
        ]
        leaves.sort(key=lambda n: n.tenants[tenant])
        target = self.max_chars * 0.9
        while leaves and self.num_chars.get(tenant, 0) > target:
            n = leaves.pop(0)
            self._remove(n, tenant)
            p = n.parent
            if p is not None and p is not self.root and not self._held_below(p, tenant):
                # The parent became a leaf of this tenant: keep its LRU order.
                i = 0
                while i < len(leaves) and leaves[i].tenants[tenant] <= p.tenants[tenant]:
                    i += 1
                leaves.insert(i, p)

    def expire(self) -> int:
        """Drop entries older than ``max_age_s``; returns how many (node, tenant) pairs."""
        cutoff = self.clock() - self.max_age_s
        gone = 0
        for n in sorted(self._nodes(), key=lambda n: -_depth(n)):  # leaves first
            for t, ts in list(n.tenants.items()):
                if ts < cutoff and not self._held_below(n, t):
                    self._remove(n, t)
                    gone += 1
        return gone

    def remove_tenant(self, tenant: str) -> None:
        for n in sorted(self._nodes(), key=lambda n: -_depth(n)):
            if tenant in n.tenants:
                self._remove(n, tenant)
        self.root.tenants.pop(tenant, None)
        self.num_chars.pop(tenant, None)

    # ------------------------------------------------------------------ internals

    def _live(self, node: _Node, now: float, tenants: set[str] | None) -> list[str]:
        cutoff = now - self.max_age_s
        return [
            t
            for t, ts in node.tenants.items()
            if ts >= cutoff and (tenants is None or t in tenants)
        ]

    def _add(self, tenant: str, n: int) -> None:
        self.num_chars[tenant] = self.num_chars.get(tenant, 0) + n

    def _split(self, child: _Node, k: int) -> _Node:
        """Cut ``child``'s edge after ``k`` characters; returns the new middle node."""
        parent = child.parent
        assert parent is not None
        mid = _Node(child.edge[:k], parent)
        mid.tenants = dict(child.tenants)
        parent.children[mid.edge[0]] = mid
        child.edge = child.edge[k:]
        child.parent = mid
        mid.children[child.edge[0]] = child
        return mid

    def _remove(self, node: _Node, tenant: str) -> None:
        if node.tenants.pop(tenant, None) is None or node is self.root:
            return
        self.num_chars[tenant] -= len(node.edge)
        if not node.tenants and not node.children and node.parent is not None:
            del node.parent.children[node.edge[0]]

    @staticmethod
    def _held_below(node: _Node, tenant: str) -> bool:
        return any(tenant in c.tenants for c in node.children.values())

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out


def _common(edge: str, text: str, start: int) -> int:
    """Length of the common prefix of ``edge`` and ``text[start:]``."""
    n = min(len(edge), len(text) - start)
    k = 0
    while k < n and edge[k] == text[start + k]:
        k += 1
    return k


def _depth(node: _Node) -> int:
    d = 0
    while node.parent is not None:
        node = node.parent
        d += 1
    return d
