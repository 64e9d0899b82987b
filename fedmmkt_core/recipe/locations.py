"""Where a key is: its value in the recipe data (by key path), its line in the YAML text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml


def _get_path(data: Any, keys: Sequence[str]) -> Any:
    node = data
    for part in keys:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def _set_path(data: Any, keys: Sequence[str], value: Any) -> None:
    node = data
    for part in keys[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def _line_map(node: yaml.Node | None) -> dict[tuple[str, ...], int]:
    lines: dict[tuple[str, ...], int] = {}

    def walk(n: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            for key_node, value_node in n.value:
                key = path + (str(key_node.value),)
                lines[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                walk(item, path + (str(i),))

    if node is not None:
        walk(node, ())
    return lines


def _nearest_line(lines: dict[tuple[str, ...], int], key: tuple[str, ...]) -> int | None:
    for end in range(len(key), -1, -1):
        if key[:end] in lines:
            return lines[key[:end]]
    return None
