"""vhost-user back-end for virtio-net (QEMU docs/interop/vhost-user.rst: "Starting and
stopping rings", "Multiple queue support", "Memory regions description", REPLY_ACK,
"Front-end message types"), server and client modes, behind a narrow device interface.

One VhostUserBackend per connection runs on its own control thread: it reads a message,
validates it (syntax and framing in vhost.protocol, meaning here), acts, and answers.
Policy on a bad message: if the frontend asked for an acknowledgement (REPLY_ACK
negotiated and NEED_REPLY set) it gets a failure reply and the connection stays;
otherwise -- including every message that has its own reply, where no answer could be
trusted -- the connection is closed with a log line. Either way only this device is
affected. The data path never runs on this thread: queue pairs are handed to the device
with queue_started(), and taken back with queue_stopped() before anything they use
(memory table, ring addresses, eventfds) changes.

Fds that come with a message belong to the message until a handler has validated the
whole request and hands one over (to a Virtq, which keeps it); whatever is left is
closed when the message is done, on every path, error or not. Kick, call and err fds
must be eventfds and are made non-blocking: they are the guest's, and the workers that
read and write them serve other guests too. Memory region fds are only borrowed (the
mapping keeps the memory).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time

from vhost import sockfile
from vhost._virtq import MAX_QUEUE_SIZE as VH_MAX_QUEUE_SIZE
from vhost._virtq import Virtq
from vhost.memory import DEFAULT_MAX_MEMORY, MAX_SLOTS, GuestMemory
from vhost.protocol import (
    REPLIES,
    STATE,
    U64,
    VRING_F_LOG,
    Feature,
    Message,
    ProtoFeature,
    Req,
    VhostBoundsError,
    VhostDisconnected,
    VhostError,
    VhostFdError,
    VhostMemoryError,
    VhostNotNegotiated,
    VhostStateError,
    bits,
    recv_message,
    send_reply,
)

log = logging.getLogger("vhost")

# What a virtio-net back-end here offers. Packet semantics of the offloads (checksums,
# TSO) belong to the device; this layer only advertises and reports them. Not offered:
# CTRL_VQ (QEMU serves the control queue itself), packed rings, LOG_ALL (no migration
# dirty log), NOTIFY_ON_EMPTY, MAC/STATUS (no config space here).
NET_FEATURES = bits(
    Feature.VERSION_1, Feature.MRG_RXBUF, Feature.CSUM, Feature.GUEST_CSUM,
    Feature.HOST_TSO4, Feature.HOST_TSO6, Feature.GUEST_TSO4, Feature.GUEST_TSO6,
    Feature.MTU, Feature.MQ, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC,
    Feature.PROTOCOL_FEATURES,
)
PROTOCOL_FEATURES = bits(
    ProtoFeature.MQ, ProtoFeature.REPLY_ACK, ProtoFeature.MTU,
    ProtoFeature.CONFIGURE_MEM_SLOTS, ProtoFeature.STATUS,
)
MAX_QUEUE_PAIRS = 64  # vring index is 8 bits in KICK/CALL/ERR; 2 rings per pair


def _eventfd(fd: int, what: str) -> None:
    """Raises VhostFdError unless fd is an eventfd; then makes it non-blocking. (The flag
    is on the open file description the frontend shares: QEMU's eventfds have it
    already.)"""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise VhostFdError(f"{what} fd: {e}") from None
    if kind != "anon_inode:[eventfd]":
        # a path would be the frontend's to choose: name only the kind of file
        shown = kind.split(":", 1)[0] if ":[" in kind else "a file"
        raise VhostFdError(f"{what} fd is {shown}, not an eventfd")
    try:
        os.set_blocking(fd, False)
    except OSError as e:
        raise VhostFdError(f"{what} fd: {e}") from None


def _readable(fd: int, timeout: float) -> bool:
    """poll(), not select(): a daemon with many devices has fds above FD_SETSIZE."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


class VhostNetDevice:
    """What a device (e.g. a softnic VF) implements. Every call comes from the control
    thread of the connection. Queue pair p is rx = backend.vq(2p), tx = backend.vq(2p+1).

    queue_stopped() must return only once no worker touches that pair any more: the
    backend unmaps memory and closes eventfds right after it returns.
    """

    #: features the device supports; the backend offers NET_FEATURES & features
    features: int = NET_FEATURES

    def connected(self, backend: VhostUserBackend) -> None:
        """A frontend connected (a new backend state, nothing negotiated yet)."""

    def queue_started(self, backend: VhostUserBackend, qp: int) -> None:
        """Both rings of pair qp are configured, enabled and started; poll their kicks."""

    def queue_stopped(self, backend: VhostUserBackend, qp: int) -> None:
        """Stop using pair qp before returning."""

    def queue_broken(self, backend: VhostUserBackend, qp: int, vq: int, reason: str) -> None:
        """The guest broke ring vq of pair qp (already stopped)."""

    def mtu_changed(self, backend: VhostUserBackend, mtu: int) -> None:
        """NET_SET_MTU."""

    def status_changed(self, backend: VhostUserBackend, status: int) -> None:
        """SET_STATUS (virtio device status byte)."""

    def disconnected(self, backend: VhostUserBackend) -> None:
        """The frontend went away; every queue pair has been stopped."""


class VhostUserBackend:
    """Protocol state of one device for one connection."""

    def __init__(self, device: VhostNetDevice, sock: socket.socket, *, name: str = "vhost",
                 queue_pairs: int = 1, max_memory: int | None = DEFAULT_MAX_MEMORY) -> None:
        if not 1 <= queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"queue_pairs must be 1..{MAX_QUEUE_PAIRS}")
        self.device = device
        self.sock = sock
        self.name = name
        self.queue_pairs = queue_pairs
        self.offered = NET_FEATURES & device.features
        if queue_pairs == 1:
            self.offered &= ~bits(Feature.MQ)
        self.offered_protocol = PROTOCOL_FEATURES
        self.mem = GuestMemory(max_memory)  # max_memory: bytes mapped at most (None: any)
        self.vqs = [Virtq(i, self.mem.table) for i in range(2 * queue_pairs)]
        self.closed = False
        self._stop = threading.Event()
        self._reset_state()

    # --- state ---
    def _reset_state(self) -> None:
        self.features = 0  # acked by SET_FEATURES
        self.protocol_features = 0  # acked by SET_PROTOCOL_FEATURES
        self.owner = False
        self.status = 0
        self.mtu = 0
        n = len(self.vqs)
        self.addr_set = [False] * n
        self.kicked = [False] * n  # ring started (kick fd received, not stopped since)
        self.enabled: list[bool | None] = [None] * n  # None: never set by SET_VRING_ENABLE
        self.running: set[int] = set()  # queue pairs handed to the device
        self.broken: set[int] = set()  # vrings broken by the guest, until reconfigured

    def vq(self, index: int) -> Virtq:
        return self.vqs[index]

    def has(self, f: Feature) -> bool:
        return bool(self.features >> int(f) & 1)

    def has_proto(self, f: ProtoFeature) -> bool:
        return bool(self.protocol_features >> int(f) & 1)

    @property
    def mergeable(self) -> bool:
        return self.has(Feature.MRG_RXBUF)

    @property
    def hdr_len(self) -> int:
        return 12 if self.has(Feature.VERSION_1) or self.has(Feature.MRG_RXBUF) else 10

    def _is_enabled(self, i: int) -> bool:
        e = self.enabled[i]
        if e is None:  # vhost-user: rings start enabled unless PROTOCOL_FEATURES acked
            return not self.has(Feature.PROTOCOL_FEATURES)
        return e

    def _qp_ready(self, qp: int) -> bool:
        return all(
            self.vqs[i].num and self.addr_set[i] and self.kicked[i] and self._is_enabled(i)
            and i not in self.broken
            for i in (2 * qp, 2 * qp + 1))

    def _stop_qp(self, qp: int) -> None:
        if qp in self.running:
            self.running.discard(qp)
            try:
                self.device.queue_stopped(self, qp)
            finally:
                for i in (2 * qp, 2 * qp + 1):
                    self.vqs[i].stop()

    def _stop_all(self) -> None:
        for qp in sorted(self.running):
            self._stop_qp(qp)

    def check_broken(self) -> None:
        """Takes rings the guest broke out of service (logged once, device and frontend
        told: the err eventfd is written here, never by a worker)."""
        for qp in sorted(self.running):
            for i in (2 * qp, 2 * qp + 1):
                reason = self.vqs[i].broken
                if reason and i not in self.broken:
                    log.warning("%s: guest broke vring %d: %s; ring stopped", self.name, i,
                                reason)
                    self.broken.add(i)
                    self._stop_qp(qp)
                    self.vqs[i].signal_err()
                    self.device.queue_broken(self, qp, i, reason)

    def _update(self) -> None:
        """Starts and stops queue pairs to match the negotiated state."""
        self.check_broken()
        for qp in range(self.queue_pairs):
            want = self._qp_ready(qp)
            if want and qp not in self.running:
                ok = all(self.vqs[i].start(self.has(Feature.RING_EVENT_IDX),
                                           self.has(Feature.RING_INDIRECT_DESC), self.hdr_len)
                         for i in (2 * qp, 2 * qp + 1))
                if not ok:
                    for i in (2 * qp, 2 * qp + 1):
                        self.vqs[i].stop()
                        if self.vqs[i].broken:
                            self.broken.add(i)
                            self.vqs[i].signal_err()
                    log.warning("%s: queue pair %d rings are outside guest memory", self.name,
                                qp)
                    continue
                self.running.add(qp)
                self.device.queue_started(self, qp)
            elif not want and qp in self.running:
                self._stop_qp(qp)

    def stats(self) -> dict[str, object]:
        """A snapshot for an admin interface; safe to call from any thread (counters are
        read without stopping the workers, so they may be a batch apart)."""
        return {
            "features": self.features, "protocol_features": self.protocol_features,
            "mtu": self.mtu, "status": self.status, "memory_regions": self.mem.mapped,
            "running_queue_pairs": sorted(self.running),
            "queues": [{"index": vq.index, "size": vq.num, "ready": vq.ready,
                        "broken": vq.broken, **vq.counters()} for vq in self.vqs],
        }

    # --- the connection ---
    def serve(self) -> None:
        """Handles messages until the peer disconnects, a message forces a disconnect,
        or close() is called. Always cleans up."""
        self.device.connected(self)
        try:
            while not self._stop.is_set():
                if not _readable(self.sock.fileno(), 0.2):
                    self.check_broken()
                    continue
                try:
                    msg = recv_message(self.sock)
                except VhostDisconnected:
                    log.info("%s: frontend disconnected", self.name)
                    return
                except (VhostError, OSError) as e:
                    log.warning("%s: bad message, disconnecting: %s", self.name, e)
                    return
                if not self._dispatch(msg):
                    return
        finally:
            self._teardown()

    def _dispatch(self, msg: Message) -> bool:
        """Handles one validated message; False when the connection must close."""
        ack = self.has_proto(ProtoFeature.REPLY_ACK) and msg.need_reply
        try:
            reply = self.handle(msg)
        except VhostError as e:
            req = msg.request
            if ack and req not in REPLIES:
                log.warning("%s: %s rejected: %s", self.name, msg.name, e)
                self._send(req, U64.pack(1))
                return True
            log.warning("%s: %s rejected, disconnecting: %s", self.name, msg.name, e)
            return False
        finally:
            msg.close_fds()
        if reply is not None:
            self._send(msg.request, reply)
        elif ack:
            self._send(msg.request, U64.pack(0))
        return True

    def _send(self, request: int, payload: bytes) -> None:
        try:
            send_reply(self.sock, request, payload)
        except OSError as e:
            log.warning("%s: cannot reply: %s", self.name, e)

    def close(self) -> None:
        """Asks serve() to stop (from any thread)."""
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _teardown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._stop_all()
        finally:
            for vq in self.vqs:
                vq.reset()
            self.mem.reset()
            self.sock.close()
            self.device.disconnected(self)

    # --- meaning: one handler per request ---
    def handle(self, msg: Message) -> bytes | None:
        """Acts on a message; returns the reply payload, None for no reply, or raises."""
        try:
            req = Req(msg.request)
        except ValueError:
            raise VhostNotNegotiated(f"unknown request {msg.request}") from None
        h = getattr(self, "_h_" + req.name.lower(), None)
        if h is None:
            raise VhostNotNegotiated(f"{req.name} is not supported by this back-end")
        needs_owner = req not in (Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES,
                                  Req.SET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM,
                                  Req.GET_MAX_MEM_SLOTS, Req.SET_OWNER, Req.RESET_OWNER)
        if needs_owner and not self.owner:
            raise VhostStateError(f"{req.name} before SET_OWNER")
        return h(msg)

    def _need_proto(self, f: ProtoFeature, req: str) -> None:
        if not self.has_proto(f):
            raise VhostNotNegotiated(f"{req} needs protocol feature {f.name}")

    def _vring(self, index: int, *, stopped: bool = False) -> int:
        if index >= len(self.vqs):
            raise VhostBoundsError(f"vring {index} of {len(self.vqs)}")
        if stopped and self.kicked[index]:
            raise VhostStateError(f"vring {index} is running")
        return index

    def _h_get_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered)

    def _h_set_features(self, msg: Message) -> None:
        f = msg.u64()
        if f & ~self.offered:
            raise VhostNotNegotiated(f"features {f & ~self.offered:#x} were not offered")
        self.features = f

    def _h_get_protocol_features(self, msg: Message) -> bytes:
        return U64.pack(self.offered_protocol)

    def _h_set_protocol_features(self, msg: Message) -> None:
        f = msg.u64()
        if f & ~self.offered_protocol:
            raise VhostNotNegotiated(f"protocol features {f & ~self.offered_protocol:#x} "
                                     "were not offered")
        self.protocol_features = f

    def _h_set_owner(self, msg: Message) -> None:
        if self.owner:
            raise VhostStateError("SET_OWNER twice")
        self.owner = True

    def _h_reset_owner(self, msg: Message) -> None:
        # Back to a fresh device, except ownership and protocol features: QEMU does not
        # renegotiate them after a reset (libvhost-user and DPDK keep them too), and a
        # lost REPLY_ACK would leave it waiting for acknowledgements forever.
        self._stop_all()
        for vq in self.vqs:
            vq.reset()
        self.mem.reset()
        pf = self.protocol_features
        self._reset_state()
        self.owner = True
        self.protocol_features = pf

    def _h_get_queue_num(self, msg: Message) -> bytes:
        self._need_proto(ProtoFeature.MQ, "GET_QUEUE_NUM")
        return U64.pack(self.queue_pairs)

    def _h_get_max_mem_slots(self, msg: Message) -> bytes:
        self._need_proto(ProtoFeature.CONFIGURE_MEM_SLOTS, "GET_MAX_MEM_SLOTS")
        return U64.pack(MAX_SLOTS)

    def _memory_change(self, change) -> None:  # type: ignore[no-untyped-def]
        # Rings keep their addresses; they are re-translated when the pairs restart.
        self._stop_all()
        try:
            change()
        finally:
            self._update()

    # QEMU sends the memory table once per queue pair (one vhost device each): the same
    # table or region again changes nothing, and must not stop the running pairs.

    # Region fds stay the message's (closed after the handler): a mapping needs none.

    def _h_set_mem_table(self, msg: Message) -> None:
        regions = msg.mem_table()
        fds = list(msg.fds)
        if self.mem.same_table(regions, fds):
            return
        self.mem.check_table(regions, fds)      # refused: the mapped table stays, rings run
        self._memory_change(lambda: self.mem.set_table(regions, fds))

    def _h_add_mem_reg(self, msg: Message) -> None:
        self._need_proto(ProtoFeature.CONFIGURE_MEM_SLOTS, "ADD_MEM_REG")
        region = msg.mem_region()
        fd = msg.fds[0]
        if self.mem.add_reference(region, fd):
            return
        self.mem.check_add(region, fd)
        self._memory_change(lambda: self.mem.add(region, fd))

    def _h_rem_mem_reg(self, msg: Message) -> None:
        self._need_proto(ProtoFeature.CONFIGURE_MEM_SLOTS, "REM_MEM_REG")
        region = msg.mem_region()
        if not any(r.gpa == region.gpa and r.size == region.size for r in self.mem.regions):
            raise VhostMemoryError(f"no memory region at {region.gpa:#x}")
        if self.mem.drop_reference(region):
            return
        self._memory_change(lambda: self.mem.remove(region))

    def _h_set_log_base(self, msg: Message) -> None:
        raise VhostNotNegotiated("dirty logging (LOG_ALL / LOG_SHMFD) was not offered")

    _h_set_log_fd = _h_set_log_base

    def _h_set_vring_num(self, msg: Message) -> None:
        index, num = msg.state()
        self._vring(index, stopped=True)
        if num == 0 or num > VH_MAX_QUEUE_SIZE or num & (num - 1):
            raise VhostBoundsError(f"vring size {num} (power of 2 up to {VH_MAX_QUEUE_SIZE})")
        self.vqs[index].set_num(num)
        self.addr_set[index] = False  # ring sizes changed: addresses need re-checking
        self.broken.discard(index)

    def _h_set_vring_addr(self, msg: Message) -> None:
        a = msg.vring_addr()
        self._vring(a.index, stopped=True)
        if a.flags & ~VRING_F_LOG:
            raise VhostBoundsError(f"vring address flags {a.flags:#x}")
        if a.flags & VRING_F_LOG and not self.has(Feature.LOG_ALL):
            raise VhostNotNegotiated("vring logging without LOG_ALL")
        num = self.vqs[a.index].num
        if not num:
            raise VhostStateError("SET_VRING_ADDR before SET_VRING_NUM")
        # virtio 1.1 §2.6: alignment 16 / 2 / 4, each part inside one region
        for what, addr, size, align in (("descriptor table", a.desc, 16 * num, 16),
                                        ("available ring", a.avail, 6 + 2 * num, 2),
                                        ("used ring", a.used, 6 + 8 * num, 4)):
            if addr % align:
                raise VhostBoundsError(f"{what} at {addr:#x} is not {align}-byte aligned")
            if not self.mem.table.uva_ok(addr, size):
                raise VhostBoundsError(f"{what} at {addr:#x}+{size:#x} is outside guest memory")
        self.vqs[a.index].set_addr(a.desc, a.used, a.avail)
        self.addr_set[a.index] = True
        self.broken.discard(a.index)

    def _h_set_vring_base(self, msg: Message) -> None:
        index, base = msg.state()
        self._vring(index, stopped=True)
        if base > 0xFFFF:
            raise VhostBoundsError(f"vring base {base:#x} for a split ring")
        self.vqs[index].set_base(base)
        self.broken.discard(index)

    def _h_get_vring_base(self, msg: Message) -> bytes:
        index, _ = msg.state()
        self._vring(index)
        self.check_broken()
        self.kicked[index] = False
        self._stop_qp(index // 2)
        self.vqs[index].set_kick_fd(-1)
        return STATE.pack(index, self.vqs[index].last_avail_idx)

    def _vring_fd(self, msg: Message, what: str) -> tuple[int, bool]:
        """(index, has_fd) of SET_VRING_KICK/CALL/ERR, the fd checked (an eventfd, now
        non-blocking) but still the message's: take it only once nothing can fail."""
        index, has_fd = msg.vring_file()
        self._vring(index)
        if has_fd:
            _eventfd(msg.fds[0], what)
        return index, has_fd

    def _with_pair_stopped(self, index: int, change) -> None:  # type: ignore[no-untyped-def]
        # A worker may be writing to the old eventfd: take the pair back first.
        self._stop_qp(index // 2)
        try:
            change()
        finally:
            self._update()

    def _h_set_vring_kick(self, msg: Message) -> None:
        index, has_fd = self._vring_fd(msg, "kick")
        if not has_fd:
            # Polling mode: no kick ever comes, so some thread would have to poll this
            # ring without end. The rings of every guest share a few workers (softnic's
            # TX lanes); one that spins on a ring nobody kicks takes its time from all
            # the others, so the request is refused. (QEMU always sends a kick fd.)
            raise VhostNotNegotiated("SET_VRING_KICK without an fd (polling mode) is not "
                                     "served: rings are served on kicks")

        def change() -> None:
            self.vqs[index].set_kick_fd(msg.take_fd())
            self.kicked[index] = True
            self.broken.discard(index)
        self._with_pair_stopped(index, change)

    def _h_set_vring_call(self, msg: Message) -> None:
        # No fd: a guest that polls its used rings; nothing to notify.
        index, has_fd = self._vring_fd(msg, "call")
        self._with_pair_stopped(
            index, lambda: self.vqs[index].set_call_fd(msg.take_fd() if has_fd else -1))

    def _h_set_vring_err(self, msg: Message) -> None:
        index, has_fd = self._vring_fd(msg, "err")
        self._with_pair_stopped(
            index, lambda: self.vqs[index].set_err_fd(msg.take_fd() if has_fd else -1))

    def _h_set_vring_enable(self, msg: Message) -> None:
        index, enable = msg.state()
        self._vring(index)
        if not self.offered & bits(Feature.PROTOCOL_FEATURES):
            raise VhostNotNegotiated("SET_VRING_ENABLE without PROTOCOL_FEATURES")
        if enable > 1:
            raise VhostBoundsError(f"vring enable value {enable}")
        self.enabled[index] = bool(enable)
        self._update()

    def _h_net_set_mtu(self, msg: Message) -> None:
        self._need_proto(ProtoFeature.MTU, "NET_SET_MTU")
        mtu = msg.u64()
        if not 68 <= mtu <= 65535:
            raise VhostBoundsError(f"MTU {mtu} outside 68..65535")
        self.mtu = mtu
        self.device.mtu_changed(self, mtu)

    def _h_set_status(self, msg: Message) -> None:
        self._need_proto(ProtoFeature.STATUS, "SET_STATUS")
        status = msg.u64()
        if status > 0xFF:
            raise VhostBoundsError(f"device status {status:#x}")
        self.status = status
        self.device.status_changed(self, status)

    def _h_get_status(self, msg: Message) -> bytes:
        self._need_proto(ProtoFeature.STATUS, "GET_STATUS")
        return U64.pack(self.status)


class _Endpoint:
    """Shared parts of server and client: one device, at most one live connection."""

    def __init__(self, path: str, device: VhostNetDevice, *, queue_pairs: int = 1,
                 name: str | None = None,
                 max_memory: int | None = DEFAULT_MAX_MEMORY) -> None:
        self.path = path
        self.device = device
        self.queue_pairs = queue_pairs
        self.max_memory = max_memory   # bytes of guest memory a frontend may map
        self.name = name or os.path.basename(path)
        self.backend: VhostUserBackend | None = None
        self.connections = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _serve(self, sock: socket.socket) -> None:
        b = VhostUserBackend(self.device, sock, name=self.name, queue_pairs=self.queue_pairs,
                             max_memory=self.max_memory)
        with self._lock:
            self.backend = b
            self.connections += 1
            # stop() looks at self.backend under the lock after setting _stop: either it
            # saw this backend and closes it, or this sees _stop. Either way serve()
            # returns, so stop() never waits on a frontend that does not go away.
            if self._stop.is_set():
                b.close()
        try:
            b.serve()
        except Exception:  # a bug must not take the whole process down
            log.exception("%s: backend failed", self.name)
            b._teardown()
        finally:
            with self._lock:
                if self.backend is b:
                    self.backend = None

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            b = self.backend
        if b is not None:
            b.close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class VhostUserServer(_Endpoint):
    """Server mode: listens on a Unix socket path; QEMU connects (chardev socket without
    server=on). One frontend at a time; a second is refused with a log line."""

    def start(self, mode: int | None = None, *, uid: int = -1, gid: int = -1
              ) -> VhostUserServer:
        """Binds and listens (vhost.sockfile's rules: a leftover socket of ours is
        replaced, anything else at the path is refused with OSError, nothing is followed
        through a symlink); mode (default 0600), uid and gid (-1: unchanged) decide who
        may connect as frontend, and are set before the socket is reachable."""
        self._lsock, self._file = sockfile.listen(
            self.path, mode=0o600 if mode is None else mode, uid=uid, gid=gid, backlog=4)
        self._thread = threading.Thread(target=self._run, name=f"vhost-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        conn_thread: threading.Thread | None = None
        last_error = 0.0
        try:
            while not self._stop.is_set():
                if not _readable(self._lsock.fileno(), 0.1):
                    continue
                try:
                    sock, _ = self._lsock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # the frontend gave up before we took it: nothing to do
                except OSError as e:
                    # EMFILE/ENFILE/ENOBUFS/ENOMEM: the process or the host is short of
                    # something. The connection waits in the backlog; the listener lives
                    # on and takes it once there is room (logged at most once a second).
                    now = time.monotonic()
                    if now - last_error >= 1.0:
                        log.warning("%s: accept failed: %s (the listener keeps waiting)",
                                    self.name, e.strerror or e)
                        last_error = now
                    self._stop.wait(0.05)
                    continue
                if conn_thread is not None:
                    # the previous frontend may be going away right now (QEMU restart)
                    conn_thread.join(timeout=1.0)
                if conn_thread is not None and conn_thread.is_alive():
                    log.warning("%s: refusing a second frontend", self.name)
                    sock.close()
                    continue
                t = threading.Thread(target=self._serve, args=(sock,),
                                     name=f"vhost-{self.name}-conn", daemon=True)
                try:
                    t.start()
                except RuntimeError:  # no thread to be had: refuse this one, keep listening
                    log.warning("%s: cannot start a connection thread", self.name)
                    sock.close()
                    continue
                conn_thread = t
        finally:
            self._lsock.close()
            if conn_thread is not None:
                with self._lock:
                    b = self.backend
                if b is not None:
                    b.close()
                conn_thread.join()
            self._file.remove()  # only the socket this server made, if it is still there


class VhostUserClient(_Endpoint):
    """Client mode: connects to a frontend that listens (QEMU server=on) and reconnects
    with exponential back-off after every disconnect, so the back-end can restart under a
    running VM."""

    backoff_min = 0.05
    backoff_max = 2.0

    def start(self) -> VhostUserClient:
        self._thread = threading.Thread(target=self._run, name=f"vhost-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        delay = self.backoff_min
        said = 0
        while not self._stop.is_set():
            try:
                # Never through a symlink, and only to a socket (vhost.sockfile.connect).
                sock = sockfile.connect(self.path)
            except OSError as e:
                # No frontend yet (ENOENT, ECONNREFUSED) is routine; anything else at the
                # path (a file, a symlink) is said once, and then waited out.
                if e.errno not in (errno.ENOENT, errno.ECONNREFUSED) and e.errno != said:
                    log.warning("%s: not connecting to %s: %s", self.name, self.path,
                                e.strerror or e)
                said = e.errno or 0
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            delay = self.backoff_min
            log.info("%s: connected to %s", self.name, self.path)
            self._serve(sock)
            self._stop.wait(self.backoff_min)


def wait_for(cond, timeout: float = 5.0, step: float = 0.005) -> bool:  # type: ignore[no-untyped-def]
    """Polls cond() until true or timeout (a helper for tests and tools)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


__all__ = [
    "NET_FEATURES", "PROTOCOL_FEATURES", "VhostNetDevice", "VhostUserBackend",
    "VhostUserClient", "VhostUserServer", "wait_for",
]
