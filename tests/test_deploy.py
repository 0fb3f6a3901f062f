"""Running as a service: site file, systemd unit, udev rule, run header and
summary records, SIGTERM, results rotation, the Numba cache location, the
start-up warm-up (per source dtype) and argument errors before any compilation."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import edge
from edge.deploy import cache
from edge.deploy.runs import file_digest, new_results_path, prune_runs, run_header
from edge.deploy.service import example_site, install, udev_rule, unit_text
from edge.deploy.site import SiteConfigError, load_site
from edge.pipeline import Pipeline
from edge.sources import SimulatorSource, open_source

REPO = Path(__file__).resolve().parents[1]
EDGE = [sys.executable, "-m", "edge.cli"]


def _env(**kw) -> dict:
    env = dict(os.environ, GOMP_SPINCOUNT="0", PYTHONPATH=str(REPO))
    env.update(kw)
    return env


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------- site file
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def site_dir(tmp_path):
    (tmp_path / "policy.toml").write_bytes((REPO / "edge" / "policy_default.toml").read_bytes())
    (tmp_path / "limits.toml").write_bytes((REPO / "firmware_bridge" / "limits.toml").read_bytes())
    return tmp_path


FULL_SITE = """
[source]
spec = "sim:1m"
rate = 50
loop = false
layout = "1m"

[geometry]
beam_center = [500.5, 510]
distance_mm = 120
wavelength_A = 0.9

[device]
port = "usb:2e8a:000A:E661"
dry_run = true

[policy]
file = "policy.toml"
limits = "limits.toml"

[model]
enabled = false
threads = 2

[processing]
threads = 1
queue_size = 8

[results]
dir = "runs"
keep = 5

[web]
bind = "127.0.0.1:8080"
"""


def test_site_file_parses_every_section(site_dir):
    site = load_site(_write(site_dir / "site.toml", FULL_SITE))
    assert site.source == "sim:1m" and site.rate == 50 and site.loop is False
    assert site.geometry == {"beam_center": (500.5, 510.0), "distance_mm": 120.0, "wavelength_A": 0.9}
    assert site.port == "usb:2e8a:000A:E661" and site.dry_run is True
    # relative paths are relative to the site file
    assert site.policy_file == site_dir / "policy.toml" and site.limits_file == site_dir / "limits.toml"
    assert site.results_dir == site_dir / "runs" and site.keep_runs == 5
    assert site.web_bind == "127.0.0.1:8080" and site.run_args()["web"] == "127.0.0.1:8080"
    args = site.run_args()
    assert args["no_model"] is True and args["model_threads"] == 2 and args["queue_size"] == 8
    assert args["config"] == str(site_dir / "policy.toml") and args["results_dir"] == str(site_dir / "runs")
    assert set(site.files()) == {"site", "policy", "limits"}


def test_site_port_emulator_means_no_port(tmp_path):
    site = load_site(_write(tmp_path / "s.toml", '[device]\nport = "emulator"\n'))
    assert site.port is None and "port" not in site.run_args()


@pytest.mark.parametrize("text, expect", [
    ("[sourc]\nspec = 'sim'\n", "unknown section [sourc]"),
    ("[source]\nspek = 'sim'\n", "unknown key 'spek' in [source]"),
    ("[processing]\nthreads = 'two'\n", "[processing] threads: expected an integer >= 1, got string 'two'"),
    ("[processing]\nthreads = true\n", "[processing] threads: expected an integer >= 1, got boolean True"),
    ("[processing]\nqueue_size = 0\n", "[processing] queue_size: expected an integer >= 1"),
    ("[device]\ndry_run = 'yes'\n", "[device] dry_run: expected true or false, got string 'yes'"),
    ("[device]\nport = 'usb:2e8a'\n", "[device] port: bad USB id 'usb:2e8a'"),
    ("[device]\nport = 3\n", "[device] port: expected a device path"),
    ("[source]\nrate = 'fast'\n", "[source] rate: expected a rate in Hz > 0"),
    ("[source]\nrate = -5\n", "[source] rate: expected a rate in Hz > 0"),
    ("[geometry]\nbeam_center = [1, 'a']\n", "[geometry] beam_center: expected [x, y]"),
    ("[geometry]\ndistance_mm = 0\n", "[geometry] distance_mm: expected a number > 0"),
    ("[geometry]\ndistance_mm = nan\n", "[geometry] distance_mm: expected a number > 0"),
    ("[policy]\nfile = 'nope.toml'\n", "[policy] file: file not found: "),
    ("[model]\nfile = '.'\n", "[model] file: not a file: "),
    ("[results]\ndir = 'site.toml'\n", "[results] dir: not a directory: "),
    ("[web]\nbind = 'localhost:http'\n", "[web] bind: expected \"[HOST:]PORT\""),
    ("source = 'sim'\n", "source must be a table"),
    ("[source\n", "invalid TOML"),
])
def test_site_file_errors_are_one_clear_line(tmp_path, text, expect):
    path = _write(tmp_path / "site.toml", text)
    with pytest.raises(SiteConfigError) as err:
        load_site(path)
    msg = str(err.value)
    assert expect in msg and str(path) in msg and "\n" not in msg


def test_missing_site_file(tmp_path):
    with pytest.raises(SiteConfigError, match="site file not found: .*nowhere.toml"):
        load_site(tmp_path / "nowhere.toml")


def test_example_site_is_valid(tmp_path):
    site = load_site(_write(tmp_path / "site.toml", example_site(str(tmp_path / "runs"))))
    assert site.source == "sim" and site.dry_run is True and site.port == "/dev/xray-edge-board"


# --------------------------------------------------------------------------- service unit, udev
def _unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: [Section], Key=Value (keys may repeat), # comments."""
    out: dict[str, dict[str, list[str]]] = {}
    sec = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            sec = out.setdefault(line[1:-1], {})
            continue
        key, eq, value = line.partition("=")
        assert eq and sec is not None and key.strip() == key and key, line
        sec.setdefault(key, []).append(value)
    return out


def test_service_unit(site_dir):
    site = load_site(_write(site_dir / "site.toml", FULL_SITE))
    text = unit_text(site.path, user="xedge", command=["/opt/xray-edge/bin/edge"], site_config=site)
    unit = _unit_sections(text)
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert svc["User"] == ["xedge"] and svc["SupplementaryGroups"] == ["dialout"]
    assert svc["ExecStartPre"] == [f"/opt/xray-edge/bin/edge warmup --site {site.path}"]
    assert svc["ExecStart"] == [f"/opt/xray-edge/bin/edge run --site {site.path} --quiet"]
    assert svc["Restart"] == ["on-failure"] and svc["KillSignal"] == ["SIGTERM"]
    assert svc["CacheDirectory"] == ["xray-edge"]  # -> $CACHE_DIRECTORY, the kernel cache
    assert svc["ReadWritePaths"] == [f"-{site_dir / 'runs'}"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_service_unit_passes_systemd_analyze_verify(tmp_path):
    site = _write(tmp_path / "site.toml", example_site(str(tmp_path / "runs")))
    unit = tmp_path / "xray-edge.service"
    unit.write_text(unit_text(site, user="root", command=[sys.executable, "-m", "edge.cli"]))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # systemd-analyze complains about the host (no running systemd, missing units it
    # links to); it must not complain about this unit's own lines
    own = [line for line in (r.stdout + r.stderr).splitlines() if "xray-edge.service" in line]
    assert not own, own


def test_udev_rule():
    rule = udev_rule("2E8A", "000a", "E661")
    lines = [ln for ln in rule.splitlines() if ln and not ln.startswith("#")]
    assert lines == ['SUBSYSTEM=="tty", ATTRS{idVendor}=="2e8a", ATTRS{idProduct}=="000a", '
                     'ATTRS{serial}=="E661", SYMLINK+="xray-edge-board", GROUP="dialout", MODE="0660"']
    with pytest.raises(ValueError, match="VID must be 4 hex digits"):
        udev_rule("2e8", "000a")


def test_install_below_a_root_directory(tmp_path, site_dir):
    site = load_site(_write(site_dir / "site.toml", FULL_SITE))
    root = tmp_path / "root"
    new_site = "/etc/xray-edge/site.toml"
    written = install(new_site, site_config=site, root=root, log=lambda m: None)
    assert {p.relative_to(root).as_posix() for p in written} == {
        "etc/xray-edge/site.toml", "etc/systemd/system/xray-edge.service", "etc/udev/rules.d/99-xray-edge.rules"}
    # the example site file is valid and safe (dry run); an existing one is kept
    example = load_site(root / "etc/xray-edge/site.toml")
    assert example.dry_run is True
    assert 'ATTRS{serial}=="E661"' in (root / "etc/udev/rules.d/99-xray-edge.rules").read_text()
    (root / "etc/xray-edge/site.toml").write_text("# mine\n")
    install(new_site, root=root, log=lambda m: None)
    assert (root / "etc/xray-edge/site.toml").read_text() == "# mine\n"


def test_cli_service_prints_unit_and_rejects_bad_site(tmp_path, capsys):
    from edge.cli import main

    site = _write(tmp_path / "site.toml", example_site(str(tmp_path / "runs")))
    assert main(["service", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert "ExecStartPre=" in out and f"warmup --site {site}" in out
    assert main(["service", "--udev", "usb:1234:abcd"]) == 0
    assert 'ATTRS{idProduct}=="abcd"' in capsys.readouterr().out
    bad = _write(tmp_path / "bad.toml", "[device]\nport = 5\n")
    assert main(["service", "--site", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[device] port" in err[0]


def test_run_with_a_site_file(tmp_path, capsys):
    """`edge run --site`: the site's source, geometry, dry run and results directory;
    options on the command line win; the header records the site file's digest."""
    from edge.cli import main

    site = _write(tmp_path / "site.toml", """
[source]
spec = "scenario:1m"
rate = "max"
[geometry]
beam_center = [520.0, 530.5]
[device]
dry_run = true
[model]
enabled = false
[results]
dir = "out"
keep = 2
""")
    for _ in range(3):
        assert main(["run", "--site", str(site), "--source", "sim:1m", "--frames", "2", "--quiet"]) == 0
    runs = sorted((tmp_path / "out").glob("run-*.jsonl"))
    assert len(runs) == 2  # keep = 2
    recs = _lines(runs[-1])
    head = recs[0]
    assert head["type"] == "run" and "sim:1m" in head["source"] and head["dry_run"] is True
    assert head["model"] is None and head["host"] and head["source_dtype"] == "int32"
    assert head["geometry"]["beam_center"] == [520.0, 530.5]
    assert head["files"]["site"] == {"path": str(site), "sha256": file_digest(site)}
    assert recs[-1]["type"] == "summary" and recs[-1]["frames_processed"] == 2
    assert "first frame processed" in capsys.readouterr().err


# --------------------------------------------------------------------------- results files
def test_results_rotation_keeps_the_newest(tmp_path):
    d = tmp_path / "runs"
    d.mkdir()
    for k in range(5):
        p = d / f"run-2020010{k}-000000.jsonl"
        p.write_text("{}\n")
        os.utime(p, (1_600_000_000 + k, 1_600_000_000 + k))
    (d / "notes.txt").write_text("not a run")
    for k in (0, 4):  # frames the live view saved beside two of the runs
        (d / f"run-2020010{k}-000000.frames").mkdir()
        (d / f"run-2020010{k}-000000.frames" / "f0.png").write_bytes(b"png")
    new = new_results_path(d)
    assert not new.exists() and new.parent == d
    new.write_text("")
    gone = prune_runs(d, 3)
    assert sorted(p.name for p in gone) == [f"run-2020010{k}-000000.jsonl" for k in range(3)]
    left = sorted(x.name for x in d.glob("run-*"))
    assert left == sorted(["run-20200103-000000.jsonl", "run-20200104-000000.frames",
                           "run-20200104-000000.jsonl", new.name])
    assert (d / "notes.txt").exists()
    # runs started in the same second get their own files
    import datetime as dt

    now = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
    a = new_results_path(d, now=now)
    assert a.name == "run-20300101-000000.jsonl"
    a.write_text("{}\n")
    assert new_results_path(d, now=now).name == "run-20300101-000000-2.jsonl"
    with pytest.raises(NotADirectoryError):
        new_results_path(d / "notes.txt")


def test_header_and_summary_records(tmp_path):
    from edge.anomaly import AnomalyModel

    model = AnomalyModel.load()
    src = open_source("sim:1m", n_frames=3, pool=1)
    out = tmp_path / "run.jsonl"
    limits = tmp_path / "limits.toml"
    limits.write_bytes((REPO / "firmware_bridge" / "limits.toml").read_bytes())
    header = run_header(src, model=model, files={"limits": limits}, extra={"argv": ["x"]})
    summary = Pipeline(src, model=model, results=out, header=header).run()
    recs = _lines(out)
    head, end = recs[0], recs[-1]
    assert head["type"] == "run" and end["type"] == "summary"
    assert [r["type"] for r in recs[1:-1]] == ["frame"] * 3
    assert head["version"] == edge.__version__ and head["host"] and head["source"] == "sim:1m"
    assert head["source_dtype"] == "int32" and head["argv"] == ["x"]
    assert head["geometry"]["shape"] == list(src.geometry.shape)
    assert head["geometry"]["beam_center"] == list(src.geometry.beam_center)
    assert head["model"]["sha256"] == file_digest(model.path)
    assert head["files"]["limits"] == {"path": str(limits), "sha256": file_digest(limits)}
    shipped = REPO / "edge" / "policy_default.toml"
    assert head["files"]["policy"]["sha256"] == file_digest(shipped)
    assert end["frames_processed"] == summary.frames_processed == 3 and end["stop_reason"] is None
    assert end["results_path"] == str(out)


def test_summary_record_written_when_the_source_fails(tmp_path):
    from edge.sources import SourceError

    class Failing(SimulatorSource):
        def _read(self, k):
            if k == 2:
                raise SourceError("frame 2 is truncated")
            return super()._read(k)

    out = tmp_path / "run.jsonl"
    src = Failing("1m", n_frames=5, pool=1)
    with pytest.raises(SourceError, match="truncated"):
        Pipeline(src, results=out, header=run_header(src)).run()
    recs = _lines(out)
    assert recs[0]["type"] == "run" and recs[-1]["type"] == "summary"
    assert recs[-1]["frames_processed"] == 2 and "truncated" in recs[-1]["source_error"]


def test_sigterm_during_a_run_writes_the_summary(tmp_path):
    out = tmp_path / "run.jsonl"
    cmd = EDGE + ["run", "--source", "sim:1m", "--rate", "20", "--no-model", "--dry-run", "--quiet",
                  "--results", str(out)]
    p = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600  # kernels load from the cache; compile if it is cold
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and sum(1 for r in out.read_text().splitlines() if '"type":"frame"' in r) >= 3:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.communicate()[1]
        p.send_signal(signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, stderr
    recs = _lines(out)
    frames = [r for r in recs if r["type"] == "frame"]
    assert recs[0]["type"] == "run" and recs[-1]["type"] == "summary"
    assert recs[-1]["stop_reason"] == "SIGTERM"
    assert recs[-1]["frames_processed"] == len(frames) >= 3
    # every frame taken in was processed, dropped or still queued at the stop (at most the queue size)
    assert 0 <= recs[-1]["frames_in"] - len(frames) - recs[-1]["frames_dropped"] <= 4 + 1
    assert "frames in" in stdout  # the summary table


# --------------------------------------------------------------------------- argument errors before warm-up
def _cache_files(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.suffix in (".nbi", ".nbc")]


@pytest.mark.parametrize("args, expect", [
    (["run", "--frames", "0"], "must be >= 1"),
    (["run", "--rate", "fast"], "--rate"),
    (["run", "--source", "/nonexistent/x.cbf"], "edge run: --source:"),
    (["run", "--site", "{tmp}/missing.toml"], "edge run: --site: site file not found"),
    (["run", "--site", "{tmp}/bad.toml"], "[processing] threads"),
    (["run", "--results-dir", "{tmp}/afile"], "edge run: --results-dir"),
    (["warmup", "--dtype", "complex64"], "not a supported frame dtype"),
    (["warmup", "--site", "{tmp}/bad.toml"], "edge warmup: site:"),
])
def test_argument_errors_exit_2_before_any_compilation(tmp_path, args, expect):
    (tmp_path / "bad.toml").write_text("[processing]\nthreads = 0\n")
    (tmp_path / "afile").write_text("")
    numba_cache = tmp_path / "numba-cache"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    r = subprocess.run(EDGE + args, env=_env(NUMBA_CACHE_DIR=str(numba_cache)), capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("usage:")
             and not ln.startswith(" ")]
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert _cache_files(numba_cache) == []  # nothing was compiled


# --------------------------------------------------------------------------- Numba cache location
def test_cache_choice_order(tmp_path):
    ro = tmp_path / "afile"  # a package "directory" nobody can write into
    ro.write_text("")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert cache.configure(str(ro), "9.9", env) is None and env["NUMBA_CACHE_DIR"] == str(tmp_path / "mine")
    assert cache.CACHE_SOURCE == "user"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert cache.configure(str(tmp_path), "9.9", env) is None and "NUMBA_CACHE_DIR" not in env
    assert cache.CACHE_SOURCE == "package"
    got = cache.configure(str(ro), "9.9", env)
    assert got == env["NUMBA_CACHE_DIR"] == str(tmp_path / "xdg" / "xray-edge" / "9.9")
    assert cache.CACHE_SOURCE == "xdg"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "CACHE_DIRECTORY": str(tmp_path / "svc")}
    assert cache.configure(str(ro), "9.9", env) == str(tmp_path / "svc" / "9.9")
    assert cache.CACHE_SOURCE == "service"
    cache.configure(os.path.dirname(edge.__file__), edge.__version__)  # restore this process's choice


def _as_other_user() -> list[str]:
    """Command prefix running as an unprivileged user (root ignores file permissions)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop privileges")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def open_tmp():
    """A temporary directory another user can enter (pytest's tmp_path is private to us)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="edge-test-"))
    d.chmod(0o755)
    yield d
    for sub, _, _ in os.walk(d):
        os.chmod(sub, 0o755)
    shutil.rmtree(d)


@pytest.mark.parametrize("home", ["xdg", "none"])
def test_read_only_package_uses_a_per_user_cache(open_tmp, home):
    """A service user who cannot write the package directory still gets cached
    kernels: in ~/.cache/xray-edge/<version>, or without a home in a temporary
    directory (numba alone would refuse to import the kernels there)."""
    if home == "none" and os.path.isdir("/var/cache/xray-edge"):
        pytest.skip("/var/cache/xray-edge exists on this machine and would be chosen")
    tmp_path = open_tmp
    pkg = tmp_path / "pkg"
    shutil.copytree(REPO / "edge", pkg / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    user_dir = tmp_path / "user"  # the home, or TMPDIR without one
    user_dir.mkdir()
    prefix = _as_other_user()
    if prefix:
        os.chown(user_dir, 65534, 65534)
    for d, _, files in os.walk(pkg):
        os.chmod(d, 0o555)
        for f in files:
            os.chmod(os.path.join(d, f), 0o444)
    probe = ("import numpy as np, edge, edge.deploy.cache as c\n"
             "from edge.measure import _chamfer_distance as k\n"
             "k(np.ones((5, 5), np.bool_))\n"
             "print(edge.__file__, c.CACHE_SOURCE, c.cache_dir(''), sum(k.stats.cache_hits.values()))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(PYTHONPATH=str(pkg), PYTHONDONTWRITEBYTECODE="1", GOMP_SPINCOUNT="0")
    if home == "xdg":
        env["HOME"] = str(user_dir)
        where = user_dir / ".cache" / "xray-edge" / edge.__version__
    else:
        env.update(HOME="/nonexistent", TMPDIR=str(user_dir))
        where = user_dir / f"xray-edge-{65534 if prefix else os.getuid()}" / edge.__version__
    runs = [subprocess.run(prefix + [sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                           timeout=600, cwd=tmp_path) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    (file1, how1, dir1, hits1), (_, how2, dir2, hits2) = (r.stdout.split() for r in runs)
    assert file1 == str(pkg / "edge" / "__init__.py")
    assert how1 == how2 == {"xdg": "xdg", "none": "tmp"}[home] and dir1 == dir2 == str(where)
    assert int(hits1) == 0 and int(hits2) == 1  # compiled once, then loaded from the per-user cache
    assert _cache_files(where) and not (pkg / "edge" / "__pycache__").exists()


# --------------------------------------------------------------------------- warm-up per source
def _kernels():
    from numba.core.registry import CPUDispatcher

    from edge import background, features, measure, spotfinding
    from edge.evidence import ice

    return {f"{m.__name__}.{n}": d for m in (background, features, measure, spotfinding, ice)
            for n, d in vars(m).items() if isinstance(d, CPUDispatcher)}


SCENARIO = {"name": "faults", "n_frames": 6, "phases": [
    {"name": "off", "start": 0, "end": 3, "labels": ["beam_off_center"], "sim": {"beam_offset": [40, -30]}},
    {"name": "dead", "start": 3, "end": 6, "labels": ["detector_fault"], "sim": {"dead_modules": 1}},
]}


@pytest.mark.parametrize("dtype", ["int32", "uint16"])
def test_warmup_for_the_source_dtype_covers_the_run(dtype):
    """After the warm-up for a source's dtype, the run compiles (or loads) nothing more."""
    from edge.anomaly import AnomalyModel
    from edge.policy import Policy

    src = SimulatorSource("1m", scenario=SCENARIO, pool=1, dtype=dtype)
    assert src.dtype == np.dtype(dtype)
    edge.warmup((src.dtype,), features=True, extras=False)
    before = {name: set(d.overloads) for name, d in _kernels().items()}
    pipe = Pipeline(src, model=AnomalyModel.load(), policy=Policy.from_toml(dry_run=True), measure_every=1)
    pipe.run()
    assert len(pipe.records) == 6
    after = {name: set(d.overloads) for name, d in _kernels().items()}
    assert after == before


def test_warmup_reports_compiling_steps_only(tmp_path):
    """A cold warm-up says what it compiles, step by step (the feature kernels in a
    parallel process); the next one loads everything from the cache, silently."""
    seen = []
    edge.warmup(("int32",), features=False, extras=False, progress=lambda *a: seen.append(a))
    assert seen == []  # cached (by earlier tests or the shipped warm cache)
    probe = ("import edge\n"
             "edge.warmup(('int32',), features=True, extras=False, parallel=True,\n"
             "            progress=lambda *a: print(*a, sep='|'))\n"
             "print('done')\n")
    env = _env(NUMBA_CACHE_DIR=str(tmp_path / "c"))
    cold, warm = (subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                 timeout=1800) for _ in range(2))
    assert cold.returncode == 0 and warm.returncode == 0, cold.stderr + warm.stderr
    lines = cold.stdout.splitlines()
    assert lines[:2] == ["1|3|peak finding, int32", "2|3|anomaly features, int32, in a parallel process"]
    # what the worker did not compile, this process does (and says so)
    assert set(lines[2:]) <= {"2|3|anomaly features, int32", "3|3|beam and fault measurements", "done"}
    assert lines[-2:] == ["3|3|beam and fault measurements", "done"]
    assert warm.stdout.splitlines() == ["done"]  # everything cached, by both processes


def test_background_pools_give_the_same_frames():
    scenario = {"name": "two", "n_frames": 6, "phases": [
        {"name": "sat", "start": 2, "end": 4, "labels": ["saturation"], "sim": {"overload": 1000.0}}]}
    with SimulatorSource("1m", scenario=scenario, pool=2, seed=3) as a:
        ref = [f for f, _ in a]
    with SimulatorSource("1m", scenario=scenario, pool=2, seed=3) as b:
        b.prepare(background=True)
        got = [f for f, _ in b]
    assert len(got) == len(ref) == 6
    assert all(np.array_equal(x, y) for x, y in zip(got, ref))
