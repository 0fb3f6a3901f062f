"""``edge report``: one self-contained HTML file for the logbook.

The live page with its scripts, style sheets and data inlined: it opens from
disk with no network and no server. Frames saved by the run's live view
(``run-<time>.frames/``) are embedded too, at most ``max_images`` of them
(flagged frames first, then evenly spaced).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from .hub import LiveHub, _clean
from .server import static_file

__all__ = ["render_report", "write_report"]


def _inline(html: str) -> str:
    def css(m):
        return "<style>\n" + static_file(m.group(1)).decode() + "\n</style>"

    def js(m):
        return "<script>\n" + _script_safe(static_file(m.group(1)).decode()) + "\n</script>"

    html = re.sub(r'<link rel="stylesheet" href="static/([\w.\-]+)">', css, html)
    return re.sub(r'<script src="static/([\w.\-]+)"></script>', js, html)


def _script_safe(text: str) -> str:
    # a literal "</script" inside a script element would end it early
    return text.replace("</script", "<\\/script")


def _json_safe(text: str) -> str:
    # the same for the embedded JSON, with escapes JSON itself accepts
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def _pick(saved: list[int], flagged: set[int], n: int) -> list[int]:
    if len(saved) <= n:
        return list(saved)
    first = [i for i in saved if i in flagged][: n // 2]
    rest = [i for i in saved if i not in first]
    step = max(1, len(rest) // max(1, n - len(first)))
    return sorted(set(first + rest[::step][: n - len(first)] + [saved[-1]]))


def render_report(results: str | Path, *, max_images: int = 24, max_frames: int = 20_000) -> str:
    """The report page for a results file, as one HTML string.

    Plots cover the last ``max_frames`` frame records (about 8 MB of data);
    the command log, drops and header cover the whole run.
    """
    hub = LiveHub(history=max_frames).follow(results)
    snap = hub.snapshot()
    flagged = {f["frame"] for f in snap["frames"] if f.get("flags")}
    images = {}
    for i in _pick(snap["saved_frames"], flagged, max_images):
        img = hub.saved_frame(i)
        if img is not None:
            images[str(i)] = img
    snap["saved_frames"] = sorted(int(k) for k in images)
    if images:
        snap["image"] = images[str(snap["saved_frames"][-1])]
    data = {"snapshot": _clean(snap), "images": images, "generated": time.strftime("%Y-%m-%d %H:%M:%S")}
    payload = _json_safe(json.dumps(data, separators=(",", ":")))
    html = _inline(static_file("index.html").decode())
    html = html.replace("<title>xray-edge live view</title>",
                        f"<title>xray-edge report: {Path(results).name}</title>")
    marker = "<script>\n"  # the first inlined script (uPlot); the data goes before it
    at = html.index(marker)
    return html[:at] + f'<script type="application/json" id="edge-data">{payload}</script>\n' + html[at:]


def write_report(results: str | Path, out: str | Path, *, max_images: int = 24) -> Path:
    """Write :func:`render_report` to ``out``; returns its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(results, max_images=max_images), encoding="utf-8")
    return out
