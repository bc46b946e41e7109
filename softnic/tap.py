"""TAP VF ports: the Linux TAP device with virtio-net headers (drivers/net/tun.c,
Documentation/networking/tuntap.rst; header layout virtio 1.x section 5.1.6).

The port is opened IFF_TAP | IFF_NO_PI | IFF_VNET_HDR with a 12-byte header
(TUNSETVNETHDRSZ) and TUNSETOFFLOAD CSUM|TSO4|TSO6(|TSO_ECN), so the kernel side behaves
like a virtio-net guest with those offloads: it hands over TCP frames of up to 64 KB
(gso_type TCPV4/TCPV6, gso_size = MSS) and partially checksummed frames (NEEDS_CSUM),
and accepts the same from us. The fd is non-blocking; frames move in batches through
softnic._io (one read or write per frame: TAP offers no multi-frame call).
"""

from __future__ import annotations

import fcntl
import os
import struct
import subprocess
from collections.abc import Sequence
from typing import Any

from softnic._batch import Batch
from softnic._io import TapCounters, tap_read_burst, tap_write_burst

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
VNET_HDR_LEN = 12

# Slot size for reading a TAP with TSO on: 64 KB of IP + Ethernet + virtio-net header,
# plus the batch's headroom.
TSO_SLOT_SIZE = 65536 + 1024


def _ip(*args: str) -> None:
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {p.stderr.strip()}")


class TapPort:
    """One TAP device opened in the caller's network namespace.

    name: device name (None: the kernel picks tapN). netns: move the kernel side into
    this named namespace (the fd stays here). peer_name: rename the kernel side there.
    mac, mtu, addrs (CIDR strings): set on the kernel side, which is brought up unless
    up=False. offload=False opens it without TSO/CSUM (plain frames, header still there).
    """

    def __init__(self, name: str | None = None, *, netns: str | None = None,
                 peer_name: str | None = None, mac: str | None = None,
                 mtu: int | None = None, addrs: Sequence[str] = (), up: bool = True,
                 offload: bool = True) -> None:
        self.fd = -1
        self.counters_ = TapCounters()
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = struct.pack("16sH22x", (name or "").encode(),
                              IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            ifr = fcntl.ioctl(fd, TUNSETIFF, ifr)
            self.name = ifr[:16].rstrip(b"\0").decode()
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            self.offloads = 0
            if offload:
                flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, flags | TUN_F_TSO_ECN)
                    flags |= TUN_F_TSO_ECN
                except OSError:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                self.offloads = flags
            else:
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.netns = netns
        self.dev = self.name                  # the kernel side's name where it lives
        try:
            self._configure(netns, peer_name, mac, mtu, addrs, up)
        except BaseException:
            self.close()
            raise

    def _configure(self, netns: str | None, peer_name: str | None, mac: str | None,
                   mtu: int | None, addrs: Sequence[str], up: bool) -> None:
        pre: list[str] = []
        if netns:
            _ip("link", "set", self.name, "netns", netns)
            pre = ["-n", netns]
        if peer_name and peer_name != self.name:
            _ip(*pre, "link", "set", self.name, "name", peer_name)
            self.dev = peer_name
        if mac:
            _ip(*pre, "link", "set", self.dev, "address", mac)
        if mtu:
            _ip(*pre, "link", "set", self.dev, "mtu", str(mtu))
        for a in addrs:
            extra = ["nodad"] if ":" in a else []
            _ip(*pre, "addr", "add", a, "dev", self.dev, *extra)
        if up:
            _ip(*pre, "link", "set", self.dev, "up")

    def fileno(self) -> int:
        return self.fd

    def read_burst(self, batch: Batch, max: int = -1) -> int:
        """Append up to `max` frames ([virtio-net header][frame]) to `batch`; returns
        how many. 0 when nothing is queued (the EAGAIN is counted)."""
        if self.fd < 0:
            raise ValueError("TAP port is closed")
        return tap_read_burst(self.fd, batch, max, self.counters_)

    def write_burst(self, batch: Batch, start: int = 0, n: int = -1) -> int:
        """Write slots [start, start+n) to the TAP; returns frames the kernel took."""
        if self.fd < 0:
            raise ValueError("TAP port is closed")
        if n < 0:
            n = batch.count - start
        return tap_write_burst(self.fd, batch, start, n, self.counters_)

    def counters(self) -> dict[str, Any]:
        return self.counters_.as_dict()  # type: ignore[no-any-return]

    def close(self) -> None:
        """Close the fd; the kernel deletes the (non-persistent) device with it."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> TapPort:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"TapPort({self.name!r} -> {self.dev!r}{where}, fd={self.fd})"


def forward(a: TapPort, b: TapPort, stop: Any, burst: int = 64) -> None:
    """Move frames (virtio-net header included) both ways between two TAPs until
    stop.is_set(): the batched read/write loop at its simplest, with no per-frame Python.
    Sleeps in poll() when both sides are idle."""
    import select

    batch = Batch(burst, slot_size=TSO_SLOT_SIZE)
    pl = select.poll()
    pl.register(a.fd, select.POLLIN)
    pl.register(b.fd, select.POLLIN)
    while not stop.is_set():
        moved = 0
        for src, dst in ((a, b), (b, a)):
            batch.clear()
            n = src.read_burst(batch)
            if n:
                dst.write_burst(batch, 0, n)
                moved += n
        if not moved:
            pl.poll(20)
