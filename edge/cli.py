"""The ``edge`` command: ``edge run``, ``edge serve``, ``edge bench``, ``edge info``, ``edge ports``,
``edge view``, ``edge report``, ``edge warmup``, ``edge service``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import stat
import sys
import threading
import time
from pathlib import Path

from .deploy import DEFAULT_SITE as _DEFAULT_SITE

_T_LOADED = time.perf_counter()


def _seconds_since_start() -> float:
    """Seconds since this process started (Linux: from /proc; else since this module loaded)."""
    try:
        with open("/proc/self/stat") as fh:
            start_ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/uptime") as fh:
            return float(fh.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _T_LOADED


class _Parser(argparse.ArgumentParser):
    """One line on stderr and exit code 2 for every command-line mistake."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class UsageError(Exception):
    """A bad argument found after parsing (a file, a combination): one line, exit code 2."""


def nonempty(text: str) -> str:
    """A file name, device or spec: not empty (an empty value would silently mean the default)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def hz(text: str) -> float:
    """A frame rate (Hz) within the sources' pacing range."""
    from .sources.base import MAX_RATE_HZ, MIN_RATE_HZ

    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not MIN_RATE_HZ <= v <= MAX_RATE_HZ:
        raise argparse.ArgumentTypeError(f"must be a frame rate in [{MIN_RATE_HZ:g}, {MAX_RATE_HZ:g}] Hz, "
                                         f"got {text!r}")
    return v


def rate(text: str):
    """A frame rate (Hz), ``file`` or ``max``."""
    if text in ("file", "max"):
        return text
    try:
        return hz(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, 'file' or 'max'") from None


def bounded_int(lo: int, hi: int):
    """An argparse type: an integer in [lo, hi]."""
    def parse(text: str) -> int:
        v = _int(text)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v

    return parse


def rate_list(text: str) -> list[float]:
    """Comma-separated frame rates (Hz), sorted."""
    try:
        rates = [hz(r.strip()) for r in text.split(",") if r.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"comma-separated rates expected: {exc}") from None
    if not rates:
        raise argparse.ArgumentTypeError("needs at least one rate (Hz), e.g. 25,50,100")
    return sorted(rates)


def layout_list(text: str) -> list[str]:
    """Comma-separated simulator layouts."""
    from .geometry import LAYOUTS

    names = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [n for n in names if n not in LAYOUTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown layout(s) {bad or [text]}; known: {', '.join(sorted(LAYOUTS))}")
    return names


def _writable(path: str | os.PathLike, option: str, created: list[Path]) -> Path:
    """Create ``path`` (and its directories) now, before any slow work, so that
    an unwritable file is a usage error; what was created is appended to
    ``created`` for :func:`_remove` if a later check fails."""
    p = Path(path)
    try:
        missing = [d for d in reversed(p.parents) if not d.exists()]
        p.parent.mkdir(parents=True, exist_ok=True)
        created.extend(missing)
        if not p.exists():
            p.open("a", encoding="utf-8").close()
            created.append(p)
        elif not p.is_file() or not os.access(p, os.W_OK):  # never open a FIFO or a device here
            raise UsageError(f"{option} {path}: cannot write: not a writable regular file")
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot write: {exc.strerror or exc}") from None
    return p


def _remove(created: list[Path]) -> None:
    for p in reversed(created):
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() else p.unlink()


class _Status:
    """Live one-line status (carriage return on a terminal, a line every 2 s otherwise)."""

    def __init__(self, stream, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.interval = 0.25 if self.tty else 2.0
        self.t0 = time.perf_counter()
        self.t_last = 0.0
        self.n = 0
        self.lat: list[float] = []
        self.flags: dict[str, int] = {}
        self.cmds = 0
        self.last_flags: tuple = ()
        self.pipe = None

    def __call__(self, rec: dict) -> None:
        self.n += 1
        if self.n == 1:
            self.stream.write(f"edge run: first frame processed {_seconds_since_start():.1f} s after start\n")
        self.lat.append(rec["latency_ms"])
        for f in rec["flags"]:
            self.flags[f] = self.flags.get(f, 0) + 1
        self.cmds += sum(1 for a in rec["actions"] if a["action"] == "command")
        # why a flag was raised (or a proposal refused), once per change
        why = rec.get("evidence_summary")
        state = (tuple(rec["flags"]), tuple(rec.get("proposed", ())))
        if why and not self.quiet and state != self.last_flags:
            lead = "\n" if self.tty else ""  # off the status line being redrawn
            self.stream.write(f"{lead}frame {rec['frame']}: {why}\n")
        self.last_flags = state
        now = time.perf_counter()
        if self.quiet or now - self.t_last < self.interval:
            return
        self.t_last = now
        self.stream.write(self.line(rec) + ("\r" if self.tty else "\n"))
        self.stream.flush()
        self.lat = self.lat[-200:]

    def line(self, rec: dict) -> str:
        import numpy as np

        el = time.perf_counter() - self.t0
        lat = np.asarray(self.lat[-200:])
        pipe = self.pipe
        dropped = pipe._frames.dropped if pipe is not None else 0
        if pipe is not None:  # a live stream drops in its receiver queue
            dropped += getattr(pipe.source, "totals", {}).get("dropped", 0)
        ok = failed = 0
        if pipe is not None:
            with pipe._lock:
                for c in pipe.command_records:
                    if c["status"] in ("ok", "dry_run", "no_device"):
                        ok += 1
                    else:
                        failed += 1
        flags = ",".join(rec["flags"]) or "-"
        return (f"frame {rec['frame']:>6} | {self.n / el:6.1f} fps | drop {dropped} | "
                f"lat p50 {np.percentile(lat, 50):5.1f} p99 {np.percentile(lat, 99):5.1f} ms | "
                f"peaks {rec['n_peaks']:>4} | flags {flags:<28.28} | cmds {self.cmds} ack {ok} fail {failed}")

    def end(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")


def _check_run_args(args, source_kind: str) -> None:
    """Every argument check that needs no slow work; raises UsageError."""
    from .geometry import LAYOUTS

    if args.source.startswith("tcp://"):
        if args.rate is not None or args.loop:
            raise UsageError("--rate/--loop do not apply to a live stream (the detector sets the pace)")
    elif args.channel is not None or args.series is not None:
        raise UsageError("--channel/--series apply to a live stream source (tcp://HOST:PORT) only")
    if args.layout is not None and source_kind not in ("sim", "scenario"):
        raise UsageError(f"--layout {args.layout} applies to the simulator ('sim', 'scenario') only; a file "
                         f"source has its own detector shape")
    emulator = not args.dry_run and not args.port
    for option, value in (("--emulator-attenuation", args.emulator_attenuation),
                          ("--applied-log", args.applied_log)):
        if value is not None and not emulator:
            raise UsageError(f"{option} applies to the built-in emulator only (not with "
                             f"{'--dry-run' if args.dry_run else '--port'})")
    if args.model is not None:
        if args.no_model:
            raise UsageError("--model and --no-model contradict each other")
        m = Path(args.model)
        if not m.is_file():
            raise UsageError(f"--model {args.model}: no such file")
        if m.suffix.lower() != ".tflite":
            raise UsageError(f"--model {args.model}: not a TFLite model (expected a .tflite file with its "
                             f"model_card.json beside it)")
    if args.port and not args.dry_run and args.port.startswith("/"):  # a device path (not a URL or usb:...)
        if not os.path.exists(args.port):
            raise UsageError(f"--port {args.port}: no such device")
        if not stat.S_ISCHR(os.stat(args.port).st_mode):
            raise UsageError(f"--port {args.port}: not a serial device (a character device such as /dev/ttyACM0)")
    arg = args.source.partition(":")[2]
    if args.layout is not None and source_kind in ("sim", "scenario") and arg.lower() in LAYOUTS \
            and arg.lower() != args.layout:
        raise UsageError(f"--layout {args.layout} contradicts --source {args.source}")
    if args.web is not None:  # the address now; binding it (a busy port) comes later, still before the warm-up
        from .web import WebConfigError, parse_bind

        try:
            parse_bind(args.web)
        except WebConfigError as exc:
            raise UsageError(f"--web {args.web}: {exc}") from None
    if args.rate == "file" and source_kind in ("sim", "scenario"):
        raise UsageError("--rate file needs a file source (CBF, Eiger) that records its frame time")


def cmd_run(args) -> int:
    import firmware_bridge as fb

    from .policy import Policy, PolicyConfigError
    from .sources import SourceError, open_source

    site = None
    if args.site:  # its values fill the options not given on the command line, then everything is checked
        from .deploy.site import SiteConfigError, load_site

        try:
            site = load_site(args.site)
        except SiteConfigError as exc:
            print(f"edge run: --site: {exc}", file=sys.stderr)
            return 2
        args.site_file = site.path
        for dest, value in site.run_args().items():
            if dest not in getattr(args, "explicit", ()):
                setattr(args, dest, value)
    source_kind = args.source.split(":")[0]
    created: list[Path] = []  # files and directories to remove if a later check fails
    try:
        _check_run_args(args, source_kind)
        try:
            limits = fb.Limits.load(args.limits)
        except (fb.ConfigError, ValueError) as exc:  # ValueError: e.g. a binary file (UnicodeDecodeError)
            raise UsageError(f"--limits {args.limits}: {exc}") from None
        try:
            policy = Policy.from_toml(args.config, dry_run=args.dry_run, limits=limits)
        except PolicyConfigError as exc:
            raise UsageError(f"--config: {exc}") from None
        attenuation = 4 if args.emulator_attenuation is None else args.emulator_attenuation
        if not args.dry_run and not args.port:
            try:
                fb.validate("set_attenuation", limits=limits, level=attenuation)
            except fb.BridgeError as exc:
                raise UsageError(f"--emulator-attenuation {attenuation}: {exc}") from None
        if args.results is not None:
            results = _writable(args.results, "--results", created)
        else:  # one new file per run; the oldest beyond --keep-runs are deleted once the run starts
            from .deploy.runs import new_results_path

            where = args.results_dir or "runs"
            try:
                results = _writable(new_results_path(where), "--results-dir", created)
            except OSError as exc:
                raise UsageError(f"--results-dir {where}: {exc}") from None
        if args.applied_log:
            _writable(args.applied_log, "--applied-log", created)
    except UsageError as exc:
        _remove(created)
        print(f"edge run: {exc}", file=sys.stderr)
        return 2
    src_kw = {}
    if source_kind in ("sim", "scenario") and args.layout:
        src_kw["layout"] = args.layout
    if args.source.startswith("tcp://"):  # live Stream V2 detector: it sets the pace
        # images wait compressed in the source's queue (at least 64 of them) before the oldest is dropped
        src_kw.update(channel=args.channel, max_series=args.series, queue_size=max(args.queue_size, 64))
    rate = args.rate
    if rate is None:  # the simulator stands in for a live detector: pace it like one
        rate = 100.0 if source_kind in ("sim", "scenario") else "max"
    try:
        source = open_source(args.source, rate_hz=None if rate == "max" else rate, n_frames=args.frames,
                             loop=args.loop, **src_kw)
    except SourceError as exc:
        _remove(created)
        print(f"edge run: --source: {exc}", file=sys.stderr)
        return 2
    if site is not None and site.geometry:
        from .deploy.runs import apply_geometry

        try:
            apply_geometry(source, site.geometry)
        except ValueError as exc:
            source.close()
            _remove(created)
            print(f"edge run: --site: {site.path}: [geometry]: {exc}", file=sys.stderr)
            return 2
    model = None
    if not args.no_model:
        from .anomaly import AnomalyError, AnomalyModel

        try:
            model = AnomalyModel.load(args.model, num_threads=args.model_threads)
        except AnomalyError as exc:
            source.close()
            _remove(created)
            print(f"edge run: --model: {exc}", file=sys.stderr)
            return 2
        print(f"edge run: model self-test {model.self_test.summary()}", file=sys.stderr)
    header = _run_header(args, source, policy, model, results)
    web = None
    if args.web is not None:  # bound before the warm-up: a busy port fails at once
        web = _start_web(args.web, "edge run", header=header, save_dir=results)
        if web is None:
            source.close()
            _remove(created)
            return 2
    from . import WARMUP_DTYPES, warmup
    from .pipeline import Pipeline
    from .sources import SimulatorSource

    if isinstance(source, SimulatorSource):  # simulate the frames while the kernels load
        source.prepare(background=True)
    dtypes = WARMUP_DTYPES if getattr(source, "dtype", None) is None else (source.dtype,)
    print(f"edge run: source {source!r}, warming up kernels for {', '.join(map(str, dtypes))} frames ...",
          file=sys.stderr)
    with _interrupt_exits("edge run", args, cleanup=lambda: _remove(created)):  # nothing ran: no empty file
        warmup(dtypes, features=model is not None, extras=False, progress=_warmup_progress("edge run"))
        if model is not None:  # one inference; not model.warmup(), which compiles features for every dtype
            import numpy as np

            from .features import N_FEATURES

            model.predict(np.zeros(N_FEATURES, np.float32))

    with contextlib.ExitStack() as stack:
        if web is not None:
            stack.callback(web.hub.stop)
            stack.callback(web.close)
            stack.callback(time.sleep, 0.3)  # first: let open pages receive the run's last update
        bridge = None
        if args.dry_run:
            print("edge run: dry run: commands are validated and logged, never sent", file=sys.stderr)
        elif args.port:
            try:
                bridge = stack.enter_context(fb.connect(args.port, limits=limits))
            except fb.BridgeError as exc:
                print(f"edge run: cannot connect to {args.port}: {exc}", file=sys.stderr)
                return 2
            print(f"edge run: connected to {args.port}", file=sys.stderr)
        else:
            from firmware_bridge.emulator import spawn_pty_emulator

            # its own process, like the real board: on a busy host an in-process
            # emulator thread would read our heartbeats late and trip its watchdog
            try:
                emu = spawn_pty_emulator(applied_log=args.applied_log)
            except RuntimeError as exc:
                print(f"edge run: {exc}", file=sys.stderr)
                return 1
            stack.callback(emu.stop)
            bridge = stack.enter_context(fb.connect(emu.port, limits=limits))
            # the emulated instrument boots fully attenuated with the shutter
            # closed; set it up as an operator would before collecting data
            bridge.send("set_attenuation", level=attenuation)
            bridge.send("open_shutter")
            print(f"edge run: built-in instrument emulator on pty {emu.port} (attenuation "
                  f"{attenuation}, shutter open; use --port for a real device)", file=sys.stderr)
        if bridge is not None:
            state = bridge.state()
            if state is not None:
                policy.on_ack(state)
            if web is not None:
                web.hub.state_source = bridge.state
        if args.results is None and args.keep_runs:
            from .deploy.runs import prune_runs

            prune_runs(results.parent, args.keep_runs)
        status = _Status(sys.stderr, args.quiet)
        pipe = Pipeline(source, model=model, policy=policy, bridge=bridge, results=results,
                        queue_size=args.queue_size, on_frame=status, header=header,
                        observer=None if web is None else web.hub,
                        workers=args.workers, threads=args.threads)
        status.pipe = pipe
        stack.enter_context(_stop_on_signals(pipe))
        try:
            summary = pipe.run(max_frames=args.frames, duration=args.duration)
        except KeyboardInterrupt:
            pipe.stop()
            summary = pipe.summary(time.perf_counter() - status.t0)
        except SourceError as exc:
            status.end()
            print(f"edge run: source failed: {exc}", file=sys.stderr)
            return 1
        finally:
            source.close()
            if web is not None:
                web.hub.end()
        status.end()
        if web is not None and args.web_keep:
            print(f"edge run: run finished; the live view stays at {web.url} until Ctrl-C", file=sys.stderr)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1.0)
    print(summary.table())
    return 0


def _run_header(args, source, policy, model, results) -> dict:
    """The run's description: first line of the results file and the page's header."""
    from . import __version__
    from .geometry import Geometry
    from .web import geometry_summary

    g = getattr(source, "geometry", None)
    geometry = geometry_summary(g) if isinstance(g, Geometry) else None
    head = {"version": __version__, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "t_wall": time.time(),
            "t_perf": time.perf_counter(), "source": repr(source), "geometry": geometry,
            "policy": str(args.config) if args.config else "edge/policy_default.toml (shipped)",
            "limits": str(args.limits) if args.limits else "firmware_bridge/limits.toml (shipped)",
            "dry_run": bool(args.dry_run or getattr(policy, "dry_run", False)),
            "port": "none (dry run)" if args.dry_run else (args.port or "built-in instrument emulator (pty)"),
            "results": str(results)}
    if model is not None:
        head["classes"] = list(model.classes)
        head["thresholds"] = {c: float(t) for c, t in zip(model.classes, model.thresholds)}
    from .deploy.runs import run_header  # provenance: host, sha256 of the site/policy/limits files and model

    site = getattr(args, "site_file", None)
    files = {"site": site, "policy": args.config, "limits": args.limits}
    return {**run_header(source, model=model, files=files, extra={"argv": sys.argv[1:]}), **head}


def _start_web(bind: str, who: str, *, header: dict | None = None, save_dir=None, follow=None):
    """Bind the read-only web view (before any warm-up); None after a one-line error."""
    from .web import LiveHub, WebConfigError, WebServer, frames_dir, is_loopback, new_token, parse_bind

    try:
        host, port = parse_bind(bind)
        token = None if is_loopback(host) else new_token()
        hub = LiveHub(header, save_dir=None if save_dir is None else frames_dir(save_dir))
        if follow is not None:
            hub.follow(follow)
        server = WebServer(hub, host, port, token=token)
    except (WebConfigError, OSError) as exc:
        print(f"{who}: --web {bind}: {exc}", file=sys.stderr)
        return None
    hub.start()
    server.start()
    print(f"{who}: live view (read-only) at {server.url}" + (" (the token is required)" if token else ""),
          file=sys.stderr)
    return server


def cmd_view(args) -> int:
    path = Path(args.results)
    if not path.is_file():
        print(f"edge view: no such results file: {path}", file=sys.stderr)
        return 2
    web = _start_web(args.web, "edge view", follow=path)
    if web is None:
        return 2
    try:
        t_end = None if args.duration is None else time.monotonic() + args.duration
        with contextlib.suppress(KeyboardInterrupt):
            while t_end is None or time.monotonic() < t_end:
                time.sleep(0.2)
    finally:
        web.close()
        web.hub.stop()
    return 0


def cmd_report(args) -> int:
    from .web import write_report

    path = Path(args.results)
    if not path.is_file():
        print(f"edge report: no such results file: {path}", file=sys.stderr)
        return 2
    out = write_report(path, args.out, max_images=args.max_images)
    print(f"edge report: wrote {out} ({out.stat().st_size / 1e6:.1f} MB, self-contained; opens without network)")
    return 0


def cmd_serve(args) -> int:
    import json

    from .sources import SourceError, open_source

    if not 0 < args.port < 65536:
        print(f"edge serve: --port must be 1-65535, got {args.port}", file=sys.stderr)
        return 2
    src_kw = {}
    if args.source.split(":")[0] in ("sim", "scenario") and args.layout:
        src_kw["layout"] = args.layout
    if args.source.startswith("tcp://"):
        print("edge serve: the source must be a simulator, scenario or file source, not a stream", file=sys.stderr)
        return 2
    rate = args.rate
    if rate is None:
        rate = 100.0 if args.source.split(":")[0] in ("sim", "scenario") else "max"
    try:
        source = open_source(args.source, rate_hz=None if rate == "max" else rate, n_frames=args.frames, **src_kw)
    except SourceError as exc:
        print(f"edge serve: source: {exc}", file=sys.stderr)
        return 2
    import zmq

    from .stream.sender import serve

    endpoint = f"tcp://{args.bind}:{args.port}"
    print(f"edge serve: {source!r} as Stream V2 on {endpoint} ({args.compression}, {args.dtype}, pixel mask "
          f"{'off' if args.no_mask else 'on'}), waiting for a client ...", file=sys.stderr)
    try:
        with source:
            stats = serve(source, endpoint=endpoint, compression=None if args.compression == "none" else
                          args.compression, pixel_mask=not args.no_mask, dtype=args.dtype, n_series=args.series,
                          series_id=args.series_id, send_timeout=args.send_timeout, wait_client=args.wait_client)
    except zmq.ZMQError as exc:
        print(f"edge serve: cannot bind {endpoint}: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(f"edge serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(stats.to_dict()))
    return 0


def cmd_bench(args) -> int:
    if args.web_clients:
        return _bench_web(args)
    created: list[Path] = []
    stem = args.out or ("runs/contention" if args.contention is not None else "runs/latency")
    try:
        out = _writable(Path(stem).with_suffix(".json"), "--out", created)
        _writable(out.with_suffix(".md"), "--out", created)
    except UsageError as exc:
        _remove(created)
        print(f"edge bench: {exc}", file=sys.stderr)
        return 2
    from .latency import benchmark, contention_benchmark, contention_markdown, to_markdown, write_results

    if args.contention is not None:
        res = contention_benchmark(args.layouts, max_competitors=args.contention, n_frames=args.frames or 120,
                                   use_model=not args.no_model, scaling=not args.no_scaling)
        markdown = contention_markdown
    else:
        res = benchmark(args.layouts, latency_rate=args.rate, n_frames=args.frames or 300, rates=args.rates,
                        use_model=not args.no_model)
        markdown = to_markdown
    write_results(res, out, out.with_suffix(".md"), markdown=markdown)
    print(markdown(res))
    print(f"written: {out} and {out.with_suffix('.md')}")
    return 0


def _bench_web(args) -> int:
    import json

    from .web.bench import to_markdown, web_overhead

    res = web_overhead(args.layouts, clients=args.web_clients, rate_hz=args.rate, n_frames=args.frames or 500,
                       use_model=not args.no_model)
    out = Path(args.out or "runs/latency")
    stem = out.with_name(out.name + "-web")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2, default=float))
    stem.with_suffix(".md").write_text(to_markdown(res))
    print(to_markdown(res))
    print(f"written: {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


def cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    import numba

    from .latency import machine_info

    m = machine_info()
    print(f"CPU:            {m['cpu']} ({m['machine']}, {m['cores']} cores)")
    print(f"Python:         {platform.python_version()} ({sys.executable})")
    for pkg in ("xray-edge", "numpy", "numba", "llvmlite", "pyserial", "cobs", "fabio", "h5py", "hdf5plugin",
                "ai-edge-litert", "tflite-runtime", "onnx", "onnxruntime"):
        try:
            v = md.version(pkg)
        except md.PackageNotFoundError:
            v = "not installed"
        print(f"{pkg + ':':<16}{v}")
    from numba import njit, prange

    @njit(parallel=True)
    def _touch(n):  # a parallel region initialises the threading layer
        s = 0
        for i in prange(n):
            s += i
        return s

    _touch(10)
    layer = numba.threading_layer()
    print(f"numba threads:  {numba.get_num_threads()} (layer {layer}; set NUMBA_NUM_THREADS)")
    try:  # the layer Numba picks silently when OpenMP is missing is 'workqueue'
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError as exc:
        print(f"WARNING:        OpenMP threading layer unavailable ({exc}); Numba runs on '{layer}': the "
              "OMP_*/GOMP_* settings do nothing and kernels are slower. Install libgomp "
              "(Debian/Raspberry Pi OS: sudo apt install libgomp1)", file=sys.stderr)
    from .pipeline import default_workers

    print("pipeline:       {} worker(s) x {} Numba thread(s) by default (edge run --workers/--threads)"
          .format(*default_workers()))
    import os

    wait = os.environ.get("OMP_WAIT_POLICY") or "unset (spin GOMP_SPINCOUNT times, then sleep)"
    print(f"OpenMP wait:    OMP_WAIT_POLICY {wait}; GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT') or 'default'}")
    try:
        from cobs import cobs

        ext = "C extension" if getattr(cobs, "_using_extension", False) else "pure Python (no C extension built)"
    except ImportError as exc:
        ext = f"not importable: {exc}"
    print(f"cobs framing:   {ext}")
    try:
        from .anomaly import AnomalyModel, _interpreter_class

        model = AnomalyModel.load()
        it = _interpreter_class()
        print(f"model runtime:  {it.__module__}.{it.__name__}, '{model.runtime_path}' path")
        print(f"model:          {model.path} ({model.path.stat().st_size} bytes), classes {', '.join(model.classes)}")
        print(f"self-test:      {model.self_test.summary()}")
    except Exception as exc:  # info must print whatever it can
        print(f"model:          not loadable: {exc}")
        print("self-test:      FAILED or not run: the model would be refused by edge run")
        return 1
    return 0


def cmd_ports(args) -> int:
    from serial.tools import list_ports

    ports = sorted(list_ports.comports(), key=lambda p: p.device)
    if not ports:
        print("no serial ports found")
        return 0
    print(f"{'device':<22} {'VID:PID':<10} {'serial':<18} description")
    for p in ports:
        vidpid = f"{p.vid:04x}:{p.pid:04x}" if p.vid is not None else "-"
        print(f"{p.device:<22} {vidpid:<10} {(p.serial_number or '-'):<18} {p.description or '-'}")
    return 0


def _warmup_progress(prog: str):
    """A :func:`edge.warmup` progress callback printing one line per compiling step."""
    def progress(step: int, n: int, label: str) -> None:
        if not progress.told:
            from .deploy import cache

            where = cache.cache_dir(os.path.dirname(os.path.abspath(__file__))) or "nowhere: no writable directory"
            print(f"{prog}: compiling kernels - first start only (or after an upgrade); they are cached in "
                  f"{where} (`edge warmup` does this at install time)", file=sys.stderr)
            progress.told = True
        print(f"{prog}: compiling kernels {step}/{n} ({label}) - first start only", file=sys.stderr, flush=True)

    progress.told = False
    return progress


def _exit_interrupted(prog: str) -> None:
    """Print one line and leave with code 130 at once, without finalizers: a
    Ctrl-C that landed inside LLVM leaves half-built compiler objects whose
    finalizers print tracebacks at interpreter exit."""
    with contextlib.suppress(Exception):
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(130)


@contextlib.contextmanager
def _interrupt_exits(prog: str, args, cleanup=None):
    """Around kernel compilation: Ctrl-C prints one line and exits 130 at once.

    A KeyboardInterrupt raised while LLVM calls back into Python is swallowed
    by ctypes (the compile goes on and the run starts anyway) or leaves
    half-built objects that print tracebacks at exit; so when we are the
    process, the handler leaves directly. Called from Python (tests), Ctrl-C
    raises KeyboardInterrupt as usual."""
    if not getattr(args, "own_process", False) or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cleanup is not None:
            with contextlib.suppress(Exception):
                cleanup()
        _exit_interrupted(prog)

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def _stop_on_signals(pipe):
    """SIGTERM (systemd stop) or a first Ctrl-C end the run cleanly: the
    pipeline finishes the frame in hand, waits for queued commands and writes
    the summary record. A second Ctrl-C interrupts at once."""

    def handler(signum, frame):
        if pipe.stop_reason is None:
            pipe.stop(signal.Signals(signum).name)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def cmd_warmup(args) -> int:
    from . import WARMUP_DTYPES, warmup
    from .deploy import cache

    dtypes = list(args.dtype or ())
    spec, layout, use_model = args.source, args.layout, not args.no_model
    if args.site:
        from .deploy.site import SiteConfigError, load_site

        try:
            site = load_site(args.site)
        except SiteConfigError as exc:
            print(f"edge warmup: site: {exc}", file=sys.stderr)
            return 2
        spec, layout = spec or site.source or "scenario", layout or site.layout
        use_model = use_model and site.model_enabled is not False
    if spec and not dtypes:
        from .sources import SourceError, open_source

        try:
            kw = {"layout": layout} if layout and spec.split(":")[0] in ("sim", "scenario") else {}
            with open_source(spec, **kw) as src:
                if src.dtype is not None:
                    dtypes = [src.dtype]
        except SourceError as exc:  # e.g. the data directory is still empty: prepare for every dtype
            print(f"edge warmup: source {spec}: {exc}; preparing the usual frame dtypes", file=sys.stderr)
    dtypes = dtypes or list(WARMUP_DTYPES)
    t0 = time.perf_counter()
    with _interrupt_exits("edge warmup", args):
        warmup(dtypes, features=use_model, extras=args.all, progress=_warmup_progress("edge warmup"))
    where = cache.cache_dir(os.path.dirname(os.path.abspath(__file__)))
    print(f"edge warmup: kernels for {', '.join(str(d) for d in dtypes)} frames ready in "
          f"{time.perf_counter() - t0:.1f} s (cache: {where or 'none, no writable directory'})")
    return 0


def cmd_service(args) -> int:
    from .deploy.service import install, udev_rule, unit_text
    from .deploy.site import SiteConfigError, load_site

    site_path = Path(args.site).absolute()
    site = None
    if site_path.exists():
        try:
            site = load_site(site_path)
        except SiteConfigError as exc:
            print(f"edge service: site: {exc}", file=sys.stderr)
            return 2
    if args.udev is not None:
        from firmware_bridge.transport import _VIDPID

        spec = args.udev or (site.port if site is not None else None) or "usb:2e8a:000a"
        m = _VIDPID.match(spec)
        if m is None:
            print(f"edge service: --udev: expected usb:VID:PID[:SERIAL] (hex), got {spec!r}", file=sys.stderr)
            return 2
        print(udev_rule(*m.groups()), end="")
        return 0
    if not args.install:
        if site is None:
            print(f"edge service: note: {site_path} does not exist yet (`edge service --install` writes an "
                  f"example)", file=sys.stderr)
        print(unit_text(site_path, user=args.user, site_config=site), end="")
        return 0
    if args.root == "/" and hasattr(os, "geteuid") and os.geteuid() != 0:
        print("edge service: --install needs root (sudo), or --root DIR to write the files below DIR",
              file=sys.stderr)
        return 2
    try:
        install(site_path, site_config=site, user=args.user, root=args.root,
                log=lambda m: print(f"edge service: {m}", file=sys.stderr))
    except OSError as exc:
        print(f"edge service: install failed: {exc}", file=sys.stderr)
        return 1
    print(f"edge service: installed. Edit {site_path}, then: sudo systemctl enable --now xray-edge; "
          f"logs: journalctl -u xray-edge -f", file=sys.stderr)
    return 0


def _dtype(text: str):
    import numpy as np

    from ._validate import as_frame

    try:
        return as_frame(np.zeros((1, 1), dtype=np.dtype(text))).dtype
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a supported frame dtype: {text!r} (e.g. int32, uint16, float32)")


def build_parser() -> argparse.ArgumentParser:
    from .geometry import LAYOUTS

    p = _Parser(prog="edge", description="Real-time X-ray detector processing beside the detector.")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="process frames, flag anomalies, send corrections",
                       description="Run the real-time loop. Default: the scripted simulator scenario with the "
                                   "built-in instrument emulator on a pty.")
    r.add_argument("--source", type=nonempty, default="scenario",
                   help="'scenario' (default), 'sim', 'scenario:FILE.toml', a CBF file/dir/glob or an Eiger *_master.h5")
    r.add_argument("--layout", default=None, choices=sorted(LAYOUTS), type=str.lower,
                   help="simulated detector: 1m (default), 4m, 9m, 16m, pilatus-6m")
    r.add_argument("--frames", type=positive_int, default=None, help="stop after this many frames")
    r.add_argument("--duration", type=positive_float, default=None, help="stop after this many seconds")
    r.add_argument("--rate", type=rate, default=None,
                   help="frame rate in Hz, 'file' (the file's frame rate) or 'max' (as fast as processing goes); "
                        "default 100 Hz for the simulator, 'max' for files")
    r.add_argument("--loop", action="store_true", help="replay a file source from the start when it ends")
    r.add_argument("--port", type=nonempty, default=None,
                   help="serial device: path, pyserial URL, usb:VID:PID[:SERIAL] (default: built-in emulator)")
    r.add_argument("--dry-run", action="store_true", help="validate and log commands, never send them")
    r.add_argument("--config", type=nonempty, default=None, help="policy TOML (default: the shipped policy_default.toml)")
    r.add_argument("--limits", type=nonempty, default=None, help="bridge limits TOML (default: the shipped limits.toml)")
    r.add_argument("--model", type=nonempty, default=None, help="anomaly model .tflite (default: the shipped model)")
    r.add_argument("--no-model", action="store_true", help="run without the anomaly model")
    r.add_argument("--model-threads", type=bounded_int(1, 256), default=1, help="TFLite threads (default 1)")
    r.add_argument("--workers", type=bounded_int(1, 256), default=None,
                   help="frames analysed in parallel, each by its own worker thread (default: one per core, "
                        "at most 8); the policy still sees frames in order")
    r.add_argument("--threads", type=bounded_int(1, 1024), default=None,
                   help="Numba threads inside each worker's kernels (default: cores / workers)")
    r.add_argument("--queue-size", type=bounded_int(1, 100_000), default=4,
                   help="frames buffered before dropping the oldest (default 4)")
    r.add_argument("--results", type=nonempty, default=None, help="JSON Lines results file (default runs/run-<time>.jsonl)")
    r.add_argument("--applied-log", type=nonempty, default=None, help="built-in emulator: JSON Lines log of applied commands")
    r.add_argument("--emulator-attenuation", type=int, default=None,
                   help="built-in emulator: attenuator level set before the run (default 4)")
    r.add_argument("--quiet", action="store_true", help="no live status line")
    r.add_argument("--web", metavar="[HOST:]PORT", default=None,
                   help="serve the read-only live view (default host 127.0.0.1; any other host gets an access "
                        "token, printed with the URL)")
    r.add_argument("--web-keep", action="store_true", help="keep serving the live view after the run until Ctrl-C")
    r.add_argument("--channel", default=None,
                   help="live stream: image channel (threshold) name; default the first listed in 'start'")
    r.add_argument("--series", type=positive_int, default=None, help="live stream: stop after this many series end")
    r.add_argument("--site", nargs="?", const=_DEFAULT_SITE, default=None, metavar="FILE",
                   help=f"site configuration TOML (default FILE: {_DEFAULT_SITE}); options given here win")
    r.add_argument("--results-dir", default=None,
                   help="directory for one run-<time>.jsonl per run (default runs/; ignored with --results)")
    r.add_argument("--keep-runs", type=positive_int, default=None,
                   help="keep at most this many run files in the results directory (default: all)")
    r.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="replay a source as a DECTRIS Stream V2 detector (ZeroMQ PUSH server)",
                        description="Detector simulator that speaks Stream V2: binds a PUSH socket and sends "
                                    "start / image / end messages for each series, paced at --rate.")
    sv.add_argument("--source", type=nonempty, default="scenario",
                    help="'scenario' (default), 'sim', 'scenario:FILE.toml', a CBF file/dir/glob or an Eiger *_master.h5")
    sv.add_argument("--layout", default=None, choices=sorted(LAYOUTS), type=str.lower,
                    help="simulated detector: 1m (default), 4m, 9m, 16m, pilatus-6m")
    sv.add_argument("--bind", default="127.0.0.1", help="address to bind (default 127.0.0.1; '*' = all interfaces)")
    sv.add_argument("--port", type=bounded_int(1, 65535), default=31001, help="TCP port (default 31001, as a DCU)")
    sv.add_argument("--rate", type=rate, default=None,
                    help="images per second, 'file' or 'max'; default 100 Hz for the simulator, 'max' for files")
    sv.add_argument("--frames", type=positive_int, default=None, help="images per series (default: the whole source)")
    sv.add_argument("--series", type=positive_int, default=1, help="series to send (default 1)")
    sv.add_argument("--series-id", type=bounded_int(0, 2**63 - 1), default=1,
                    help="series_id of the first series (default 1)")
    sv.add_argument("--compression", choices=["bslz4", "lz4", "none"], default="bslz4")
    sv.add_argument("--dtype", choices=["uint8", "uint16", "uint32"], default="uint32", help="pixel type sent")
    sv.add_argument("--no-mask", action="store_true", help="no pixel_mask in the start message")
    sv.add_argument("--send-timeout", type=positive_float, default=1.0,
                    help="seconds an image may wait for a reading client before it is counted unsent")
    sv.add_argument("--wait-client", type=positive_float, default=60.0,
                    help="seconds to wait for a client (default 60)")
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="latency benchmark: frame in -> command on the wire / ack",
                       description="Latency and highest sustained rate (default), or with --contention K "
                                   "throughput and latency beside 0..K busy-loop processes plus throughput "
                                   "vs cores used.")
    b.add_argument("--layouts", type=layout_list, default="1m,4m", help="simulated layouts, e.g. 1m,4m")
    b.add_argument("--rate", type=hz, default=50.0, help="frame rate for the latency runs (Hz)")
    b.add_argument("--rates", type=rate_list, default="25,50,75,100,125,150,200,250,300",
                   help="rates tried for the highest sustained rate (Hz)")
    b.add_argument("--frames", type=positive_int, default=None,
                   help="frames per run (default 300; 120 with --contention)")
    b.add_argument("--no-model", action="store_true")
    b.add_argument("--contention", type=bounded_int(0, 16), default=None, metavar="K",
                   help="contention benchmark beside 0..K CPU-bound competitor processes (started and "
                        "always stopped by the benchmark)")
    b.add_argument("--no-scaling", action="store_true", help="with --contention: skip throughput vs cores")
    b.add_argument("--out", type=nonempty, default=None,
                   help="output path stem, .json and .md are written (default runs/latency, runs/contention)")
    b.add_argument("--web-clients", type=bounded_int(1, 64), default=None, metavar="N",
                   help="instead: frame in -> command latency with no live view and with N connected pages "
                        "(alternating runs; writes <out>-web.json/.md)")
    b.set_defaults(func=cmd_bench)

    v = sub.add_parser("view", help="serve the live view of a recorded (or still running) run",
                       description="Serve the read-only web page for a results file: plots, command log, header, "
                                   "and the frames the run's live view saved.")
    v.add_argument("results", help="runs/run-<time>.jsonl")
    v.add_argument("--web", metavar="[HOST:]PORT", default="127.0.0.1:8080",
                   help="address (default 127.0.0.1:8080; any other host gets an access token)")
    v.add_argument("--duration", type=positive_float, default=None, help="stop serving after this many seconds")
    v.set_defaults(func=cmd_view)
    rp = sub.add_parser("report", help="write one self-contained HTML report of a run")
    rp.add_argument("results", help="runs/run-<time>.jsonl")
    rp.add_argument("-o", "--out", type=nonempty, default="report.html", help="output HTML file (default report.html)")
    rp.add_argument("--max-images", type=bounded_int(1, 10_000), default=24, help="saved frames to embed (default 24)")
    rp.set_defaults(func=cmd_report)

    i = sub.add_parser("info", help="versions, model runtime, Numba threading, CPU")
    i.set_defaults(func=cmd_info)
    s = sub.add_parser("ports", help="serial ports with USB ids")
    s.set_defaults(func=cmd_ports)

    w = sub.add_parser("warmup", help="compile the kernels now (install time), or load them from the cache",
                       description="Compile the Numba kernels into the on-disk cache, so `edge run` starts in "
                                   "seconds. Default: every usual frame dtype; --site/--source: only what that "
                                   "source needs.")
    w.add_argument("--site", nargs="?", const=_DEFAULT_SITE, default=None, metavar="FILE",
                   help=f"prepare for this site's source (default FILE: {_DEFAULT_SITE})")
    w.add_argument("--source", default=None, help="prepare for this source (as `edge run --source`)")
    w.add_argument("--layout", default=None, help="simulated detector layout (with a sim/scenario source)")
    w.add_argument("--dtype", action="append", type=_dtype, default=None,
                   help="frame dtype to prepare for (repeatable; e.g. int32, uint16, uint32, float32)")
    w.add_argument("--no-model", action="store_true", help="skip the anomaly-feature kernels")
    w.add_argument("--all", action="store_true",
                   help="also the kernels only the Python API uses (background maps, local background, dark)")
    w.set_defaults(func=cmd_warmup)

    v = sub.add_parser("service", help="print (or --install) the systemd unit and udev rule",
                       description="Print the systemd unit that runs `edge run --site FILE` as a service; "
                                   "--install writes it with an example site file, creates the service user and "
                                   "installs a udev rule for a usb:VID:PID port.")
    v.add_argument("--site", default=_DEFAULT_SITE, metavar="FILE", help=f"site file (default {_DEFAULT_SITE})")
    v.add_argument("--user", default="xray-edge", help="service user, in the dialout group (default xray-edge)")
    v.add_argument("--install", action="store_true", help="install the unit, udev rule, site file and user")
    v.add_argument("--root", default="/", metavar="DIR", help="with --install: write the files below DIR")
    v.add_argument("--udev", nargs="?", const="", default=None, metavar="usb:VID:PID[:SERIAL]",
                   help="print the udev rule (default: the site's usb: port, else the example 2e8a:000a)")
    v.set_defaults(func=cmd_service)
    p.explicit_parsers = {"run": r, "warmup": w}
    return p


def _explicit(argv: list[str] | None, cmd: str) -> set[str]:
    """Options of ``cmd`` given on the command line (to let them win over a site file)."""
    p = build_parser()
    for action in p.explicit_parsers[cmd]._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv))) - {"cmd", "func"}


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (2, its line already printed) or --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "site", None) and args.cmd in ("run", "warmup"):
        args.explicit = _explicit(argv, args.cmd)
    args.own_process = argv is None  # the process itself, not called from Python
    if argv is None and threading.current_thread() is threading.main_thread():
        # Ctrl-C / SIGINT always ends a command, also when a parent started
        # us with SIGINT ignored (a shell's background job, nohup ... &)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # e.g. Ctrl-C during a benchmark (a running loop handles its own)
        if args.own_process:
            _exit_interrupted(f"edge {args.cmd}")
        print(f"edge {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
