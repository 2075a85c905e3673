"""YAML loading with bounded work: a safe loader that counts every value while it composes the
document, with aliases expanded, and refuses deep nesting and self-reference.

An alias costs the loader nothing (it points at the anchored node) but everything after it walks
the copy it stands for: 1.3 KB of aliases nested nine deep stand for 9^9 values. So each alias
counts the expanded size of its anchor (computed once per distinct node), and the load stops as
soon as the count passes the limit.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, SequenceNode

from merger.errors import RecipeError
from merger.limits import RECIPE_DEPTH, RECIPE_NODES


class _BoundedLoader(yaml.SafeLoader):
    """Counts while it composes, so a refusal comes as soon as the limit is passed: one per node
    written out, and an alias's whole expanded size where it is used."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_depth = RECIPE_DEPTH.value
        self._nodes = 0
        self._max_nodes = RECIPE_NODES.value
        self._open_anchors: set[str] = set()
        self._sizes: dict[int, int] = {}

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        anchor = self.peek_event().anchor
        if self.check_event(AliasEvent):
            if anchor in self._open_anchors:
                raise RecipeError(f"the recipe's YAML alias *{anchor} refers to itself, so it never ends")
            node = super().compose_node(parent, index)
            self._count(expanded_size(node, self._sizes))
            return node
        self._depth += 1
        if anchor is not None:
            self._open_anchors.add(anchor)
        try:
            if self._depth > self._max_depth:
                RECIPE_DEPTH.check(self._depth, "the recipe's YAML")
            self._count(1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open_anchors.discard(anchor)

    def _count(self, nodes: int) -> None:
        self._nodes += nodes
        if self._nodes > self._max_nodes:
            raise RECIPE_NODES.exceeded("the recipe's YAML, with its aliases expanded,")


def expanded_size(root: Node, sizes: dict[int, int]) -> int:
    """How many nodes `root` stands for once every alias in it is replaced by a copy of its
    anchor; `sizes` memoizes by node, so shared nodes are walked once. `root` is complete (the
    loader refuses an alias to a node still being composed), so there is no cycle."""
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:  # iterative post-order
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        if children_done:
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
        else:
            stack.append((node, True))
            stack += [(child, False) for child in _children(node) if id(child) not in sizes]
    return sizes[id(root)]


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def load(text: str) -> Any:
    """`yaml.safe_load(text)` within the recipe limits; YAML errors propagate as PyYAML's."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
