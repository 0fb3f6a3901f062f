"""Scripted simulator scenarios: which anomaly is active at which frame.

A :class:`Scenario` is a run of ``n_frames`` simulated frames made of
:class:`Phase` entries. Each phase covers the half-open frame range
``[start, end)``, carries ground-truth ``labels`` and the
:class:`edge.sim.SimConfig` overrides that produce the anomaly; frames
outside every phase are clean. :class:`edge.sources.SimulatorSource` plays a
scenario and reports the labels of each frame in ``FrameMeta.truth``, so the
real-time pipeline can be scored: every onset answered within a few frames,
nothing sent during clean stretches.

Scenarios are open loop: the scripted anomaly stays for the whole phase
whatever commands the pipeline sends.

Scenarios can be written as TOML (:meth:`Scenario.from_toml`) or dicts::

    name = "my run"
    n_frames = 600
    [base]                      # SimConfig overrides for every frame
    n_spots = 200
    [[phases]]
    name = "saturation"
    start = 100                 # first frame of the phase
    end = 160                   # first frame after it
    labels = ["saturation"]
    sim = { overload = 1000.0 }
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

from ._validate import read_toml
from .anomaly_data import CLASSES
from .sim import SimConfig


__all__ = [
    "ANOMALY_CLASSES",
    "LABELS",
    "Phase",
    "Scenario",
    "ScenarioError",
    "default_scenario",
]

#: Class names of the anomaly model, in its output order.
ANOMALY_CLASSES: tuple[str, ...] = CLASSES  # one list, owned by the model's data recipe
#: Every ground-truth label a scenario may use: the model classes plus
#: ``weak_diffraction``, a peak-statistics condition rather than a model class.
LABELS: frozenset[str] = frozenset(ANOMALY_CLASSES) | {"weak_diffraction"}

_SIM_FIELDS = {f.name: f for f in fields(SimConfig)}
#: Bounds that keep a scenario file from exhausting memory or time.
MAX_FRAMES = 10_000_000
MAX_COUNT = 100_000
# The geometry must stay fixed for a whole run (the pipeline builds it once),
# and the layout comes from the source, so these cannot vary per phase.
_FIXED_KEYS = frozenset({"layout", "beam_center", "distance_mm", "wavelength_A", "saturation", "dtype"})
_DEFAULTS = SimConfig()


class ScenarioError(ValueError):
    """An invalid scenario definition; the message names the key and source."""


@dataclass(frozen=True)
class Phase:
    """One scripted stretch of frames.

    Parameters
    ----------
    name : str
        Phase name, reported in ``FrameMeta.info["phase"]``.
    start, end : int
        Half-open frame range ``[start, end)``.
    labels : frozenset of str
        Ground-truth labels active during the phase (see :data:`LABELS`).
    sim : mapping
        :class:`edge.sim.SimConfig` overrides applied during the phase.
    """

    name: str
    start: int
    end: int
    labels: frozenset[str]
    sim: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", frozenset(self.labels))
        object.__setattr__(self, "sim", MappingProxyType(dict(self.sim)))

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, index: int) -> bool:
        return self.start <= index < self.end


@dataclass(frozen=True)
class Scenario:
    """A scripted run: phases over ``n_frames`` frames, clean elsewhere.

    Parameters
    ----------
    phases : sequence of Phase
        Non-overlapping phases inside ``[0, n_frames)``; sorted on creation.
    n_frames : int
        Length of the run in frames.
    name : str
        Scenario name.
    base : mapping
        :class:`edge.sim.SimConfig` overrides for every frame (clean ones too).

    Raises
    ------
    ScenarioError
        Overlapping or out-of-range phases, unknown labels, unknown or
        geometry-changing simulator keys, values of the wrong type.
    """

    phases: tuple[Phase, ...]
    n_frames: int
    name: str = "custom"
    base: Mapping[str, Any] = field(default_factory=dict)
    source: str = field(default="<dict>", compare=False)

    def __post_init__(self) -> None:
        where = self.source
        if isinstance(self.n_frames, bool) or not isinstance(self.n_frames, int) or not 1 <= self.n_frames <= MAX_FRAMES:
            raise ScenarioError(f"{where}: n_frames must be an integer in [1, {MAX_FRAMES}], got {self.n_frames!r}")
        object.__setattr__(self, "base", MappingProxyType(_check_sim(self.base, f"{where}: base")))
        phases = tuple(sorted(self.phases, key=lambda p: p.start))
        for k, p in enumerate(phases):
            w = f"{where}: phase {p.name!r}"
            for key in ("start", "end"):
                v = getattr(p, key)
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ScenarioError(f"{w}: {key} must be an integer frame number, got {v!r}")
            if not 0 <= p.start < p.end <= self.n_frames:
                raise ScenarioError(f"{w}: need 0 <= start < end <= n_frames ({self.n_frames}), "
                                    f"got start={p.start}, end={p.end}")
            if k and p.start < phases[k - 1].end:
                raise ScenarioError(f"{w} (frames {p.start}-{p.end}) overlaps phase "
                                    f"{phases[k - 1].name!r} (frames {phases[k - 1].start}-{phases[k - 1].end})")
            bad = p.labels - LABELS
            if bad:
                raise ScenarioError(f"{w}: unknown label(s) {sorted(bad)}; known: {sorted(LABELS)}")
            object.__setattr__(p, "sim", MappingProxyType(_check_sim(p.sim, f"{w}: sim")))
        object.__setattr__(self, "phases", phases)
        # frame -> phase lookup table: O(1) per frame, n_frames entries
        table: list[Phase | None] = [None] * self.n_frames
        for p in phases:
            table[p.start:p.end] = [p] * len(p)
        object.__setattr__(self, "_table", tuple(table))

    # -- queries --------------------------------------------------------------
    def phase_at(self, index: int) -> Phase | None:
        """The phase active at frame ``index`` (None = clean)."""
        if not 0 <= index < self.n_frames:
            raise IndexError(f"frame {index} outside scenario {self.name!r} (0..{self.n_frames - 1})")
        return self._table[index]  # type: ignore[attr-defined]

    def labels_at(self, index: int) -> frozenset[str]:
        """Ground-truth labels at frame ``index`` (empty = clean)."""
        p = self.phase_at(index)
        return p.labels if p is not None else frozenset()

    def overrides_at(self, index: int) -> dict[str, Any]:
        """SimConfig overrides at frame ``index`` (base, then the phase's)."""
        p = self.phase_at(index)
        return {**self.base, **(p.sim if p is not None else {})}

    def clean_ranges(self) -> list[tuple[int, int]]:
        """Half-open ``[start, end)`` frame ranges outside every phase."""
        out, t = [], 0
        for p in self.phases:
            if p.start > t:
                out.append((t, p.start))
            t = p.end
        if t < self.n_frames:
            out.append((t, self.n_frames))
        return out

    # -- (de)serialisation -----------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> "Scenario":
        """Build from a mapping with keys ``name``, ``n_frames``, ``base``, ``phases``.

        Raises
        ------
        ScenarioError
            Unknown keys, missing or invalid values; the message names the key.
        """
        if not isinstance(data, Mapping):
            raise ScenarioError(f"{source}: scenario must be a table/dict, got {type(data).__name__}")
        _check_keys(data, {"name", "n_frames", "base", "phases"}, source)
        if "n_frames" not in data:
            raise ScenarioError(f"{source}: missing key 'n_frames'")
        raw_phases = data.get("phases", [])
        if not isinstance(raw_phases, (list, tuple)):
            raise ScenarioError(f"{source}: 'phases' must be a list of tables")
        phases = []
        for k, ph in enumerate(raw_phases):
            w = f"{source}: phases[{k}]"
            if not isinstance(ph, Mapping):
                raise ScenarioError(f"{w} must be a table")
            _check_keys(ph, {"name", "start", "end", "labels", "sim"}, w)
            for key in ("name", "start", "end"):
                if key not in ph:
                    raise ScenarioError(f"{w}: missing key {key!r}")
            labels = ph.get("labels", [])
            if isinstance(labels, str) or not isinstance(labels, (list, tuple, frozenset, set)):
                raise ScenarioError(f"{w}.labels must be a list of strings, got {labels!r}")
            sim = ph.get("sim", {})
            if not isinstance(sim, Mapping):
                raise ScenarioError(f"{w}.sim must be a table")
            phases.append(Phase(str(ph["name"]), ph["start"], ph["end"], frozenset(labels), dict(sim)))
        base = data.get("base", {})
        if not isinstance(base, Mapping):
            raise ScenarioError(f"{source}: 'base' must be a table")
        return cls(tuple(phases), data["n_frames"], str(data.get("name", "custom")), dict(base), source)

    @classmethod
    def from_toml(cls, path: str | os.PathLike) -> "Scenario":
        """Load a scenario file (format in the module docstring)."""
        path = os.fspath(path)
        return cls.from_dict(read_toml(path, ScenarioError, "scenario file"), source=path)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form accepted by :meth:`from_dict` (tuples become lists)."""
        def plain(m):
            return {k: list(v) if isinstance(v, tuple) else v for k, v in m.items()}
        return {"name": self.name, "n_frames": self.n_frames, "base": plain(self.base),
                "phases": [{"name": p.name, "start": p.start, "end": p.end,
                            "labels": sorted(p.labels), "sim": plain(p.sim)} for p in self.phases]}


def default_scenario() -> Scenario:
    """The scripted 2,000-frame run used to judge the real-time pipeline.

    Every anomaly lasts 60-80 frames and is separated by 200 clean frames;
    the run starts with 200 clean frames (baselines, model warm-up).

    ======  =========  ====================  ======================================
    start   end        labels                simulator overrides
    ======  =========  ====================  ======================================
    200     260        saturation            ``overload=1000`` (~40 peaks clip)
    460     520        ice_rings             ``ice_rings=True``
    720     780        beam_off_center       ``beam_offset=(40, -30)`` px
    980     1040       no_beam               ``flux=0``
    1240    1300       detector_fault        ``dead_modules=1``
    1500    1580       weak_diffraction      ``mean_intensity=30`` (~30 % of peaks)
    1780    1840       blank                 ``crystal=False``
    ======  =========  ====================  ======================================
    """
    spec = [
        ("saturation", 200, 260, {"saturation"}, {"overload": 1000.0}),
        ("ice_rings", 460, 520, {"ice_rings"}, {"ice_rings": True}),
        ("beam_off_center", 720, 780, {"beam_off_center"}, {"beam_offset": (40.0, -30.0)}),
        ("no_beam", 980, 1040, {"no_beam"}, {"flux": 0.0}),
        ("detector_fault", 1240, 1300, {"detector_fault"}, {"dead_modules": 1}),
        ("weak_diffraction", 1500, 1580, {"weak_diffraction"}, {"mean_intensity": 30.0}),
        ("blank", 1780, 1840, {"blank"}, {"crystal": False}),
    ]
    return Scenario(tuple(Phase(n, s, e, frozenset(lab), sim) for n, s, e, lab, sim in spec),
                    2000, "default", {}, "default scenario")


# -- validation helpers --------------------------------------------------------
def _check_keys(data: Mapping, allowed: set, where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def _check_sim(sim: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check SimConfig overrides by name and by the type of the default value."""
    if not isinstance(sim, Mapping):
        raise ScenarioError(f"{where} must be a table")
    out = {}
    for key, value in sim.items():
        if key not in _SIM_FIELDS:
            raise ScenarioError(f"{where}: unknown simulator key {key!r}; known: {sorted(_SIM_FIELDS)}")
        if key in _FIXED_KEYS:
            raise ScenarioError(f"{where}: {key!r} changes the detector geometry/format and cannot be "
                                f"scripted (set it on the source instead)")
        default = getattr(_DEFAULTS, key)
        w = f"{where}.{key}"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ScenarioError(f"{w} must be true or false, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ScenarioError(f"{w} must be a finite number, got {value!r}")
            if isinstance(default, int) and not float(value).is_integer():
                raise ScenarioError(f"{w} must be an integer, got {value!r}")
            if value < 0 and key != "beamstop_arm_angle":
                raise ScenarioError(f"{w} must be >= 0, got {value!r}")
            if isinstance(default, int) and value > MAX_COUNT:  # counts of spots, pixels, modules...
                raise ScenarioError(f"{w} must be <= {MAX_COUNT}, got {value!r}")
            value = type(default)(value)
        elif isinstance(default, tuple):
            if (not isinstance(value, (list, tuple)) or len(value) != len(default)
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in value)):
                raise ScenarioError(f"{w} must be a list of {len(default)} finite numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        out[key] = value
    return out
