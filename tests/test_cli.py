"""The ``edge`` command line: every mistake is one line on stderr and exit code
2 before any kernel warm-up; Ctrl-C during the warm-up is a clean exit 130.

Each case runs the real CLI in a subprocess (``python -m edge.cli``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.cli import main as edge_main

REAL_FRAMES = next((p / "shared" / "real_frames" for p in Path(__file__).resolve().parents[2:4]
                    if (p / "shared" / "real_frames").is_dir()),
                   Path(__file__).resolve().parents[2] / "shared" / "real_frames")
ENV = {**os.environ, "GOMP_SPINCOUNT": "0"}


def _edge(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=ENV)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "bad_scenario.toml").write_text("n_frames = 5\nbogus = 1\n")
    (d / "notes.cbf").write_text("notes\n")
    (d / "bad_limits.toml").write_text('version = 1\n[rate]\nburst = "x"\n')
    (d / "bad_policy.toml").write_text('version = 1\n[rules.saturation]\nflag = "saturation"\ndebounse = [2, 3]\n'
                                       'actions = [{ action = "attenuation", step = 1 }]\n')
    (d / "model.tflite").write_bytes(b"not a model")
    (d / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (d / "huge_scenario.toml").write_text("n_frames = 99999999999999\n")
    (d / "many_spots.toml").write_text("n_frames = 5\n[base]\nn_spots = 1000000000\n")
    os.mkfifo(d / "fifo")
    return d


# (arguments, words the one error line must contain); {d} = the fixture directory
CASES = [
    (["run", "--emulator-attenuation", "99"], ["--emulator-attenuation 99", "[0, 15]"]),
    (["run", "--results", "/proc/r.jsonl"], ["--results /proc/r.jsonl", "cannot write"]),
    (["run", "--results", "{d}"], ["--results", "cannot write"]),
    (["run", "--applied-log", "/proc/a.jsonl"], ["--applied-log /proc/a.jsonl", "cannot write"]),
    (["run", "--source", "scenario:{d}/missing.toml"], ["--source", "missing.toml", "scenario file not found"]),
    (["run", "--source", "scenario:{d}/bad_scenario.toml"], ["--source", "bad_scenario.toml", "bogus"]),
    (["run", "--source", "sim:7m"], ["--source", "unknown layout '7m'"]),
    (["run", "--source", "/no/such/file.cbf"], ["--source", "/no/such/file.cbf", "not found"]),
    (["run", "--source", "{d}/notes.cbf"], ["--source", "notes.cbf", "not a CBF"]),
    (["run", "--rate", "0"], ["argument --rate", "frame rate in"]),
    (["run", "--rate", "1e-300"], ["argument --rate", "frame rate in"]),
    (["run", "--source", "scenario:{d}/binary.toml"], ["--source", "binary.toml"]),
    (["run", "--source", "scenario:{d}/huge_scenario.toml"], ["--source", "n_frames"]),
    (["run", "--source", "scenario:{d}/many_spots.toml"], ["--source", "n_spots"]),
    (["run", "--config", "{d}/binary.toml"], ["--config", "binary.toml"]),
    (["run", "--limits", "{d}/binary.toml"], ["--limits", "binary.toml"]),
    (["run", "--queue-size", "1000000"], ["argument --queue-size", "[1, 100000]"]),
    (["run", "--model-threads", "100000"], ["argument --model-threads", "[1, 256]"]),
    (["run", "--results", "{d}/fifo"], ["--results", "cannot write"]),
    (["run", "--rate", "nan"], ["argument --rate"]),
    (["run", "--rate", "fast"], ["argument --rate", "'fast'"]),
    (["run", "--rate", "file"], ["--rate file", "file source"]),
    (["run", "--frames", "abc"], ["argument --frames", "'abc' is not an integer"]),
    (["run", "--frames", "0"], ["argument --frames", ">= 1"]),
    (["run", "--duration", "-1"], ["argument --duration", "> 0"]),
    (["run", "--duration", "inf"], ["argument --duration", "finite"]),
    (["run", "--threads", "0"], ["argument --threads"]),
    (["run", "--model-threads", "x"], ["argument --model-threads", "not an integer"]),
    (["run", "--queue-size", "-3"], ["argument --queue-size"]),
    (["run", "--emulator-attenuation", "x"], ["argument --emulator-attenuation"]),
    (["run", "--layout", "7m"], ["argument --layout", "7m"]),
    (["run", "--layout", "4m", "--source", "{d}/notes.cbf"], ["--layout 4m", "simulator"]),
    (["run", "--model", "{d}/notes.cbf"], ["--model", "notes.cbf", ".tflite"]),
    (["run", "--model", "{d}/none.tflite"], ["--model", "none.tflite", "no such file"]),
    (["run", "--model", "{d}/model.tflite", "--no-model"], ["--model", "--no-model"]),
    (["run", "--limits", "{d}/bad_limits.toml"], ["--limits", "bad_limits.toml", "burst"]),
    (["run", "--limits", "{d}/missing_limits.toml"], ["--limits", "missing_limits.toml"]),
    (["run", "--config", "{d}/bad_policy.toml"], ["--config", "bad_policy.toml", "debounse"]),
    (["run", "--config", "{d}/missing_policy.toml"], ["--config", "missing_policy.toml"]),
    (["run", "--port", "/dev/no-such-tty"], ["--port /dev/no-such-tty", "no such device"]),
    (["run", "--port", "{d}/notes.cbf"], ["--port", "not a serial device"]),
    (["run", "--source", "sim:4m", "--layout", "9m"], ["--layout 9m", "contradicts", "sim:4m"]),
    (["run", "--dry-run", "--emulator-attenuation", "3"], ["--emulator-attenuation", "--dry-run"]),
    (["run", "--port", "/dev/null", "--applied-log", "{d}/a.jsonl"], ["--applied-log", "--port"]),
    (["run", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["run", "--web", "notaport"], ["--web notaport"]),
    (["view", "/no/such/run.jsonl", "--duration", "-1"], ["argument --duration"]),
    (["report", "/no/such/run.jsonl", "--max-images", "x"], ["argument --max-images"]),
    (["run", "--port", ""], ["argument --port", "empty"]),
    (["run", "--results", " "], ["argument --results", "empty"]),
    (["run", "--source", ""], ["argument --source", "empty"]),
    (["bench", "--out", ""], ["argument --out", "empty"]),
    (["bench", "--layouts", "7m"], ["argument --layouts", "7m"]),
    (["bench", "--rates", "abc"], ["argument --rates", "'abc'"]),
    (["bench", "--rates", "50,-1"], ["argument --rates", "frame rate in"]),
    (["bench", "--rate", "0"], ["argument --rate", "frame rate in"]),
    (["bench", "--rate", "max"], ["argument --rate", "'max'"]),
    (["bench", "--frames", "abc"], ["argument --frames", "not an integer"]),
    (["bench", "--out", "/proc/x/latency"], ["--out", "cannot write"]),
    ([], ["required"]),
    (["fly"], ["invalid choice", "fly"]),
]


@pytest.mark.parametrize("argv, words", CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_mistake_is_one_line_exit_2_before_warmup(files, tmp_path, argv, words):
    argv = [a.replace("{d}", str(files)) for a in argv]
    words = [w.replace("{d}", str(files)) for w in words]
    if argv[:1] == ["run"]:
        argv += ["--frames", "3"] if "--frames" not in argv else []
    p = _edge(*argv, cwd=tmp_path)
    lines = p.stderr.splitlines()
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "warming up" not in p.stderr and p.stdout == ""
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "runs").exists()  # no results file left behind


@pytest.mark.parametrize("delay", [0.5, 1.7])
def test_ctrl_c_during_warmup_is_one_line_exit_130(tmp_path, delay):
    """An empty Numba cache makes the warm-up compile for minutes: SIGINT once
    it started must end the process at once, with one line and code 130 (also
    when it lands while LLVM is calling back into Python, where a raised
    KeyboardInterrupt is swallowed by ctypes and the run went on)."""
    env = {**ENV, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    p = subprocess.Popen([sys.executable, "-m", "edge.cli", "run", "--no-model", "--dry-run", "--frames", "3",
                          "--results", str(tmp_path / "r.jsonl")], stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env, cwd=tmp_path)
    try:
        first = p.stderr.readline()  # blocks until the warm-up starts (or the process dies)
        assert "warming up" in first, first + p.stderr.read()
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert p.returncode == 130, err[-3000:]
    lines = [ln for ln in err.splitlines() if not ln.startswith("edge run: compiling kernels")]  # progress
    assert lines == ["edge run: interrupted"] and out == ""
    assert not (tmp_path / "r.jsonl").exists()  # nothing ran: no empty results file left behind


def test_bad_policy_file_named(files, capsys):
    assert edge_main(["run", "--config", str(files / "bad_policy.toml"), "--frames", "5", "--no-model",
                      "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "debounse" in err and "bad_policy.toml" in err


def test_bad_limits_blame_the_limits_file_not_the_policy(files, capsys):
    assert edge_main(["run", "--limits", str(files / "bad_limits.toml"), "--frames", "5", "--no-model",
                      "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "bad_limits.toml" in err and "policy_default" not in err


def test_run_dry_run_writes_results(tmp_path, capsys):
    out = tmp_path / "sub" / "r.jsonl"
    rc = edge_main(["run", "--source", "sim", "--rate", "max", "--frames", "30", "--no-model", "--dry-run", "--quiet",
                    "--results", str(out)])
    assert rc == 0
    frames = [json.loads(x) for x in out.read_text().splitlines() if '"type":"frame"' in x]
    assert len(frames) == 30 and all(r["n_peaks"] > 50 for r in frames)
    assert "frames in 30, processed 30" in capsys.readouterr().out


def test_layout_applies_to_the_simulator(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert edge_main(["run", "--source", "sim", "--rate", "max", "--layout", "4M", "--frames", "2", "--no-model",
                      "--dry-run", "--quiet", "--results", str(out)]) == 0
    assert "frames in 2, processed 2" in capsys.readouterr().out


def test_info_and_ports(capsys):
    assert edge_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "numba threads" in out and "ai-edge-litert" in out
    assert edge_main(["ports"]) == 0


def test_run_goes_on_past_a_damaged_file(tmp_path):
    """The real CLI on a directory whose second file is truncated: exit 0, the
    summary reports the unreadable frame, the JSONL holds its error record."""
    import numpy as np
    from fabio.cbfimage import CbfImage

    d = tmp_path / "frames"
    d.mkdir()
    header = ("\n# Pixel_size 172e-6 m x 172e-6 m\n# Exposure_period 0.02 s\n# Wavelength 0.96859 A\n"
              "# Detector_distance 0.35100 m\n# Beam_xy (20.5, 15.25) pixels\n")
    data = np.random.default_rng(1).poisson(5, (40, 50)).astype(np.int32)
    for k in (1, 2, 3):
        CbfImage(data=data, header={"_array_data.header_convention": "PILATUS_1.2",
                                    "_array_data.header_contents": header}).write(str(d / f"img_{k}.cbf"))
    raw = (d / "img_2.cbf").read_bytes()
    (d / "img_2.cbf").write_bytes(raw[: raw.index(b"\x0c\x1a\x04\xd5") + 50])
    out = tmp_path / "r.jsonl"
    p = _edge("run", "--source", str(d), "--no-model", "--dry-run", "--quiet", "--results", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "frames in 2, processed 2" in p.stdout and "1 unreadable frames" in p.stdout, p.stdout
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    errors = [r for r in recs if r["type"] == "error"]
    assert len(errors) == 1 and errors[0]["frame"] == 1 and errors[0]["path"].endswith("img_2.cbf")
    assert "truncated" in errors[0]["error"]
    assert [r["frame"] for r in recs if r["type"] == "frame"] == [0, 2]
