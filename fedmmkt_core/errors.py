"""Exceptions that reach users. Anything derived from :class:`UserError` is printed without a
traceback by the CLI and exits with status 2."""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A problem the user can fix (bad recipe, missing file, unknown plugin...)."""


class MissingDependencyError(UserError):
    """An optional package a plugin needs is not installed."""

    def __init__(self, module: str, hint: str):
        super().__init__(f"this component needs the Python package '{module}', which is not installed. {hint}")
        self.module = module
        self.hint = hint


class PluginError(UserError):
    """A plugin is broken: duplicate names, misspelt hooks, unknown component names."""


class DataError(UserError):
    """A dataset cannot be loaded: names the file or folder that is wrong."""


class PluginOutputError(Exception):
    """A component returned something the round loop cannot use (names the plugin; the run stops)."""


class ClientFailure(Exception):
    """A client's work failed or its reply was rejected. Carries the reason the round records."""

    def __init__(self, client_id: int, reason: str):
        super().__init__(f"client {client_id}: {reason}")
        self.client_id = client_id
        self.reason = reason


@dataclass(frozen=True)
class RecipeIssue:
    """One problem found in a recipe, located by key path (and YAML line when known)."""

    path: str
    message: str
    line: int | None = None

    def format(self, source: str | None = None) -> str:
        where = ""
        if source and self.line is not None:
            where = f"{source}:{self.line}: "
        elif self.line is not None:
            where = f"line {self.line}: "
        key = f"{self.path}: " if self.path else ""
        return f"{where}{key}{self.message}"


class RecipeError(UserError):
    """A recipe failed validation. ``issues`` holds every problem found, not just the first."""

    def __init__(self, issues: list[RecipeIssue], source: str | None = None):
        self.issues = issues
        self.source = source
        lines = [issue.format(source) for issue in issues]
        header = f"recipe {source} is invalid" if source else "recipe is invalid"
        super().__init__(f"{header} ({len(issues)} error{'s' if len(issues) != 1 else ''}):\n  " + "\n  ".join(lines))
