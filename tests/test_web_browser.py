"""The live view in a real headless browser (Debian's chromium + chromedriver via
selenium): a scripted run through a real pty to the emulator, the page
following it, the device's safe state, ``edge view`` and ``edge report``.

Screenshots are kept as artefacts in ``$EDGE_TEST_ARTEFACTS`` (default: a
pytest temporary directory; the paths are printed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

import firmware_bridge as fb
from edge.cli import main as edge_main
from edge.pipeline import Pipeline
from edge.policy import Policy
from edge.sources import open_source
from edge.web import LiveHub, WebServer, frames_dir
from firmware_bridge.emulator import start_pty_emulator

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

SCENARIO = """
name = "web test"
n_frames = 90
[[phases]]
name = "saturation"
start = 30
end = 60
labels = ["saturation"]
sim = { overload = 1000.0 }
"""


def _need_browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        msg = f"browser tests need {', '.join(missing)} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI installs them: a skip there would hide a broken page
        pytest.skip(msg)


@pytest.fixture(scope="module")
def browser():
    _need_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="edge-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1500,1250"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    d = Path(os.environ.get("EDGE_TEST_ARTEFACTS") or tmp_path_factory.mktemp("screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def model():
    from edge.anomaly import AnomalyModel

    m = AnomalyModel.load()
    m.warmup()
    return m


def _wait(what, cond, timeout=60.0):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _text(driver, css):
    from selenium.webdriver.common.by import By

    els = driver.find_elements(By.CSS_SELECTOR, css)
    return els[0].text if els else ""


def _lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _header(model, results):
    return {"version": "test", "source": "scenario:web-test.toml", "policy": "shipped", "limits": "shipped",
            "dry_run": False, "port": "emulator", "results": str(results), "t_wall": time.time(),
            "t_perf": time.perf_counter(), "classes": list(model.classes),
            "thresholds": dict(zip(model.classes, map(float, model.thresholds)))}


def _screenshot(driver, artefacts, name):
    path = artefacts / name
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


@pytest.fixture(scope="module")
def live_run(browser, model, tmp_path_factory, artefacts):
    """A short scripted run (saturation at frames 30-59) watched live by the browser."""
    from selenium.webdriver.common.by import By

    tmp = tmp_path_factory.mktemp("live")
    scen = tmp / "web-test.toml"
    scen.write_text(SCENARIO)
    results = tmp / "run.jsonl"
    emu = start_pty_emulator(applied_log=str(tmp / "applied.jsonl"))
    seen = []
    try:
        with fb.connect(emu.port) as bridge:
            bridge.send("set_attenuation", level=4)
            bridge.send("open_shutter")
            policy = Policy.from_toml()
            policy.on_ack(bridge.state())
            hub = LiveHub(_header(model, results), state=bridge.state, save_dir=frames_dir(results)).start()
            try:
                with WebServer(hub, "127.0.0.1", 0) as srv:
                    browser.get(srv.url)
                    _wait("the page to connect", lambda: _text(browser, "#conn") == "live")
                    source = open_source(f"scenario:{scen}", rate_hz=20.0, layout="1m")
                    # paced like a detector, but waiting instead of dropping: every frame is processed
                    pipe = Pipeline(source, model=model, policy=policy, bridge=bridge, results=results,
                                    observer=hub, header=hub.header, block_source=True)
                    t = threading.Thread(target=pipe.run, daemon=True)
                    t.start()
                    while t.is_alive():
                        seen.append(_text(browser, "#frame-no"))
                        time.sleep(0.1)
                    t.join()
                    hub.end()
                    _wait("the page to show the end of the run", lambda: "run ended" in _text(browser, "#summary"))
                    time.sleep(0.5)  # the last image event
                    shot = _screenshot(browser, artefacts, "live-run.png")
                    markers = browser.find_elements(By.CSS_SELECTOR, "#peak-markers circle.peak")
                    page = {
                        "frame": int(_text(browser, "#frame-no")),
                        "markers": len(markers),
                        "marker_frame": int(browser.find_element(By.ID, "peak-markers").get_attribute("data-frame")),
                        "peaks_text": _text(browser, "#frame-peaks"),
                        "rows": [(r.get_attribute("data-frame"), r.get_attribute("data-status"), r.text)
                                 for r in browser.find_elements(By.CSS_SELECTOR, "#cmdlog tr[data-frame]")],
                        "state": _text(browser, "#state"),
                        "plots": len(browser.find_elements(By.CSS_SELECTOR, ".plots .uplot")),
                    }
            finally:
                hub.stop()
    finally:
        emu.stop()
    return {"results": results, "seen": seen, "page": page, "screenshot": shot, "records": _lines(results)}


def test_page_follows_the_run(live_run):
    records = live_run["records"]
    frames = {r["frame"]: r for r in records if r["type"] == "frame"}
    assert records[0]["type"] == "run" and len(frames) == 90
    shown = [int(s) for s in live_run["seen"] if s.isdigit()]
    assert len(set(shown)) >= 2 and shown == sorted(shown), shown  # the counter advanced, never back
    page = live_run["page"]
    assert page["plots"] == 8
    assert "normal operation" in page["state"] and "OPEN" in page["state"]


def test_peak_markers_match_the_frame_record(live_run):
    page = live_run["page"]
    frames = {r["frame"]: r for r in live_run["records"] if r["type"] == "frame"}
    assert page["marker_frame"] == page["frame"]
    n = frames[page["frame"]]["n_peaks"]
    assert n > 50 and page["markers"] == n and page["peaks_text"] == str(n)


def test_flagged_frame_command_and_evidence_in_the_log(live_run):
    commands = [r for r in live_run["records"] if r["type"] == "command"]
    sat = [c for c in commands if c["rule"] == "saturation"]
    assert sat and all(c["status"] == "ok" for c in sat)
    rows = live_run["page"]["rows"]
    assert len(rows) == len(commands)
    for c in sat:
        row = [text for f, st, text in rows if f == str(c["frame"]) and st == "ok"]
        assert row, (c, rows)
        text = row[0]
        # rule, command with its arguments, the evidence (flag and probability), the outcome with its round trip
        assert f"set_attenuation(level={c['args']['level']})" in text and "saturation" in text
        assert "flags: saturation 0." in text or "flags: saturation 1." in text
        assert "acked, round trip" in text


def test_safe_state_is_shown_when_the_device_enters_it(browser, artefacts, tmp_path):
    from selenium.webdriver.common.by import By

    emu = start_pty_emulator()
    try:
        # no heartbeats: the device's watchdog puts it into its safe state
        with fb.connect(emu.port, heartbeat_interval=None, watchdog_ms=1500) as bridge:
            bridge.send("open_shutter")
            hub = LiveHub({"version": "test", "dry_run": False}, state=bridge.state).start()
            try:
                with WebServer(hub, "127.0.0.1", 0) as srv:
                    browser.get(srv.url)
                    _wait("the device state", lambda: _text(browser, "#safe-state"))
                    _wait("safe-state telemetry", lambda: bridge.state().safe_state, timeout=30)
                    banner = _wait("the safe-state banner",
                                   lambda: [b for b in browser.find_elements(By.ID, "safe-banner") if b.is_displayed()])
                    text = banner[0].text
                    _screenshot(browser, artefacts, "safe-state.png")
                    assert "DEVICE IN SAFE STATE" in text and "attenuation 15" in text
                    assert "SAFE STATE ACTIVE" in _text(browser, "#safe-state")
                    _wait("the safe-state entry in the log",
                          lambda: browser.find_elements(By.CSS_SELECTOR, '#cmdlog tr[data-status="safe_state"]'))
                    assert "safe" in browser.find_element(By.TAG_NAME, "body").get_attribute("class")
            finally:
                hub.stop()
    finally:
        emu.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_edge_view_serves_a_recorded_run(live_run, browser, artefacts):
    from selenium.webdriver.common.by import By

    port = _free_port()
    rc = {}
    t = threading.Thread(target=lambda: rc.setdefault("rc", edge_main(
        ["view", str(live_run["results"]), "--web", f"127.0.0.1:{port}", "--duration", "60"])), daemon=True)
    t.start()
    _wait("edge view to listen", lambda: _connectable(port), timeout=30)
    browser.get(f"http://127.0.0.1:{port}/")
    _wait("the replay", lambda: "replay" in _text(browser, "#summary"))
    commands = [r for r in live_run["records"] if r["type"] == "command"]
    _wait("the command log", lambda: len(browser.find_elements(By.CSS_SELECTOR, "#cmdlog tr[data-frame]"))
          == len(commands))
    _wait("a saved frame", lambda: _text(browser, "#frame-no").isdigit())
    _screenshot(browser, artefacts, "view.png")
    shown = int(_text(browser, "#frame-no"))
    saved = sorted(int(p.stem) for p in frames_dir(live_run["results"]).glob("*.json"))
    assert shown == saved[-1]
    frames = {r["frame"]: r for r in live_run["records"] if r["type"] == "frame"}
    assert len(browser.find_elements(By.CSS_SELECTOR, "#peak-markers circle.peak")) == frames[shown]["n_peaks"]
    assert "scenario:web-test.toml" in _text(browser, "#hdr-source")


def _connectable(port) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_edge_report_opens_with_no_network(live_run, browser, artefacts, tmp_path):
    from selenium.webdriver.common.by import By

    out = tmp_path / "report.html"
    assert edge_main(["report", str(live_run["results"]), "-o", str(out)]) == 0
    html = out.read_text()
    assert "<script src=" not in html and "<link rel=\"stylesheet\"" not in html
    # the only addresses in it: the SVG namespace and uPlot's licence banner (neither is fetched)
    assert set(re.findall(r"https?://[^\s\"')]+", html)) <= {"http://www.w3.org/2000/svg",
                                                          "https://github.com/leeoniya/uPlot"}
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                            {"offline": True, "latency": 0, "downloadThroughput": 0, "uploadThroughput": 0})
    try:
        browser.get(out.as_uri())
        _wait("the plots", lambda: len(browser.find_elements(By.CSS_SELECTOR, ".plots .uplot")) == 8)
        _wait("the frame", lambda: _text(browser, "#frame-no").isdigit())
        _screenshot(browser, artefacts, "report.png")
        resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [r for r in resources if not r.startswith("data:")] == []  # nothing fetched
        commands = [r for r in live_run["records"] if r["type"] == "command"]
        assert len(browser.find_elements(By.CSS_SELECTOR, "#cmdlog tr[data-frame]")) == len(commands)
        shown = int(_text(browser, "#frame-no"))
        frames = {r["frame"]: r for r in live_run["records"] if r["type"] == "frame"}
        assert len(browser.find_elements(By.CSS_SELECTOR, "#peak-markers circle.peak")) == frames[shown]["n_peaks"]
    finally:
        browser.execute_cdp_cmd("Network.emulateNetworkConditions",
                                {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
