"""The systemd unit, the udev rule and ``edge service --install``.

The service runs ``edge run --site FILE`` as a dedicated system user in the
``dialout`` group (serial ports), compiles or loads the kernels first
(``ExecStartPre=edge warmup``), restarts on failure and stops cleanly on
SIGTERM (the run's summary record is written). The udev rule gives the
instrument board a stable name (``/dev/xray-edge-board``) from its USB
VID:PID, whatever ``ttyACM*`` number it enumerates as.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from .site import DEFAULT_SITE, SiteConfig

__all__ = ["SERVICE_NAME", "SERVICE_USER", "UDEV_NAME", "edge_command", "example_site", "install",
           "udev_rule", "unit_text"]

SERVICE_NAME = "xray-edge"
SERVICE_USER = "xray-edge"
#: Symlink the udev rule creates: ``/dev/xray-edge-board``.
UDEV_NAME = "xray-edge-board"


def edge_command() -> list[str]:
    """How to run this installation's ``edge`` (its venv's script, else ``python -m edge.cli``)."""
    script = Path(sys.executable).with_name("edge")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "edge.cli"]


def unit_text(site: str | os.PathLike = DEFAULT_SITE, *, user: str = SERVICE_USER,
              command: list[str] | None = None, site_config: SiteConfig | None = None) -> str:
    """The systemd unit (``xray-edge.service``) for a site file.

    Parameters
    ----------
    site : path
        Site file given to ``edge run --site`` and ``edge warmup --site``.
    user : str
        System user the service runs as (in the ``dialout`` group).
    command : list of str, optional
        The ``edge`` executable (default :func:`edge_command`).
    site_config : SiteConfig, optional
        The parsed site file; its results directory is made writable.
    """
    edge = " ".join(shlex.quote(c) for c in (command or edge_command()))
    site_q = shlex.quote(os.fspath(site))
    rw = ""
    if site_config is not None and site_config.results_dir is not None:
        rw = f"ReadWritePaths=-{site_config.results_dir}\n"
    return f"""\
# {SERVICE_NAME}.service, written by `edge service`. Install with
# `sudo edge service --install`, then `sudo systemctl enable --now {SERVICE_NAME}`.
[Unit]
Description=xray-edge: real-time X-ray detector processing beside the detector
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
Group={user}
SupplementaryGroups=dialout
# /var/lib/{SERVICE_NAME} (working directory, default results) and
# /var/cache/{SERVICE_NAME} (compiled kernels, $CACHE_DIRECTORY), owned by {user}
StateDirectory={SERVICE_NAME}
CacheDirectory={SERVICE_NAME}
WorkingDirectory=/var/lib/{SERVICE_NAME}
Environment=PYTHONUNBUFFERED=1
# compile the kernels (first start after an install or upgrade: minutes on a
# Raspberry Pi) or load them from the cache (seconds)
ExecStartPre={edge} warmup --site {site_q}
ExecStart={edge} run --site {site_q} --quiet
TimeoutStartSec=1h
# SIGTERM stops the run cleanly: queued commands finish, the summary record is written
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=10
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=read-only
PrivateTmp=yes
{rw}
[Install]
WantedBy=multi-user.target
"""


def udev_rule(vid: str = "2e8a", pid: str = "000a", serial: str | None = None, *,
              name: str = UDEV_NAME) -> str:
    """A udev rule naming the board ``/dev/<name>`` by USB VID:PID (hex), optionally its serial number."""
    for label, v in (("VID", vid), ("PID", pid)):
        if len(v) != 4 or any(c not in "0123456789abcdefABCDEF" for c in v):
            raise ValueError(f"{label} must be 4 hex digits, got {v!r}")
    match = f'ATTRS{{idVendor}}=="{vid.lower()}", ATTRS{{idProduct}}=="{pid.lower()}"'
    if serial:
        if '"' in serial or "\n" in serial:
            raise ValueError(f"bad serial number {serial!r}")
        match += f', ATTRS{{serial}}=="{serial}"'
    return (f"# /etc/udev/rules.d/99-{SERVICE_NAME}.rules, written by `edge service`: the instrument board\n"
            f"# (USB {vid}:{pid}) appears as /dev/{name}, read-write for the dialout group.\n"
            f'SUBSYSTEM=="tty", {match}, SYMLINK+="{name}", GROUP="dialout", MODE="0660"\n')


def example_site(results_dir: str = f"/var/lib/{SERVICE_NAME}/runs") -> str:
    """A safe starting site file: the simulator, dry run (nothing is sent)."""
    return f"""\
# xray-edge site configuration ({DEFAULT_SITE}); see README "Run as a service".
# Safe to start: the simulator and a dry run. Point [source] at the detector
# and [device] at the board, then set dry_run = false.
[source]
spec = "sim"

[device]
port = "/dev/{UDEV_NAME}"   # or "usb:VID:PID", or "emulator"
dry_run = true

[results]
dir = "{results_dir}"
keep = 200
"""


def _vidpid(port: str | None) -> tuple[str, str, str | None] | None:
    from firmware_bridge.transport import _VIDPID

    m = _VIDPID.match(port or "")
    if m is None or not (port or "").lower().startswith("usb:"):
        return None
    return m.group(1), m.group(2), m.group(3)


def install(site: str | os.PathLike = DEFAULT_SITE, *, site_config: SiteConfig | None = None,
            user: str = SERVICE_USER, root: str | os.PathLike = "/", usb: str | None = None,
            system: bool = True, log=print) -> list[Path]:
    """Install the service: unit, udev rule, example site file, system user.

    Parameters
    ----------
    site : path
        The site file (written from :func:`example_site` if missing).
    site_config : SiteConfig, optional
        The parsed site file; a ``usb:VID:PID`` port there gets a udev rule.
    user : str
        Service user, created (system user, group of its own, in ``dialout``)
        when missing.
    root : path
        Install below this directory (packaging, tests); user creation and
        ``systemctl`` / ``udevadm`` are skipped unless it is ``/``.
    usb : str, optional
        ``usb:VID:PID[:SERIAL]`` for the udev rule (default: the site's port).
    system : bool
        Create the user and reload systemd and udev (only with ``root="/"``).

    Returns
    -------
    list of Path
        Files written.
    """
    root = Path(root)
    live = system and root.resolve() == Path("/")
    written = []

    def put(path: str, text: str, *, keep: bool = False) -> None:
        dest = root / path.lstrip("/")
        if keep and dest.exists():
            log(f"kept existing {dest}")
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text, encoding="utf-8")
        written.append(dest)
        log(f"wrote {dest}")

    site_path = Path(site)
    put(str(site_path), example_site(), keep=True)
    put(f"/etc/systemd/system/{SERVICE_NAME}.service", unit_text(site_path, user=user, site_config=site_config))
    ids = _vidpid(usb) or _vidpid(site_config.port if site_config is not None else None)
    if ids is not None:
        put(f"/etc/udev/rules.d/99-{SERVICE_NAME}.rules", udev_rule(*ids))
    if live:
        _ensure_user(user, log)
        for cmd in (["systemctl", "daemon-reload"], ["udevadm", "control", "--reload-rules"]):
            if shutil.which(cmd[0]) is None:
                log(f"skipped `{' '.join(cmd)}` ({cmd[0]} not found)")
                continue
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            log(f"ran `{' '.join(cmd)}`" + ("" if r.returncode == 0 else
                                            f": failed ({r.stderr.strip() or r.returncode}); run it yourself"))
    return written


def _ensure_user(user: str, log) -> None:
    import pwd

    try:
        pwd.getpwnam(user)
        log(f"user {user} exists")
        return
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--user-group", "--groups", "dialout", "--home-dir", f"/var/lib/{SERVICE_NAME}",
           "--no-create-home", "--shell", "/usr/sbin/nologin", user]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise OSError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.returncode}")
    log(f"created system user {user} (groups: {user}, dialout)")
