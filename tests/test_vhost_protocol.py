"""vhost-user protocol end to end over real Unix sockets: negotiation as QEMU 7.2 does it,
REPLY_ACK, every malformed / out-of-order case (a failure reply, or a disconnect of that
device alone with a log line), client mode with reconnect."""

import contextlib
import logging
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhost.backend import NET_FEATURES, PROTOCOL_FEATURES, VhostUserClient, wait_for
from vhost.protocol import (
    ADDR,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    REGION,
    STATE,
    U64,
    VERSION,
    VRING_NOFD_MASK,
    Feature,
    ProtoFeature,
    Req,
    VhostError,
    bits,
    recv_reply,
)
from vhost.testing import (
    VNET_HDR,
    LoopbackDevice,
    VhostUserFrontend,
    guest_ram_fd,
    loopback_server,
)


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "vf0.sock")


@pytest.fixture
def server(sock_path):
    with loopback_server(sock_path, queue_pairs=2) as (srv, dev):
        yield srv, dev


@pytest.fixture
def fe(server, sock_path):
    f = VhostUserFrontend(sock_path).connect()
    yield f
    f.close()


def assert_disconnected(fe, timeout=3.0):
    fe.sock.settimeout(timeout)
    try:
        assert fe.sock.recv(64) == b""
    except ConnectionResetError:
        pass


def echo_ok(fe, qp=0):
    frame = VNET_HDR + b"\xaa" * 60
    assert fe.send(qp, [frame]) == 1
    got = fe.wait_recv(qp, 1)
    assert len(got) == 1 and got[0][12:] == frame[12:]


def test_offers_exactly_what_is_implemented(fe):
    offered = fe.get_u64(Req.GET_FEATURES)
    assert offered == NET_FEATURES
    for f in (Feature.VERSION_1, Feature.MRG_RXBUF, Feature.CSUM, Feature.GUEST_CSUM,
              Feature.HOST_TSO4, Feature.HOST_TSO6, Feature.GUEST_TSO4, Feature.GUEST_TSO6,
              Feature.MTU, Feature.MQ, Feature.RING_EVENT_IDX, Feature.RING_INDIRECT_DESC,
              Feature.PROTOCOL_FEATURES):
        assert offered >> f & 1, f.name
    for f in (Feature.CTRL_VQ, Feature.LOG_ALL, Feature.RING_PACKED, Feature.MAC):
        assert not offered >> f & 1, f.name
    assert fe.get_u64(Req.GET_PROTOCOL_FEATURES) == bits(
        ProtoFeature.MQ, ProtoFeature.REPLY_ACK, ProtoFeature.MTU,
        ProtoFeature.CONFIGURE_MEM_SLOTS, ProtoFeature.STATUS) == PROTOCOL_FEATURES


def test_negotiation_end_to_end(server, fe):
    srv, dev = server
    fe.start(queue_pairs=2)
    assert fe.queue_num == 2 and fe.max_mem_slots == 32
    assert wait_for(lambda: ("started", 1) in dev.events)
    b = srv.backend
    assert b.features == NET_FEATURES and b.protocol_features == PROTOCOL_FEATURES
    assert b.mergeable and b.hdr_len == 12 and b.mem.mapped == 1
    echo_ok(fe, 0)
    echo_ok(fe, 1)
    fe.request(Req.NET_SET_MTU, U64.pack(9000))
    fe.request(Req.SET_STATUS, U64.pack(0x0F))
    assert fe.get_u64(Req.GET_STATUS) == 0x0F
    assert ("mtu", 9000) in dev.events and ("status", 0x0F) in dev.events
    # GET_VRING_BASE stops the ring and reports where the guest's next chain is
    assert fe.get_vring_base(1) == 1
    assert ("stopped", 0) in dev.events
    assert 0 not in b.running and 1 in b.running
    # restart: QEMU re-sends base, addr, kick after a stop
    fe.request(Req.SET_VRING_BASE, STATE.pack(1, 1))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        fe.request(Req.SET_VRING_KICK, U64.pack(1), fds=[kick])
        fe.ring(1).kick_fd = kick
        assert wait_for(lambda: 0 in b.running)
        echo_ok(fe, 0)
    finally:
        fe.ring(1).kick_fd = -1
        os.close(kick)


def test_rings_wait_for_enable_with_protocol_features(server, fe):
    srv, dev = server
    fe.negotiate()
    fe.set_mem_table()
    fe.setup_ring(0, enable=False)
    fe.setup_ring(1, enable=False)
    time.sleep(0.05)
    assert not srv.backend.running
    fe.request(Req.SET_VRING_ENABLE, STATE.pack(0, 1))
    fe.request(Req.SET_VRING_ENABLE, STATE.pack(1, 1))
    assert srv.backend.running == {0}
    fe.request(Req.SET_VRING_ENABLE, STATE.pack(1, 0))
    assert not srv.backend.running


def test_without_protocol_features_rings_start_enabled(server, fe):
    srv, dev = server
    feats = NET_FEATURES & ~bits(Feature.PROTOCOL_FEATURES)
    fe.negotiate(features=feats)
    fe.set_mem_table()
    fe.setup_ring(0)
    fe.setup_ring(1)
    assert wait_for(lambda: srv.backend.running == {0})
    echo_ok(fe)


def test_reply_ack_only_when_asked(server, fe):
    fe.negotiate()
    fe.send_raw(Req.SET_STATUS, U64.pack(1))  # no NEED_REPLY: no answer
    fe.send_raw(Req.SET_STATUS, U64.pack(3), flags=VERSION | FLAG_NEED_REPLY)
    assert U64.unpack(recv_reply(fe.sock, Req.SET_STATUS))[0] == 0
    assert fe.get_u64(Req.GET_STATUS) == 3


# Rejected with a failure reply; the connection stays (REPLY_ACK negotiated, NEED_REPLY).
NACK_CASES = {
    "ring size not a power of 2": (Req.SET_VRING_NUM, lambda fe: STATE.pack(0, 100), None),
    "ring size 0": (Req.SET_VRING_NUM, lambda fe: STATE.pack(0, 0), None),
    "ring size too big": (Req.SET_VRING_NUM, lambda fe: STATE.pack(0, 65536), None),
    "vring index out of range": (Req.SET_VRING_NUM, lambda fe: STATE.pack(4, 256), None),
    "vring addr before num": (Req.SET_VRING_ADDR, lambda fe: ADDR.pack(2, 0, 0, 0, 0, 0), None),
    "split ring base > 16 bits": (Req.SET_VRING_BASE, lambda fe: STATE.pack(0, 1 << 16), None),
    "dirty log base": (Req.SET_LOG_BASE, lambda fe: struct.pack("<QQ", 4096, 0), None),
    "dirty log fd": (Req.SET_LOG_FD, lambda fe: b"", "fd"),
    "feature not offered (LOG_ALL)": (
        Req.SET_FEATURES, lambda fe: U64.pack(NET_FEATURES | bits(Feature.LOG_ALL)), None),
    "feature not offered (packed)": (
        Req.SET_FEATURES, lambda fe: U64.pack(bits(Feature.RING_PACKED)), None),
    "second SET_OWNER": (Req.SET_OWNER, lambda fe: b"", None),
    "vring enable value 2": (Req.SET_VRING_ENABLE, lambda fe: STATE.pack(0, 2), None),
    "MTU too small": (Req.NET_SET_MTU, lambda fe: U64.pack(20), None),
    "status > 8 bits": (Req.SET_STATUS, lambda fe: U64.pack(0x100), None),
    "unsupported request (SEND_RARP)": (Req.SEND_RARP, lambda fe: bytes(8), None),
    "overlapping regions": (Req.SET_MEM_TABLE, lambda fe: struct.pack("<II", 2, 0) +
                            REGION.pack(0, 1 << 20, 1 << 40, 0) +
                            REGION.pack(1 << 19, 1 << 20, 1 << 41, 0), "fd2"),
    "region size 0": (Req.SET_MEM_TABLE, lambda fe: struct.pack("<II", 1, 0) +
                      REGION.pack(0, 0, 1 << 40, 0), "fd"),
    "region wraps": (Req.SET_MEM_TABLE, lambda fe: struct.pack("<II", 1, 0) +
                     REGION.pack((1 << 64) - 4096, 8192, 1 << 40, 0), "fd"),
    "region beyond the fd": (Req.ADD_MEM_REG, lambda fe: bytes(8) +
                             REGION.pack(1 << 40, 1 << 20, 1 << 44, 1 << 50), "fd"),
    "remove unknown region": (Req.REM_MEM_REG, lambda fe: bytes(8) +
                              REGION.pack(1 << 40, 4096, 0, 0), None),
    "kick without an fd (polling mode)": (
        Req.SET_VRING_KICK, lambda fe: U64.pack(1 | VRING_NOFD_MASK), None),
    "kick fd is a pipe": (Req.SET_VRING_KICK, lambda fe: U64.pack(1), "pipe"),
    "call fd is a pipe": (Req.SET_VRING_CALL, lambda fe: U64.pack(0), "pipe"),
    "call fd is a memfd": (Req.SET_VRING_CALL, lambda fe: U64.pack(0), "fd"),
    "err fd is a socket": (Req.SET_VRING_ERR, lambda fe: U64.pack(0), "socket"),
    "memory from an unsealed memfd": (Req.SET_MEM_TABLE, lambda fe: struct.pack("<II", 1, 0) +
                                      REGION.pack(0, 1 << 20, 1 << 40, 0), "unsealed"),
    "memory from a pipe": (Req.ADD_MEM_REG, lambda fe: bytes(8) +
                           REGION.pack(1 << 40, 4096, 1 << 44, 0), "pipe"),
    "memory beyond the cap (64 GiB)": (Req.SET_MEM_TABLE, lambda fe: struct.pack("<II", 1, 0) +
                                       REGION.pack(0, 96 << 30, 1 << 40, 0), "huge"),
}


@contextlib.contextmanager
def _fds_of(kind, fe):
    """The fds a NACK case sends (the test's own copies, closed after)."""
    mine = []
    try:
        if kind is None:
            yield None
            return
        if kind in ("fd", "fd2"):
            yield [fe.memfd] * (2 if kind == "fd2" else 1)
            return
        if kind == "pipe":
            mine = list(os.pipe())
            send = [mine[0]]
        elif kind == "socket":
            a, b = socket.socketpair()
            mine = [a.detach(), b.detach()]
            send = [mine[0]]
        elif kind == "unsealed":
            mine = [guest_ram_fd(1 << 20, seal=False)]
            send = mine
        elif kind == "huge":          # sparse: nothing is allocated
            mine = [guest_ram_fd(96 << 30)]
            send = mine
        yield send
    finally:
        for fd in mine:
            os.close(fd)


@pytest.mark.parametrize("case", sorted(NACK_CASES))
def test_meaning_errors_get_a_failure_reply(server, fe, case, caplog):
    req, payload, fds = NACK_CASES[case]
    fe.negotiate()
    if req is Req.SET_VRING_ADDR:
        fe.set_mem_table()
    if req is Req.REM_MEM_REG:
        fe.set_mem_table()
    nfd = len(os.listdir("/proc/self/fd"))
    with caplog.at_level(logging.WARNING, logger="vhost"), _fds_of(fds, fe) as fdlist:
        with pytest.raises(VhostError, match="rejected"):
            fe.request(req, payload(fe), fds=fdlist, ack=True)
    assert any("rejected" in r.getMessage() for r in caplog.records)
    # the connection is still good, and fds passed with the bad message were closed
    assert fe.get_u64(Req.GET_FEATURES) == NET_FEATURES
    assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= nfd)


def test_vring_addr_outside_memory_is_rejected(server, fe):
    fe.negotiate()
    fe.set_mem_table()
    fe.request(Req.SET_VRING_NUM, STATE.pack(0, 256))
    for desc, used, avail in ((1 << 50, fe.uva(0x1000), fe.uva(0x2000)),
                              (fe.uva(0x1008), fe.uva(0x3000), fe.uva(0x2000)),
                              (fe.uva(0x1000), fe.uva(fe.mem_size - 8), fe.uva(0x2000))):
        with pytest.raises(VhostError):
            fe.request(Req.SET_VRING_ADDR, ADDR.pack(0, 0, desc, used, avail, 0), ack=True)
    assert fe.get_u64(Req.GET_FEATURES) == NET_FEATURES


def test_vring_change_while_running_is_rejected(server, fe):
    srv, _ = server
    fe.start()
    assert wait_for(lambda: srv.backend.running == {0})
    with pytest.raises(VhostError):
        fe.request(Req.SET_VRING_NUM, STATE.pack(0, 128), ack=True)
    echo_ok(fe)


# Disconnect: syntax or framing errors, errors without an ack to carry them, and errors
# in requests that have their own reply.
def _raw(fe, data, fds=None):
    if fds:
        fe.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  struct.pack(f"{len(fds)}i", *fds))])
    else:
        fe.sock.sendall(data)


HDR = struct.Struct("<III")
DISCONNECT_CASES = {
    "bad version": lambda fe: _raw(fe, HDR.pack(Req.GET_FEATURES, 2, 0)),
    "unknown flags": lambda fe: _raw(fe, HDR.pack(Req.GET_FEATURES, VERSION | 0x100, 0)),
    "reply flag on a request": lambda fe: _raw(fe, HDR.pack(Req.GET_FEATURES,
                                                            VERSION | FLAG_REPLY, 0)),
    "unknown request": lambda fe: _raw(fe, HDR.pack(99, VERSION, 0)),
    "request 0": lambda fe: _raw(fe, HDR.pack(0, VERSION, 0)),
    "wrong payload size": lambda fe: _raw(fe, HDR.pack(Req.SET_FEATURES, VERSION, 4) + bytes(4)),
    "huge payload size": lambda fe: _raw(fe, HDR.pack(Req.SET_FEATURES, VERSION, 1 << 20)),
    "truncated payload": lambda fe: (_raw(fe, HDR.pack(Req.SET_FEATURES, VERSION, 8) + bytes(3)),
                                     fe.sock.shutdown(socket.SHUT_WR)),
    "truncated header": lambda fe: (_raw(fe, b"\x01\x00"), fe.sock.shutdown(socket.SHUT_WR)),
    "mem table with too few fds": lambda fe: _raw(fe, HDR.pack(
        Req.SET_MEM_TABLE, VERSION, 8 + 2 * 32) + struct.pack("<II", 2, 0) + bytes(64),
        [fe.memfd]),
    "mem table with 9 regions": lambda fe: _raw(fe, HDR.pack(
        Req.SET_MEM_TABLE, VERSION, 8 + 9 * 32) + struct.pack("<II", 9, 0) + bytes(9 * 32),
        [fe.memfd] * 8),
    "too many fds": lambda fe: _raw(fe, HDR.pack(Req.GET_FEATURES, VERSION, 0),
                                    [fe.memfd] * 12),
    "fd on a message that takes none": lambda fe: _raw(fe, HDR.pack(
        Req.SET_FEATURES, VERSION, 8) + bytes(8), [fe.memfd]),
    "kick without fd or NOFD": lambda fe: _raw(fe, HDR.pack(
        Req.SET_VRING_KICK, VERSION, 8) + U64.pack(0)),
    "kick with unknown bits": lambda fe: _raw(fe, HDR.pack(
        Req.SET_VRING_KICK, VERSION, 8) + U64.pack(0x1100)),
    "error without NEED_REPLY": lambda fe: _raw(fe, HDR.pack(
        Req.SET_VRING_NUM, VERSION, 8) + STATE.pack(0, 3)),
    "GET_QUEUE_NUM without MQ": lambda fe: (fe.request(Req.SET_PROTOCOL_FEATURES, U64.pack(0)),
                                            _raw(fe, HDR.pack(Req.GET_QUEUE_NUM, VERSION, 0))),
    "mem table before SET_OWNER": lambda fe: _raw(fe, HDR.pack(
        Req.SET_MEM_TABLE, VERSION, 40) + struct.pack("<II", 1, 0) +
        REGION.pack(0, 4096, 1 << 40, 0), [fe.memfd]),
}


@pytest.mark.parametrize("case", sorted(DISCONNECT_CASES))
def test_bad_messages_disconnect_that_device_only(tmp_path, case, caplog):
    other_path = str(tmp_path / "other.sock")
    bad_path = str(tmp_path / "bad.sock")
    with loopback_server(other_path) as (osrv, odev), loopback_server(bad_path) as (bsrv, bdev):
        with VhostUserFrontend(other_path) as good:
            good.start()
            echo_ok(good)
            nfd = len(os.listdir("/proc/self/fd"))
            with VhostUserFrontend(bad_path).connect() as bad:
                with caplog.at_level(logging.INFO, logger="vhost"):
                    DISCONNECT_CASES[case](bad)
                    assert_disconnected(bad)
                assert wait_for(lambda: ("disconnected",) in bdev.events)
                assert any(r.name == "vhost" for r in caplog.records)
            # the other device is untouched, and the bad one's fds are all closed
            echo_ok(good)
            assert wait_for(lambda: len(os.listdir("/proc/self/fd")) <= nfd)
        # the bad device's server accepts a new, well-behaved frontend
        with VhostUserFrontend(bad_path) as again:
            again.start()
            echo_ok(again)


def test_second_frontend_is_refused(server, sock_path, fe):
    fe.start()
    with VhostUserFrontend(sock_path).connect() as intruder:
        assert_disconnected(intruder)
    echo_ok(fe)


def test_reset_owner_unmaps_and_restarts(server, fe):
    srv, dev = server
    fe.start()
    assert wait_for(lambda: srv.backend.running == {0})
    fe.request(Req.RESET_OWNER, ack=False)
    fe.request(Req.GET_FEATURES)  # a round trip: RESET_OWNER has been handled
    b = srv.backend
    assert b.mem.mapped == 0 and not b.running and b.features == 0
    assert b.owner and b.protocol_features == PROTOCOL_FEATURES
    assert all(vq.call_fd == -1 and vq.kick_fd == -1 for vq in b.vqs)
    # QEMU brings the device back without a new SET_OWNER
    fe.request(Req.SET_FEATURES, U64.pack(fe.features))
    fe.set_mem_table()
    fe._next = [r.mmap_offset for r in fe.regions]
    fe.setup_ring(0)
    fe.setup_ring(1)
    echo_ok(fe)


def test_client_mode_reconnects_with_backoff(tmp_path):
    path = str(tmp_path / "qemu.sock")
    dev = LoopbackDevice()
    client = VhostUserClient(path, dev).start()  # nobody listens yet: it backs off
    try:
        time.sleep(0.3)
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        lsock.settimeout(10)
        for round_ in range(2):  # QEMU server=on; the second round is a reconnect
            conn, _ = lsock.accept()
            fe = VhostUserFrontend(path)
            fe.sock = conn
            fe.sock.settimeout(5)
            with fe:
                fe.start()
                echo_ok(fe)
            assert wait_for(lambda r=round_: dev.events.count(("disconnected",)) == r + 1)
        assert client.connections >= 2
        lsock.close()
    finally:
        client.stop()
    assert dev.events.count(("connected",)) >= 2


def test_vhost_never_imports_softnic():
    import subprocess
    import sys

    code = ("import sys, vhost.backend, vhost.testing, vhost.bench; "
            "sys.exit(any(m.split('.')[0] == 'softnic' for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=os.getcwd()).returncode == 0


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=st.one_of(st.sampled_from(list(Req)), st.integers(0, 2**32 - 1)),
       flags=st.one_of(st.just(VERSION), st.just(VERSION | FLAG_NEED_REPLY),
                       st.integers(0, 2**32 - 1)),
       payload=st.binary(max_size=300), lie=st.integers(-8, 8),
       nfds=st.integers(0, 3), negotiated=st.booleans())
def test_random_messages_never_hurt_the_server(server, sock_path, request, flags, payload,
                                               lie, nfds, negotiated):
    srv, dev = server
    with VhostUserFrontend(sock_path).connect() as f:
        f.sock.settimeout(0.5)
        if negotiated:
            f.negotiate()
            f.set_mem_table()
        size = max(0, len(payload) + lie)
        try:  # whatever comes back (a reply, a nack, EOF, a reset) is fine
            _raw(f, HDR.pack(int(request), flags, size) + payload, [f.memfd] * nfds)
            f.sock.recv(64)
        except (TimeoutError, ConnectionError):
            pass
    # the server still serves a well-behaved frontend
    assert wait_for(lambda: srv.backend is None)
    with VhostUserFrontend(sock_path) as g:
        g.start()
        echo_ok(g)


def test_server_socket_mode(tmp_path):
    from vhost.backend import VhostUserServer

    path = str(tmp_path / "m.sock")
    srv = VhostUserServer(path, LoopbackDevice()).start(mode=0o600)
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
    finally:
        srv.stop()
    assert not os.path.exists(path)


# ---- every fd a frontend sends is closed, whatever becomes of its message ----------------

def _fresh(kind):
    """A new fd of `kind` (the test closes its copy once sent)."""
    if kind == "eventfd":
        return os.eventfd(0)
    if kind == "pipe":
        r, w = os.pipe()
        os.close(w)
        return r
    if kind == "socket":
        a, b = socket.socketpair()
        b.close()
        return a.detach()
    if kind == "unsealed":
        return guest_ram_fd(1 << 20, seal=False)
    if kind == "huge":
        return guest_ram_fd(96 << 30)
    return guest_ram_fd(1 << 20)      # "memfd": sealed, 1 MiB


def _table(*regions):
    return struct.pack("<II", len(regions), 0) + b"".join(REGION.pack(*r) for r in regions)


ONE = (1 << 40, 1 << 20, 1 << 44, 0)       # a region of 1 MiB at guest address 1 TiB
# (request, payload, fd kinds, flags). NEED_REPLY: a failure reply; without: a disconnect.
# Everything here is malformed or refused; each carries fds.
_ACK = VERSION | FLAG_NEED_REPLY
FD_CASES = {
    "table regions overlap": (Req.SET_MEM_TABLE, _table(ONE, ONE), ["memfd"] * 2, _ACK),
    "table beyond its fd": (Req.SET_MEM_TABLE, _table((0, 4 << 20, 1 << 44, 0)), ["memfd"],
                            _ACK),
    "table from an unsealed memfd": (Req.SET_MEM_TABLE, _table(ONE), ["unsealed"], _ACK),
    "table from a pipe": (Req.SET_MEM_TABLE, _table(ONE), ["pipe"], _ACK),
    "table beyond the cap": (Req.SET_MEM_TABLE, _table((0, 96 << 30, 1 << 44, 0)), ["huge"],
                             _ACK),
    "region beyond its fd": (Req.ADD_MEM_REG, bytes(8) + REGION.pack(1 << 40, 2 << 20, 1 << 44,
                                                                      0), ["memfd"], _ACK),
    "region from an eventfd": (Req.ADD_MEM_REG, bytes(8) + REGION.pack(*ONE), ["eventfd"], _ACK),
    "region overlaps the table": (Req.ADD_MEM_REG, bytes(8) + REGION.pack(0, 1 << 20, 1 << 45,
                                                                          0), ["memfd"], _ACK),
    "remove an unknown region": (Req.REM_MEM_REG, bytes(8) + REGION.pack(*ONE), ["memfd"], _ACK),
    "dirty log base": (Req.SET_LOG_BASE, struct.pack("<QQ", 4096, 0), ["memfd"], _ACK),
    "dirty log fd": (Req.SET_LOG_FD, b"", ["eventfd"], _ACK),
    "kick of ring 9": (Req.SET_VRING_KICK, U64.pack(9), ["eventfd"], _ACK),
    "kick from a socket": (Req.SET_VRING_KICK, U64.pack(1), ["socket"], _ACK),
    "call from a pipe": (Req.SET_VRING_CALL, U64.pack(0), ["pipe"], _ACK),
    "err from a memfd": (Req.SET_VRING_ERR, U64.pack(0), ["memfd"], _ACK),
    "call of ring 200": (Req.SET_VRING_CALL, U64.pack(200), ["eventfd"], _ACK),
    "call from a pipe, no ack": (Req.SET_VRING_CALL, U64.pack(0), ["pipe"], VERSION),
    "fd with a NOFD kick": (Req.SET_VRING_KICK, U64.pack(1 | VRING_NOFD_MASK), ["eventfd"],
                            _ACK),
    "fds on GET_FEATURES": (Req.GET_FEATURES, b"", ["memfd", "eventfd"], VERSION),
    "table with too few fds": (Req.SET_MEM_TABLE, _table(ONE, (1 << 41, 1 << 20, 1 << 46, 0)),
                               ["memfd"], _ACK),
    "eleven fds": (Req.SET_FEATURES, bytes(8), ["eventfd"] * 11, _ACK),
    "backend request fd": (Req.SET_BACKEND_REQ_FD, b"", ["socket"], _ACK),
    "inflight fd": (Req.SET_INFLIGHT_FD, bytes(24), ["memfd"], _ACK),
    "unknown request": (77, b"", ["eventfd"], _ACK),
}


def test_fds_of_a_thousand_malformed_requests_are_all_closed(server, sock_path):
    """1,000 requests that carry fds and are refused (a failure reply) or end the
    connection (framing, no ack to carry the error): afterwards the process holds exactly
    the fds it held before, and the device serves a well-behaved frontend."""
    srv, dev = server
    names = sorted(FD_CASES)
    fe = None
    outcomes: dict[str, set[str]] = {n: set() for n in names}

    def nfds():
        return len(os.listdir("/proc/self/fd"))

    before = nfds()                 # no frontend connected: the server's listener only
    try:
        for i in range(1000):
            if fe is None:
                fe = VhostUserFrontend(sock_path).connect()
                fe.negotiate()
                fe.set_mem_table()
            name = names[i % len(names)]
            req, payload, kinds, flags = FD_CASES[name]
            fds = [_fresh(k) for k in kinds]
            try:
                _raw(fe, HDR.pack(int(req), flags, len(payload)) + payload, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                if flags & FLAG_NEED_REPLY and req not in (Req.GET_FEATURES,):
                    reply = recv_reply(fe.sock, int(req))
                    assert U64.unpack(reply)[0] != 0, f"{name}: accepted"
                    outcomes[name].add("nack")
                    continue
                assert_disconnected(fe)
                outcomes[name].add("disconnect")
            except (VhostError, ConnectionError, struct.error):
                outcomes[name].add("disconnect")    # closed instead of answering
            fe.close()
            fe = None
            assert wait_for(lambda: srv.backend is None)
        if fe is not None:
            fe.close()
            fe = None
        assert wait_for(lambda: srv.backend is None)
        assert wait_for(lambda: nfds() == before), (before, nfds())
    finally:
        if fe is not None:
            fe.close()
    print({n: sorted(o) for n, o in outcomes.items()})
    # the refusals that can carry an answer do
    for name in ("table from an unsealed memfd", "table beyond the cap", "call from a pipe",
                 "kick from a socket", "err from a memfd", "region from an eventfd"):
        assert outcomes[name] == {"nack"}, (name, outcomes[name])
    with VhostUserFrontend(sock_path) as good:
        good.start()
        echo_ok(good)


def test_stop_never_waits_on_a_frontend_that_stays(tmp_path):
    """stop() racing a connection just made (its backend not registered yet, so stop()
    found none to close): the connection is closed instead of served, so stop() is never
    left waiting on a frontend that does not go away (a VF delete would hang on it, the
    admin lock held)."""
    import threading

    ep = VhostUserClient(str(tmp_path / "qemu.sock"), LoopbackDevice())
    a, b = socket.socketpair()
    try:
        ep._stop.set()                     # what stop() does first
        t = threading.Thread(target=ep._serve, args=(a,), daemon=True)
        t.start()
        t.join(5)
        assert not t.is_alive(), "the endpoint serves a frontend after stop()"
    finally:
        b.close()
