"""Where Numba keeps the compiled kernels (``cache=True``).

Numba's default is a ``__pycache__`` directory next to each source file. That
fails for a service user who cannot write the package directory: Numba then
tries ``~/.cache/numba`` and, with no usable home, refuses to import the
kernels. :func:`configure` picks a writable directory before Numba is
imported, in this order:

1. ``NUMBA_CACHE_DIR`` if you set it (always respected);
2. the package's own ``__pycache__`` when it is writable (a checkout, a venv
   you own): Numba's default, nothing is set;
3. ``$CACHE_DIRECTORY/<version>`` (set by systemd for ``CacheDirectory=``);
4. ``$XDG_CACHE_HOME/xray-edge/<version>`` (default ``~/.cache``);
5. ``/var/cache/xray-edge/<version>`` when writable;
6. ``<tmp>/xray-edge-<uid>/<version>`` as a last resort (lost at reboot).

The package version is part of the path, so an upgrade starts from an empty
cache (Numba also checks each source file's hash and its own version).
"""

from __future__ import annotations

import os
import sys
import tempfile

__all__ = ["configure", "cache_dir", "CACHE_SOURCE"]

#: How the cache directory was chosen: "user" (NUMBA_CACHE_DIR), "package",
#: "service", "xdg", "var", "tmp"; set by :func:`configure`.
CACHE_SOURCE: str | None = None
_CHOSEN: str | None = None


def _writable(path: str, *, create: bool) -> bool:
    """True if ``path`` is (or, with ``create``, can be made) a directory we can write files in.

    Checked the way Numba checks it (create a temporary file), because
    permission bits lie for root and on read-only mounts.
    """
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        elif not os.path.isdir(path):
            return False
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _candidates(version: str, env) -> list[tuple[str, str]]:
    out = []
    if env.get("CACHE_DIRECTORY"):  # systemd CacheDirectory=; may be a ':'-separated list
        out.append(("service", os.path.join(env["CACHE_DIRECTORY"].split(":")[0], version)))
    xdg = env.get("XDG_CACHE_HOME") or ""
    if not os.path.isabs(xdg):  # the XDG spec says to ignore relative paths
        home = os.path.expanduser("~")
        xdg = os.path.join(home, ".cache") if os.path.isabs(home) and os.path.isdir(home) else ""
    if xdg:
        out.append(("xdg", os.path.join(xdg, "xray-edge", version)))
    if os.path.isdir("/var/cache/xray-edge"):
        out.append(("var", os.path.join("/var/cache/xray-edge", version)))
    uid = os.getuid() if hasattr(os, "getuid") else 0
    out.append(("tmp", os.path.join(tempfile.gettempdir(), f"xray-edge-{uid}", version)))
    return out


def configure(package_dir: str, version: str, env=None) -> str | None:
    """Choose Numba's cache directory for the kernels in ``package_dir``.

    Must run before ``numba`` is imported (Numba reads ``NUMBA_CACHE_DIR``
    once); if it already was, its config is updated as well.

    Parameters
    ----------
    package_dir : str
        Directory of the modules holding ``@njit(cache=True)`` kernels.
    version : str
        Package version, made part of the path.
    env : mapping, optional
        Environment to read and update (default ``os.environ``).

    Returns
    -------
    str or None
        The directory set as ``NUMBA_CACHE_DIR``, or None when Numba's
        default (the package's ``__pycache__``) is used.
    """
    global CACHE_SOURCE, _CHOSEN
    env = os.environ if env is None else env
    if env.get("NUMBA_CACHE_DIR"):
        CACHE_SOURCE, _CHOSEN = "user", env["NUMBA_CACHE_DIR"]
        return None
    if _writable(os.path.join(package_dir, "__pycache__"), create=True):
        CACHE_SOURCE, _CHOSEN = "package", None
        return None
    for how, path in _candidates(version, env):
        if _writable(path, create=True):
            break
    else:  # nothing writable at all: Numba will compile at every start
        CACHE_SOURCE, _CHOSEN = "none", None
        return None
    CACHE_SOURCE, _CHOSEN = how, path
    env["NUMBA_CACHE_DIR"] = path
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None and env is os.environ:
        numba_config.CACHE_DIR = path
    return path


def cache_dir(package_dir: str) -> str | None:
    """The directory the kernels of ``package_dir`` are cached in (None: no cache)."""
    if CACHE_SOURCE == "package":
        return os.path.join(package_dir, "__pycache__")
    return _CHOSEN
