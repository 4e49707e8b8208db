"""Does a config value fit a parameter's annotation? For error messages that name the key,
before a wrong type fails deep inside a component."""

from __future__ import annotations

import collections.abc
import types
import typing
from typing import Any


def matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    if origin in (list, tuple, collections.abc.Sequence):
        element = args[0] if args else None
        return isinstance(value, list | tuple) and (
            element is None or all(matches(v, element) for v in value)
        )
    return True


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin in (list, tuple, collections.abc.Sequence):
        return f"a list of {type_name(args[0])}" if args else "a list"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))
