"""Running ``edge`` as a service on a board: Numba cache location, site
configuration, run headers and results rotation, the systemd unit and udev rule.

:mod:`.cache` is imported by ``edge/__init__.py`` before Numba, so this
package must stay light: nothing here imports Numba, NumPy or the kernels at
import time.
"""

#: Where ``edge run --site``, ``edge warmup --site`` and ``edge service`` look
#: for the site file when no FILE is given.
DEFAULT_SITE = "/etc/xray-edge/site.toml"
