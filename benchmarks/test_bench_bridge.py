"""Benchmarks of firmware_bridge (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/test_bench_bridge.py --benchmark-only

Round trip = ``bridge.send()`` -> ack over a real pty pair with no faults,
against the in-process Python emulator and the C reference firmware.
p50/p99/max are stored in ``extra_info`` (and printed with ``-s``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

import firmware_bridge as fb
from firmware_bridge.commands import Limits
from firmware_bridge.emulator import start_pty_emulator
from firmware_bridge.framing import FrameDecoder, encode_frame
from firmware_bridge.messages import MsgType

FW = Path(__file__).resolve().parents[1] / "firmware_bridge" / "firmware"
ROUNDS = 3000


def _fast_limits() -> Limits:
    base = Limits.load(None)
    return Limits(base.commands, 1e9, 10**9, "bench")


@pytest.fixture(params=["python-emulator", "c-firmware"])
def port(request, tmp_path):
    if request.param == "python-emulator":
        emu = start_pty_emulator(link_path=str(tmp_path / "ttyB"))
        yield emu.port
        emu.stop()
        return
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "bridge_fw"
    subprocess.run([cc, "-std=c99", "-Wall", "-Wextra", "-Werror", "-O2", "-o", str(exe),
                    str(FW / "bridge_proto.c"), str(FW / "host_pty.c")], check=True)
    link = str(tmp_path / "ttyC")
    proc = subprocess.Popen([str(exe), "pty", "--link", link], stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    yield link
    proc.terminate()
    proc.wait(5)
    proc.stdout.close()


def _percentiles(data: list[float]) -> dict:
    d = sorted(data)
    pick = lambda p: d[min(len(d) - 1, int(p * len(d)))] * 1e3  # noqa: E731
    return {"p50_ms": round(pick(0.50), 4), "p99_ms": round(pick(0.99), 4),
            "max_ms": round(d[-1] * 1e3, 4), "n": len(d)}


def test_round_trip_latency(benchmark, port):
    with fb.connect(port, limits=_fast_limits()) as bridge:
        for _ in range(50):  # warm up
            bridge.send("set_attenuation", level=1)
        i = iter(range(10**9))
        benchmark.pedantic(lambda: bridge.send("set_attenuation", level=next(i) % 16),
                           rounds=ROUNDS, iterations=1)
    stats = _percentiles(benchmark.stats.stats.data)
    benchmark.extra_info.update(stats)
    print(f"\nround trip ({port}): {stats}")


def test_encode_frames_per_second(benchmark):
    payload = fb.validate("recentre_beam", dx=1.0, dy=-2.0).payload

    def encode_1000():
        for s in range(1000):
            encode_frame(MsgType.COMMAND, 0x12345678, s, payload)

    benchmark(encode_1000)
    benchmark.extra_info["frames_per_second"] = round(1000 / benchmark.stats.stats.mean)
    print(f"\nencode: {benchmark.extra_info['frames_per_second']} frames/s")


def test_decode_frames_per_second(benchmark):
    payload = bytes(30)  # typical ACK: cmd, code, 28-byte state
    wire = b"".join(encode_frame(MsgType.ACK, 0x12345678, s, payload) for s in range(1000))

    def decode_1000():
        assert len(FrameDecoder().feed(wire)) == 1000

    benchmark(decode_1000)
    benchmark.extra_info["frames_per_second"] = round(1000 / benchmark.stats.stats.mean)
    print(f"\ndecode: {benchmark.extra_info['frames_per_second']} frames/s")
