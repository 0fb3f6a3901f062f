"""The site configuration: one TOML file describing an installation.

``edge run --site FILE`` (default :data:`DEFAULT_SITE`) and ``edge service``
read it. Every key is checked before anything starts: an unknown key, a
wrong type or a missing file is a :class:`SiteConfigError` with a one-line
message naming the file, the key and what was expected. Relative paths are
relative to the site file's directory. Example (all sections optional)::

    [source]
    spec = "/data/incoming/*_master.h5"   # what `edge run --source` takes
    rate = "max"                          # Hz, "file" or "max"
    loop = false
    layout = "1m"                         # simulator only

    [geometry]                            # overrides what the source reports
    beam_center = [1261.6, 1306.9]        # (x, y) px
    distance_mm = 351.0
    wavelength_A = 0.96859
    pixel_size_mm = 0.172
    saturation = 115897                   # counts

    [device]
    port = "/dev/xray-edge-board"         # path, pyserial URL, usb:VID:PID[:SERIAL] or "emulator"
    dry_run = false

    [policy]
    file = "policy.toml"                  # default: the shipped policy
    limits = "limits.toml"                # default: the bridge's shipped limits

    [model]
    enabled = true
    file = "anomaly_int8.tflite"          # default: the shipped model
    threads = 1

    [processing]
    threads = 2                           # Numba threads (default: all cores)
    queue_size = 4

    [results]
    dir = "/var/lib/xray-edge/runs"       # one run-<time>.jsonl per run
    keep = 200                            # older run files are deleted

    [web]
    bind = "127.0.0.1:8080"               # the read-only live view, as `edge run --web [HOST:]PORT`
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware_bridge.transport import _VIDPID

from .._validate import read_toml
from . import DEFAULT_SITE


__all__ = ["DEFAULT_SITE", "SiteConfig", "SiteConfigError", "load_site"]



class SiteConfigError(ValueError):
    """The site file cannot be read or has an invalid key (message: one line)."""


_RATE_WORDS = ("file", "max")

# section -> key -> (kind, description). Kinds: str, bool, int (>= 1),
# float (> 0), file (must exist), dir, rate, point, port, bind.
_SCHEMA: dict[str, dict[str, str]] = {
    "source": {"spec": "str", "rate": "rate", "loop": "bool", "layout": "str"},
    "geometry": {"beam_center": "point", "distance_mm": "float", "wavelength_A": "float",
                 "pixel_size_mm": "float", "saturation": "float"},
    "device": {"port": "port", "dry_run": "bool"},
    "policy": {"file": "file", "limits": "file"},
    "model": {"enabled": "bool", "file": "file", "threads": "int"},
    "processing": {"threads": "int", "queue_size": "int"},
    "results": {"dir": "dir", "keep": "int"},
    "web": {"bind": "bind"},
}

_EXPECTED = {
    "str": "a non-empty string", "bool": "true or false", "int": "an integer >= 1",
    "float": "a number > 0", "file": "a path to an existing file", "dir": "a directory path",
    "rate": 'a rate in Hz > 0, "file" or "max"', "point": "[x, y], two finite numbers (px)",
    "port": 'a device path, pyserial URL, "usb:VID:PID[:SERIAL]" (hex) or "emulator"',
    "bind": '"[HOST:]PORT" (port 0-65535)',
}


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(kind: str, v: Any, base: Path) -> tuple[bool, Any, str]:
    """``(ok, value, why)``: the value converted (paths resolved), or why it is wrong."""
    if kind in ("str", "file", "dir", "port", "bind") and not (isinstance(v, str) and v.strip()):
        return False, None, ""
    if kind == "str":
        return True, v, ""
    if kind == "bool":
        return isinstance(v, bool), v, ""
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1, v, ""
    if kind == "float":
        return _number(v) and v > 0, float(v) if _number(v) else v, ""
    if kind == "rate":
        return (v in _RATE_WORDS) or (_number(v) and v > 0), v, ""
    if kind == "point":
        ok = isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v)
        return ok, tuple(float(x) for x in v) if ok else v, ""
    if kind == "file":
        p = (base / os.path.expanduser(v)).resolve()
        if not p.is_file():
            return False, p, f"file not found: {p}" if not p.exists() else f"not a file: {p}"
        return True, p, ""
    if kind == "dir":
        p = (base / os.path.expanduser(v)).resolve()
        if p.exists() and not p.is_dir():
            return False, p, f"not a directory: {p}"
        return True, p, ""
    if kind == "port":
        if v == "emulator":
            return True, None, ""
        if v.lower().startswith("usb:") and _VIDPID.match(v) is None:
            return False, v, f"bad USB id {v!r}"
        return True, v, ""
    if kind == "bind":
        from ..web import WebConfigError, parse_bind

        try:
            parse_bind(v)
        except WebConfigError:
            return False, v, ""
        return True, v, ""
    raise AssertionError(kind)


@dataclass
class SiteConfig:
    """A validated site file. Paths are absolute; None means "the default"."""

    path: Path
    source: str | None = None
    rate: float | str | None = None
    loop: bool | None = None
    layout: str | None = None
    geometry: dict[str, Any] = field(default_factory=dict)
    port: str | None = None
    """Serial port spec; None = the built-in instrument emulator."""
    dry_run: bool | None = None
    policy_file: Path | None = None
    limits_file: Path | None = None
    model_enabled: bool | None = None
    model_file: Path | None = None
    model_threads: int | None = None
    threads: int | None = None
    queue_size: int | None = None
    results_dir: Path | None = None
    keep_runs: int | None = None
    web_bind: str | None = None
    """Address of the read-only live view (``edge run --web``)."""

    def run_args(self) -> dict[str, Any]:
        """The ``edge run`` options this file sets (argparse dest -> value)."""
        out = {"source": self.source, "rate": self.rate, "loop": self.loop, "layout": self.layout,
               "port": self.port, "dry_run": self.dry_run,
               "config": None if self.policy_file is None else str(self.policy_file),
               "limits": None if self.limits_file is None else str(self.limits_file),
               "model": None if self.model_file is None else str(self.model_file),
               "no_model": None if self.model_enabled is None else not self.model_enabled,
               "model_threads": self.model_threads, "threads": self.threads, "queue_size": self.queue_size,
               "results_dir": None if self.results_dir is None else str(self.results_dir),
               "keep_runs": self.keep_runs, "web": self.web_bind}
        return {k: v for k, v in out.items() if v is not None}

    def files(self) -> dict[str, Path]:
        """Configuration files this site uses (for the run header's digests)."""
        out = {"site": self.path}
        for name, p in (("policy", self.policy_file), ("limits", self.limits_file)):
            if p is not None:
                out[name] = p
        return out


_FIELDS = {("source", "spec"): "source", ("source", "rate"): "rate", ("source", "loop"): "loop",
           ("source", "layout"): "layout", ("device", "port"): "port", ("device", "dry_run"): "dry_run",
           ("policy", "file"): "policy_file", ("policy", "limits"): "limits_file",
           ("model", "enabled"): "model_enabled", ("model", "file"): "model_file",
           ("model", "threads"): "model_threads", ("processing", "threads"): "threads",
           ("processing", "queue_size"): "queue_size", ("results", "dir"): "results_dir",
           ("results", "keep"): "keep_runs", ("web", "bind"): "web_bind"}


def load_site(path: str | os.PathLike = DEFAULT_SITE) -> SiteConfig:
    """Read and validate a site file.

    Raises
    ------
    SiteConfigError
        Unreadable file, invalid TOML, unknown section or key, a value of the
        wrong type or range, a policy/limits/model file that does not exist.
    """
    p = Path(path).expanduser()
    where = str(p)
    data = read_toml(p, SiteConfigError, "site file")
    base = p.resolve().parent
    site = SiteConfig(path=p.resolve())
    for section, table in data.items():
        schema = _SCHEMA.get(section)
        if schema is None:
            raise SiteConfigError(f"{where}: unknown section [{section}]; known: "
                                  f"{', '.join(f'[{s}]' for s in _SCHEMA)}")
        if not isinstance(table, dict):
            raise SiteConfigError(f"{where}: {section} must be a table ([{section}]), got {_type_name(table)}")
        for key, value in table.items():
            kind = schema.get(key)
            if kind is None:
                raise SiteConfigError(f"{where}: unknown key {key!r} in [{section}]; known: {', '.join(schema)}")
            ok, conv, why = _check(kind, value, base)
            if not ok:
                raise SiteConfigError(f"{where}: [{section}] {key}: {why or 'expected ' + _EXPECTED[kind]}, "
                                      f"got {_type_name(value)} {value!r}")
            if section == "geometry":
                site.geometry[key] = conv
            else:
                setattr(site, _FIELDS[section, key], conv)
    return site
