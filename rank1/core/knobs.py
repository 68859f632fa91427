"""The building blocks of the config tree: a field with its range, and the error every check raises."""

from __future__ import annotations

from dataclasses import field


class ConfigError(ValueError):
    """A config value, key or flag that cannot be used; the message names it."""


def knob(default, *, gt=None, ge=None, lt=None, le=None):
    """A field with its range: checked by flags.check_tree (None values are not checked)."""
    limits = {k: v for k, v in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if v is not None}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"limits": limits})
    return field(default=default, metadata={"limits": limits})
