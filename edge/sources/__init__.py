"""Frame sources: simulator, scripted scenarios, mini-CBF and Eiger/NeXus replay.

Every source yields ``(frame, meta)`` pairs through one interface,
:class:`FrameSource`; :func:`open_source` builds one from a spec string::

    with open_source("scenario:1m", rate_hz=100) as src:
        for frame, meta in src:
            ...   # meta.index, meta.t_source, meta.geometry, meta.truth, meta.info

Specs: ``"sim"`` / ``"sim:4m"`` (endless clean frames), ``"scenario"`` /
``"scenario:4m"`` / ``"scenario:FILE.toml"`` (scripted run with ground
truth, :mod:`edge.scenario`), a ``.cbf`` / ``.cbf.bz2`` / ``.cbf.gz`` file, a
directory or glob of them, or an Eiger/NeXus ``*_master.h5`` file.

One module per source kind: :mod:`.base` (interface, pacing), :mod:`.simulator`,
:mod:`.cbf`, :mod:`.eiger`, :mod:`.stream`.
"""

from __future__ import annotations

import glob as _glob
import os
from typing import Any

from ..geometry import LAYOUTS
from ..scenario import ScenarioError
from .base import MAX_FRAME_BYTES, MAX_RATE_HZ, MIN_RATE_HZ, FrameError, FrameMeta, FrameSource, SourceError
from .cbf import CbfSource, is_cbf
from .eiger import EigerSource, write_eiger_master
from .simulator import SimulatorSource
from .stream import StreamSource

__all__ = [
    "FrameMeta",
    "FrameSource",
    "SimulatorSource",
    "CbfSource",
    "EigerSource",
    "StreamSource",
    "SourceError",
    "FrameError",
    "MAX_FRAME_BYTES",
    "open_source",
    "write_eiger_master",
]


def open_source(spec: str | os.PathLike, *, rate_hz: float | str | None = None, n_frames: int | None = None,
                loop: bool = False, **kw: Any) -> FrameSource:
    """Open a frame source from a spec string.

    Parameters
    ----------
    spec : str or path
        ``"sim"``, ``"sim:<layout>"``, ``"scenario"``, ``"scenario:<layout>"``,
        ``"scenario:<file.toml>"``, a ``.cbf``/``.cbf.bz2``/``.cbf.gz`` file, a
        directory or glob of CBF files, an Eiger ``*_master.h5`` / ``.nxs``, or
        ``"tcp://HOST[:PORT]"``: a live DECTRIS Stream V2 detector (port 31001
        by default; paced by the detector, so ``rate_hz`` must be None).
    rate_hz : float, "file" or None
        Emission rate in Hz; ``"file"`` = ``1 / frame_time`` of the file
        (CBF ``Exposure_period``, Eiger ``frame_time``); None = unpaced.
    n_frames : int, optional
        Stop after this many frames.
    loop : bool
        Replay finite sources from the start.
    **kw
        Passed to the source class (e.g. ``seed``, ``pool``, ``preload``,
        ``layout``, ``scenario`` for the simulator; ``copy``).

    Raises
    ------
    SourceError
        Unknown spec, missing file, no frame time for ``rate_hz="file"``,
        or a source that cannot be opened.
    """
    s = os.fspath(spec)
    if not isinstance(s, str) or not s:
        raise SourceError(f"empty or invalid source spec {spec!r}")
    file_rate = isinstance(rate_hz, str)
    if file_rate and rate_hz != "file":
        raise SourceError(f"rate_hz must be a number, None or 'file', got {rate_hz!r}")
    common = {"rate_hz": None if file_rate else rate_hz, "n_frames": n_frames, "loop": loop}
    if s.startswith("tcp://"):
        if file_rate or rate_hz is not None or loop:
            raise SourceError(f"{s}: a live stream is paced by the detector: no rate_hz, no loop")
        return StreamSource(s, n_frames=n_frames, **kw)
    head, _, arg = s.partition(":")
    if head in ("sim", "scenario") and not os.path.exists(s):
        layout = kw.pop("layout", "1m")
        scenario = kw.pop("scenario", "default" if head == "scenario" else None)
        if arg:
            if arg.lower().endswith(".toml"):
                if head != "scenario":
                    raise SourceError(f"source spec {s!r}: a scenario file needs 'scenario:FILE.toml'")
                scenario = arg
            elif arg.lower() in LAYOUTS:
                layout = arg
            else:
                raise SourceError(f"source spec {s!r}: unknown layout {arg!r}; known: {sorted(LAYOUTS)} "
                                  f"(or a scenario .toml file)")
        try:
            src: FrameSource = SimulatorSource(layout, scenario=scenario, **common, **kw)
        except (ScenarioError, UnicodeDecodeError) as exc:  # a missing or invalid scenario file
            raise SourceError(f"source spec {s!r}: {exc}", path=arg or None) from exc
    elif s.endswith(("_master.h5", ".nxs")) or (s.endswith((".h5", ".hdf5")) and os.path.isfile(s)):
        src = EigerSource(s, **common, **kw)
    elif is_cbf(s) or os.path.isdir(s) or _glob.has_magic(s):
        src = CbfSource(s, **common, **kw)
    elif not os.path.exists(s):
        raise SourceError(f"source {s!r} not found: expected 'sim[:layout]', 'scenario[:layout|:file.toml]', "
                          f"a CBF file/directory/glob or an Eiger *_master.h5 file", path=s)
    else:
        raise SourceError(f"unrecognised source {s!r}: expected a .cbf/.cbf.bz2/.cbf.gz file, a directory or "
                          f"glob of them, or an Eiger *_master.h5 file", path=s)
    if file_rate:
        if not src.frame_time or src.frame_time <= 0:
            src.close()
            raise SourceError(f"rate_hz='file' but {src.name} has no frame time "
                              f"(CBF Exposure_period / Eiger frame_time)", path=s)
        if not MIN_RATE_HZ <= 1.0 / src.frame_time <= MAX_RATE_HZ:
            src.close()
            raise SourceError(f"rate_hz='file': {src.name} has frame time {src.frame_time} s, outside "
                              f"[{1 / MAX_RATE_HZ:g}, {1 / MIN_RATE_HZ:g}] s", path=s)
        src.rate_hz = 1.0 / src.frame_time
    return src
