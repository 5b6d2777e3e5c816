"""Typed method options. Each method declares one frozen dataclass of its knobs; from it
come the ``quantize`` flags (``--damp-percent``), ``compare``'s ``method:key=value``
parsing and the validation, so that a default lives in one place and an unknown or
malformed option is an error instead of being ignored.

    @dataclass(frozen=True)
    class GPTQOptions(Options):
        damp_percent: float = opt(0.01, "dampening, a fraction of the mean Hessian diagonal",
                                  check=lambda v: 0 < v < 1, flag="--damp-percent")

``config.options`` keeps what the user gave (it is recorded in ``config.json`` and keys the
resume state); ``method.options(config)`` is the typed view with defaults filled in.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from ..errors import AnybitError


def opt(default: Any, help: str, *, choices: tuple | None = None, check: Callable[[Any], bool] | None = None,
        must: str = "", flag: str | None = None, key: str | None = None) -> Any:
    """A field of an :class:`Options` dataclass.

    ``choices``/``check``: what a valid value is (``must`` says it in words, for the error);
    ``flag``: the ``quantize`` flag (a bool defaulting to True gets ``--no-...``);
    ``key``: the option's name where it is not a Python identifier (``lambda``).
    """
    return field(default=default, metadata={"help": help, "choices": choices, "check": check, "must": must,
                                            "flag": flag, "key": key})


@dataclass(frozen=True)
class OptionInfo:
    key: str  # the name users write (``--option KEY=...``, ``method:KEY=...``)
    name: str  # the dataclass field
    type: Any
    default: Any
    help: str
    choices: tuple | None
    flag: str | None


_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _coerce(value: Any, tp: Any, what: str) -> Any:
    """``value`` as type ``tp`` (bool, int, float, str, tuple[float, ...], or one of them | None)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if args and type(None) in args and origin is not tuple:  # X | None: JSON null is None
        # (the string "none" stays a string: it is a value of some options, e.g. order=none)
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), what)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise AnybitError(f"{what} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise AnybitError(f"{what} must be an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise AnybitError(f"{what} must be an integer, got {value!r}") from None
        if f != int(f):
            raise AnybitError(f"{what} must be an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise AnybitError(f"{what} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise AnybitError(f"{what} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise AnybitError(f"{what} must be a string, got {value!r}")
    if origin is tuple:  # tuple[float, ...]: a list, or one string separated by "/" or ","
        if isinstance(value, str):
            value = value.replace(",", "/").split("/")
        elif isinstance(value, (int, float)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise AnybitError(f"{what} must be a list of numbers such as 0.9/0.95/1.0, got {value!r}")
        return tuple(_coerce(v, args[0], what) for v in value)
    raise TypeError(f"option type {tp!r} is not supported")  # a programming error in a method


@dataclass(frozen=True)
class Options:
    """Base of every method's options (no fields: a method without knobs)."""

    @classmethod
    def describe(cls) -> list[OptionInfo]:
        hints = typing.get_type_hints(cls)
        return [OptionInfo(f.metadata.get("key") or f.name, f.name, hints[f.name], f.default,
                           f.metadata.get("help", ""), f.metadata.get("choices"), f.metadata.get("flag"))
                for f in fields(cls)]

    @classmethod
    def parse(cls, raw: dict, method: str) -> "Options":
        """The typed options from ``raw`` (user-given keys only; the rest take their defaults)."""
        infos = {i.key: i for i in cls.describe()}
        unknown = sorted(set(raw) - set(infos))
        if unknown:
            known = ", ".join(infos) or "none"
            raise AnybitError(f"method {method} has no option {unknown[0]!r} (its options: {known}); "
                              f"`anybit quantize --help` lists them")
        meta = {f.name: f.metadata for f in fields(cls)}
        values = {}
        for key, value in raw.items():
            info = infos[key]
            what = f"{method} option {key}" + (f" ({info.flag})" if info.flag else "")
            v = _coerce(value, info.type, what)
            m = meta[info.name]
            if v is not None and info.choices is not None and v not in info.choices:
                raise AnybitError(f"{what} must be one of {', '.join(map(str, info.choices))}, got {v!r}")
            if v is not None and m.get("check") is not None and not m["check"](v):
                raise AnybitError(f"{what} must be {m.get('must') or 'valid'}, got {v!r}")
            values[info.name] = v
        return cls(**values)

    def to_dict(self) -> dict:
        keys = {i.name: i.key for i in self.describe()}
        return {keys[k]: v for k, v in dataclasses.asdict(self).items()}
