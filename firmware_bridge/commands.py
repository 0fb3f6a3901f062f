"""Command vocabulary, validation against configured limits, and rate limiting.

Validation happens entirely on the host, before any byte is written: a
command must be in the vocabulary, enabled in the limits file (allowlist),
have exactly the expected arguments of the right type, within range, and be
admitted by the rate limiter. The device enforces its own hard limits again.
"""

from __future__ import annotations

import math
import numbers
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

from .errors import ConfigError, RateLimited, UnknownCommand, ValidationError
from .messages import CommandId, GainMode

GAIN_MODES = tuple(m.name.lower() for m in GainMode)


@dataclass(frozen=True)
class ArgSpec:
    """One command argument: its type and the range the wire format can carry."""

    name: str
    kind: str  # "int" | "float" | "bool" | "choice" | "text"
    lo: float = -math.inf
    hi: float = math.inf
    choices: tuple[str, ...] = ()
    max_bytes: int = 0
    default: Any = None  # None = required

    @property
    def constraint_keys(self) -> frozenset[str]:
        return frozenset({"int": {"min", "max"}, "float": {"min", "max"}, "bool": set(),
                          "choice": {"choices"}, "text": {"max_bytes"}}[self.kind])


@dataclass(frozen=True)
class CommandDef:
    """A vocabulary entry. ``wire`` names the entry whose limits apply (aliases)."""

    name: str
    cid: CommandId
    args: tuple[ArgSpec, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)  # for aliases
    wire: str = ""


_I32_UM = (-2**31 + 1) / 1000.0, (2**31 - 1) / 1000.0

VOCABULARY: dict[str, CommandDef] = {c.name: c for c in (
    CommandDef("set_attenuation", CommandId.SET_ATTENUATION, (ArgSpec("level", "int", 0, 255),)),
    CommandDef("set_exposure", CommandId.SET_EXPOSURE,
               (ArgSpec("time_s", "float", 1e-6, (2**32 - 1) / 1e6),)),
    CommandDef("set_gain", CommandId.SET_GAIN, (ArgSpec("mode", "choice", choices=GAIN_MODES),)),
    CommandDef("shutter", CommandId.SHUTTER, (ArgSpec("open", "bool"),)),
    CommandDef("open_shutter", CommandId.SHUTTER, (), {"open": True}, "shutter"),
    CommandDef("close_shutter", CommandId.SHUTTER, (), {"open": False}, "shutter"),
    CommandDef("recentre_beam", CommandId.RECENTRE_BEAM,
               (ArgSpec("dx", "float", *_I32_UM), ArgSpec("dy", "float", *_I32_UM))),
    CommandDef("raise_alarm", CommandId.RAISE_ALARM,
               (ArgSpec("code", "int", 0, 65535), ArgSpec("text", "text", max_bytes=64, default=""))),
    CommandDef("query_state", CommandId.QUERY_STATE),
    CommandDef("resume", CommandId.RESUME),
)}
#: Command name for each command id (canonical, non-alias).
COMMAND_NAMES = {c.cid: c.name for c in VOCABULARY.values() if not c.wire}


@dataclass(frozen=True)
class ValidatedCommand:
    """A command that passed validation, with its encoded COMMAND payload."""

    name: str
    cid: CommandId
    args: dict
    payload: bytes

    @property
    def wire_name(self) -> str:
        return COMMAND_NAMES[self.cid]


@dataclass(frozen=True)
class CommandLimits:
    enabled: bool
    constraints: Mapping[str, Mapping[str, Any]]
    rate_per_second: float | None
    burst: int | None


@dataclass(frozen=True)
class Limits:
    """Parsed limits configuration (allowlist, argument ranges, rate limits).

    Build with :meth:`load`; see ``firmware_bridge/limits.toml`` for the format.
    """

    commands: Mapping[str, CommandLimits]
    max_per_second: float
    burst: int
    source: str = "<dict>"

    @classmethod
    def load(cls, source: str | os.PathLike | Mapping | "Limits" | None = None) -> "Limits":
        """Load limits from a TOML path, a mapping, or the shipped default (``None``).

        Raises
        ------
        ConfigError
            If the file cannot be read or contains unknown keys or bad values.
        """
        if isinstance(source, Limits):
            return source
        if source is None:
            text = resources.files(__package__).joinpath("limits.toml").read_text("utf-8")
            return cls._from_mapping(_parse_toml(text, "default limits.toml"), "default limits.toml")
        if isinstance(source, Mapping):
            return cls._from_mapping(source, "<dict>")
        if not isinstance(source, (str, os.PathLike)):
            raise ConfigError(f"limits must be a path, a mapping or a Limits, "
                              f"got {type(source).__name__}")
        path = os.fspath(source)
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(f"cannot read limits file {path!r}: {exc}") from exc
        return cls._from_mapping(_parse_toml(text, path), path)

    @classmethod
    def _from_mapping(cls, data: Mapping, where: str) -> "Limits":
        _check_keys(data, {"version", "rate", "commands"}, where)
        version = data.get("version", 1)
        if isinstance(version, bool) or version != 1:
            raise ConfigError(f"{where}: unsupported limits version {version!r} (expected 1)")
        rate = data.get("rate", {})
        _check_keys(rate, {"max_per_second", "burst"}, f"{where} [rate]")
        max_ps = _positive(rate.get("max_per_second", 500.0), f"{where} rate.max_per_second")
        burst = _burst(rate.get("burst", 100), f"{where} rate.burst")
        commands: dict[str, CommandLimits] = {}
        table = data.get("commands", {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: [commands] must be a table of command tables, "
                              f"got {type(table).__name__}")
        for name, entry in table.items():
            cdef = VOCABULARY.get(name)
            if cdef is None or cdef.wire:
                raise ConfigError(f"{where}: unknown command {name!r} in [commands] "
                                  f"(known: {', '.join(sorted(COMMAND_NAMES.values()))})")
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where}: [commands.{name}] must be a table")
            argnames = {a.name: a for a in cdef.args}
            _check_keys(entry, {"enabled", "rate_per_second", "burst", *argnames},
                        f"{where} [commands.{name}]")
            constraints = {}
            for aname, spec in argnames.items():
                cons = entry.get(aname, {})
                if not isinstance(cons, Mapping):
                    raise ConfigError(f"{where}: commands.{name}.{aname} must be a table")
                _check_keys(cons, spec.constraint_keys, f"{where} commands.{name}.{aname}")
                constraints[aname] = _check_constraint(spec, dict(cons), f"{where} commands.{name}.{aname}")
            rps = entry.get("rate_per_second")
            cburst = entry.get("burst")
            enabled = entry.get("enabled", True)
            if not isinstance(enabled, bool):
                raise ConfigError(f"{where}: commands.{name}.enabled must be true or false")
            commands[name] = CommandLimits(
                enabled, constraints,
                None if rps is None else _positive(rps, f"{where} commands.{name}.rate_per_second"),
                None if cburst is None else _burst(cburst, f"{where} commands.{name}.burst"))
        return cls(commands, max_ps, burst, where)

    def validate(self, command: str, /, **args: Any) -> ValidatedCommand:
        """Check a command against vocabulary and limits and encode it.

        Raises
        ------
        UnknownCommand
            Not in the vocabulary, or not enabled in the limits.
        ValidationError
            Missing/unexpected argument, wrong type, or out of range.
        """
        if not isinstance(command, str):
            raise UnknownCommand(f"command name must be a str, got {type(command).__name__}")
        cdef = VOCABULARY.get(command)
        if cdef is None:
            raise UnknownCommand(f"unknown command {command!r}; known: {', '.join(sorted(VOCABULARY))}")
        wire = cdef.wire or cdef.name
        lim = self.commands.get(wire)
        if lim is None or not lim.enabled:
            raise UnknownCommand(f"command {command!r} is not allowed by limits ({self.source})")
        expected = {a.name for a in cdef.args}
        unexpected = set(args) - expected
        if unexpected:
            raise ValidationError(f"{command}: unexpected argument(s) {sorted(unexpected)}; "
                                  f"expected {sorted(expected) or 'none'}")
        values: dict[str, Any] = dict(cdef.fixed)
        for spec in cdef.args:
            if spec.name not in args:
                if spec.default is None:
                    raise ValidationError(f"{command}: missing argument {spec.name!r}")
                value = spec.default
            else:
                value = args[spec.name]
            values[spec.name] = _check_value(command, spec, value, lim.constraints.get(spec.name, {}))
        return ValidatedCommand(command, cdef.cid, values, encode_command(cdef.cid, values))


def encode_command(cid: CommandId, v: Mapping[str, Any]) -> bytes:
    """Encode validated argument values into a COMMAND payload."""
    if cid == CommandId.SET_ATTENUATION:
        return struct.pack("<BB", cid, v["level"])
    if cid == CommandId.SET_EXPOSURE:
        return struct.pack("<BI", cid, round(v["time_s"] * 1e6))
    if cid == CommandId.SET_GAIN:
        return struct.pack("<BB", cid, GainMode[v["mode"].upper()])
    if cid == CommandId.SHUTTER:
        return struct.pack("<BB", cid, 1 if v["open"] else 0)
    if cid == CommandId.RECENTRE_BEAM:
        return struct.pack("<Bii", cid, round(v["dx"] * 1000), round(v["dy"] * 1000))
    if cid == CommandId.RAISE_ALARM:
        text = v["text"].encode("utf-8")
        return struct.pack("<BHB", cid, v["code"], len(text)) + text
    return struct.pack("<B", cid)


def _check_value(command: str, spec: ArgSpec, value: Any, cons: Mapping[str, Any]) -> Any:
    where = f"{command}: argument {spec.name!r}"
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise ValidationError(f"{where} must be a bool, got {value!r}")
        return value
    if spec.kind == "choice":
        choices = cons.get("choices", spec.choices)
        if not isinstance(value, str) or value not in choices:
            raise ValidationError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if spec.kind == "text":
        if not isinstance(value, str):
            raise ValidationError(f"{where} must be a str, got {type(value).__name__}")
        limit = cons.get("max_bytes", spec.max_bytes)
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:  # lone surrogate: not representable on the wire
            raise ValidationError(f"{where} is not valid Unicode text ({exc.reason} at "
                                  f"index {exc.start})") from exc
        if n > limit:
            raise ValidationError(f"{where} is {n} UTF-8 bytes, limit is {limit}")
        return value
    # numbers (NumPy scalars too); bool is an int subclass but never a valid number here
    if isinstance(value, bool) or type(value).__name__ == "bool_" \
            or not isinstance(value, numbers.Real):
        raise ValidationError(f"{where} must be a number, got {value!r}")
    if spec.kind == "int":
        if not isinstance(value, numbers.Integral):
            try:
                as_float = float(value)
            except (OverflowError, ValueError) as exc:
                raise ValidationError(f"{where} must be an integer, got {value!r}") from exc
            if not as_float.is_integer():
                raise ValidationError(f"{where} must be an integer, got {value!r}")
            value = as_float
        value = int(value)
    else:
        try:
            value = float(value)
        except (OverflowError, ValueError) as exc:  # e.g. 10**400
            raise ValidationError(f"{where}={value!r} is not a finite float") from exc
        if not math.isfinite(value):
            raise ValidationError(f"{where} must be finite, got {value!r}")
    lo, hi = cons.get("min", spec.lo), cons.get("max", spec.hi)
    if not lo <= value <= hi:
        raise ValidationError(f"{where}={value!r} outside allowed range [{lo}, {hi}]")
    return value


def _check_constraint(spec: ArgSpec, cons: dict, where: str) -> dict:
    for key in ("min", "max"):
        if key in cons:
            v = cons[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"{where}.{key} must be a finite number, got {v!r}")
            if spec.kind == "int" and not float(v).is_integer():
                raise ConfigError(f"{where}.{key} must be an integer, got {v!r}")
            if not spec.lo <= v <= spec.hi:
                raise ConfigError(f"{where}.{key}={v!r} outside what the protocol can carry "
                                  f"[{spec.lo}, {spec.hi}]")
    if cons.get("min", -math.inf) > cons.get("max", math.inf):
        raise ConfigError(f"{where}: min > max")
    if "choices" in cons:
        ch = cons["choices"]
        if not isinstance(ch, list) or not ch or any(c not in spec.choices for c in ch):
            raise ConfigError(f"{where}.choices must be a non-empty subset of {list(spec.choices)}")
        cons["choices"] = tuple(ch)
    if "max_bytes" in cons:
        mb = cons["max_bytes"]
        if isinstance(mb, bool) or not isinstance(mb, int) or not 0 <= mb <= spec.max_bytes:
            raise ConfigError(f"{where}.max_bytes must be an integer in [0, {spec.max_bytes}]")
    return cons


def _check_keys(data: Any, allowed: set | frozenset, where: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a table")
    unknown = set(data) - set(allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown, key=repr)}; "
                          f"allowed: {sorted(allowed)}")


def _positive(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ConfigError(f"{where} must be a positive number, got {v!r}")
    return float(v)


def _burst(v: Any, where: str) -> int:
    """A bucket capacity: a whole number of commands >= 1 (0.5 would admit nothing)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < 1 or v != int(v) or v > 10**9:
        raise ConfigError(f"{where} must be a whole number of commands in [1, 1e9], got {v!r}")
    return int(v)


def _parse_toml(text: str, where: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from exc


class _Bucket:
    __slots__ = ("rate", "capacity", "tokens", "t")

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity, self.tokens, self.t = rate, capacity, capacity, time.monotonic()

    def wait_needed(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + (now - self.t) * self.rate)
        self.t = now
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Token buckets: one global, one per command that configures a rate.

    Thread-safe. :meth:`acquire` either admits the command (consuming a token
    from every relevant bucket) or raises :class:`RateLimited` without
    consuming anything.
    """

    def __init__(self, limits: Limits) -> None:
        self._lock = threading.Lock()
        self._global = _Bucket(limits.max_per_second, limits.burst)
        self._per = {name: _Bucket(cl.rate_per_second, cl.burst or max(1.0, cl.rate_per_second))
                     for name, cl in limits.commands.items() if cl.rate_per_second}

    def acquire(self, wire_name: str) -> None:
        now = time.monotonic()
        with self._lock:
            buckets = [self._global] + ([self._per[wire_name]] if wire_name in self._per else [])
            wait = max(b.wait_needed(now) for b in buckets)
            if wait > 0:
                raise RateLimited(f"rate limit exceeded for {wire_name!r}; retry in {wait:.3f} s", wait)
            for b in buckets:
                b.tokens -= 1.0


_default_limits: Limits | None = None


def validate(command: str, /, limits: str | os.PathLike | Mapping | Limits | None = None,
             **args: Any) -> ValidatedCommand:
    """Validate ``command(**args)`` against ``limits`` (default: shipped limits.toml).

    Does not touch any port and does not consume rate-limit tokens.

    Examples
    --------
    >>> validate("set_attenuation", level=3).args
    {'level': 3}
    """
    global _default_limits
    if limits is None:
        if _default_limits is None:
            _default_limits = Limits.load(None)
        lim = _default_limits
    else:
        lim = Limits.load(limits)
    return lim.validate(command, **args)
