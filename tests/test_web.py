"""The live view without a browser: access control, read-only endpoints,
slow clients, replay of results files, frame images, CLI mistakes."""

from __future__ import annotations

import http.client
import io
import json
import socket
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edge
import firmware_bridge as fb
from edge.cli import main as edge_main
from edge.web import LiveHub, WebConfigError, WebServer, frame_view, parse_bind, read_records
from edge.web.imaging import MASKED, downsample_max, encode_png_gray8
from firmware_bridge.emulator import start_pty_emulator

ENDPOINTS = ["/", "/index.html", "/static/app.js", "/static/uPlot.iife.min.js", "/static/uPlot.min.css",
             "/static/app.css", "/api/snapshot", "/api/frame?n=0", "/events", "/nothing"]


def _request(port, method, path, headers=None, read=True):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request(method, path, headers=headers or {})
    r = c.getresponse()
    body = r.read() if read and (r.status != 200 or not path.startswith("/events")) else b""
    status, hdrs = r.status, dict(r.getheaders())
    c.close()
    return status, hdrs, body


def _frame_record(i, n_peaks=3):
    return {"type": "frame", "frame": i, "t_source": 1.0 + i / 100, "n_peaks": n_peaks, "median_snr": 8.0,
            "background": 2.0, "latency_ms": 5.0, "stages_ms": {"total": 4.0}, "flags": [], "probabilities": {},
            "actions": []}


# --------------------------------------------------------------------------- binding
def test_non_local_bind_without_token_is_refused():
    hub = LiveHub()
    for host in ("0.0.0.0", "192.0.2.1", "::", "example.org"):
        with pytest.raises(WebConfigError, match="without an access token"):
            WebServer(hub, host, 0)


def test_parse_bind():
    assert parse_bind("8080") == ("127.0.0.1", 8080)
    assert parse_bind("0.0.0.0:9000") == ("0.0.0.0", 9000)
    assert parse_bind("[::1]:81") == ("::1", 81)
    for bad in ("http", "1.2.3.4:99999", ":80", "-1"):
        with pytest.raises(WebConfigError):
            parse_bind(bad)


@pytest.mark.parametrize("argv", [
    ["run", "--web", "notaport", "--frames", "5", "--no-model", "--dry-run"],
    ["run", "--web", "127.0.0.1:70000", "--frames", "5", "--no-model", "--dry-run"],
    ["view", "/no/such/run.jsonl"],
    ["report", "/no/such/run.jsonl", "-o", "/tmp/x.html"],
])
def test_cli_mistakes_exit_2_with_one_line(argv, capsys):
    assert edge_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edge "), err


def test_cli_busy_port_exits_2_before_warmup(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        rc = edge_main(["run", "--web", f"127.0.0.1:{port}", "--frames", "5", "--no-model", "--dry-run",
                        "--results", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert rc == 2 and "warming up" not in err and f"--web 127.0.0.1:{port}" in err


# --------------------------------------------------------------------------- access
@pytest.fixture
def served():
    hub = LiveHub({"version": "test"}).start()
    hub.record(_frame_record(0))
    srv = WebServer(hub, "127.0.0.1", 0, token="s3cret-token").start()
    yield hub, srv
    srv.close()
    hub.stop()


def test_request_without_token_gets_403(served):
    _, srv = served
    for path in ENDPOINTS:
        for q in ("", "?token=wrong", "?token="):
            sep = "&" if "?" in path and q else ""
            full = path + (q.replace("?", sep) if sep else q)
            status, _, body = _request(srv.port, "GET", full)
            assert status == 403 and b"token" in body, (full, status)
        status, _, _ = _request(srv.port, "GET", path, {"Cookie": "edge_token=wrong"})
        assert status == 403


def test_token_in_query_or_cookie_is_accepted(served):
    _, srv = served
    status, hdrs, body = _request(srv.port, "GET", "/?token=s3cret-token")
    assert status == 200 and b"<canvas" in body
    cookie = hdrs["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, _, body = _request(srv.port, "GET", "/api/snapshot", {"Cookie": cookie.split(";")[0]})
    assert status == 200 and json.loads(body)["header"]["version"] == "test"
    assert srv.url.endswith("/?token=s3cret-token")


def test_loopback_without_token_checks_the_host_header():
    hub = LiveHub()
    with WebServer(hub, "127.0.0.1", 0) as srv:
        assert _request(srv.port, "GET", "/")[0] == 200
        # DNS rebinding: a foreign name pointing at 127.0.0.1 must not read the page
        assert _request(srv.port, "GET", "/", {"Host": "evil.example:80"})[0] == 403


def test_no_endpoint_changes_state(tmp_path):
    """Every method on every path: nothing reaches the device, the hub or the results."""
    emu = start_pty_emulator()
    try:
        with fb.connect(emu.port) as bridge:
            bridge.send("open_shutter")
            hub = LiveHub({"version": "test"}, state=bridge.state).start()
            hub.record(_frame_record(0))
            with WebServer(hub, "127.0.0.1", 0) as srv:
                time.sleep(0.3)
                before = (len(emu.applied), emu.state["shutter_open"], hub.snapshot()["frames"])
                for path in ENDPOINTS:
                    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
                        status, hdrs, body = _request(srv.port, method, path,
                                                      {"Content-Type": "application/json"})
                        assert status == 405 and hdrs["Allow"] == "GET, HEAD", (method, path)
                    if path != "/events":
                        assert _request(srv.port, "GET", path)[0] in (200, 404)
                after = (len(emu.applied), emu.state["shutter_open"], hub.snapshot()["frames"])
                assert after == before
            hub.stop()
    finally:
        emu.stop()


def test_static_files_cannot_escape_the_package(served):
    _, srv = served
    for path in ("/static/../hub.py", "/static/..%2Fhub.py", "/static/.hidden", "/static/"):
        assert _request(srv.port, "GET", path + "?token=s3cret-token")[0] == 404


# --------------------------------------------------------------------------- streaming
def _sse_events(sock_file, n, timeout=10.0):
    """Read n events (name, data) from an SSE stream."""
    events, name, data = [], None, []
    t_end = time.monotonic() + timeout
    while len(events) < n and time.monotonic() < t_end:
        line = sock_file.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and name:
            events.append((name, json.loads("".join(data))))
            name, data = None, []
    return events


def test_events_stream_snapshot_then_updates_and_a_stalled_client_costs_nothing():
    hub = LiveHub({"version": "t"}, update_hz=50).start()
    with WebServer(hub, "127.0.0.1", 0, write_timeout=1.0) as srv:
        # a client that connects and never reads
        stalled = socket.create_connection(("127.0.0.1", srv.port))
        stalled.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        reader = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        reader.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        f = reader.makefile("rb")
        while f.readline() not in (b"\r\n", b"\n"):  # response headers
            pass
        name, snap = _sse_events(f, 1)[0]
        assert name == "snapshot" and snap["header"]["version"] == "t"
        # big records: the stalled client's socket buffer fills up
        for i in range(3000):
            rec = _frame_record(i)
            rec["truth"] = ["x" * 2000]
            hub.record(rec)
        got = []
        while not got or got[-1] != 2999:
            evs = _sse_events(f, 1)
            assert evs, "stream stopped"
            name, data = evs[0]
            frames = data["frames"] if name == "update" else data["frames"] if name == "snapshot" else []
            got.extend(fr["frame"] for fr in frames)
        assert sorted(set(got))[-1] == 2999
        stalled.close()
        reader.close()
    hub.stop()


# --------------------------------------------------------------------------- replay
def test_read_records_skips_a_half_written_or_corrupt_line(tmp_path):
    p = tmp_path / "run.jsonl"
    p.write_bytes(b'{"type":"run","version":"x"}\n{"type":"frame"\x00\xff}\n{"type":"drop","frame":3}\n{"type":"fr')
    recs, off = read_records(p)
    assert [r["type"] for r in recs] == ["run", "drop"]
    with open(p, "ab") as fh:
        fh.write(b'ame","frame":4}\n')
    recs, off2 = read_records(p, off)
    assert [r["type"] for r in recs] == ["frame"] and off2 == p.stat().st_size


def test_replay_builds_the_snapshot_with_evidence(tmp_path):
    p = tmp_path / "run.jsonl"
    recs = [{"type": "run", "version": "9", "dry_run": True}, _frame_record(0), _frame_record(1),
            {"type": "drop", "frame": 2, "t_source": 1.02},
            {"type": "command", "frame": 1, "name": "set_attenuation", "args": {"level": 5}, "rule": "saturation",
             "reason": "saturation", "status": "rejected", "error": "SafeStateActive: in safe state",
             "state": {"safe_state": True, "attenuation": 15}}]
    recs[2]["flags"] = ["saturation"]
    recs[2]["probabilities"] = {"saturation": 0.93}
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    snap = LiveHub().follow(p).snapshot()
    assert snap["mode"] == "replay" and snap["header"]["version"] == "9" and snap["dropped"] == 1
    assert [f["frame"] for f in snap["frames"]] == [0, 1]
    cmd = snap["commands"][0]
    assert cmd["evidence"]["flags"] == ["saturation"] and cmd["evidence"]["probabilities"]["saturation"] == 0.93
    assert snap["state"]["safe_state"] is True and "ack of frame 1" in snap["state"]["source"]


# --------------------------------------------------------------------------- images
def _ref_block_max(frame, valid, f):
    ny, nx = frame.shape
    out = np.full((-(-ny // f), -(-nx // f)), np.nan, dtype=np.float32)
    for by in range(out.shape[0]):
        for bx in range(out.shape[1]):
            blk = frame[by * f:(by + 1) * f, bx * f:(bx + 1) * f].astype(np.float64)
            ok = valid[by * f:(by + 1) * f, bx * f:(bx + 1) * f] & np.isfinite(blk) & (blk >= 0)
            if frame.dtype.kind == "u":  # the dtype maximum marks gaps (EIGER)
                ok &= blk != np.iinfo(frame.dtype).max
            if ok.any():
                out[by, bx] = blk[ok].max()
    return out


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from([np.int32, np.uint16, np.uint32, np.float32, np.float64]),
       ny=st.integers(1, 30), nx=st.integers(1, 30), factor=st.integers(1, 7), seed=st.integers(0, 2**16),
       masked=st.floats(0.0, 1.0))
def test_downsample_max_matches_reference(dtype, ny, nx, factor, seed, masked):
    rng = np.random.default_rng(seed)
    frame = rng.integers(-2, 500, size=(ny, nx)).astype(dtype)  # -1/-2 wrap to the dtype max if unsigned
    if np.dtype(dtype).kind == "f":
        frame.flat[rng.integers(0, frame.size, 2)] = [np.nan, np.inf]
    valid = rng.random((ny, nx)) >= masked
    got = downsample_max(frame, valid, factor)
    np.testing.assert_array_equal(got, _ref_block_max(frame, valid, factor))


def test_png_decodes_to_the_same_pixels():
    PIL = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(0).integers(0, 256, size=(37, 51), dtype=np.uint8)
    back = np.asarray(PIL.open(io.BytesIO(encode_png_gray8(img))))
    np.testing.assert_array_equal(back, img)
    with pytest.raises(ValueError):
        encode_png_gray8(np.zeros((0, 4), np.uint8))


def test_frame_view_marks_masked_blocks_peaks_and_rings():
    from edge.sim import simulate

    PIL = pytest.importorskip("PIL.Image")
    import base64

    sf = simulate(layout="1m", seed=1)
    peaks = edge.find_peaks(sf.frame, geometry=sf.geometry)
    v = frame_view(sf.frame, sf.geometry, peaks, max_size=400)
    img = np.asarray(PIL.open(io.BytesIO(base64.b64decode(v["png"]))))
    f = v["factor"]
    assert f == 3 and img.shape == (-(-1065 // f), -(-1030 // f))
    ref = _ref_block_max(sf.frame, sf.geometry.valid, f)
    np.testing.assert_array_equal(img == MASKED, np.isnan(ref))  # gaps and masked regions
    assert len(v["peaks"]["x"]) == len(peaks) > 50
    for ring in v["rings"]:  # labelled radius is where the resolution map has that d
        r = ring["r"]
        assert abs(float(sf.geometry.d_spacing(r)) - ring["d"]) < 1e-3 * ring["d"]  # r rounded to 0.1 px


def test_edge_run_with_web_writes_the_header_and_serves(tmp_path, capsys):
    results = tmp_path / "run.jsonl"
    rc = edge_main(["run", "--source", "sim", "--frames", "20", "--rate", "max", "--no-model", "--dry-run", "--quiet",
                    "--web", "127.0.0.1:0", "--results", str(results)])
    err = capsys.readouterr().err
    assert rc == 0 and "live view (read-only) at http://127.0.0.1:" in err
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    head = lines[0]
    assert head["type"] == "run" and head["dry_run"] is True and head["geometry"]["shape"] == [1065, 1030]
    frames = [r for r in lines if r["type"] == "frame"]
    assert len(frames) == 20 and all(r["background"] > 0 for r in frames)


def test_hub_rates_are_bounded_however_fast_frames_come():
    """Images at most image_hz, updates at most update_hz (a slower machine only means fewer)."""
    from edge.sim import simulate

    sf = simulate(layout="1m", seed=2)
    peaks = edge.find_peaks(sf.frame, geometry=sf.geometry)
    hub = LiveHub(image_hz=5, update_hz=10).start()
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 1.5:
        rec = _frame_record(i, n_peaks=len(peaks))
        hub.record(rec)
        hub.frame(sf.frame, rec, peaks, sf.geometry)  # a new reference every time
        i += 1
        time.sleep(0.001)
    t_end = time.monotonic() + 30
    while len(hub.snapshot()["frames"]) < i and time.monotonic() < t_end:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    hub.stop()
    assert i > 100
    assert 1 <= hub.image_version <= int(elapsed * 5) + 2
    assert 1 <= hub.seq <= int(elapsed * 10) + 2
    snap = hub.snapshot()
    assert len(snap["frames"]) == i  # every record kept, only the pictures are sampled
    assert snap["image"]["n_peaks"] == len(peaks) == len(snap["image"]["peaks"]["x"])


def test_live_state_changes_are_saved_and_replayed(tmp_path):
    """Safe state entered and left during a run: logged live, saved, logged again by edge view."""
    states = iter([{"safe_state": False, "attenuation": 4, "shutter_open": True, "alarm_code": 0}] * 2
                  + [{"safe_state": True, "attenuation": 15, "shutter_open": False, "alarm_code": 65535}] * 2
                  + [{"safe_state": False, "attenuation": 15, "shutter_open": False, "alarm_code": 0}])
    current = {}

    def state():
        current.update(next(states, current))
        return dict(current)

    results = tmp_path / "run.jsonl"
    results.write_text("".join(json.dumps(_frame_record(i)) + "\n" for i in range(3)))
    hub = LiveHub(state=state, save_dir=tmp_path / "run.frames")
    for i in range(5):
        hub.record(_frame_record(i))
        hub._drain()  # one hub cycle, run here so the test needs no timing
    live = [(c["status"], c["frame"]) for c in hub.snapshot()["commands"]]
    assert live == [("safe_state", 2), ("resumed", 4)]
    replay = LiveHub().follow(results).snapshot()
    assert [(c["status"], c["frame"]) for c in replay["commands"]] == live
    assert replay["state"]["safe_state"] is False and replay["state"]["attenuation"] == 15


def test_replay_of_a_long_run_keeps_its_header_and_every_command(tmp_path):
    """More records than the hub's inbox holds (100,000): read and drained in chunks."""
    p = tmp_path / "run.jsonl"
    line = json.dumps(_frame_record(0))
    lines = [json.dumps({"type": "run", "version": "long"})]
    for i in range(110_000):
        lines.append(line.replace('"frame": 0,', f'"frame": {i},', 1))
        if i % 10_000 == 0:
            lines.append(json.dumps({"type": "command", "frame": i, "name": "raise_alarm", "args": {},
                                     "rule": "r", "status": "ok"}))
    p.write_text("\n".join(lines) + "\n")
    snap = LiveHub(history=1000).follow(p).snapshot()
    assert snap["header"]["version"] == "long" and len(snap["commands"]) == 11
    assert [f["frame"] for f in snap["frames"]] == list(range(109_000, 110_000))


@settings(max_examples=40, deadline=None)
@given(vmax=st.sampled_from([1.0, 255.0, 65535.0, 1.0e6]), seed=st.integers(0, 2**16), integral=st.booleans())
def test_log_levels_match_the_log_formula(vmax, seed, integral):
    from edge.web.imaging import LEVELS, _levels

    rng = np.random.default_rng(seed)
    blocks = (rng.random((17, 23)) * rng.choice([2.0, 300.0, 3.0e6])).astype(np.float32)
    if integral:
        blocks = np.floor(blocks)
    blocks[rng.random(blocks.shape) < 0.2] = -1.0  # no valid pixel
    img, n_masked = _levels(blocks, vmax)
    b = blocks.astype(np.float64)
    ref = np.where(b < 0, MASKED, np.floor(np.log1p(np.clip(b, 0.0, vmax)) * (LEVELS / np.log1p(vmax)) + 0.5))
    assert n_masked == int((b < 0).sum())
    np.testing.assert_array_equal(img == MASKED, b < 0)
    assert np.abs(img.astype(int) - ref.astype(int)).max() <= 1  # libm vs NumPy log1p at a .5 boundary
    assert (img == ref).mean() > 0.99


def test_snapshot_json_is_the_snapshot():
    """The pre-encoded snapshot a page receives equals the dict snapshot, cleaned."""
    from edge.web.hub import _clean

    hub = LiveHub({"version": "t"})
    for i in range(25):
        hub.record({"type": "frame", "frame": i, "t_source": i / 10, "n_peaks": i, "flags": [],
                    "probabilities": {"blank": 0.1}, "latency_ms": 1.0, "median_snr": float("nan") if i == 3 else 5.0,
                    "stages_ms": {"total": 1.0}})
    hub.record({"type": "drop", "frame": 25, "t_source": 2.5})
    hub._drain()
    text, seq, iv = hub.snapshot_json()
    assert json.loads(text) == json.loads(json.dumps(_clean(hub.snapshot())))
    assert (seq, iv) == (hub.seq, hub.image_version) and json.loads(text)["frames"][3]["median_snr"] is None
    empty = LiveHub()
    assert json.loads(empty.snapshot_json()[0])["frames"] == []
