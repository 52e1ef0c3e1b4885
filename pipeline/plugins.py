"""User plug-ins named as ``package.module:attribute`` in a config."""

from __future__ import annotations

import importlib

from pipeline.errors import UserError


def import_object(spec: str, field: str):
    """Import ``package.module:attribute``; errors name the config field that gave it."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"{field}: cannot import {module_name!r} ({exc}); put it on PYTHONPATH"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise UserError(f"{field}: {module_name} has no attribute {attribute!r}") from None
