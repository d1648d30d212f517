"""Settings: frozen dataclasses filled from defaults, a TOML file, environment variables and flags.

Precedence, lowest first: dataclass defaults < TOML file < ``HAR_*`` environment < CLI flags.
A field ``broker.host`` is ``[broker] host = ...`` in TOML, ``HAR_BROKER_HOST`` in the
environment and ``{"broker.host": ...}`` in the overrides the CLI passes. Unknown keys are errors:
a typo in a config file must not silently fall back to a default. A setting a later version
retired (a class's ``RETIRED`` map: name -> why) is logged and ignored in a config file, so a
device's file from before an upgrade still starts it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from shared.errors import ConfigError
from shared.topics import DEFAULT_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

ENV_PREFIX = "HAR_"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

S = TypeVar("S")
REDACTED = "<redacted>"

log = logging.getLogger(__name__)


def read_secret_file(path: Path, setting: str) -> str:
    """The secret in ``path`` (a password file), surrounding whitespace removed; a ConfigError
    names the ``setting`` that points at it."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {setting}: {exc}") from exc


def redact_url(url: str) -> str:
    """``url`` with the password of its user part and any ``password=`` parameter redacted."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        if ":" in user:
            netloc = f"{user.split(':', 1)[0]}:{REDACTED}@{host}"
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    if netloc == parts.netloc and not any(name.lower() == "password" for name, _ in pairs):
        return url  # nothing secret in it (and "sqlite:///path" keeps its three slashes)
    query = "&".join(
        f"{name}={REDACTED}" if name.lower() == "password" else f"{name}={value}"
        for name, value in pairs
    )
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """How to reach the MQTT broker. Defaults to a broker on this machine's loopback."""

    host: str = "127.0.0.1"
    port: int = 1883
    topic_root: str = DEFAULT_ROOT
    client_id: str = ""
    username: str = ""
    password: str = ""
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    max_inflight: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"broker.port {self.port} outside 1..65535")
        if self.keepalive_s < 5:
            raise ConfigError("broker.keepalive_s must be >= 5")
        if not 0 < self.reconnect_min_s <= self.reconnect_max_s:
            raise ConfigError("need 0 < broker.reconnect_min_s <= broker.reconnect_max_s")
        if self.password and self.password_file is not None:
            raise ConfigError("set broker.password or broker.password_file, not both")

    def __repr__(self) -> str:
        # Settings are printed (`har agent show-config`) and may end up in logs or tracebacks:
        # say whether a password is set, never what it is.
        shown = {field.name: repr(getattr(self, field.name)) for field in dataclasses.fields(self)}
        if self.password:
            shown["password"] = REDACTED
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in shown.items())})"

    def resolved_password(self) -> str:
        """The password, read from ``password_file`` when one is configured."""
        if self.password_file is None:
            return self.password
        return read_secret_file(self.password_file, "broker.password_file")


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def load_settings(
    cls: type[S],
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    env_prefix: str = ENV_PREFIX,
) -> S:
    """Build ``cls`` (a frozen dataclass, possibly nested) from every settings layer."""
    values: dict[str, Any] = {}
    if config_file is not None:
        _merge_file(cls, values, read_toml(config_file), prefix="")
    for path, field_type in _leaf_fields(cls):
        name = env_prefix + path.replace(".", "_").upper()
        if environ is not None and name in environ:
            _set_path(values, path, _from_text(name, environ[name], field_type))
    known = dict(_leaf_fields(cls))
    for path, value in (overrides or {}).items():
        if path not in known:
            raise ConfigError(f"unknown setting {path!r}")
        if value is not None:
            _set_path(values, path, _coerce(path, value, known[path]))
    return _construct(cls, values, prefix="")


def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_fields(cls: type[Any], prefix: str = "") -> list[tuple[str, Any]]:
    leaves: list[tuple[str, Any]] = []
    hints = _hints(cls)
    for field in dataclasses.fields(cls):
        field_type = hints[field.name]
        path = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(field_type):
            leaves.extend(_leaf_fields(typing.cast(type[Any], field_type), prefix=f"{path}."))
        else:
            leaves.append((path, field_type))
    return leaves


def _merge_file(
    cls: type[Any], values: dict[str, Any], doc: Mapping[str, Any], prefix: str
) -> None:
    hints = _hints(cls)
    names = {field.name for field in dataclasses.fields(cls)}
    retired: Mapping[str, str] = getattr(cls, "RETIRED", {})
    for key, value in doc.items():
        path = f"{prefix}{key}"
        if key in retired and key not in names:
            log.warning("setting %r is retired and ignored: %s", path, retired[key])
            continue
        if key not in names:
            raise ConfigError(f"unknown setting {path!r} in config file")
        field_type = hints[key]
        if dataclasses.is_dataclass(field_type):
            if not isinstance(value, dict):
                raise ConfigError(f"setting {path!r} must be a table")
            _merge_file(typing.cast(type[Any], field_type), values, value, prefix=f"{path}.")
        else:
            _set_path(values, path, _coerce(path, value, field_type))


def _set_path(values: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = values
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value


def _construct(cls: type[S], values: Mapping[str, Any], prefix: str) -> S:
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        field_type = hints[field.name]
        if dataclasses.is_dataclass(field_type):
            kwargs[field.name] = _construct(
                typing.cast(type[Any], field_type),
                values.get(field.name, {}),
                prefix=f"{prefix}{field.name}.",
            )
        elif field.name in values:
            kwargs[field.name] = values[field.name]
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid settings {prefix.rstrip('.') or cls.__name__}: {exc}") from exc


def _optional_inner(field_type: Any) -> tuple[Any, bool]:
    """(inner type, is optional) for ``X | None``."""
    origin = typing.get_origin(field_type)
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(field_type) if arg is not type(None)]
        if len(args) == 1:
            return args[0], True
    return field_type, False


def _from_text(name: str, text: str, field_type: Any) -> Any:
    inner, optional = _optional_inner(field_type)
    if text == "" and optional:
        return None
    if text == "" and inner is Path:
        # An empty path would silently mean "the current directory".
        raise ConfigError(f"{name} is set but empty")
    return _coerce(name, text, inner)


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in _TRUE | _FALSE:
        raise ConfigError(f"expected true/false, got {value!r}")
    return text in _TRUE


def _to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"expected an integer, got {value!r}")
    return int(value)


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"expected a number, got {value!r}")
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ConfigError(f"expected a string, got {value!r}")
    return str(value)


def _to_path(value: Any) -> Path:
    return (value if isinstance(value, Path) else Path(_to_str(value))).expanduser()


def _to_str_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"expected a list, got {value!r}")
    return tuple(_to_str(item) for item in value)


_CONVERTERS: Mapping[Any, Any] = MappingProxyType(
    {
        bool: _to_bool,
        int: _to_int,
        float: _to_float,
        str: _to_str,
        Path: _to_path,
        tuple[str, ...]: _to_str_tuple,
    }
)


def _coerce(name: str, value: Any, field_type: Any) -> Any:
    inner, optional = _optional_inner(field_type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"setting {name} must not be empty")
    converter = _CONVERTERS.get(inner)
    if converter is None:
        raise ConfigError(f"setting {name}: unsupported type {field_type!r}")
    try:
        return converter(value)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {exc}") from exc


def add_broker_flags(parser: argparse.ArgumentParser) -> None:
    """The broker flags every long-running command shares; ``broker_overrides`` reads them."""
    parser.add_argument("--broker-host", help="MQTT broker host (default 127.0.0.1)")
    parser.add_argument("--broker-port", type=int, help="MQTT broker port (default 1883)")
    parser.add_argument("--topic-root", help=f"topic root (default {DEFAULT_ROOT})")


def broker_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``load_settings`` overrides of ``add_broker_flags`` (absent flags count as unset)."""
    return {
        "broker.host": getattr(args, "broker_host", None),
        "broker.port": getattr(args, "broker_port", None),
        "broker.topic_root": getattr(args, "topic_root", None),
    }
