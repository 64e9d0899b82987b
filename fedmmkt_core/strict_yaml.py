"""A strict YAML loader for recipes and ``--set`` values: what YAML 1.1 quietly converts is refused or
read as written.

PyYAML's ``safe_load`` reads YAML 1.1, where ``yes``/``no``/``on``/``off`` are booleans, ``1:30`` is
the number 90, ``010`` is 8, ``2024-01-02`` a date, a repeated key silently replaces the first one
and ``!!binary`` decodes base64. A recipe is configuration a person reads, so :class:`StrictLoader`
resolves plain scalars as YAML 1.2's core schema does (``true``/``false``, ``null``, decimal,
``0o``/``0x`` integers, floats with a dot or an exponent such as ``1e-3``, ``.inf``/``.nan``); every
other plain scalar is a string, which the recipe's schema then refuses where a number is expected.
:func:`load_strict` refuses duplicate keys (naming both lines), explicit tags, integers of more than
:data:`MAX_INT_DIGITS` digits, nesting deeper than ``max_depth`` and documents larger than ``max_nodes``
values once aliases are expanded; each refusal is a :class:`StrictYAMLError` with the key path and
the line.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import AliasEvent

MAX_INT_DIGITS = 100  # no setting needs more; Python refuses to parse more than 4300 digits anyway

INT_TAG = "tag:yaml.org,2002:int"
MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictYAMLError(ValueError):
    """A YAML document refused by the strict loader: ``line`` (1-based) and ``path`` (keys) locate it."""

    def __init__(self, message: str, line: int | None = None, path: tuple[str, ...] = ()):
        super().__init__(message)
        self.message = message
        self.line = line
        self.path = path


class StrictLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars and a nesting limit checked while composing (a deep
    document is refused before Python's recursion limit is reached). Explicit tags are recorded on the
    node (``explicit_tag``) for :func:`load_strict` to refuse with the key path."""

    yaml_implicit_resolvers: dict = {}
    max_depth = 64

    max_nodes = 100_000

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        tag = None
        if not self.check_event(AliasEvent):
            event = self.peek_event()
            tag = event.tag
            if self._depth >= self.max_depth:
                raise StrictYAMLError(_too_deep(self.max_depth), event.start_mark.line + 1)
            self._nodes += 1
            if self._nodes > self.max_nodes:  # stop composing early: aliases are counted by check_tree
                raise StrictYAMLError(_too_many(self.max_nodes), event.start_mark.line + 1)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if tag is not None:
            node.explicit_tag = tag
        return node

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        value = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if value.startswith("-") else 1
        value = value.lstrip("+-")
        if value.startswith("0o"):
            return sign * int(value[2:], 8)
        if value.startswith("0x"):
            return sign * int(value[2:], 16)
        return sign * int(value, 10)


StrictLoader.add_constructor(INT_TAG, StrictLoader.construct_yaml_int)

for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    (INT_TAG, r"[-+]?(?:0|[1-9][0-9_]*)|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
    (
        "tag:yaml.org,2002:float",
        r"[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*\.[0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+.0123456789",
    ),
    (MERGE_TAG, r"<<", "<"),
):
    StrictLoader.add_implicit_resolver(_tag, re.compile(rf"^(?:{_pattern})$"), list(_first))


class StrictDumper(yaml.SafeDumper):
    """SafeDumper that quotes every string :class:`StrictLoader` or YAML 1.1 would read as another type
    (``1e3``, ``yes``): what it writes reads back the same with either loader."""

    yaml_implicit_resolvers = {key: list(value) for key, value in yaml.SafeDumper.yaml_implicit_resolvers.items()}


for _first, _resolvers in StrictLoader.yaml_implicit_resolvers.items():
    StrictDumper.yaml_implicit_resolvers.setdefault(_first, [])
    StrictDumper.yaml_implicit_resolvers[_first] = _resolvers + StrictDumper.yaml_implicit_resolvers[_first]


def _too_many(max_nodes: int) -> str:
    return f"too many values once aliases are expanded (more than {max_nodes})"


def _too_deep(max_depth: int) -> str:
    return f"nested too deeply (at most {max_depth} levels of mappings and lists)"


def load_strict(text: str, max_nodes: int, max_depth: int = 64) -> tuple[Any, yaml.Node | None, int]:
    """(data, root node, number of values once aliases are expanded) of one YAML document; raises
    :class:`StrictYAMLError` for what the strict rules refuse and ``yaml.YAMLError`` for bad syntax."""
    _check_brackets(text, max_depth)
    loader = StrictLoader(text)
    loader.max_depth = max_depth
    loader.max_nodes = max_nodes
    try:
        root = loader.get_single_node()
        size = check_tree(root, max_nodes, max_depth)
        data = loader.construct_document(root) if root is not None else None
    finally:
        loader.dispose()
    return data, root, size


def _check_brackets(text: str, max_depth: int) -> None:
    """Refuse flow collections nested deeper than ``max_depth`` before PyYAML's scanner sees them (it looks
    1024 characters ahead at every level of ``[[[[...``, which costs a second). Quoted scalars and comments
    are skipped; a bracket inside a plain scalar counts, which only matters past ``max_depth`` of them."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth, line, quote, index, size = 0, 1, "", 0, len(text)
    while index < size:
        char = text[index]
        if char == "\n":
            line += 1
        elif quote:
            if char == "\\" and quote == '"':
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1] in " \t\n"):
            end = text.find("\n", index)
            index = size if end < 0 else end
            continue
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise StrictYAMLError(_too_deep(max_depth), line)
        elif char in "]}":
            depth = max(depth - 1, 0)
        index += 1


def check_tree(root: yaml.Node | None, max_nodes: int, max_depth: int = 64) -> int:
    """Refuse explicit tags, duplicate keys, huge integers, and a tree deeper than ``max_depth`` or
    larger than ``max_nodes`` values once aliases are expanded (sizes are memoised per node, so a billion
    laughs costs one pass over its few nodes). Returns the expanded size."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int, path: tuple[str, ...]) -> int:
        line = node.start_mark.line + 1
        if depth > max_depth:
            raise StrictYAMLError(_too_deep(max_depth), line, path)
        if id(node) in sizes:
            return sizes[id(node)]
        tag = getattr(node, "explicit_tag", None)
        if tag is not None:
            shown = tag.replace("tag:yaml.org,2002:", "!!")
            raise StrictYAMLError(
                f"explicit YAML tag {shown} is not allowed: write a plain value (quote it for a string)", line, path
            )
        total = 1
        if isinstance(node, yaml.ScalarNode):
            if node.tag == INT_TAG and len(node.value) > MAX_INT_DIGITS:
                raise StrictYAMLError(
                    f"an integer of {len(node.value)} digits; at most {MAX_INT_DIGITS} are read", line, path
                )
        elif isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else "?"
                key_line = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != MERGE_TAG:
                    ident = (key_node.tag, key_node.value)
                    if ident in seen:
                        shown = key if len(key) <= 60 else key[:60] + "..."
                        raise StrictYAMLError(
                            f"duplicate key '{shown}' (lines {seen[ident]} and {key_line}): a key may appear once",
                            key_line,
                            path + (key,),
                        )
                    seen[ident] = key_line
                total += size(key_node, depth + 1, path + (key,)) + size(value_node, depth + 1, path + (key,))
                if total > max_nodes:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                total += size(item, depth + 1, path + (str(index),))
                if total > max_nodes:
                    break
        if total > max_nodes:
            raise StrictYAMLError(_too_many(max_nodes), line, path)
        sizes[id(node)] = total
        return total

    return size(root, 0, ()) if root is not None else 0
