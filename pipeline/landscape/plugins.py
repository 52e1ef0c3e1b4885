"""User plug-ins named as ``package.module:attribute`` in a config, imported and called.

A plug-in is the user's code: whatever it raises or returns, the failure is reported as
one line naming the config field and the plug-in, never as a traceback from inside it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from landscape.errors import UserError, describe


def import_object(spec: str, field: str):
    """Import ``package.module:attribute``; errors name the config field that gave it."""
    module_name, _, attribute = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(
            f"{field}: cannot import {module_name!r} ({exc}); put it on PYTHONPATH"
        ) from None
    except Exception as exc:  # the module's own code failed (a syntax error, a raise)
        raise UserError(f"{field}: importing {module_name} raised {describe(exc)}") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise UserError(f"{field}: {module_name} has no attribute {attribute!r}") from None


def call_factory(
    factory: Callable,
    spec: str,
    field: str,
    arguments: dict,
    kwargs: dict,
    kwargs_field: str | None = None,
):
    """``factory(*arguments.values(), **kwargs)``, with every way it can fail as one line.

    ``field`` is the config field naming ``spec`` (``model.name``); ``arguments`` are the
    positional arguments by name (``input_shape``, ``num_classes``), ``kwargs`` come from
    ``kwargs_field`` (default ``<section>.kwargs``). The signature is checked before the
    call, so that a factory taking the wrong arguments is told apart from one whose body
    raises.
    """
    kwargs_field = kwargs_field or f"{field.rpartition('.')[0]}.kwargs"
    if not callable(factory):
        raise UserError(f"{field}: {spec} is a {type(factory).__name__}, not a function")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some built-ins have none; the call itself will tell
        signature = None
    if signature is not None:
        plain = inspect.Parameter.empty
        signature = signature.replace(
            parameters=[p.replace(annotation=plain) for p in signature.parameters.values()],
            return_annotation=plain,
        )
        try:
            signature.bind_partial(*arguments.values())
        except TypeError:
            wanted = ", ".join([*arguments, "**kwargs"])
            raise UserError(f"{field}: {spec} must take ({wanted}), it takes {signature}") from None
        try:
            signature.bind(*arguments.values(), **kwargs)
        except TypeError as exc:
            raise UserError(
                f"{kwargs_field}: {spec}{signature} cannot be called with {kwargs_field} "
                f"{kwargs} ({exc}); fix {kwargs_field}"
            ) from None
    try:
        return factory(*arguments.values(), **kwargs)
    except UserError:  # a built-in loader's own one-line error
        raise
    except Exception as exc:
        given = [f"{name} {value!r}" for name, value in arguments.items()]
        called = ", ".join([*given, f"{kwargs_field} {kwargs}"])
        raise UserError(f"{field}: {spec} raised {describe(exc)} (called with {called})") from None
