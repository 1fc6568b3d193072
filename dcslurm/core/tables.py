"""A TOML table checked into a dataclass, one key at a time: the reader of every config
table (the run's sections, each stage's params, sweep files) and of the params a task
binds from its plan. Every error is one line naming the table and the key. Credentials
are refused by key and by content, and a value is never echoed (it may be a secret).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import types
import typing
from typing import Any

from dcslurm.core.errors import ConfigError

# Keys that would put a secret into a file that gets copied, printed and
# rendered into scripts.
_SECRET_KEYS = {
    "key", "secret", "password", "token", "secret_key", "access_key",
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token",
    "access_key_id", "secret_access_key", "session_token",
}



# Credentials recognised by what a value holds, whatever its key: they would
# otherwise be copied into plan.json, sbatch scripts and logs.
_SECRET_CONTENT = (
    # user info with a password in a URL: scheme://user:password@host
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@:]*:[^/\s@]*@", re.I), "a password in a URL"),
    # an AWS access key id
    (re.compile(r"\b(AKIA|ASIA|AIDA|AROA)[0-9A-Z]{16}\b"), "an AWS access key id"),
    # an assignment of a literal to a secret-looking variable (export X=..., --export=...,X=...):
    # one naming a secret or password anywhere, or ending in TOKEN, ..._KEY (not TOKENIZERS_...);
    # `X=$X` or `X="$(...)"` hands over a value from the environment and holds no secret itself
    (re.compile(r"\b([A-Z0-9_]*(SECRET|PASSWORD|PASSWD)[A-Z0-9_]*|[A-Z0-9_]*(TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY"
                r"|CREDENTIALS?))=(?![\"']?\$)(?=[^\s,;]+)"), "an assignment to a secret variable"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
)


def _refuse_secret_content(value: Any, where: str) -> None:
    """One-line ConfigError if a string (or a string in a list) holds a
    credential. The message names the key and the kind of credential, never the value."""
    if isinstance(value, str):
        for pattern, what in _SECRET_CONTENT:
            if pattern.search(value):
                raise ConfigError(
                    f"{where}: holds a credential ({what}); credentials must not be written in a config file: "
                    "set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
                )
    elif isinstance(value, list):
        for item in value:
            _refuse_secret_content(item, where)
    # Tables are checked key by key when their own dataclass is loaded (resources, stage params).


def shown(value: Any) -> str:
    """`value` quoted when it is a short plain word (a mistyped name), else not shown at all."""
    if isinstance(value, str) and re.fullmatch(r"[\w.:/-]{0,24}", value):
        return repr(value)
    return f"{_toml_type(value)} (not shown)"


def _toml_type(value: Any) -> str:
    """What a TOML value is, for error messages that must not echo the value itself."""
    for tp, name in ((bool, "true/false"), (int, "an integer"), (float, "a number"), (str, "a string"),
                     (list, "a list"), (dict, "a table")):
        if isinstance(value, tp):
            return name
    return "a date or time" if value is not None else "nothing"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin is dict or tp is dict:
        return "table"
    return {str: "string", int: "integer", float: "number", bool: "true/false", type(None): "nothing"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _check_type(value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise TypeError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise TypeError
        return [_check_type(v, arg) for v in value]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise TypeError
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise TypeError
    if tp is type(None):
        if value is not None:
            raise TypeError
        return value
    if not isinstance(value, tp):
        raise TypeError
    return value


def load_dataclass(cls: type, table: Any, where: str) -> Any:
    """Build dataclass `cls` from a TOML table; one-line ConfigError on any problem.

    `where` is "run.toml: [section]" and prefixes every message.
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table, got {_toml_type(table)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key.lower() in _SECRET_KEYS:
            raise ConfigError(
                f"{where} {key}: credentials must not be written in a config file; "
                "set them in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            )
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        _refuse_secret_content(value, f"{where} {key}")
        try:
            kwargs[key] = _check_type(value, hints[key])
        except TypeError:
            # The value is not echoed: a misplaced secret would be printed.
            raise ConfigError(
                f"{where} {key}: expected {_type_name(hints[key])}, got {_toml_type(value)}"
            ) from None
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {missing[0]!r}")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise ConfigError(f"{where} {exc}") from None
    return obj



def read_toml(path: str, what: str = "config file") -> dict:
    """A TOML file's table, or a one-line ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {what}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
