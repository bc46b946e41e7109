#!/usr/bin/env bash
# Build (or find) the cached QEMU test guest: a Debian cloud kernel and a busybox initramfs
# with virtio_net, esp4/esp6, xfrm and vxlan modules. Run once before the QEMU tests to pay
# the download up front (CI); the tests build it themselves otherwise.
# Cache: $SOFTNIC_GUEST_CACHE, else $XDG_CACHE_HOME/softnic-guest, else ~/.cache/softnic-guest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" -m softnic.guest build
