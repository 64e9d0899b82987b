"""What every suite checks: registration under its kind and a strict, JSON-round-tripping config."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from ..interfaces import Component
from ..plugins import get_registry


class _ComponentTests:
    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    params: ClassVar[dict[str, Any]] = {}

    def make(self) -> Component:
        registration = get_registry().get(self.kind, self.name)
        cls = registration.cls
        return cls(cls.Config.model_validate(self.params))

    def test_registered_under_its_kind(self) -> None:
        registration = get_registry().get(self.kind, self.name)
        assert registration.kind == self.kind
        assert registration.package

    def test_config_rejects_unknown_keys(self) -> None:
        from pydantic import ValidationError

        cls = get_registry().get(self.kind, self.name).cls
        with pytest.raises(ValidationError) as info:
            cls.Config.model_validate({**self.params, "no_such_setting_xyz": 1})
        assert info.value.errors()[0]["type"] == "extra_forbidden"

    def test_config_round_trips_through_json(self) -> None:
        cls = get_registry().get(self.kind, self.name).cls
        config = cls.Config.model_validate(self.params)
        assert cls.Config.model_validate_json(config.model_dump_json()) == config
