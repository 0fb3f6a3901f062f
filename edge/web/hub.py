"""The hub between the loop and the browsers.

The pipeline hands the hub references only (:meth:`LiveHub.record` appends a
record to a deque, :meth:`LiveHub.frame` replaces one tuple). The hub's own
thread turns them, at bounded rates, into pre-encoded Server-Sent Events that
every client thread just writes out: data updates at most ``update_hz`` per
second, frame images at most ``image_hz``. A client that reads slowly or
vanishes only loses events (it gets a fresh snapshot when it fell too far
behind); nothing it does reaches the processing thread.

The same hub replays a finished run (:meth:`LiveHub.follow` tails a JSON Lines
results file, also one still being written) and provides the snapshot that
``edge report`` embeds.
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from . import imaging
from .imaging import frame_view

__all__ = ["LiveHub", "frames_dir", "geometry_summary", "read_records"]

#: Frame-record fields the page uses (the rest stays in the JSONL).
_FRAME_KEYS = ("frame", "t_source", "n_peaks", "median_snr", "background", "latency_ms", "queue_ms",
               "stages_ms", "flags", "probabilities", "actions", "phase", "truth", "beam_offset_px",
               "n_saturated_peaks")


def frames_dir(results: str | Path) -> Path:
    """Directory beside a results file where the live view saves frame images."""
    p = Path(results)
    return p.with_name(p.stem + ".frames")


def geometry_summary(g) -> dict:
    """JSON-ready description of an :class:`edge.Geometry` (for the run header)."""
    return {"shape": list(g.shape), "pixel_size_mm": g.pixel_size_mm, "distance_mm": g.distance_mm,
            "wavelength_A": g.wavelength_A, "beam_center": list(g.beam_center), "saturation": g.saturation}


def read_records(path: str | Path, offset: int = 0, max_bytes: int = -1) -> tuple[list[dict], int]:
    """Complete JSON lines of a results file from byte ``offset``.

    Reads at most ``max_bytes`` (-1: to the end). Returns the records and
    the offset after the last complete line (a line still being written, or a
    corrupt one, is skipped, never fatal).
    """
    out = []
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(max_bytes)
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out, offset + end


def _clean(o: Any):
    """JSON-safe copy: NaN/inf -> None (browsers reject them in JSON)."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if hasattr(o, "to_dict"):
        return _clean(o.to_dict())
    if hasattr(o, "item"):  # numpy scalars
        return _clean(o.item())
    return o


def _json(o: Any) -> str:
    return json.dumps(_clean(o), separators=(",", ":"))


def _with_encoded(obj: dict, key: str, items) -> str:
    """JSON of ``obj`` plus ``key``: a list of already encoded JSON values.

    Frame records are encoded once, when they arrive; a new page's snapshot
    of thousands of them is then a join, not a recursive clean-and-encode
    that held the GIL for tens of ms and made the loop drop a frame.
    """
    body = _json(obj)
    return body[:-1] + ("," if len(body) > 2 else "") + json.dumps(key) + ":[" + ",".join(items) + "]}"


def sse(event: str, data: dict | str) -> bytes:
    """One Server-Sent Event, encoded (``data``: a dict, or JSON text)."""
    text = data if isinstance(data, str) else _json(data)
    return f"event: {event}\ndata: {text}\n\n".encode()


class LiveHub:
    """Collects a run's records and frames and serves them as events.

    Parameters
    ----------
    header : dict, optional
        Run description (version, source, geometry, policy, limits, mode);
        a ``{"type": "run"}`` record seen later replaces it.
    state : callable, optional
        Returns the instrument state (``DeviceState`` or dict) or None; polled
        from the hub thread (e.g. ``bridge.state``, which reads a cache).
    history : int
        Frame records kept for a new client's snapshot.
    update_hz, image_hz : float
        Highest rates of data updates and frame images (images also keep
        their encoding below 10 % of one core).
    save_dir : path, optional
        Save an encoded frame here at most every ``save_every_s`` seconds
        (and the first frame of each new set of flags), for ``edge view``.
    max_saved : int
        Stop saving after this many frames.
    """

    def __init__(self, header: dict | None = None, *, state: Callable[[], Any] | None = None,
                 history: int = 3000, update_hz: float = 10.0, image_hz: float = 5.0,
                 save_dir: str | Path | None = None, save_every_s: float = 2.0, max_saved: int = 1000,
                 image_size: int = 768) -> None:
        self.header = dict(header or {})
        self.state_source = state
        self._update_dt = 1.0 / float(update_hz)
        self._image_dt = 1.0 / float(image_hz)
        self._image_size = int(image_size)
        self._save_dir = None if save_dir is None else Path(save_dir)
        self._save_every = float(save_every_s)
        self._max_saved = int(max_saved)
        self._saved: list[int] = []
        self._t_saved = -math.inf
        self._t_scan = -math.inf
        self._state_off = 0
        self._last_flags: tuple = ()
        # handed over by the pipeline (any thread)
        self._inbox: deque = deque(maxlen=100_000)
        self._latest: tuple | None = None
        # owned by the hub thread, read by clients under the lock
        self._cv = threading.Condition()
        self._frames: deque = deque(maxlen=int(history))
        self._frames_json: deque = deque(maxlen=int(history))  # the same records, encoded
        self._by_frame: dict[int, dict] = {}
        self._commands: deque = deque(maxlen=5000)
        self._drops: deque = deque(maxlen=int(history))
        self.dropped = 0
        self.errors = 0
        self._state: dict | None = None
        self._ended = False
        self.seq = 0
        self._events: deque = deque(maxlen=256)  # (seq, encoded update)
        self.image_version = 0
        self._image: dict | None = None
        self._image_event = b""
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._follow: tuple[Path, int] | None = None
        self._mode = "live"
        self.cpu_s = 0.0  # CPU time used by the hub thread (encoding, events)

    # ------------------------------------------------------------ pipeline side (references only)
    def record(self, rec: dict) -> None:
        """Take a logged record (called from any pipeline thread)."""
        self._inbox.append(rec)

    def frame(self, frame, record: dict, peaks, geometry) -> None:
        """Take the latest processed frame (called from the processing thread)."""
        self._latest = (frame, record, peaks, geometry)

    def end(self) -> None:
        """Mark the run as finished (the page says so)."""
        self._inbox.append({"type": "end"})

    # ------------------------------------------------------------ replay
    def follow(self, path: str | Path) -> "LiveHub":
        """Replay a results file, then keep reading lines appended to it."""
        self._mode = "replay"
        self._follow = (Path(path), 0)
        while True:  # in chunks: a long run's file is far larger than the inbox
            off = self._follow[1]
            self._poll_file()
            self._drain(publish=False)  # no page yet: pages start from a snapshot
            if self._follow[1] == off:
                return self

    def _poll_file(self) -> None:
        """Replay: new lines of the results file and newly saved frames."""
        if self._follow is None:
            return
        path, off = self._follow
        try:
            recs, off = read_records(path, off, max_bytes=8 << 20)
        except OSError:
            return
        self._follow = (path, off)
        self._inbox.extend(recs)
        states = frames_dir(path) / "state.jsonl"
        if states.is_file():
            with contextlib.suppress(OSError):
                recs, self._state_off = read_records(states, self._state_off)
                self._inbox.extend(recs)
        now = time.monotonic()
        if now - self._t_scan < 1.0:
            return
        self._t_scan = now
        d = frames_dir(path)
        saved = sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit()) if d.is_dir() else []
        if saved and saved != self._saved:
            self._saved = saved
            img = self.saved_frame(saved[-1])
            if img is not None:
                self._set_image(img)

    def saved_frame(self, index: int) -> dict | None:
        """A saved frame image (live or replay), or None."""
        base = self._save_dir if self._save_dir is not None else (
            frames_dir(self._follow[0]) if self._follow else None)
        if base is None or index not in self._saved:
            return None
        try:
            return json.loads((base / f"{index}.json").read_text())
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------ hub thread
    def start(self) -> "LiveHub":
        if self._thread is None:
            imaging.warm()  # here, not on the hub thread: a compile holds the GIL
            self._thread = threading.Thread(target=self._run, name="edge-web-hub", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        t_next = 0.0
        latest_done = None
        cpu0 = time.thread_time()
        while not self._stop.wait(self._update_dt):
            self.cpu_s = time.thread_time() - cpu0
            try:
                self._poll_file()
                self._drain()
                now = time.monotonic()
                latest = self._latest
                if latest is not None and latest is not latest_done and now >= t_next:
                    latest_done = latest
                    self._encode(*latest)
                    # at most image_hz, and encoding busy at most 10 % of the
                    # time (a 4M frame takes tens of ms on a small board)
                    t_next = now + max(self._image_dt, 10.0 * (time.monotonic() - now))
            except Exception as exc:  # the view must never take the run down
                self.errors += 1
                self.header.setdefault("web_errors", []).append(f"{type(exc).__name__}: {exc}")

    def _encode(self, frame, record, peaks, geometry) -> None:
        img = frame_view(frame, geometry, peaks, max_size=self._image_size)
        if not self.header.get("geometry"):  # file sources know it only from their first frame
            self.header["geometry"] = geometry_summary(geometry)
        img.update(frame=record["frame"], t_source=record["t_source"], n_peaks=record["n_peaks"],
                   flags=record["flags"])
        self._set_image(img)
        flags = tuple(record["flags"])
        now = time.monotonic()
        if (self._save_dir is not None and len(self._saved) < self._max_saved
                and (now - self._t_saved >= self._save_every or (flags and flags != self._last_flags))):
            self._save_dir.mkdir(parents=True, exist_ok=True)
            (self._save_dir / f"{record['frame']}.json").write_text(json.dumps(_clean(img)))
            self._saved.append(record["frame"])
            self._t_saved = now
        self._last_flags = flags

    def _set_image(self, img: dict) -> None:
        ev = sse("image", img)
        with self._cv:
            self._image, self._image_event = img, ev
            self.image_version += 1
            self._cv.notify_all()

    def _drain(self, publish: bool = True) -> None:
        """Move inbox records into the history; publish one update event."""
        frames, drops, cmds = [], [], []
        header_changed = False
        replayed: list[dict] = []
        while True:
            try:
                rec = self._inbox.popleft()
            except IndexError:
                break
            kind = rec.get("type")
            if kind == "frame":
                f = {k: rec[k] for k in _FRAME_KEYS if k in rec}
                frames.append(f)
            elif kind == "drop":
                drops.append({"frame": rec.get("frame"), "t_source": rec.get("t_source")})
            elif kind == "command":
                cmds.append(rec)
            elif kind == "error":
                cmds.append({**rec, "name": "(processing error)", "status": "error"})
            elif kind == "state":  # replay: a device state change the live view saved
                replayed.append(rec)
            elif kind == "end":
                self._ended = header_changed = True
            elif kind == "run":
                self.header.update({k: v for k, v in rec.items() if k != "type"})
                header_changed = True
        state = None
        if self.state_source is not None:
            try:
                st = self.state_source()
            except Exception:  # a vanished device is shown by the command log, not here
                st = None
            if st is not None:
                state = _clean(st)
                state = {**state, "source": "bridge"}
        if state is None and not replayed:
            for c in reversed(cmds):
                if c.get("state"):
                    state = {**_clean(c["state"]), "source": f"ack of frame {c.get('frame')}"}
                    break
        encoded = [_json(f) for f in frames]  # once per record, outside the lock
        with self._cv:
            for f, e in zip(frames, encoded):
                if len(self._frames) == self._frames.maxlen:
                    self._by_frame.pop(self._frames[0]["frame"], None)
                self._frames.append(f)
                self._frames_json.append(e)
                self._by_frame[f["frame"]] = f
            cmds = [self._with_evidence(c) for c in cmds]
            old = self._state
            for rec in replayed:  # in their order: each safe-state change is logged
                cmds.extend(self._state_change(self._state, rec["state"], rec))
                self._state = rec["state"]
            last = frames[-1] if frames else (self._frames[-1] if self._frames else {})
            if state is not None and state != self._state:
                cmds.extend(self._state_change(self._state, state, last))
                self._state = state
            state_changed = self._state != old
            state = self._state
            self._commands.extend(cmds)
            self._drops.extend(drops)
            self.dropped += len(drops)
            if not (frames or drops or cmds or state_changed or header_changed):
                return
            if not publish:
                self._events.clear()
                self.seq += 1  # a page that saw an older seq takes a new snapshot
                return
            upd = {"drops": drops, "commands": cmds, "dropped": self.dropped, "ended": self._ended}
            if state_changed:
                upd["state"] = state
            if header_changed:
                upd["header"] = self.header
            self.seq += 1
            self._events.append((self.seq, sse("update", _with_encoded(upd, "frames", encoded))))
            self._cv.notify_all()

    def _state_change(self, old: dict | None, new: dict, last: dict) -> list[dict]:
        """Log entry for the device entering / leaving its safe state (``last``:
        the frame record it happened after); live, saves the instrument's
        changes beside the results for ``edge view``."""
        key = ("safe_state", "shutter_open", "attenuation", "alarm_code")
        if old is not None and all(old.get(k) == new.get(k) for k in key):
            return []
        if self._save_dir is not None and self._follow is None:
            self._save_dir.mkdir(parents=True, exist_ok=True)
            rec = {"type": "state", "frame": last.get("frame"), "t_source": last.get("t_source"),
                   "state": {**new, "source": "bridge (saved by the live view)"}}
            with open(self._save_dir / "state.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps(_clean(rec)) + "\n")
        safe, was = bool(new.get("safe_state")), bool(old and old.get("safe_state"))
        if safe == was:
            return []
        text = (f"device entered its safe state: shutter closed, attenuation {new.get('attenuation')}, "
                f"alarm {new.get('alarm_code')}" if safe else "device left its safe state")
        return [{"type": "device", "frame": last.get("frame"), "name": "(device)", "rule": "device watchdog",
                 "status": "safe_state" if safe else "resumed", "reason": text,
                 "evidence": {"t_source": last.get("t_source")}}]

    def _with_evidence(self, cmd: dict) -> dict:
        """The command with the frame evidence behind it (flags, probabilities, peaks)."""
        f = self._by_frame.get(cmd.get("frame"))
        if f is None:
            return cmd
        ev = {k: f[k] for k in ("t_source", "flags", "probabilities", "n_peaks", "median_snr", "beam_offset_px",
                                "n_saturated_peaks") if k in f}
        return {**cmd, "evidence": ev}

    # ------------------------------------------------------------ client side
    def snapshot(self) -> dict:
        """Everything a new page needs (also what ``edge report`` embeds)."""
        with self._cv:
            return {**self._snapshot_rest(), "frames": list(self._frames)}

    def snapshot_json(self) -> tuple[str, int, int]:
        """:meth:`snapshot` as JSON text, from the records encoded on arrival;
        with its ``seq`` and ``image_version``."""
        with self._cv:
            rest, frames = self._snapshot_rest(), list(self._frames_json)
        return _with_encoded(rest, "frames", frames), rest["seq"], rest["image_version"]

    def _snapshot_rest(self) -> dict:
        return {"header": self.header, "mode": self._mode, "drops": list(self._drops), "dropped": self.dropped,
                "commands": list(self._commands), "state": self._state, "ended": self._ended,
                "saved_frames": list(self._saved), "image": self._image, "seq": self.seq,
                "image_version": self.image_version}

    def wait(self, seq: int, image_version: int, timeout: float) -> tuple[list[bytes] | None, bytes | None, int, int]:
        """Block until something newer than ``seq``/``image_version`` (or timeout).

        Returns ``(updates, image, seq, image_version)``; ``updates`` is None
        when the client fell so far behind that it needs a new snapshot.
        """
        with self._cv:
            self._cv.wait_for(lambda: self.seq > seq or self.image_version > image_version
                              or self._stop.is_set(), timeout)
            updates: list[bytes] | None = []
            if self.seq > seq:
                if not self._events or self._events[0][0] > seq + 1:
                    updates = None
                else:
                    updates = [ev for s, ev in self._events if s > seq]
            image = self._image_event if self.image_version > image_version else None
            return updates, image, self.seq, self.image_version
