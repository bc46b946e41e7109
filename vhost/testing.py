"""A vhost-user FRONTEND for tests, fuzzing and benchmarks: it does what QEMU does on the
socket (docs/interop/vhost-user.rst) and what a Linux virtio-net driver does on the rings
(virtio 1.1 §2.6 driver side, §5.1.6), with guest RAM from memfd_create. No QEMU needed.

    dev = LoopbackDevice()
    srv = VhostUserServer(path, dev).start()
    with VhostUserFrontend(path) as fe:
        fe.start()                       # negotiate, memory table, rings, enable
        fe.send(0, [hdr + frame])        # TX of queue pair 0
        frames = fe.wait_recv(0, 1)      # RX of queue pair 0

Hostile tests write raw descriptors with fe.ring(i).write_desc()/post(), or raw
messages with fe.request()/fe.send_raw().
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator

from vhost._frontend import DriverRing, GuestRam
from vhost._virtq import FrameBuffers, Virtq, echo_burst
from vhost.backend import VhostNetDevice, VhostUserBackend, VhostUserServer
from vhost.memory import DEFAULT_MAX_MEMORY
from vhost.protocol import (
    ADDR,
    FLAG_NEED_REPLY,
    REGION,
    REPLIES,
    STATE,
    U64,
    VERSION,
    VRING_NOFD_MASK,
    Feature,
    ProtoFeature,
    Region,
    Req,
    VhostError,
    bits,
    recv_reply,
    send_message,
)

VNET_HDR = bytes(12)  # a virtio-net header with nothing to do (GSO_NONE, no csum)
PAGE = 4096


def _align(v: int, a: int = PAGE) -> int:
    return (v + a - 1) & ~(a - 1)


class VhostUserFrontend:
    """The QEMU side of one vhost-user net device, plus the guest driver's rings.

    regions=2 splits guest RAM into two regions of one memfd (the second at guest
    address 4 GiB and a non-zero mmap_offset), as QEMU does around the PCI hole. The
    user addresses sent for regions are fake (uva_base): the back-end must only use them
    to find a region, never dereference them.

    Guest RAM is a memfd sealed against growing and shrinking, as QEMU's
    memory-backend-memfd makes it (seal=False: unsealed, as with seal=off), or, with
    ram_path, a file created there (memory-backend-file,share=on,mem-path=...; unlinked
    once open, and not sealable).
    """

    def __init__(self, path: str, *, mem_size: int = 8 << 20, regions: int = 1,
                 uva_base: int = 0x7E00_0000_0000, seal: bool = True,
                 ram_path: str | None = None) -> None:
        if regions not in (1, 2):
            raise ValueError("regions must be 1 or 2")
        self.path = path
        self.mem_size = _align(mem_size, 2 * PAGE)
        self.memfd = guest_ram_fd(self.mem_size, seal=seal, ram_path=ram_path)
        self.ram = GuestRam(self.memfd, self.mem_size)
        if regions == 1:
            self.regions = [Region(0, self.mem_size, uva_base, 0)]
        else:
            half = self.mem_size // 2
            self.regions = [Region(0, half, uva_base, 0),
                            Region(1 << 32, half, uva_base + (1 << 36), half)]
        self._next = [r.mmap_offset for r in self.regions]  # bump allocators (fd offsets)
        self.sock: socket.socket | None = None
        self.features = 0
        self.protocol_features = 0
        self.rings: dict[int, DriverRing] = {}
        self._fds: list[int] = []

    # --- lifetime ---
    def connect(self, timeout: float = 5.0) -> VhostUserFrontend:
        end = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.path)
                s.settimeout(timeout)
                self.sock = s
                return self
            except OSError:
                s.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.01)

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.disconnect()
        self.rings.clear()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        self.ram.close()
        if self.memfd >= 0:
            os.close(self.memfd)
            self.memfd = -1

    def __enter__(self) -> VhostUserFrontend:
        if self.sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- messages ---
    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features >> ProtoFeature.REPLY_ACK & 1)

    def send_raw(self, request: int, payload: bytes = b"", *, flags: int = VERSION,
                 fds: list[int] | None = None) -> None:
        if self.sock is None:
            raise VhostError("not connected")
        send_message(self.sock, request, payload, flags, fds)

    def request(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
                *, ack: bool | None = None) -> bytes | None:
        """Sends a request as QEMU would. GET-style requests return their reply; others
        ask for an acknowledgement when REPLY_ACK is negotiated (ack=None) and raise
        VhostError on a failure reply."""
        if self.sock is None:
            raise VhostError("not connected")
        if req in REPLIES:
            self.send_raw(req, payload, fds=fds)
            return recv_reply(self.sock, req)
        want_ack = self.reply_ack if ack is None else ack
        self.send_raw(req, payload, flags=VERSION | (FLAG_NEED_REPLY if want_ack else 0),
                      fds=fds)
        if want_ack:
            status = U64.unpack(recv_reply(self.sock, req))[0]
            if status:
                raise VhostError(f"back-end rejected {Req(req).name} ({status})")
        return None

    def get_u64(self, req: int) -> int:
        return U64.unpack(self.request(req) or bytes(8))[0]

    def negotiate(self, features: int | None = None, protocol_features: int | None = None,
                  ) -> tuple[int, int]:
        """QEMU's vhost_dev_init order: features, protocol features, queue count,
        memory slots, owner, features acked. Defaults: everything offered."""
        offered = self.get_u64(Req.GET_FEATURES)
        pf = 0
        if offered >> Feature.PROTOCOL_FEATURES & 1:
            offered_pf = self.get_u64(Req.GET_PROTOCOL_FEATURES)
            pf = offered_pf if protocol_features is None else protocol_features
            self.request(Req.SET_PROTOCOL_FEATURES, U64.pack(pf), ack=False)
            self.protocol_features = pf
            if pf >> ProtoFeature.MQ & 1:
                self.queue_num = self.get_u64(Req.GET_QUEUE_NUM)
            if pf >> ProtoFeature.CONFIGURE_MEM_SLOTS & 1:
                self.max_mem_slots = self.get_u64(Req.GET_MAX_MEM_SLOTS)
        self.request(Req.SET_OWNER)
        self.features = offered if features is None else features
        self.request(Req.SET_FEATURES, U64.pack(self.features))
        return self.features, pf

    def mem_table_payload(self, regions: list[Region] | None = None) -> bytes:
        regions = self.regions if regions is None else regions
        return struct.pack("<II", len(regions), 0) + b"".join(
            REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset) for r in regions)

    def set_mem_table(self) -> None:
        self.request(Req.SET_MEM_TABLE, self.mem_table_payload(),
                     fds=[self.memfd] * len(self.regions))

    # --- guest memory layout ---
    def alloc(self, size: int, region: int = 0, align: int = 64) -> int:
        """Reserves guest RAM in region; returns its fd offset."""
        r = self.regions[region]
        off = _align(self._next[region], align)
        if off + size > r.mmap_offset + r.size:
            raise MemoryError("guest RAM exhausted")
        self._next[region] = off + size
        return off

    def gpa(self, off: int) -> int:
        for r in self.regions:
            if r.mmap_offset <= off < r.mmap_offset + r.size:
                return r.gpa + off - r.mmap_offset
        raise ValueError("offset outside guest RAM")

    def uva(self, off: int) -> int:
        for r in self.regions:
            if r.mmap_offset <= off < r.mmap_offset + r.size:
                return r.uva + off - r.mmap_offset
        raise ValueError("offset outside guest RAM")

    def _eventfd(self) -> int:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fds.append(fd)
        return fd

    def setup_ring(self, index: int, *, num: int = 256, buf_size: int = 2048,
                   region: int = 0, call: bool = True, kick: bool = True,
                   enable: bool = True, base: int = 0) -> DriverRing:
        """Lays out ring index in guest RAM and configures it on the back-end (QEMU's
        vhost_virtqueue_start order). Even index = RX (buffers posted), odd = TX."""
        ring_off = self.alloc(DriverRing.layout_size(num), region, PAGE)
        buf_off = self.alloc(num * buf_size, region, 64)
        delta = self.gpa(ring_off) - ring_off
        event_idx = bool(self.features >> Feature.RING_EVENT_IDX & 1)
        ring = DriverRing(self.ram, ring_off, buf_off, delta, num, buf_size, event_idx)
        self.rings[index] = ring
        self.request(Req.SET_VRING_NUM, STATE.pack(index, num))
        self.request(Req.SET_VRING_BASE, STATE.pack(index, base))
        self.request(Req.SET_VRING_ADDR, ADDR.pack(
            index, 0, self.uva(ring.desc_off), self.uva(ring.used_off),
            self.uva(ring.avail_off), 0))
        if call:
            ring.call_fd = self._eventfd()
            self.request(Req.SET_VRING_CALL, U64.pack(index), fds=[ring.call_fd])
        if kick:
            ring.kick_fd = self._eventfd()
            self.request(Req.SET_VRING_KICK, U64.pack(index), fds=[ring.kick_fd])
        else:
            self.request(Req.SET_VRING_KICK, U64.pack(index | VRING_NOFD_MASK))
        if index % 2 == 0:
            ring.refill()
        if enable and self.features >> Feature.PROTOCOL_FEATURES & 1:
            self.request(Req.SET_VRING_ENABLE, STATE.pack(index, 1))
        return ring

    def start(self, queue_pairs: int = 1, *, features: int | None = None,
              protocol_features: int | None = None, num: int = 256,
              buf_size: int = 2048, tx_region: int = 0) -> VhostUserFrontend:
        """Everything QEMU does to bring a net device up with queue_pairs pairs."""
        if self.sock is None:
            self.connect()
        self.negotiate(features, protocol_features)
        self.set_mem_table()
        for qp in range(queue_pairs):
            self.setup_ring(2 * qp, num=num, buf_size=buf_size)
            self.setup_ring(2 * qp + 1, num=num, buf_size=buf_size, region=tx_region)
        return self

    def get_vring_base(self, index: int) -> int:
        reply = self.request(Req.GET_VRING_BASE, STATE.pack(index, 0)) or bytes(8)
        return STATE.unpack(reply)[1]

    # --- the guest driver ---
    def ring(self, index: int) -> DriverRing:
        return self.rings[index]

    @property
    def mergeable(self) -> bool:
        return bool(self.features >> Feature.MRG_RXBUF & 1)

    def send(self, qp: int, frames: list[bytes]) -> int:
        """TX on pair qp; frames include their 12-byte virtio-net header."""
        return self.rings[2 * qp + 1].send(frames)

    def recv(self, qp: int, max_frames: int = 256) -> list[bytes]:
        return self.rings[2 * qp].recv(max_frames, self.mergeable)

    def wait_recv(self, qp: int, n: int, timeout: float = 5.0) -> list[bytes]:
        """Receives until n frames arrived or timeout (then returns what came)."""
        out: list[bytes] = []
        end = time.monotonic() + timeout
        while len(out) < n and time.monotonic() < end:
            got = self.recv(qp, n - len(out))
            out += got
            if not got:
                self.rings[2 * qp + 1].reclaim()
                time.sleep(0.001)
        return out


def guest_ram_fd(size: int, *, seal: bool = True, ram_path: str | None = None) -> int:
    """An fd of size bytes of guest RAM, as QEMU's memory backends make it: a memfd,
    sealed (F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) unless seal=False, or a file
    created and unlinked in the directory ram_path."""
    if ram_path is not None:
        fd = os.open(ram_path, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        os.ftruncate(fd, size)
        return fd
    fd = os.memfd_create("vhost-guest", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


@contextlib.contextmanager
def loopback_server(path: str, *, queue_pairs: int = 1,
                    max_memory: int | None = DEFAULT_MAX_MEMORY, **device_kw: object,
                    ) -> Iterator[tuple[VhostUserServer, LoopbackDevice]]:
    """A pytest-friendly server with a LoopbackDevice on path, stopped on exit."""
    dev = LoopbackDevice(**device_kw)  # type: ignore[arg-type]
    srv = VhostUserServer(path, dev, queue_pairs=queue_pairs, max_memory=max_memory).start()
    try:
        yield srv, dev
    finally:
        srv.stop()


class LoopbackDevice(VhostNetDevice):
    """A trivial device: each queue pair's TX frames go back out on its RX ring (echo),
    or are only consumed (sink: the frontend's own ceiling). One worker thread per pair,
    polling while busy and sleeping on the TX kick eventfd when idle."""

    def __init__(self, *, mode: str = "echo", batch: int = 64, cap: int = 65536 + 64,
                 features: int | None = None) -> None:
        if mode not in ("echo", "sink"):
            raise ValueError("mode is echo or sink")
        self.mode = mode
        self.batch = batch
        self.cap = cap
        if features is not None:
            self.features = features
        self.events: list[tuple] = []
        self.rx_dropped = 0
        self._workers: dict[int, tuple[threading.Thread, threading.Event]] = {}
        self.backend: VhostUserBackend | None = None

    def connected(self, backend: VhostUserBackend) -> None:
        self.backend = backend
        self.events.append(("connected",))

    def queue_started(self, backend: VhostUserBackend, qp: int) -> None:
        stop = threading.Event()
        t = threading.Thread(target=self._work, args=(backend.vq(2 * qp + 1),
                             backend.vq(2 * qp), backend.mergeable, stop),
                             name=f"loopback-qp{qp}", daemon=True)
        self._workers[qp] = (t, stop)
        self.events.append(("started", qp))
        t.start()

    def queue_stopped(self, backend: VhostUserBackend, qp: int) -> None:
        t, stop = self._workers.pop(qp)
        stop.set()
        t.join()
        self.events.append(("stopped", qp))

    def queue_broken(self, backend: VhostUserBackend, qp: int, vq: int, reason: str) -> None:
        self.events.append(("broken", qp, vq, reason))

    def mtu_changed(self, backend: VhostUserBackend, mtu: int) -> None:
        self.events.append(("mtu", mtu))

    def status_changed(self, backend: VhostUserBackend, status: int) -> None:
        self.events.append(("status", status))

    def disconnected(self, backend: VhostUserBackend) -> None:
        self.events.append(("disconnected",))

    def _work(self, tx: Virtq, rx: Virtq, mergeable: bool, stop: threading.Event) -> None:
        fb = FrameBuffers(self.batch, self.cap)
        idle = 0
        while not stop.is_set():
            if self.mode == "echo":
                n, m = echo_burst(tx, rx, fb, mergeable)
                self.rx_dropped += n - m
            else:
                n = fb.pop_from(tx)
            if n:
                idle = 0
                continue
            idle += 1
            if idle < 64:  # stay busy a little: traffic tends to come in bursts
                time.sleep(0)
                continue
            tx.enable_kicks(True)
            if tx.avail_count() == 0 and not stop.is_set():
                if tx.kick_fd >= 0:
                    p = select.poll()
                    p.register(tx.kick_fd, select.POLLIN)
                    if p.poll(50):
                        try:
                            os.read(tx.kick_fd, 8)
                        except BlockingIOError:
                            pass
                else:
                    time.sleep(0.001)
            tx.enable_kicks(False)
            idle = 0


class RingHarness:
    """One device-side Virtq and one driver-side DriverRing over the same memfd, with
    no socket and no thread: the fastest way to feed a ring hostile descriptors (fuzzing)
    and watch the device side's verdict synchronously."""

    UVA = 0x7D00_0000_0000

    def __init__(self, *, num: int = 16, buf_size: int = 256, indirect: bool = True,
                 event_idx: bool = False, hdr_len: int = 12, mem_size: int = 1 << 20,
                 gpa: int = 0x10000) -> None:
        from vhost._virtq import MemTable

        self.memfd = os.memfd_create("vhost-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, mem_size)
        self.ram = GuestRam(self.memfd, mem_size)
        self.mem = MemTable()
        self.mem.add(self.memfd, gpa, mem_size, self.UVA, 0)
        self.gpa_base = gpa
        self.mem_size = mem_size
        buf_off = _align(DriverRing.layout_size(num), 64)
        self.driver = DriverRing(self.ram, 0, buf_off, gpa, num, buf_size, event_idx)
        self.free_off = _align(buf_off + num * buf_size)  # scratch: indirect tables, data
        self.vq = Virtq(1, self.mem)
        self.vq.set_num(num)
        d = self.driver
        self.vq.set_addr(self.UVA + d.desc_off, self.UVA + d.used_off, self.UVA + d.avail_off)
        self.vq.set_base(0)
        if not self.vq.start(event_idx, indirect, hdr_len):
            raise VhostError("ring does not translate")

    def close(self) -> None:
        self.vq.reset()
        self.mem.clear()
        self.ram.close()
        os.close(self.memfd)

    def __enter__(self) -> RingHarness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def frame_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
              csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    """A 12-byte virtio-net header (virtio 1.1 §5.1.6)."""
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, num_buffers)


__all__ = ["LoopbackDevice", "RingHarness", "VhostUserFrontend", "frame_hdr", "VNET_HDR",
           "bits", "guest_ram_fd", "loopback_server"]
