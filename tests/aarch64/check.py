#!/usr/bin/env python3
"""aarch64 check: install and run xray-edge in an emulated Raspberry Pi 5 (arm64 Debian bookworm).

Run as root on an x86-64 Debian/Ubuntu host (not part of ``.ci/run``: it takes
~20 min ``--quick``, about an hour in full; run it when dependencies change)::

    apt-get install qemu-user-static mmdebstrap binfmt-support     # once
    python3 tests/aarch64/check.py --quick      # install, edge info, model, one kernel, framing tests
    python3 tests/aarch64/check.py              # + warm-up, edge run (dry-run and emulator pty), test subset

What it does:

1. registers qemu-aarch64 (``/proc/sys/fs/binfmt_misc``, flag F) and builds an
   arm64 Debian bookworm root (the base of Raspberry Pi OS) with mmdebstrap:
   python3, venv, pip, no compiler, and no libgomp1 (as a minimal Debian);
   the tarball is cached (``--cache-dir``), so reruns start in seconds;
2. unpacks a fresh copy, copies the working tree (git-tracked and new files)
   to ``/src`` and ``pip install``s it into a venv, recording with pip's
   ``--report`` every package that came from a source distribution (there is
   no compiler, so none may need one; ``cobs`` is source-only: whether its C
   extension got built is reported);
3. runs everything with ``QEMU_CPU=cortex-a76`` (the Pi 5's core) and a Pi 5
   style ``/proc/cpuinfo`` bind-mounted over the host's (ai-edge-litert
   segfaults parsing an x86 one): ``edge info`` without and with libgomp1,
   the model's self-test and one inference, one Numba kernel against NumPy
   (a hypothesis test), the bridge framing tests;
4. once with QEMU's ``max`` CPU (SVE, SME), where the XNNPACK path returns
   wrong outputs: the self-test must catch it;
5. full mode: cold and cached warm-up, ``edge run`` on the simulator in
   dry-run and against the instrument emulator on a pty (100 frames each,
   peaks/flags/probabilities/actions compared frame by frame with the same
   run on the host) and a test subset;
6. checks that every runtime dependency resolves as a cp310 aarch64 wheel
   (JetPack 6 ships Python 3.10), except the known source-only ``cobs``.

The report goes to ``runs/aarch64/report.json`` and ``report.md`` (versions,
timings, pass/fail); the exit code is 1 when a step failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
#: Debian packages of the root. No compiler, no libgomp1 (downloaded to /opt/debs, installed by a step).
PACKAGES = ["python3", "python3-venv", "python3-pip", "ca-certificates"]
DEBS_HOOK = 'chroot "$1" sh -c "mkdir -p /opt/debs && cd /opt/debs && apt-get download libgomp1"'
QEMU_BINFMT = (":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46\\x02\\x01\\x01\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x00"
               "\\x02\\x00\\xb7\\x00:\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff"
               "\\xff\\xfe\\xff\\xff\\xff:/usr/bin/qemu-aarch64-static:F")
PI5_CPU = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
PI5_TAIL = "Revision\t: d04170\nSerial\t\t: 0000000000000000\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n"
#: Runtime wheels must exist for these (JetPack 6: Ubuntu 22.04, glibc 2.35, Python 3.10).
CP310_PLATFORMS = ["manylinux_2_35_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
                   "manylinux2014_aarch64"]
SOURCE_ONLY_OK = {"cobs"}  # pure-Python fallback when its optional C extension cannot be built
PY_ENV = "GOMP_SPINCOUNT=0"  # the machine is shared: no spinning OpenMP workers

# the emulated-run pieces run inside the root with /opt/venv/bin/python
MODEL_SNIPPET = r"""
import json, time, numpy as np
t = time.perf_counter()
from edge.anomaly import AnomalyModel
m = AnomalyModel.load()
g = json.load(open(m.path.with_name('golden.json')))
cases = [c for c in g['cases'] if c['features'] is not None]
r = m.predict(np.array(cases[0]['features'], np.float32))
print(json.dumps({'runtime_path': m.runtime_path, 'self_test': m.self_test.summary(),
                  'failed_paths': sorted(m.self_test.failed), 'case': cases[0]['name'],
                  'flags': list(r.flags), 'seconds': round(time.perf_counter() - t, 1)}))
"""
MAX_CPU_SNIPPET = r"""
import json, numpy as np
from edge.anomaly import AnomalyModel, ModelSelfTestError, default_model_path, make_interpreter, run_int8
from edge.features import N_FEATURES
blob = default_model_path().read_bytes()
raw = {p: run_int8(make_interpreter(blob, runtime_path=p), np.zeros((1, N_FEATURES), np.int8))[0].tolist()
       for p in ('default', 'builtin', 'reference')}
try:
    m = AnomalyModel.load()
    out = {'loaded': True, 'runtime_path': m.runtime_path, 'failed_paths': sorted(m.self_test.failed),
           'self_test': m.self_test.summary()}
except ModelSelfTestError as exc:
    out = {'loaded': False, 'refused': str(exc)[:400]}
out['zero_input_outputs'] = raw
print(json.dumps(out))
"""


class Check:
    def __init__(self, args):
        self.args = args
        self.cache = Path(args.cache_dir)
        self.work = self.cache / "work"
        self.root = self.work / "root"
        self.steps: list[dict] = []
        self.info: dict = {"mode": "quick" if args.quick else "full", "host": platform.node(),
                           "host_cpu": _cpu_model(), "started_utc": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                   time.gmtime()),
                           "git": _git("describe", "--always", "--dirty")}

    # -- plumbing ---------------------------------------------------------------
    def step(self, name: str, fn, *, critical: bool = False):
        """Run one step, time it, record pass/fail and its detail."""
        print(f"[aarch64] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            detail = fn()
            status = "pass"
        except StepFailed as exc:
            detail, status = str(exc), "FAIL"
        except subprocess.TimeoutExpired as exc:
            detail, status = f"timed out after {exc.timeout:.0f} s", "FAIL"
        except KeyboardInterrupt:  # SIGINT or SIGTERM: record how far this step got, then stop
            rec = {"step": name, "status": "interrupted", "seconds": round(time.perf_counter() - t0, 1),
                   "detail": "check stopped before this step finished"}
            self.steps.append(rec)
            raise SystemExit(self.finish())
        rec = {"step": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), "detail": detail}
        self.steps.append(rec)
        print(f"[aarch64] {name}: {status} in {rec['seconds']} s: {_short(detail)}", flush=True)
        self.write_report()
        if critical and status != "pass":
            raise SystemExit(self.finish())
        return rec

    def run(self, cmd: str, *, cpu: str = "cortex-a76", timeout: float = 1200, check: bool = True,
            pi5_cpuinfo: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command inside the emulated root (own mount namespace, niced, time-bounded)."""
        env_in = {"PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
                  "QEMU_CPU": cpu, "GOMP_SPINCOUNT": "0", "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
                  "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONDONTWRITEBYTECODE": "",
                  "NUMBA_CACHE_DIR": "", "TERM": "dumb"}
        env_in = {k: v for k, v in env_in.items() if v}
        r = shlex.quote(str(self.root))
        mounts = [f"mount -t proc proc {r}/proc", f"mount --rbind /dev {r}/dev",
                  f"mount -t sysfs -o ro sysfs {r}/sys", f"mount -t tmpfs tmpfs {r}/tmp",
                  f"mount --bind {shlex.quote(str(self.cache / 'pip'))} {r}/root/.cache/pip"]
        if pi5_cpuinfo:
            mounts.append(f"mount --bind {shlex.quote(str(self.work / 'cpuinfo'))} {r}/proc/cpuinfo")
        inner = " ".join(f"{k}={shlex.quote(v)}" for k, v in env_in.items())
        script = " && ".join(mounts) + (f" && exec chroot {r} /usr/bin/env -i {inner} /bin/sh -c "
                                        + shlex.quote(f"cd /src && {cmd}"))
        full = ["nice", "-n", "10", "timeout", "-k", "10", str(int(timeout)),
                "unshare", "--mount", "--propagation", "private", "sh", "-c", script]
        # own process group: an interrupted check leaves no emulated process behind
        with subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "QEMU_CPU": cpu}, start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout + 30)
            except BaseException:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
        p = subprocess.CompletedProcess(full, proc.returncode, out, err)
        log = self.work / "logs"
        log.mkdir(exist_ok=True)
        with open(log / "commands.log", "a") as fh:
            fh.write(f"\n$ [{cpu}] {cmd}\n(exit {p.returncode})\n{p.stdout}\n{p.stderr}\n")
        if check and p.returncode != 0:
            raise StepFailed(f"exit {p.returncode}: {_tail(p.stderr or p.stdout)}")
        return p

    # -- steps --------------------------------------------------------------------
    def host_setup(self):
        if os.geteuid() != 0:
            raise StepFailed("needs root (mmdebstrap, binfmt_misc, chroot)")
        missing = [t for t in ("mmdebstrap", "qemu-aarch64-static", "unshare", "chroot") if not shutil.which(t)]
        if missing:
            raise StepFailed(f"missing {missing}: apt-get install qemu-user-static mmdebstrap binfmt-support")
        binfmt = Path("/proc/sys/fs/binfmt_misc")
        if not (binfmt / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=True)
        entry = binfmt / "qemu-aarch64"
        if not entry.exists():
            (binfmt / "register").write_text(QEMU_BINFMT)
        text = entry.read_text()
        if "enabled" not in text or not re.search(r"flags:.*F", text):
            raise StepFailed(f"{entry} is not enabled with flag F (fix binary):\n{text}")
        return {"qemu": _first_line(["qemu-aarch64-static", "--version"]),
                "mmdebstrap": _first_line(["mmdebstrap", "--version"]), "binfmt": "qemu-aarch64, flags F"}

    def root_tarball(self):
        key = hashlib.sha256(json.dumps([SUITE, PACKAGES, DEBS_HOOK]).encode()).hexdigest()[:12]
        tar = self.cache / f"{SUITE}-arm64-{key}.tar"
        built = False
        if not tar.exists() or self.args.rebuild_root:
            self.cache.mkdir(parents=True, exist_ok=True)
            part = tar.with_suffix(".partial.tar")
            subprocess.run(["nice", "-n", "10", "timeout", "2400", "mmdebstrap", "--arch=arm64", "--variant=apt",
                            "--format=tar", f"--include={','.join(PACKAGES)}", f"--customize-hook={DEBS_HOOK}",
                            SUITE, str(part)], check=True, capture_output=True, text=True)
            part.rename(tar)
            built = True
        if self.work.exists():
            shutil.rmtree(self.work)
        self.root.mkdir(parents=True)
        subprocess.run(["tar", "-xf", str(tar), "-C", str(self.root)], check=True)
        for d in ("root/.cache/pip", "src"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.cache / "pip").mkdir(exist_ok=True)
        # the host's CA bundle (a TLS-inspecting proxy's CA would be in it) and resolver
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", self.root / "etc/ssl/certs/ca-certificates.crt")
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        n = os.cpu_count() or 1
        (self.work / "cpuinfo").write_text("\n".join(PI5_CPU.format(n=k) for k in range(n)) + "\n" + PI5_TAIL)
        files = _git("ls-files", "-co", "--exclude-standard", "-z").split("\0")
        for f in filter(None, files):
            src = REPO / f
            if src.is_file():
                dst = self.root / "src" / f
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        os_rel = (self.root / "etc/os-release").read_text()
        return {"tarball": str(tar), "built_now": built, "tarball_mb": round(tar.stat().st_size / 2**20),
                "os": re.search(r'PRETTY_NAME="([^"]+)"', os_rel).group(1), "source_files": len(files) - 1}

    def pip_install(self):
        self.run("python3 -m venv /opt/venv", timeout=600)
        p = self.run("pip install --report /tmp/report.json . pytest hypothesis && cat /tmp/report.json",
                     timeout=2400)
        report = json.loads(p.stdout[p.stdout.index("{"):])
        pkgs, sdists = {}, []
        for item in report["install"]:
            meta = item["metadata"]
            url = item["download_info"]["url"]
            kind = "wheel" if url.endswith(".whl") else ("local" if url.startswith("file:") else "sdist")
            pkgs[meta["name"]] = f"{meta['version']} ({kind})"
            if kind == "sdist":
                sdists.append(meta["name"])
        py = self.run("python3 --version", timeout=120).stdout.strip()
        cobs = self.run("python -c 'from cobs import cobs; print(cobs._using_extension)'", timeout=300)
        self.info["python"] = py
        self.info["packages"] = pkgs
        self.info["sdists"] = sdists
        self.info["cobs_c_extension"] = cobs.stdout.strip() == "True"
        bad = sorted(set(s.lower() for s in sdists) - SOURCE_ONLY_OK)
        detail = {"python": py, "from_sdist": sdists, "cobs_c_extension_built": self.info["cobs_c_extension"],
                  "packages": len(pkgs)}
        if bad:
            raise StepFailed(f"installed from source distributions: {bad} ({detail})")
        return detail

    def edge_info(self, *, expect_omp: bool):
        p = self.run("edge info", timeout=900, check=False)
        out = p.stdout + p.stderr
        layer = re.search(r"layer (\w+)", out)
        layer = layer.group(1) if layer else "?"
        warned = "OpenMP threading layer unavailable" in out
        st = re.search(r"self-test:\s+(.*)", out)
        detail = {"exit": p.returncode, "threading_layer": layer, "openmp_warning": warned,
                  "cobs": (re.search(r"cobs framing:\s+(.*)", out) or [None, "?"])[1],
                  "self_test": st.group(1) if st else "?",
                  "cpu": (re.search(r"CPU:\s+(.*)", out) or [None, "?"])[1]}
        if p.returncode != 0:
            raise StepFailed(f"edge info exit {p.returncode}: {_tail(out)}")
        if expect_omp and (layer != "omp" or warned):
            raise StepFailed(f"expected the OpenMP layer: {detail}")
        if not expect_omp and (layer == "omp" or not warned):
            raise StepFailed(f"expected a warning about the missing OpenMP layer: {detail}")
        return detail

    def install_libgomp(self):
        self.run("dpkg -i /opt/debs/libgomp1_*.deb", timeout=600)
        return self.run("dpkg-query -W libgomp1", timeout=120).stdout.strip()

    def model(self):
        p = self.run(f"python -c {shlex.quote(MODEL_SNIPPET)}", timeout=900)
        res = json.loads(p.stdout.strip().splitlines()[-1])
        if res["runtime_path"] != "default" or res["failed_paths"]:
            raise StepFailed(f"on a Pi 5 CPU the default path should pass the self-test: {res}")
        return res

    def max_cpu(self):
        p = self.run(f"python -c {shlex.quote(MAX_CPU_SNIPPET)}", cpu="max", timeout=900)
        res = json.loads(p.stdout.strip().splitlines()[-1])
        wrong = res["zero_input_outputs"]["default"] != [-17, -123, -89, -128, 122, -122]
        res["xnnpack_wrong_here"] = wrong
        caught = (not res["loaded"]) or "default" in res.get("failed_paths", [])
        if wrong and not caught:
            raise StepFailed(f"XNNPACK is wrong on the max CPU and the self-test did not catch it: {res}")
        if not wrong:
            res["note"] = "XNNPACK gave the right outputs on this QEMU's max CPU: nothing to catch"
        return res

    def pytest(self, targets: str, *, timeout: float):
        p = self.run(f"python -m pytest -q -p no:cacheprovider {targets}", timeout=timeout, check=False)
        last = [ln for ln in p.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        if p.returncode != 0:
            raise StepFailed(f"exit {p.returncode}: {_tail(p.stdout, 15)}")
        return last[0]

    def warmup(self, label: str):
        t0 = time.perf_counter()
        has_cmd = self.run("edge warmup --help", timeout=600, check=False).returncode == 0
        cmd = "edge warmup" if has_cmd else "python -c 'import edge; edge.warmup()'"
        t0 = time.perf_counter()
        self.run(cmd, timeout=3600)
        return {"command": cmd, "seconds": round(time.perf_counter() - t0, 1), "which": label}

    def edge_run(self, *, dry_run: bool, cpu: str = "cortex-a76"):
        out = f"/src/runs/aarch64-{'dry' if dry_run else 'pty'}-{cpu}.jsonl"
        flags = "--dry-run " if dry_run else ""
        cmd = f"edge run --layout 1m --frames 100 --rate max --quiet {flags}--results {out}"
        t0 = time.perf_counter()
        p = self.run(cmd, timeout=3600, cpu=cpu)
        secs = round(time.perf_counter() - t0, 1)
        # on the max CPU the model runs on the fallback path, whose int8 outputs may differ by a few
        # LSB: compare what decides commands there, everything on the Pi 5 CPU
        keys = ("n_peaks", "flags", "actions") if cpu == "max" else ("n_peaks", "flags", "probabilities", "actions")
        arm = _frames(self.root / out.lstrip("/"), keys)
        host_out = Path(tempfile.mkdtemp()) / "host.jsonl"
        subprocess.run([str(REPO / ".venv/bin/edge"), *cmd.replace(out, str(host_out)).split()[1:]],
                       cwd=REPO, capture_output=True, text=True, timeout=1800, check=True,
                       env={**os.environ, "GOMP_SPINCOUNT": "0"})
        host = _frames(host_out, keys)
        diff = [k for k in sorted(set(arm) | set(host)) if arm.get(k) != host.get(k)]
        cmds = sum(len([a for a in v["actions"] if a.get("action") == "command"]) for v in arm.values())
        detail = {"command": cmd, "cpu": cpu, "seconds": secs, "frames": len(arm), "commands": cmds,
                  "frames_differing_from_x86": len(diff),
                  "self_test": (re.findall(r"model self-test (.*)", p.stderr) or ["?"])[0][:160]}
        if len(arm) != 100 or diff:
            raise StepFailed(f"{detail}; first differing frames {diff[:5]}")
        return detail

    def cp310_wheels(self):
        import tomllib

        deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        binary = [d for d in deps if re.split(r"[<>=; ]", d)[0].lower() not in SOURCE_ONLY_OK]
        d = tempfile.mkdtemp()
        plat = [a for p in CP310_PLATFORMS for a in ("--platform", p)]
        pip = [sys.executable, "-m", "pip", "download", "--isolated", "--cert", "/etc/ssl/certs/ca-certificates.crt",
               "-q", "-d", d, "--python-version", "3.10", "--implementation", "cp", *plat]
        subprocess.run([*pip, "--only-binary=:all:", *binary], check=True, capture_output=True, text=True,
                       timeout=1200)
        subprocess.run([*pip, "--no-deps", "--no-binary=:all:", *(d for d in deps if d.split(">")[0] in
                                                                  SOURCE_ONLY_OK)],
                       check=True, capture_output=True, text=True, timeout=600)
        files = sorted(os.listdir(d))
        shutil.rmtree(d)
        wheels = [f for f in files if f.endswith(".whl")]
        # name-version of each: pip may pick older releases for 3.10 (ai-edge-litert 2.x has no cp310 aarch64)
        return {"wheels": len(wheels), "sdists": [f for f in files if not f.endswith(".whl")],
                "aarch64_wheels": sorted("-".join(f.split("-")[:2]) for f in wheels if "aarch64" in f)}

    # -- report ---------------------------------------------------------------------
    def write_report(self):
        out = Path(self.args.report_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = {**self.info, "steps": self.steps,
               "passed": all(s["status"] == "pass" for s in self.steps)}
        (out / "report.json").write_text(json.dumps(doc, indent=1) + "\n")
        lines = [f"aarch64 check ({doc['mode']}), {doc['started_utc']}, commit {doc['git']}, host {doc['host_cpu']}"
                 f" (QEMU user-mode emulation, shared machine: timings are rough)", "",
                 ]
        if doc.get("packages"):
            key = ("numpy", "numba", "llvmlite", "ai-edge-litert", "cobs", "pyserial", "fabio", "h5py", "hdf5plugin")
            lines += [f"{doc.get('python', '')} in the root; " + ", ".join(
                f"{k} {doc['packages'][k]}" for k in key if k in doc["packages"]), ""]
        lines += ["| step | result | time | detail |", "|---|---|---|---|"]
        for s in self.steps:
            lines.append(f"| {s['step']} | {s['status']} | {_dur(s['seconds'])} | {_short(s['detail'], 400)} |")
        (out / "report.md").write_text("\n".join(lines) + "\n")

    def finish(self) -> int:
        self.write_report()
        ok = all(s["status"] == "pass" for s in self.steps)
        print((Path(self.args.report_dir) / "report.md").read_text())
        print(f"[aarch64] {'PASSED' if ok else 'FAILED'}; report in {self.args.report_dir}/report.md and .json")
        return 0 if ok else 1


class StepFailed(Exception):
    pass


def _frames(path: Path, keys) -> dict:
    out = {}
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "frame":
            out[rec["frame"]] = {k: rec[k] for k in keys}
    return out


def _git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    return platform.machine()


def _first_line(cmd) -> str:
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]


def _tail(text: str, n: int = 6) -> str:
    return "\n".join((text or "").strip().splitlines()[-n:])


def _short(detail, n: int = 200) -> str:
    if isinstance(detail, dict):
        s = "; ".join(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in detail.items())
    else:
        s = str(detail)
    s = s.replace("\n", " ").replace("|", "/")
    return s if len(s) <= n else s[: n - 3] + "..."


def _dur(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60)} s"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="install, edge info, model, one kernel, framing tests")
    ap.add_argument("--cache-dir", default=os.path.join(os.environ.get("XDG_CACHE_HOME", "/root/.cache"),
                                                        "xray-edge-aarch64"),
                    help="root tarball, pip cache and the work root (default ~/.cache/xray-edge-aarch64)")
    ap.add_argument("--report-dir", default=str(REPO / "runs" / "aarch64"), help="report.json and report.md")
    ap.add_argument("--rebuild-root", action="store_true", help="rebuild the cached root tarball")
    ap.add_argument("--render", action="store_true", help="only rewrite report.md from report.json")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    c = Check(args)
    if args.render:
        doc = json.loads((Path(args.report_dir) / "report.json").read_text())
        c.steps = doc.pop("steps")
        doc.pop("passed")
        c.info = doc
        c.write_report()
        print((Path(args.report_dir) / "report.md").read_text())
        return 0
    c.step("host: qemu-aarch64 binfmt, tools", c.host_setup, critical=True)
    c.step("arm64 Debian bookworm root (cached tarball) + source copy", c.root_tarball, critical=True)
    c.step("pip install . (no compiler in the root)", c.pip_install, critical=True)
    c.step("edge info, no libgomp1 (must warn)", lambda: c.edge_info(expect_omp=False))
    c.step("apt: libgomp1", c.install_libgomp)
    c.step("edge info (Pi 5 CPU)", lambda: c.edge_info(expect_omp=True))
    c.step("model: self-test + one inference (Pi 5 CPU)", c.model)
    c.step("model on QEMU 'max' CPU (SVE/SME): self-test catches XNNPACK", c.max_cpu)
    c.step("one kernel vs NumPy: test_ring_moments_matches_bincount",
           lambda: c.pytest("tests/test_core_kernels.py -k test_ring_moments_matches_bincount", timeout=2400))
    c.step("bridge framing tests", lambda: c.pytest("tests/test_bridge_framing.py", timeout=1800))
    c.step("cp310 aarch64 wheels resolve (JetPack 6)", c.cp310_wheels)
    if not args.quick:  # cheapest first: the warm-up compiles every kernel (~30 min under emulation)
        c.step("test subset: bridge and policy",
               lambda: c.pytest("tests/test_bridge_commands.py tests/test_bridge_channel.py "
                                "tests/test_bridge_exactly_once.py tests/test_policy.py", timeout=3600))
        c.step("test subset: anomaly runtime and self-test",
               lambda: c.pytest("tests/test_anomaly.py -k '(self_test or golden or tampered or wrong or refuse or "
                                "bad_features or missing or corrupt or card) and not regenerates'", timeout=3600))
        c.step("warm-up, cold Numba cache", lambda: c.warmup("cold"))
        c.step("warm-up, cached", lambda: c.warmup("cached"))
        c.step("edge run, simulator, dry-run, 100 frames vs x86", lambda: c.edge_run(dry_run=True))
        c.step("edge run, simulator, emulator on a pty, 100 frames vs x86", lambda: c.edge_run(dry_run=False))
        c.step("edge run on QEMU 'max' CPU (self-test fallback), dry-run, 100 frames vs x86",
               lambda: c.edge_run(dry_run=True, cpu="max"))
    return c.finish()


if __name__ == "__main__":
    sys.exit(main())
