"""Simulated frames (:mod:`edge.sim`), clean or following a scripted :class:`~edge.scenario.Scenario`."""

from __future__ import annotations

import os
import threading
import zlib
from dataclasses import replace
from typing import Any, Mapping

import numpy as np

from ..geometry import LAYOUTS, Geometry
from ..scenario import Scenario, default_scenario
from ..sim import SimConfig, simulate
from .base import FrameSource, SourceError

__all__ = ["SimulatorSource"]


def _derived_seed(*parts: int) -> int:
    """A deterministic 32-bit seed from integers (``simulate`` needs an int)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _config_key(overrides: Mapping[str, Any]) -> tuple:
    return tuple(sorted(overrides.items()))


class SimulatorSource(FrameSource):
    """Simulated frames (:mod:`edge.sim`), clean or following a :class:`Scenario`.

    Simulating one frame costs ~80 ms at 1M and ~0.4 s at 4M, far too slow to
    stream, so the source pre-simulates a *pool* of ``pool`` distinct frames
    (distinct seeds) per simulator configuration - one for clean frames and one
    per distinct phase of the scenario - and cycles through it: frame ``k`` of
    a configuration uses pool slot ``k % pool``. Start-up cost is
    ``pool x configurations`` simulations (default scenario: 8 configurations,
    32 frames, ~3 s and ~140 MB at 1M; ~14 s and ~570 MB at 4M), after which
    frames stream at memory speed. ``preload=True`` instead simulates every
    frame individually (all distinct; needs a finite ``n_frames`` or scenario).
    ``prepare(background=True)`` starts the simulation on a thread and returns
    at once; the first frame then waits only for what is left of it (``edge
    run`` does this before loading the kernels, so both happen at once).

    Parameters
    ----------
    layout : str
        Detector layout (:data:`edge.geometry.LAYOUTS`), e.g. ``"1m"``, ``"4m"``.
    n_frames : int, optional
        Frames to emit; default endless without a scenario, else the scenario length.
    rate_hz : float, optional
        Emission rate (Hz), None = as fast as possible.
    seed : int
        Base seed; pool seeds derive from it, the configuration and the slot.
    scenario : Scenario, mapping, path or "default", optional
        Scripted anomalies with ground truth (:mod:`edge.scenario`).
    pool : int
        Distinct frames per configuration.
    preload : bool
        Simulate every emitted frame individually before the first emission.
    loop : bool
        Replay the scenario from the start when it ends.
    copy : bool
        Emit copies instead of the shared pool arrays.
    config : SimConfig, optional
        Base simulator configuration; ``**sim`` overrides its fields.
    max_memory_bytes : int
        Refuse pools/preloads whose frames would exceed this (default 4 GiB).
    """

    def __init__(self, layout: str = "1m", n_frames: int | None = None, rate_hz: float | None = None, *,
                 seed: int = 0, scenario: Scenario | Mapping | str | os.PathLike | None = None, pool: int = 4,
                 preload: bool = False, loop: bool = False, copy: bool = False, config: SimConfig | None = None,
                 max_memory_bytes: int = 4 << 30, **sim: Any) -> None:
        super().__init__(rate_hz=rate_hz, n_frames=n_frames, loop=loop, preload=preload, copy=copy)
        if not isinstance(layout, str) or layout.lower() not in LAYOUTS:
            raise SourceError(f"unknown simulator layout {layout!r}; known: {sorted(LAYOUTS)}")
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise SourceError(f"pool must be a positive integer, got {pool!r}")
        try:
            self.config = replace(config or SimConfig(), **sim, layout=layout.lower())
        except TypeError as exc:
            raise SourceError(f"bad simulator option: {exc}") from None
        if isinstance(scenario, str) and scenario == "default":
            scenario = default_scenario()
        elif isinstance(scenario, Mapping):
            scenario = Scenario.from_dict(scenario)
        elif isinstance(scenario, (str, os.PathLike)):
            scenario = Scenario.from_toml(scenario)
        self.scenario: Scenario | None = scenario
        self.seed = int(seed)
        self.pool = pool
        self.max_memory_bytes = int(max_memory_bytes)
        self.geometry = self.config.geometry()
        # the pool frames carry the per-frame mask (bad pixels) as -2 markers;
        # the geometry keeps the static gap mask and the count cutoff
        self.geometry = Geometry(self.geometry.shape, self.geometry.pixel_size_mm, self.geometry.distance_mm,
                                 self.geometry.wavelength_A, self.geometry.beam_center, mask=self.geometry.mask,
                                 saturation=self.config.saturation)
        self.frame_time = None
        self.dtype = np.dtype(self.config.dtype)
        kind = "sim" if scenario is None else f"scenario:{scenario.name}"
        self.name = f"{kind}:{self.config.layout}"
        self._pools: dict[tuple, list[tuple[np.ndarray, dict]]] = {}
        self._pending: dict[tuple, threading.Event] = {}  # pools a background thread is simulating
        self._pool_error: BaseException | None = None

    def _length(self) -> int | None:
        return None if self.scenario is None else self.scenario.n_frames

    def _overrides(self, k: int) -> tuple[dict, Any]:
        if self.scenario is None:
            return {}, None
        return self.scenario.overrides_at(k), self.scenario.phase_at(k)

    def _simulate(self, overrides: dict, seed: int) -> tuple[np.ndarray, dict]:
        sf = simulate(self.config, seed=seed, **overrides)
        info = {"seed": seed, "beam_offset_px": tuple(sf.config.beam_offset)}
        if sf.config.dead_modules:
            info["fault_regions"] = _dead_modules(sf.frame, self.config.layout)
        return sf.frame, info

    def _frames_needed(self) -> int:
        length = self._length()
        if self.preload:
            if length is None:
                return self._cap or 0
            return length if (self._cap is None or self.loop) else min(length, self._cap)
        n_configs = 1 if self.scenario is None else len({_config_key(self.scenario.overrides_at(k))
                                                         for k in self._scripted_range()})
        return n_configs * self.pool

    def _scripted_range(self) -> range:
        n = self.scenario.n_frames
        return range(n if (self._cap is None or self.loop) else min(n, self._cap))

    def prepare(self, *, background: bool = False) -> None:
        """Simulate the frame pools (see the class notes), or with ``background`` start doing so."""
        self._check_open()
        need = self._frames_needed() * int(np.prod(self.geometry.shape)) * np.dtype(self.config.dtype).itemsize
        if need > self.max_memory_bytes:
            raise SourceError(f"{self.name}: the simulated frames would need {need / 2**20:.0f} MiB, more than "
                              f"max_memory_bytes={self.max_memory_bytes / 2**20:.0f} MiB; use a smaller pool, "
                              f"fewer frames or no preload")
        if self.preload:
            return super().prepare()
        keys = [_config_key({})] if self.scenario is None else \
            list(dict.fromkeys(_config_key(self.scenario.overrides_at(k)) for k in self._scripted_range()))
        todo = [key for key in keys if key not in self._pools and key not in self._pending]
        if background:
            if todo:
                for key in todo:
                    self._pending[key] = threading.Event()
                threading.Thread(target=self._make_pools_later, args=(todo,), name="edge-sim-pools",
                                 daemon=True).start()
            return
        for key in todo:
            self._pools[key] = self._make_pool(key)
        # frames stream only once every pool is there: simulating while frames
        # are processed would compete with the processing for the GIL
        for event in list(self._pending.values()):
            event.wait()
        if self._pool_error is not None:
            raise SourceError(f"{self.name}: simulating the frames failed: {self._pool_error!r}")

    def _make_pool(self, key: tuple) -> list[tuple[np.ndarray, dict]]:
        tag = zlib.crc32(repr(key).encode())  # stable across runs (unlike hash())
        return [self._simulate(dict(key), _derived_seed(self.seed, tag, slot)) for slot in range(self.pool)]

    def _make_pools_later(self, keys: list[tuple]) -> None:
        for key in keys:
            try:
                if not self._closed:
                    self._pools[key] = self._make_pool(key)
            except BaseException as exc:  # reported by prepare()
                self._pool_error = exc
            finally:
                self._pending[key].set()

    def _read(self, k: int) -> tuple[np.ndarray, dict, frozenset]:
        overrides, phase = self._overrides(k)
        if self.preload:
            frame, info = self._simulate(overrides, _derived_seed(self.seed, 0xF4A3E, k))
            slot = None
        else:
            entries = self._pools[_config_key(overrides)]
            slot = k % self.pool
            frame, info = entries[slot]
            info = dict(info)
        info["pool_slot"] = slot
        if self.scenario is not None:
            info["phase"] = phase.name if phase is not None else "clean"
            info["scenario_frame"] = k
        truth = phase.labels if phase is not None else frozenset()
        return frame, info, truth

    def close(self) -> None:
        super().close()
        self._pools.clear()


def _dead_modules(frame: np.ndarray, layout: str) -> list[tuple[int, int, int, int]]:
    """Modules reading (almost) all zero, as ``(row0, row1, col0, col1)`` half-open boxes.

    Hot pixels are scattered after the module dies, so allow a few nonzero ones.
    """
    lay = LAYOUTS[layout.lower()]
    (mr, mc), (pr, pc), (gr, gc) = lay.modules, lay.module_shape, lay.gap
    out = []
    for i in range(mr):
        for j in range(mc):
            r0, c0 = i * (pr + gr), j * (pc + gc)
            block = frame[r0:r0 + pr, c0:c0 + pc]
            if np.count_nonzero(block > 0) < 0.01 * block.size:
                out.append((r0, r0 + pr, c0, c0 + pc))
    return out
