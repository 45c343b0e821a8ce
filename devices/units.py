"""The files a bundle installs on a board: two systemd units and install.sh (text only).

On the board:

- ``/opt/msfusion/bundle``: the bundle (wheelhouse, device.toml, these files);
- ``/opt/msfusion/venv``: the runtime's virtual environment, built offline
  from the wheelhouse by install.sh;
- ``/etc/msfusion/device.toml``: the device config, mode 0600, owned by the
  service user ``msfusion`` (it holds the device's broker password);
- ``msfusion-device.service``: runs the daemon as ``msfusion`` at boot and
  restarts it on failure, including after the kernel's OOM killer;
- ``msfusion-firstboot.service``: on a card flashed offline (`install_bundle`)
  nothing can run the board's Python yet, so this one-shot unit runs
  ``install.sh --firstboot`` at the first boot, before the daemon starts; it
  is skipped once the venv exists.
"""

from __future__ import annotations

import shlex
from pathlib import PurePosixPath

PREFIX = PurePosixPath("/opt/msfusion")
VENV = PREFIX / "venv"
BUNDLE_ON_BOARD = PREFIX / "bundle"
CONFIG_PATH = PurePosixPath("/etc/msfusion/device.toml")
STATE_ROOT = PurePosixPath("/var/lib/msfusion")
SECRETS_DIR = PurePosixPath("/etc/msfusion/secrets")  # the broker's CA, the device's TLS certificate and key
SERVICE_USER = "msfusion"
DEVICE_UNIT = "msfusion-device.service"
FIRSTBOOT_UNIT = "msfusion-firstboot.service"
UNIT_DIR = PurePosixPath("/etc/systemd/system")
WANTS_DIR = UNIT_DIR / "multi-user.target.wants"


def device_unit(memory_max_bytes: int, cpu_cores: int) -> str:
    """The daemon's unit.

    Args:
        memory_max_bytes: the service's hard memory cap (the kernel OOM-kills
            above it); the runtime's own budget in device.toml is lower.
        cpu_cores: the board's cores (sizes the BLAS/OpenMP thread pools).
    """
    return f"""\
[Unit]
Description=msfusion device runtime (collaborative training worker)
Documentation=https://arxiv.org/abs/2407.03622
Wants=network-online.target
After=network-online.target {FIRSTBOOT_UNIT}
# Keep retrying while the broker is unreachable, however long that takes.
StartLimitIntervalSec=0

[Service]
Type=simple
User={SERVICE_USER}
Group={SERVICE_USER}
ExecStart={VENV}/bin/python -m msfusion.edge_runtime --config {CONFIG_PATH}
Restart=on-failure
RestartSec=10
# The runtime stops a task before its budget (device.toml); this cap is the
# kernel's backstop. No swap: a swapping board trains far too slowly and
# wears out its SD card.
MemoryMax={memory_max_bytes}
MemorySwapMax=0
Environment=MALLOC_ARENA_MAX=2
Environment=OMP_NUM_THREADS={cpu_cores}
NoNewPrivileges=yes
ProtectSystem=full
ProtectHome=yes
PrivateTmp=yes

[Install]
WantedBy=multi-user.target
"""


def firstboot_unit() -> str:
    """The one-shot unit that finishes an offline install at the first boot."""
    return f"""\
[Unit]
Description=msfusion: install the device runtime from its bundle (first boot)
ConditionPathExists=!{VENV}/bin/python
After=local-fs.target
Before={DEVICE_UNIT}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh {BUNDLE_ON_BOARD}/install.sh --firstboot
# Unpacking large wheels onto an SD card takes minutes.
TimeoutStartSec=3600

[Install]
WantedBy=multi-user.target
"""


def install_script(
    requirement: str, python_minor: str, python: str, data_dir: PurePosixPath, state_dir: PurePosixPath
) -> str:
    """install.sh: builds the venv from the wheelhouse, installs the config, enables the units.

    Args:
        requirement: what pip installs, e.g. "msfusion[executorch]==0.1.0".
        python_minor: the Python the wheels are for, "3.11".
        python: the interpreter install.sh uses unless PYTHON is set.
        data_dir: the device's shard folder (a shard in the bundle is copied there).
        state_dir: the device's state folder.
    """
    q = shlex.quote
    return f"""\
#!/bin/sh
# Installs the msfusion device runtime from this bundle, offline. As root on the board:
#   sh install.sh               install, enable and (re)start msfusion-device.service
#   sh install.sh --firstboot   what {FIRSTBOOT_UNIT} runs on a card flashed offline
# PYTHON=/path/to/python{python_minor} picks the interpreter (default: {python}).
# MSFUSION_ROOT=DIR installs under DIR instead of / and skips what needs the
# running system (service user, ownership, systemctl); tests use it.
set -eu
BUNDLE=$(cd "$(dirname "$0")" && pwd)
ROOT=${{MSFUSION_ROOT:-}}
MODE=${{1:-}}
PYTHON=${{PYTHON:-{q(python)}}}
WANT={q(python_minor)}
REQUIREMENT={q(requirement)}
DATA_DIR="$ROOT"{q(str(data_dir))}
STATE_DIR="$ROOT"{q(str(state_dir))}
VENV="$ROOT"{q(str(VENV))}
CONFIG="$ROOT"{q(str(CONFIG_PATH))}

fail() {{ echo "install.sh: $*" >&2; exit 1; }}
HAVE=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') || fail "cannot run $PYTHON"
[ "$HAVE" = "$WANT" ] || fail "the wheels are for Python $WANT but $PYTHON is $HAVE; set PYTHON=/path/to/python$WANT"
SYSTEM=1
[ -z "$ROOT" ] || SYSTEM=0
[ "$SYSTEM" = 0 ] || [ "$(id -u)" = 0 ] || fail "run as root (sudo sh $0)"
if [ "$SYSTEM" = 1 ] && [ "$MODE" != --firstboot ] && command -v systemctl >/dev/null 2>&1; then
  systemctl stop {DEVICE_UNIT} 2>/dev/null || true
fi
if [ "$SYSTEM" = 1 ] && ! id -u {SERVICE_USER} >/dev/null 2>&1; then
  useradd --system --user-group --home-dir {STATE_ROOT} --no-create-home --shell /usr/sbin/nologin {SERVICE_USER}
fi

# The venv, from the wheelhouse only: the board's pip.conf (piwheels, mirrors) is ignored.
"$PYTHON" -m venv --clear "$VENV" || fail "cannot create a venv (Debian/Ubuntu: apt install python3-venv)"
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIREMENT 2>/dev/null || true
"$VENV/bin/python" -m pip install -q --no-index --find-links "$BUNDLE/wheelhouse" --upgrade pip
"$VENV/bin/python" -m pip install -q --no-index --find-links "$BUNDLE/wheelhouse" "$REQUIREMENT"

# The config (it holds the broker password) and the device's folders.
install -d -m 0755 "$(dirname "$CONFIG")"
install -m 0600 "$BUNDLE/device.toml" "$CONFIG"
install -d -m 0750 "$ROOT"{q(str(STATE_ROOT))}
install -d -m 0700 "$DATA_DIR" "$STATE_DIR"
if [ -d "$BUNDLE/shard" ]; then cp -R "$BUNDLE/shard/." "$DATA_DIR/"; fi
SECRETS="$ROOT"{q(str(SECRETS_DIR))}
if [ -d "$BUNDLE/secrets" ]; then
  install -d -m 0700 "$SECRETS"
  install -m 0600 "$BUNDLE/secrets/"* "$SECRETS/"
  [ "$SYSTEM" = 0 ] || chown -R {SERVICE_USER}:{SERVICE_USER} "$SECRETS"
fi
if [ "$SYSTEM" = 1 ]; then
  chown {SERVICE_USER}:{SERVICE_USER} "$CONFIG"
  chown -R {SERVICE_USER}:{SERVICE_USER} {q(str(STATE_ROOT))} "$DATA_DIR" "$STATE_DIR"
fi

# The units (already in place on a card flashed offline).
if [ "$MODE" != --firstboot ]; then
  install -d -m 0755 "$ROOT"{q(str(UNIT_DIR))}
  install -m 0644 "$BUNDLE/{DEVICE_UNIT}" "$BUNDLE/{FIRSTBOOT_UNIT}" "$ROOT"{q(str(UNIT_DIR))}/
  if [ "$SYSTEM" = 1 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload
    systemctl enable {FIRSTBOOT_UNIT} {DEVICE_UNIT}
    systemctl restart {DEVICE_UNIT}
  fi
fi
echo "msfusion device runtime installed in $VENV"
"""
