"""Correction policy: per-frame observations in, instrument commands out.

A :class:`Policy` turns one :class:`Observation` per frame (anomaly flags and
probabilities, peak statistics, measured beam offset and fault region) into
actions: :class:`Command` (for :mod:`firmware_bridge`, already validated
against its allowlist and limits) and local :class:`MaskRegion` actions.

Rules come from TOML (default: ``edge/policy_default.toml``, which documents
the format). Each rule has a condition (a model flag with on/off probability
hysteresis, or a peak statistic against a running baseline of clean frames),
debounce (N of the last M frames, and the current frame), re-arming, cool-down
in frames and seconds, per-rule and global rate limits, and actions. A rule
only ever fires on a frame where its condition holds, so nothing is sent when
an anomaly ends or on clean frames.

Leaving the instrument's safe state (``resume``, ``open_shutter``,
``shutter(open=True)``) is a human decision: a policy refuses such actions at
load time, and again before a command leaves it, unless the file sets
``[policy] allow_leave_safe_state = true``.

The policy is pure and deterministic: time comes from ``Observation.t``, the
only other input is :meth:`Policy.on_ack` (the device-reported attenuation).
It holds no locks; use one instance per pipeline thread. A frame costs a few
microseconds per rule.
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping, Union

import firmware_bridge
from firmware_bridge import Limits
from firmware_bridge.commands import VOCABULARY

from ._validate import parse_toml, read_toml
from .scenario import ANOMALY_CLASSES


__all__ = [
    "Observation",
    "Command",
    "MaskRegion",
    "Action",
    "Policy",
    "PolicyConfigError",
    "STATS",
    "LEAVES_SAFE_STATE",
    "leaves_safe_state",
]

#: Peak statistics a ``stat`` rule can test (attributes of :class:`Observation`).
STATS = ("n_peaks", "median_snr", "n_saturated_peaks")


class PolicyConfigError(ValueError):
    """Invalid policy configuration; the message names the file and the key."""


@dataclass(frozen=True)
class Observation:
    """What the pipeline measured on one frame.

    Attributes
    ----------
    index : int
        Frame number.
    t : float
        Time of the frame (s, any monotonic clock); cool-downs and rate
        limits use it.
    flags : frozenset of str
        Anomaly model flags (model classes, e.g. ``"saturation"``).
    probabilities : dict of str to float
        Model class probabilities in [0, 1] (may be empty).
    n_peaks : int
        Bragg peaks found.
    median_snr : float or None
        Median peak signal-to-noise ratio (None without peaks).
    n_saturated_peaks : int
        Peaks whose maximum reaches the count cutoff.
    beam_offset_px : (float, float) or None
        Measured true beam position minus the geometry's beam centre
        ``(dx, dy)`` in pixels; None when not measured.
    fault_region : (int, int, int, int) or None
        ``(row0, row1, col0, col1)`` (half-open) of a bad region, if measured.
    """

    index: int
    t: float
    flags: frozenset[str] = frozenset()
    probabilities: Mapping[str, float] = field(default_factory=dict)
    n_peaks: int = 0
    median_snr: float | None = None
    n_saturated_peaks: int = 0
    beam_offset_px: tuple[float, float] | None = None
    fault_region: tuple[int, int, int, int] | None = None


@dataclass(frozen=True)
class Command:
    """A bridge command the policy wants sent: ``bridge.send(name, **args)``.

    ``args`` passed :func:`firmware_bridge.validate` with the policy's limits.
    ``dry_run`` commands are for logging only and must not be sent.
    """

    name: str
    args: dict
    rule: str
    reason: str
    dry_run: bool = False
    index: int = -1


@dataclass(frozen=True)
class MaskRegion:
    """Local action: mask ``region = (row0, row1, col0, col1)`` (half-open) from now on."""

    region: tuple[int, int, int, int]
    rule: str
    reason: str
    index: int = -1


Action = Union[Command, MaskRegion]


# =============================================================================
# Configuration
# =============================================================================
@dataclass(frozen=True)
class _ActionSpec:
    kind: str  # attenuation | recentre | alarm | mask | command
    step: int = 0
    at_limit: str = "skip"
    code: int = 0
    text: str = ""
    min_offset_px: float = 0.0
    command: str = ""
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rule:
    """One parsed rule (see ``policy_default.toml`` for the meaning of each field)."""

    name: str
    enabled: bool
    flag: str | None
    stat: str | None
    below_fraction: float | None
    at_least: float | None
    max_baseline_spread: float | None
    unless: frozenset[str]
    on_threshold: float | None
    off_threshold: float | None
    debounce_n: int
    debounce_m: int
    rearm_frames: int
    cooldown_frames: int
    cooldown_s: float
    max_per_minute: float
    actions: tuple[_ActionSpec, ...]


#: Default ``max_baseline_spread`` of a ``below_fraction`` rule: the
#: baseline frames' median absolute deviation over their median. Steady data
#: (a rotation series, the simulator) stay well below it; a grid scan, where
#: the peak count swings from hit to miss, is above it, so no rule fires there.
DEFAULT_MAX_BASELINE_SPREAD = 0.25

_TOP_KEYS = {"version", "policy", "baseline", "rules"}
_POLICY_KEYS = {"dry_run", "max_fires_per_minute", "um_per_px", "initial_attenuation", "allow_leave_safe_state"}
#: Commands that take the instrument out of its safe state (shutter closed,
#: attenuator in, after a watchdog timeout). Leaving the safe state is a human
#: decision: a policy may send these only with ``allow_leave_safe_state = true``.
LEAVES_SAFE_STATE = frozenset({"resume", "open_shutter"})


def leaves_safe_state(command: str, args: Mapping[str, Any]) -> bool:
    """True for ``resume``, ``open_shutter`` and ``shutter(open=true)``."""
    return command in LEAVES_SAFE_STATE or (command == "shutter" and args.get("open") is not False)
_BASELINE_KEYS = {"window", "min_frames"}
_RULE_KEYS = {"enabled", "flag", "stat", "below_fraction", "max_baseline_spread", "at_least", "unless", "on_threshold",
              "off_threshold", "debounce", "rearm_frames", "cooldown_frames", "cooldown_s",
              "max_per_minute", "actions"}
_ACTION_KEYS = {
    "attenuation": {"step", "at_limit", "code", "text"},
    "recentre": {"min_offset_px"},
    "alarm": {"code", "text"},
    "mask": set(),
    "command": {"command", "args"},
}


class _Cfg:
    """Typed access to one config table with messages naming file and key."""

    def __init__(self, data: Any, where: str, path: str, allowed: set) -> None:
        if not isinstance(data, Mapping):
            raise PolicyConfigError(f"{where}: {path or 'top level'} must be a table, got {type(data).__name__}")
        unknown = set(data) - set(allowed)
        if unknown:
            raise PolicyConfigError(f"{where}: unknown key(s) {sorted(unknown)} in {path or 'top level'}; "
                                    f"allowed: {sorted(allowed)}")
        self.data, self.where, self.path = data, where, path

    def key(self, k: str) -> str:
        return f"{self.path}.{k}" if self.path else k

    def err(self, k: str, msg: str) -> PolicyConfigError:
        return PolicyConfigError(f"{self.where}: {self.key(k)} {msg}")

    def number(self, k: str, default, *, lo=-math.inf, hi=math.inf, integer=False, lo_open=False, optional=False):
        if k not in self.data:
            return default
        v = self.data[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise self.err(k, f"must be a finite number, got {v!r}")
        if integer and not float(v).is_integer():
            raise self.err(k, f"must be an integer, got {v!r}")
        if (v <= lo if lo_open else v < lo) or v > hi:
            rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
            raise self.err(k, f"must be in {rng}, got {v!r}")
        return int(v) if integer else float(v)

    def boolean(self, k: str, default: bool) -> bool:
        v = self.data.get(k, default)
        if not isinstance(v, bool):
            raise self.err(k, f"must be true or false, got {v!r}")
        return v

    def string(self, k: str, default: str | None, choices=None) -> str | None:
        if k not in self.data:
            return default
        v = self.data[k]
        if not isinstance(v, str):
            raise self.err(k, f"must be a string, got {v!r}")
        if choices is not None and v not in choices:
            raise self.err(k, f"must be one of {sorted(choices)}, got {v!r}")
        return v


def _limit_range(limits: Limits, command: str, arg: str) -> tuple[float, float]:
    """Allowed [min, max] of a numeric argument: limits file, else what the wire carries."""
    spec = next(a for a in VOCABULARY[command].args if a.name == arg)
    entry = limits.commands.get(command)
    cons = entry.constraints.get(arg, {}) if entry is not None else {}
    return cons.get("min", spec.lo), cons.get("max", spec.hi)


# =============================================================================
# Policy
# =============================================================================
class _RuleState:
    __slots__ = ("window", "count", "latched", "armed", "off_streak", "last_index", "last_t", "fires")

    def __init__(self, m: int) -> None:
        self.window: deque[bool] = deque(maxlen=m)
        self.count = 0
        self.latched = False
        self.armed = True
        self.off_streak = 0
        self.last_index: int | None = None
        self.last_t: float | None = None
        self.fires: deque[float] = deque()


class Policy:
    """Rule-based correction policy; build with :meth:`from_toml` or :meth:`from_dict`.

    Attributes
    ----------
    rules : tuple of Rule
        Parsed rules (disabled ones included, never evaluated).
    dry_run : bool
        Commands come out with ``dry_run=True``.
    attenuation : int or None
        Tracked attenuator level: the configured start, then each level the
        policy commands, overridden by every :meth:`on_ack`.
    events : deque
        Recent decisions ``(index, rule, event)`` for logs: fires and fires
        that were skipped (rate limit, at a limit, nothing measured).
    """

    def __init__(self, rules: tuple[Rule, ...], *, limits: Limits, dry_run: bool = False,
                 max_fires_per_minute: float = 30.0, um_per_px: float = 1.0, initial_attenuation: int | None = None,
                 baseline_window: int = 50, baseline_min_frames: int = 10, source: str = "<dict>",
                 allow_leave_safe_state: bool = False) -> None:
        if not (isinstance(um_per_px, (int, float)) and math.isfinite(um_per_px) and um_per_px > 0):
            raise PolicyConfigError(f"um_per_px must be a positive finite number, got {um_per_px!r}")
        self.allow_leave_safe_state = bool(allow_leave_safe_state)
        self.rules = rules
        self.limits = limits
        self.dry_run = dry_run
        self.max_fires_per_minute = max_fires_per_minute
        self.um_per_px = um_per_px
        self.initial_attenuation = initial_attenuation
        self.baseline_window = baseline_window
        self.baseline_min_frames = baseline_min_frames
        self.source = source
        self._active = tuple(r for r in rules if r.enabled)
        self._att_range = _limit_range(limits, "set_attenuation", "level")
        self._dx_range = _limit_range(limits, "recentre_beam", "dx")
        self._dy_range = _limit_range(limits, "recentre_beam", "dy")
        self.reset()

    # -- construction ---------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | os.PathLike | None = None, *, dry_run: bool = False,
                  limits: str | os.PathLike | Mapping | Limits | None = None) -> "Policy":
        """Load rules from a TOML file (None = the shipped ``policy_default.toml``).

        ``dry_run=True`` forces dry-run whatever the file says; ``limits`` is
        the bridge limits (path, mapping, :class:`firmware_bridge.Limits`;
        None = the bridge's shipped ``limits.toml``).

        Raises
        ------
        PolicyConfigError
            Unreadable file, invalid TOML, unknown keys, invalid values.
        """
        if path is None:
            where = "edge/policy_default.toml"
            text = resources.files(__package__).joinpath("policy_default.toml").read_text("utf-8")
            data = parse_toml(text, where, PolicyConfigError)
        else:
            where = os.fspath(path)
            data = read_toml(where, PolicyConfigError, "policy file")
        return cls.from_dict(data, dry_run=dry_run, limits=limits, source=where)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, dry_run: bool = False,
                  limits: str | os.PathLike | Mapping | Limits | None = None, source: str = "<dict>",
                  known_flags: frozenset[str] | None = None) -> "Policy":
        """Build from a mapping with the TOML structure (see :meth:`from_toml`).

        ``known_flags`` is the flag vocabulary (default: the anomaly model's
        classes, :data:`edge.scenario.ANOMALY_CLASSES`).
        """
        try:
            lim = Limits.load(limits)
        except firmware_bridge.ConfigError as exc:
            # the limits file is to blame, not the policy file
            raise PolicyConfigError(f"bad bridge limits: {exc}") from exc
        flags = frozenset(ANOMALY_CLASSES if known_flags is None else known_flags)
        top = _Cfg(data, source, "", _TOP_KEYS)
        if top.number("version", 1, integer=True) != 1:
            raise top.err("version", f"must be 1, got {data.get('version')!r}")
        pol = _Cfg(data.get("policy", {}), source, "policy", _POLICY_KEYS)
        att_lo, att_hi = _limit_range(lim, "set_attenuation", "level")
        base = _Cfg(data.get("baseline", {}), source, "baseline", _BASELINE_KEYS)
        window = base.number("window", 50, lo=1, hi=100000, integer=True)
        min_frames = base.number("min_frames", 10, lo=1, hi=window, integer=True)
        # > 0: a negative value would move the beam away from the centre
        um = pol.number("um_per_px", 1.0, lo=0, lo_open=True)
        allow_leave = pol.boolean("allow_leave_safe_state", False)
        rules_tbl = data.get("rules", {})
        if not isinstance(rules_tbl, Mapping):
            raise top.err("rules", "must be a table of [rules.NAME] tables")
        rules = tuple(cls._parse_rule(name, r, source, flags, lim, allow_leave) for name, r in rules_tbl.items())
        return cls(rules, limits=lim,
                   dry_run=bool(dry_run) or pol.boolean("dry_run", False),
                   max_fires_per_minute=pol.number("max_fires_per_minute", 30.0, lo=0, lo_open=True),
                   um_per_px=um,
                   initial_attenuation=pol.number("initial_attenuation", None, lo=att_lo, hi=att_hi, integer=True),
                   baseline_window=window, baseline_min_frames=min_frames, source=source,
                   allow_leave_safe_state=allow_leave)

    @staticmethod
    def _parse_rule(name: str, data: Any, where: str, flags: frozenset[str], lim: Limits,
                    allow_leave: bool = False) -> Rule:
        c = _Cfg(data, where, f"rules.{name}", _RULE_KEYS)
        flag = c.string("flag", None)
        stat = c.string("stat", None, choices=STATS)
        if (flag is None) == (stat is None):
            raise c.err("flag", "or 'stat': a rule needs exactly one of them")
        if flag is not None and flag not in flags:
            raise c.err("flag", f"is not a known flag: {flag!r}; known: {sorted(flags)}")
        below = c.number("below_fraction", None, lo=0, hi=1, lo_open=True)
        spread = c.number("max_baseline_spread", None, lo=0, lo_open=True)
        at_least = c.number("at_least", None)
        on = c.number("on_threshold", None, lo=0, hi=1)
        off = c.number("off_threshold", None, lo=0, hi=1)
        if stat is not None:
            if (below is None) == (at_least is None):
                raise c.err("stat", "needs exactly one of 'below_fraction' (of the clean baseline) or 'at_least'")
            if on is not None or off is not None:
                raise c.err("on_threshold", "and off_threshold apply to flag rules only")
        elif below is not None or at_least is not None:
            raise c.err("below_fraction" if below is not None else "at_least", "applies to stat rules only")
        if spread is not None and below is None:
            raise c.err("max_baseline_spread", "applies to 'below_fraction' rules only")
        if below is not None and spread is None:
            spread = DEFAULT_MAX_BASELINE_SPREAD
        if off is not None and on is None:
            raise c.err("off_threshold", "needs on_threshold")
        if on is not None and off is not None and off > on:
            raise c.err("off_threshold", f"({off}) must not exceed on_threshold ({on})")
        unless = data.get("unless", [])
        if not isinstance(unless, list) or not all(isinstance(u, str) for u in unless):
            raise c.err("unless", f"must be a list of flag names, got {unless!r}")
        bad = set(unless) - flags
        if bad:
            raise c.err("unless", f"has unknown flag(s) {sorted(bad)}; known: {sorted(flags)}")
        deb = data.get("debounce", [2, 3])
        if (not isinstance(deb, list) or len(deb) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in deb)):
            raise c.err("debounce", f"must be [N, M] (N of the last M frames), got {deb!r}")
        n, m = deb
        if not 1 <= m <= 1000:
            raise c.err("debounce", f"M must be in [1, 1000], got {m}")
        if not 1 <= n <= m:
            raise c.err("debounce", f"needs 1 <= N <= M, got N={n}, M={m}")
        acts = data.get("actions")
        if not isinstance(acts, list) or not acts:
            raise c.err("actions", "must be a non-empty list of action tables")
        actions = tuple(Policy._parse_action(a, where, f"rules.{name}.actions[{k}]", lim, allow_leave)
                        for k, a in enumerate(acts))
        return Rule(
            name=name, enabled=c.boolean("enabled", True), flag=flag, stat=stat, below_fraction=below,
            max_baseline_spread=spread, at_least=at_least, unless=frozenset(unless), on_threshold=on, off_threshold=off,
            debounce_n=n, debounce_m=m,
            rearm_frames=c.number("rearm_frames", 0, lo=0, integer=True),
            cooldown_frames=c.number("cooldown_frames", 0, lo=0, integer=True),
            cooldown_s=c.number("cooldown_s", 0.0, lo=0),
            max_per_minute=c.number("max_per_minute", 60.0, lo=0, lo_open=True),
            actions=actions)

    @staticmethod
    def _parse_action(data: Any, where: str, path: str, lim: Limits, allow_leave: bool = False) -> _ActionSpec:
        if not isinstance(data, Mapping) or "action" not in data:
            raise PolicyConfigError(f"{where}: {path} must be a table with an 'action' key "
                                    f"(one of {sorted(_ACTION_KEYS)})")
        kind = data["action"]
        if kind not in _ACTION_KEYS:
            raise PolicyConfigError(f"{where}: {path}.action: unknown action {kind!r}; "
                                    f"known: {sorted(_ACTION_KEYS)}")
        c = _Cfg(data, where, path, _ACTION_KEYS[kind] | {"action"})

        def check(command: str, key: str, **args) -> None:
            try:
                firmware_bridge.validate(command, limits=lim, **args)
            except (firmware_bridge.BridgeError, TypeError, ValueError, OverflowError) as exc:
                raise c.err(key, f"is refused by the bridge limits ({lim.source}): {exc}") from exc

        if kind == "attenuation":
            step = c.number("step", None, integer=True)
            if step is None or step == 0:
                raise c.err("step", "must be a nonzero integer (+1 = more attenuation)")
            at_limit = c.string("at_limit", "skip", choices={"skip", "alarm"})
            code = c.number("code", 0, integer=True)
            text = c.string("text", "")
            check("set_attenuation", "action", level=_limit_range(lim, "set_attenuation", "level")[0])
            if at_limit == "alarm":
                if "code" not in data:
                    raise c.err("code", "is required with at_limit = \"alarm\"")
                check("raise_alarm", "code", code=code, text=text)
            return _ActionSpec("attenuation", step=step, at_limit=at_limit, code=code, text=text)
        if kind == "recentre":
            check("recentre_beam", "action", dx=0.0, dy=0.0)
            return _ActionSpec("recentre", min_offset_px=c.number("min_offset_px", 0.0, lo=0))
        if kind == "alarm":
            if "code" not in data:
                raise c.err("code", "is required for an alarm action")
            code = c.number("code", 0, integer=True)
            text = c.string("text", "")
            check("raise_alarm", "code", code=code, text=text)
            return _ActionSpec("alarm", code=code, text=text)
        if kind == "mask":
            return _ActionSpec("mask")
        command = c.string("command", None)
        if command is None:
            raise c.err("command", "is required for a command action")
        args = data.get("args", {})
        if not isinstance(args, Mapping):
            raise c.err("args", "must be a table of command arguments")
        if command not in VOCABULARY:
            raise c.err("command", f"is not a bridge command: {command!r}; known: {sorted(VOCABULARY)}")
        known = {a.name for a in VOCABULARY[command].args}
        unknown = sorted(set(args) - known)
        if unknown:  # checked here: names like 'limits' or 'command' must not reach validate()
            raise c.err("args", f"has unknown argument(s) {unknown} for {command!r}; known: {sorted(known) or 'none'}")
        if leaves_safe_state(command, args) and not allow_leave:
            raise c.err("command", f"{command!r} takes the instrument out of its safe state: that is a human "
                                   f"decision; set [policy] allow_leave_safe_state = true to let a rule do it")
        check(command, "command", **args)
        return _ActionSpec("command", command=command, args=dict(args))

    # -- state ----------------------------------------------------------------
    def reset(self) -> None:
        """Forget all history (debounce windows, cool-downs, baselines, tracked level)."""
        self.attenuation: int | None = self.initial_attenuation
        self._state = {r.name: _RuleState(r.debounce_m) for r in self._active}
        self._fires: deque[float] = deque()
        self._base = {s: deque(maxlen=self.baseline_window) for s in STATS}
        self._median: dict[str, float | None] = dict.fromkeys(STATS)
        self._spread: dict[str, float | None] = dict.fromkeys(STATS)
        self.events: deque[tuple[int, str, str]] = deque(maxlen=1000)

    def on_ack(self, ack_or_state: Any) -> None:
        """Update the tracked attenuator level from the device.

        Accepts a :class:`firmware_bridge.Ack` (or anything with ``.state``,
        e.g. a ``CommandRejected``), a :class:`firmware_bridge.DeviceState`, a
        mapping with ``"attenuation"``, or None (dry-run acks; ignored).
        """
        state = getattr(ack_or_state, "state", ack_or_state)
        if state is None:
            return
        level = state.get("attenuation") if isinstance(state, Mapping) else getattr(state, "attenuation", None)
        if level is not None:
            self.attenuation = int(level)

    def baseline(self, stat: str = "n_peaks") -> float | None:
        """Running median of ``stat`` over recent clean frames (None until ``min_frames``)."""
        return self._median[stat]

    def baseline_spread(self, stat: str = "n_peaks") -> float | None:
        """Median absolute deviation of the baseline frames over their median (None until ``min_frames``)."""
        return self._spread[stat]

    # -- per frame ------------------------------------------------------------
    def step(self, obs: Observation) -> list[Action]:
        """Evaluate all rules on one frame; return the actions to take now."""
        t = obs.t
        while self._fires and self._fires[0] <= t - 60.0:
            self._fires.popleft()
        out: list[Action] = []
        any_stat_on = False
        for rule in self._active:
            st = self._state[rule.name]
            on = self._condition(rule, st, obs)
            if rule.stat is not None:
                any_stat_on |= on
            if len(st.window) == st.window.maxlen and st.window[0]:
                st.count -= 1
            st.window.append(on)
            st.count += on
            if not st.armed:
                st.off_streak = 0 if on else st.off_streak + 1
                st.armed = st.off_streak >= rule.rearm_frames
            # fire only on a frame where the condition holds: never on a clean frame
            if not (on and st.armed and st.count >= rule.debounce_n):
                continue
            # 1 us slack: frame times are sums of float periods
            if st.last_index is not None and (obs.index - st.last_index < rule.cooldown_frames
                                              or t - st.last_t < rule.cooldown_s - 1e-6):
                continue
            while st.fires and st.fires[0] <= t - 60.0:
                st.fires.popleft()
            if len(st.fires) >= rule.max_per_minute:
                self.events.append((obs.index, rule.name, "skipped: rule rate limit"))
                continue
            if len(self._fires) >= self.max_fires_per_minute:
                self.events.append((obs.index, rule.name, "skipped: global rate limit"))
                continue
            actions = self._actions(rule, obs)
            if not actions:
                continue
            out.extend(actions)
            st.last_index, st.last_t = obs.index, t
            st.fires.append(t)
            self._fires.append(t)
            st.armed = rule.rearm_frames == 0
            st.off_streak = 0
            self.events.append((obs.index, rule.name, "fired: " + ", ".join(_describe(a) for a in actions)))
        if not obs.flags and not any_stat_on:
            self._update_baseline(obs)
        return out

    __call__ = step

    def _condition(self, rule: Rule, st: _RuleState, obs: Observation) -> bool:
        if rule.unless and not rule.unless.isdisjoint(obs.flags):
            on = False
        elif rule.flag is not None:
            on = rule.flag in obs.flags
            if not on and rule.on_threshold is not None:
                p = obs.probabilities.get(rule.flag)
                if p is not None:
                    thr = rule.off_threshold if (st.latched and rule.off_threshold is not None) else rule.on_threshold
                    on = p >= thr
        else:
            value = getattr(obs, rule.stat)
            if value is None:
                on = False
            elif rule.at_least is not None:
                on = value >= rule.at_least
            else:
                # a drop means something only against a steady baseline: in a
                # grid scan the peak count swings from frame to frame by design
                base, spread = self._median[rule.stat], self._spread[rule.stat]
                on = (base is not None and spread is not None and spread <= rule.max_baseline_spread
                      and value < rule.below_fraction * base)
        st.latched = on
        return on

    def _update_baseline(self, obs: Observation) -> None:
        for s in STATS:
            v = getattr(obs, s)
            if v is None:
                continue
            buf = self._base[s]
            buf.append(float(v))
            if len(buf) < self.baseline_min_frames:
                self._median[s] = self._spread[s] = None
                continue
            med = statistics.median(buf)
            mad = statistics.median(abs(x - med) for x in buf)
            self._median[s] = med
            self._spread[s] = mad / med if med > 0 else (0.0 if mad == 0 else math.inf)

    # -- actions --------------------------------------------------------------
    def _actions(self, rule: Rule, obs: Observation) -> list[Action]:
        out: list[Action] = []
        if rule.flag is not None:
            cond = rule.flag
        elif rule.below_fraction is not None:
            cond = (f"{rule.stat} below {rule.below_fraction:g} x clean baseline {self._median[rule.stat]:g} "
                    f"(spread {self._spread[rule.stat]:.2f})")
        else:
            cond = f"{rule.stat} >= {rule.at_least:g}"
        for a in rule.actions:
            if a.kind == "attenuation":
                if self.attenuation is None:
                    self.events.append((obs.index, rule.name, "skipped: attenuation level unknown"))
                    continue
                lo, hi = self._att_range
                level = self.attenuation + a.step
                if lo <= level <= hi:
                    cmd = self._command("set_attenuation", {"level": level}, rule, obs,
                                        f"{cond}: attenuation {self.attenuation} -> {level}")
                    if cmd is not None:
                        out.append(cmd)
                        self.attenuation = level  # optimistic until on_ack says otherwise
                elif a.at_limit == "alarm":
                    cmd = self._command("raise_alarm", {"code": a.code, "text": a.text}, rule, obs,
                                        f"{cond}: attenuation already at {self.attenuation} (limits {lo}..{hi})")
                    if cmd is not None:
                        out.append(cmd)
                else:
                    self.events.append((obs.index, rule.name, f"skipped: attenuation at limit {self.attenuation}"))
            elif a.kind == "recentre":
                off = obs.beam_offset_px
                if off is None:
                    self.events.append((obs.index, rule.name, "skipped: beam offset not measured"))
                    continue
                dx_px, dy_px = float(off[0]), float(off[1])
                if not (math.isfinite(dx_px) and math.isfinite(dy_px)):
                    self.events.append((obs.index, rule.name, "skipped: beam offset not finite"))
                    continue
                if math.hypot(dx_px, dy_px) < a.min_offset_px:
                    self.events.append((obs.index, rule.name, "skipped: beam offset below min_offset_px"))
                    continue
                # move the beam back: measured offset is true minus believed position
                dx = min(max(-dx_px * self.um_per_px, self._dx_range[0]), self._dx_range[1])
                dy = min(max(-dy_px * self.um_per_px, self._dy_range[0]), self._dy_range[1])
                cmd = self._command("recentre_beam", {"dx": round(dx, 3), "dy": round(dy, 3)}, rule, obs,
                                    f"beam off centre by ({dx_px:.1f}, {dy_px:.1f}) px")
                if cmd is not None:
                    out.append(cmd)
            elif a.kind == "alarm":
                cmd = self._command("raise_alarm", {"code": a.code, "text": a.text}, rule, obs, cond)
                if cmd is not None:
                    out.append(cmd)
            elif a.kind == "mask":
                if obs.fault_region is None:
                    self.events.append((obs.index, rule.name, "skipped: fault region not measured"))
                    continue
                region = tuple(int(v) for v in obs.fault_region)
                out.append(MaskRegion(region, rule.name, f"{cond}: mask rows {region[0]}:{region[1]}, "
                                                         f"columns {region[2]}:{region[3]}", obs.index))
            else:
                cmd = self._command(a.command, dict(a.args), rule, obs, cond)
                if cmd is not None:
                    out.append(cmd)
        return out

    def _command(self, name: str, args: dict, rule: Rule, obs: Observation, reason: str) -> Command | None:
        # the last check before anything leaves the policy: safe state, allowlist and ranges
        if leaves_safe_state(name, args) and not self.allow_leave_safe_state:
            self.events.append((obs.index, rule.name, f"skipped: {name} leaves the safe state (not allowed)"))
            return None
        try:
            vc = firmware_bridge.validate(name, limits=self.limits, **args)
        except (firmware_bridge.BridgeError, TypeError, ValueError, OverflowError) as exc:
            self.events.append((obs.index, rule.name, f"skipped: {exc}"))
            return None
        return Command(name, dict(vc.args), rule.name, reason, self.dry_run, obs.index)


def _describe(a: Action) -> str:
    if isinstance(a, Command):
        return f"{a.name}({', '.join(f'{k}={v!r}' for k, v in a.args.items())})"
    return f"mask{a.region}"
