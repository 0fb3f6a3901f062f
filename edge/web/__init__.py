"""Live web view of a run: ``edge run --web``, ``edge view``, ``edge report``.

:class:`LiveHub` watches a :class:`edge.pipeline.Pipeline` (it is the
pipeline's ``observer``: the processing thread only hands it references) or
replays a results file; :class:`WebServer` serves it read-only over HTTP with
Server-Sent Events; :func:`write_report` writes one self-contained HTML file.
Scripts and styles ship in ``edge/web/static`` (uPlot, MIT licence, vendored):
the page never loads anything from the internet.
"""

from .hub import LiveHub, frames_dir, geometry_summary, read_records
from .imaging import frame_view
from .report import render_report, write_report
from .server import WebConfigError, WebServer, is_loopback, new_token, parse_bind

__all__ = ["LiveHub", "WebServer", "WebConfigError", "frame_view", "frames_dir", "geometry_summary", "is_loopback",
           "new_token", "parse_bind", "read_records", "render_report", "write_report"]
