"""Reference firmware build checks and an end-to-end soak smoke run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bridge_helpers import CFLAGS, FIRMWARE_DIR, compiler


@pytest.mark.skipif(compiler() is None, reason="no C compiler (cc/gcc/clang) found")
def test_core_compiles_strict_and_standalone(tmp_path):
    """The protocol core builds alone (no host program, no OS) with strict C99 flags."""
    cc = compiler()
    obj = tmp_path / "bridge_proto.o"
    r = subprocess.run([cc, *CFLAGS, "-pedantic", "-ffreestanding", "-c",
                        str(FIRMWARE_DIR / "bridge_proto.c"), "-o", str(obj)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # no heap and no OS calls: the only undefined symbols are memset/memcpy/strlen
    nm = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True)
    if nm.returncode == 0:
        undefined = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
        assert undefined <= {"memset", "memcpy", "strlen", "_GLOBAL_OFFSET_TABLE_"}, undefined


@pytest.mark.parametrize("device", ["python", "c"])
def test_soak_smoke(tmp_path, device):
    if device == "c" and compiler() is None:
        pytest.skip("no C compiler (cc/gcc/clang) found")
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "firmware_bridge.soak", "--commands", "400",
                        "--corrupt", "0.02", "--drop", "0.02", "--duplicate", "0.02",
                        "--replugs", "1", "--unplug-time", "0.05", "--takeovers", "1",
                        "--takeover-commands", "10", "--restarts", "1", "--device", device,
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert res["applied_twice"] == 0 and res["acked_missing_from_log"] == 0
    assert res["outcomes_reported"] == 400 and res["link"]["disconnects"] >= 2
    other = res["other_host"]  # the second session is accounted for too
    assert other["sent"] == other["acked"] + other["rejected"] + other["failed"]
    assert res["boots_seen"] >= 2  # the restart was seen (new boot id, same device id)
