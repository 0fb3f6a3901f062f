"""What a run records about itself, and one results file per run.

Each run's JSON Lines file starts with a ``header`` record (:func:`run_header`:
what ran, where, on which source and geometry, with which configuration
files and model, by digest) and ends with a ``summary`` record (written by
:class:`edge.pipeline.Pipeline` however the run ends). :func:`new_results_path`
gives each run its own file in a results directory and deletes the oldest
beyond a count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import os
import platform
import shutil
import socket
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

__all__ = ["apply_geometry", "file_digest", "new_results_path", "prune_runs", "run_header", "RUN_GLOB"]

#: Results files this module creates and rotates (``run-<UTC time>[-n].jsonl``).
RUN_GLOB = "run-*.jsonl"


def file_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _default_files() -> dict[str, Path]:
    return {"policy": Path(str(resources.files("edge").joinpath("policy_default.toml"))),
            "limits": Path(str(resources.files("firmware_bridge").joinpath("limits.toml")))}


def run_header(source, *, model=None, files: Mapping[str, str | os.PathLike | None] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict:
    """What a run's header record says about where it ran and with what.

    Give it to :class:`edge.pipeline.Pipeline` (``header=``), which writes it
    as the first record (``{"type": "run", ...}``); ``edge run`` adds its
    own fields (policy and port as given, the model's classes).

    Parameters
    ----------
    source : FrameSource
        Its name, frame dtype, rate and geometry are recorded.
    model : AnomalyModel, optional
        Its file and sha256 (verified against the model card at load).
    files : mapping, optional
        Configuration files by role (``site``, ``policy``, ``limits``); a
        None value (or a missing ``policy`` / ``limits``) is the shipped
        default, recorded with its path and sha256 too.
    extra : mapping, optional
        More fields (e.g. the command line).
    """
    from .. import __version__
    from ..geometry import Geometry
    from ..web import geometry_summary

    roles = {k: Path(v) for k, v in _default_files().items()}
    for k, v in (files or {}).items():
        if v is not None:
            roles[k] = Path(v)
    digests = {}
    for role, p in roles.items():
        try:
            digests[role] = {"path": str(p), "sha256": file_digest(p)}
        except OSError as exc:
            digests[role] = {"path": str(p), "error": str(exc)}
    geom = getattr(source, "geometry", None)
    dtype = getattr(source, "dtype", None)
    rec = {
        "version": __version__,
        "started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pid": os.getpid(),
        "source": getattr(source, "name", repr(source)),
        "source_dtype": None if dtype is None else str(dtype),
        "rate_hz": getattr(source, "rate_hz", None),
        "geometry": geometry_summary(geom) if isinstance(geom, Geometry) else None,
        "files": digests,
        "model": None if model is None else {
            "path": str(model.path), "sha256": model.card["files"]["tflite"]["sha256"]},
    }
    if extra:
        rec.update(extra)
    return rec


def apply_geometry(source, overrides: Mapping[str, Any]) -> None:
    """Replace fields of ``source.geometry`` (e.g. a site's measured beam centre).

    Keys: ``beam_center``, ``distance_mm``, ``wavelength_A``, ``pixel_size_mm``,
    ``saturation``. Raises ValueError for values :class:`edge.Geometry` refuses.
    """
    if overrides:
        source.geometry = dataclasses.replace(source.geometry, **dict(overrides))


def new_results_path(directory: str | os.PathLike, *, now: _dt.datetime | None = None) -> Path:
    """A new ``run-<UTC time>.jsonl`` path in ``directory`` (nothing is created).

    The name gets ``-2``, ``-3`` ... when a run file from the same second
    exists (a quick service restart).

    Raises
    ------
    NotADirectoryError
        ``directory`` exists and is not a directory.
    """
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d} is not a directory")
    stamp = (now or _dt.datetime.now(_dt.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        p = d / (f"run-{stamp}.jsonl" if n == 1 else f"run-{stamp}-{n}.jsonl")
        if not p.exists():
            return p
    raise OSError(f"{d}: more than 999 runs started in {stamp}")


def prune_runs(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete the oldest ``run-*.jsonl`` files in ``directory`` (with the live
    view's ``.frames`` directories beside them) so that ``keep`` remain.

    Returns the files deleted. Call it once the new run's file exists, so
    that it counts among the ``keep``.
    """
    from ..web import frames_dir

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    runs = sorted(Path(directory).glob(RUN_GLOB), key=lambda p: (p.stat().st_mtime, p.name))
    gone = runs[: max(0, len(runs) - keep)]
    for p in gone:
        shutil.rmtree(frames_dir(p), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    return gone
