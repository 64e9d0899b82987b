"""The plugin author's reference, generated from the code: ``python -m fedmmkt_cli.reference > docs/reference.md``.

Every pluggy hook, every extension kind's base class with its public methods (signature and docstring,
taken with :mod:`inspect`), the :class:`~fedmmkt_core.server.context.ServerContext` methods an algorithm
calls, the data types the kinds exchange, and the built-in bases a plugin may subclass (``TorchClassifier``,
the transformers wrapper, ``FedMMKT``'s hooks). ``tests/test_reference.py`` fails when ``docs/reference.md``
differs from what this module prints.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import sys
import textwrap
from collections.abc import Callable, Iterable
from typing import Any

COMMAND = "python -m fedmmkt_cli.reference > docs/reference.md"

# The ServerContext methods an algorithm calls (the rest is the runner's: backend, rounds, commits).
CONTEXT_METHODS = ("seed_for", "phase", "exchange", "evaluate_clients", "build_client_model")

_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc):`~?([^`]+)`")


def _markdown(doc: str | None) -> str:
    """A docstring as Markdown: Sphinx roles become code spans (``~a.b.C`` -> ``C``)."""
    if not doc:
        return "*(no docstring)*"  # pragma: no cover - every documented object has one

    def role(match: re.Match[str]) -> str:
        target = match.group(1)
        return f"`{target.rsplit('.', 1)[-1] if match.group(0).count('~') else target}`"

    return _ROLE.sub(role, inspect.cleandoc(doc))


def _annotation(annotation: Any) -> str:
    # the modules use ``from __future__ import annotations``: annotations are the source's own text
    return annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)


def _signature(name: str, obj: Callable[..., Any], drop_first: bool = False) -> str:
    """``name(a: int, *, b: str = 'x') -> T`` with annotations as written in the source (no quotes)."""
    signature = inspect.signature(obj)
    parameters = list(signature.parameters.values())[1 if drop_first else 0 :]
    parts: list[str] = []
    star_done = False
    for index, parameter in enumerate(parameters):
        kind = parameter.kind
        if kind is inspect.Parameter.KEYWORD_ONLY and not star_done:
            parts.append("*")
        star_done = star_done or kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY)
        text = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}.get(kind, "")
        text += parameter.name
        if parameter.annotation is not inspect.Parameter.empty:
            text += f": {_annotation(parameter.annotation)}"
        if parameter.default is not inspect.Parameter.empty:
            text += f" = {parameter.default!r}" if ":" in text else f"={parameter.default!r}"
        parts.append(text)
        following = parameters[index + 1] if index + 1 < len(parameters) else None
        if kind is inspect.Parameter.POSITIONAL_ONLY and (following is None or following.kind is not kind):
            parts.append("/")
    result = f"{name}({', '.join(parts)})"
    if signature.return_annotation is not inspect.Signature.empty:
        result += f" -> {_annotation(signature.return_annotation)}"
    return result


def _overridden(owner: type, name: str) -> str:
    """The docstring to show for ``owner.name`` without its own: the base method's it implements."""
    for base in owner.__mro__[1:]:
        if name in base.__dict__:
            return f"*(implements `{base.__name__}.{name}`)*"
    return "*(no docstring)*"


def _member(owner: type, name: str) -> tuple[str, str] | None:
    """(heading, docstring) of ``owner.name`` as defined in ``owner`` itself, or None for data."""
    raw = owner.__dict__[name]
    label = f"{owner.__name__}.{name}"
    if isinstance(raw, property | functools.cached_property):
        func = raw.fget if isinstance(raw, property) else raw.func
        kind = "property" if isinstance(raw, property) else "cached property"
        returns = inspect.signature(func).return_annotation
        typed = f": {_annotation(returns)}" if returns is not inspect.Signature.empty else ""
        heading = f"{label}{typed}  ({kind})"
    elif isinstance(raw, classmethod | staticmethod):
        func = raw.__func__
        kind = "classmethod" if isinstance(raw, classmethod) else "staticmethod"
        heading = f"{_signature(label, func, drop_first=kind == 'classmethod')}  ({kind})"
    elif inspect.isfunction(raw):
        func = raw
        abstract = "  (abstract: implement it)" if getattr(raw, "__isabstractmethod__", False) else ""
        heading = _signature(label, raw, drop_first=True) + abstract
    else:
        return None
    return heading, _markdown(func.__doc__) if func.__doc__ else _overridden(owner, name)


def _public_members(owner: type, only: Iterable[str] | None = None) -> list[str]:
    names = list(only) if only is not None else [n for n in owner.__dict__ if not n.startswith("_")]
    return [name for name in names if name in owner.__dict__ and _member(owner, name) is not None]


def _class_attributes(owner: type) -> list[str]:
    """``name: annotation = value`` of the public class-level data ``owner`` declares itself."""
    annotations = owner.__dict__.get("__annotations__", {})
    lines = []
    for name, annotation in annotations.items():
        if name.startswith("_") or (dataclasses.is_dataclass(owner) and name in owner.__dataclass_fields__):
            continue
        text = f"{name}: {_annotation(annotation)}"
        if name in owner.__dict__:
            value = owner.__dict__[name]
            text += f" = {value.__name__ if isinstance(value, type) else repr(value)}"
        lines.append(f"`{text}`")
    return lines


def _dataclass_fields(owner: type) -> list[str]:
    if not dataclasses.is_dataclass(owner):
        return []
    out = []
    for item in dataclasses.fields(owner):
        default = ""
        if item.default is not dataclasses.MISSING:
            default = f" = {item.default!r}"
        elif item.default_factory is not dataclasses.MISSING:
            default = f" = {item.default_factory.__name__}()"  # type: ignore[union-attr]
        out.append(f"`{item.name}: {item.type}{default}`")
    return out


def _init_attributes(owner: type) -> list[str]:
    """The public ``self.name`` attributes ``owner.__init__`` sets, with their annotation where it has one."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(owner.__init__)))
    seen: dict[str, str] = {}
    for node in ast.walk(tree):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                if not target.attr.startswith("_") and target.attr not in seen:
                    seen[target.attr] = ast.unparse(node.annotation) if isinstance(node, ast.AnnAssign) else ""
    return [f"`{name}: {annotation}`" if annotation else f"`{name}`" for name, annotation in seen.items()]


def _class_section(
    owner: type, level: str = "###", only: Iterable[str] | None = None, attributes: list[str] | None = None
) -> list[str]:
    bases = ", ".join(base.__name__ for base in owner.__bases__ if base is not object)
    out = [f"{level} `{owner.__module__}.{owner.__name__}`" + (f" ({bases})" if bases else ""), ""]
    out += [_markdown(owner.__doc__), ""]
    fields = _dataclass_fields(owner) + _class_attributes(owner) + (attributes or [])
    if fields:
        out += ["Attributes: " + ", ".join(fields) + ".", ""]
    for name in _public_members(owner, only):
        heading, doc = _member(owner, name)  # type: ignore[misc]
        out += [f"- `{heading}`", "", textwrap.indent(doc, "  "), ""]
    return out


def _function_section(func: Callable[..., Any], level: str = "###") -> list[str]:
    heading = _signature(f"{func.__module__}.{func.__name__}", func)
    return [f"{level} `{heading}`", "", _markdown(func.__doc__), ""]


def generate() -> str:
    """The whole page, as Markdown."""
    from fedmmkt_plugins.algorithms.fedmmkt import FedMMKT
    from fedmmkt_plugins.clients.torch_classifier import (
        TorchClassifier,
        hf_classifier_module,
        pretrained_hf_classifier,
    )

    from fedmmkt_core import data, hookspecs, interfaces
    from fedmmkt_core.server.context import ServerContext

    out = [
        "# Plugin reference",
        "",
        f"<!-- generated from the code by `{COMMAND}`; do not edit by hand -->",
        "",
        'Generated from the code\'s signatures and docstrings; `CONTRIBUTING.md` ("Writing a plugin") tells how',
        "the pieces fit. Regenerate with:",
        "",
        "```bash",
        COMMAND,
        "```",
        "",
        "## Hooks (`fedmmkt_core.hookspecs`)",
        "",
        _markdown(hookspecs.__doc__),
        "",
        "| hook | registers the kind | base class |",
        "| --- | --- | --- |",
    ]
    for hook, kind in hookspecs.HOOK_KINDS.items():
        out.append(f"| `{hook}(register)` | `{kind}` | `{interfaces.KINDS[kind].__name__}` |")
    out.append("")
    for hook in hookspecs.HOOK_KINDS:
        out += _function_section(getattr(hookspecs, hook))
    out += ["## Extension kinds (`fedmmkt_core.interfaces`)", "", _markdown(interfaces.__doc__), ""]
    kinds = sorted(interfaces.KINDS.values(), key=lambda cls: inspect.getsourcelines(cls)[1])  # as in the source
    for owner in (interfaces.ComponentConfig, interfaces.Component, *kinds):
        out += _class_section(owner)
    out += ["### Types the kinds exchange", ""]
    for owner in (interfaces.ClientReply, interfaces.AlignmentBatch, interfaces.DenoisingStep):
        out += _class_section(owner, "####")
    out += [
        "## `ServerContext`: what an algorithm calls",
        "",
        "Only these methods are for algorithms; the others are the runner's.",
        "",
    ]
    out += _class_section(ServerContext, "###", CONTEXT_METHODS, _init_attributes(ServerContext))
    out += ["## Data types (`fedmmkt_core.data`)", "", _markdown(data.__doc__), ""]
    for name, obj in vars(data).items():
        if getattr(obj, "__module__", None) == data.__name__ and not name.startswith("_"):
            out += _class_section(obj) if isinstance(obj, type) else _function_section(obj)
    out += [
        "## Built-in bases a plugin may subclass",
        "",
        "### PyTorch client models (`fedmmkt_plugins.clients.torch_classifier`)",
        "",
    ]
    out += _class_section(TorchClassifier, "####")
    out += _function_section(hf_classifier_module, "####")
    out += _function_section(pretrained_hf_classifier, "####")
    out += ["### FedMMKT variants (`fedmmkt_plugins.algorithms.fedmmkt`)", ""]
    hooks = ("base_mask", "aggregate", "distill_targets", "judge_sources", "generator_training_batch")
    out += _class_section(FedMMKT, "####", (*hooks, "measure_generator", "generator_report"))
    return "\n".join(line.rstrip() for line in out).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(generate())


if __name__ == "__main__":
    main()
