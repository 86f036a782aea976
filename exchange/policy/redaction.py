"""Where a payload holds personal data, and how to replace it. Pure.

A :class:`Shape` is read once from a payload's JSON Schema (its ``x-exchange-category`` and
``x-exchange-subject-ref`` annotations, through ``$ref``, ``anyOf`` and arrays, at any depth).
:func:`protected_values` walks a payload along its shape and lists every value of a data category
with the data subject it belongs to: the pseudonym named by the nearest enclosing subject
reference. A value no subject reference covers is listed with ``subject=None``; callers treat it as
the most protected (a child victim's), never as free to release.

:func:`replace_values` returns a copy of the payload with the listed values replaced, keeping the
payload's shape: a string becomes the replacement, a list of strings a one-item list, anything else
is removed (every categorised field is optional in the catalogue).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from exchange.catalogue import CATEGORY, SUBJECT_REF

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Shape:
    """What a payload's schema says of one place in it."""

    category: str | None = None
    subject_field: str | None = None
    properties: Mapping[str, Shape] = field(default_factory=dict)
    items: Shape | None = None


@dataclass(frozen=True)
class ProtectedValue:
    """A value of a data category in a payload, the pseudonym of its subject (None: unknown) and
    the role that subject counts as (resolved by the message that holds it)."""

    path: Path
    category: str
    subject: str | None
    role: str = ""


def pointer(path: Path) -> str:
    """The path as the ledger and the API name it: ``payload/victims/0/names``."""
    return "/".join(["payload", *(str(p) for p in path)])


def shape_of(schema: Mapping[str, Any]) -> Shape:
    """The shape of a JSON Schema (2020-12, local ``$defs`` references only)."""
    defs = schema.get("$defs", {})

    def resolve(node: Mapping[str, Any], seen: frozenset[str]) -> Shape:
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name in seen:  # a recursive type: its nested copies are covered by the outer one
                return Shape()
            target = resolve(defs[name], seen | {name})
            category = node.get(CATEGORY, target.category)
            return Shape(category, target.subject_field, target.properties, target.items)
        category = node.get(CATEGORY)
        branches = [resolve(b, seen) for b in node.get("anyOf", []) + node.get("oneOf", [])]
        props: dict[str, Shape] = {}
        subject = None
        for name, sub in node.get("properties", {}).items():
            if sub.get(SUBJECT_REF):
                subject = name
            props[name] = resolve(sub, seen)
        items = resolve(node["items"], seen) if isinstance(node.get("items"), Mapping) else None
        for branch in branches:
            category = category or branch.category
            subject = subject or branch.subject_field
            props = {**branch.properties, **props}
            items = items or branch.items
        return Shape(category, subject, props, items)

    return resolve(schema, frozenset())


def protected_values(shape: Shape, payload: Any) -> list[ProtectedValue]:
    """Every categorised value in ``payload``, in document order, with its subject."""
    found: list[ProtectedValue] = []

    def walk(node: Shape, value: Any, path: Path, subject: str | None) -> None:
        if value is None:
            return
        if node.category is not None:
            found.append(ProtectedValue(path, node.category, subject))
            return
        if isinstance(value, Mapping):
            if node.subject_field is not None:
                named = value.get(node.subject_field)
                subject = named if isinstance(named, str) else None
            for key, item in value.items():
                child = node.properties.get(key)
                if child is not None:
                    walk(child, item, (*path, key), subject)
        elif isinstance(value, list) and node.items is not None:
            for index, item in enumerate(value):
                walk(node.items, item, (*path, index), subject)

    walk(shape, payload, (), None)
    return found


def replace_values(payload: Mapping[str, Any], replacements: Sequence[tuple[Path, str]]) -> dict[str, Any]:
    """A copy of ``payload`` with the value at each path replaced (see the module docstring).

    Copy on write: only the objects and lists on the way to a replaced value are copied; the rest
    is shared with ``payload``, which is never modified.
    """
    result: dict[str, Any] = dict(payload)
    copied: set[Path] = {()}
    for path, replacement in replacements:
        parent: Any = result
        for depth, step in enumerate(path[:-1]):
            child = parent[step]
            here = path[: depth + 1]
            if here not in copied:
                child = dict(child) if isinstance(child, Mapping) else list(child)
                parent[step] = child
                copied.add(here)
            parent = child
        last = path[-1]
        value = parent[last]
        if isinstance(value, str):
            parent[last] = replacement
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            parent[last] = [replacement]
        elif isinstance(parent, dict):
            del parent[last]
        else:  # an item of a list of objects: keep the list's length, drop the item's content
            parent[last] = None
    return result
