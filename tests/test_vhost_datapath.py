"""Frames both ways through a loopback device over vhost-user with the in-process
frontend: byte-exact against scapy-built frames parsed back by dpkt, every layout the
negotiation allows (mergeable or not, 10-byte legacy header, two memory regions, MQ,
EVENT_IDX or not), hostile rings over a real connection, and memory / fd leak counts."""

import os
import struct
import time

import dpkt
import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from vhost.backend import NET_FEATURES, wait_for
from vhost.memory import GuestMemory
from vhost.protocol import REGION, STATE, U64, Feature, Region, Req, VhostError, bits
from vhost.testing import VhostUserFrontend, frame_hdr, loopback_server

MACS = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}  # explicit: no ARP lookups


def scapy_frames(n, seed=1):
    out = []
    for i in range(n):
        size = (i * 97 + seed) % 1400
        if i % 3 == 0:
            p = Ether(**MACS) / IP(
                src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000 + i, dport=4789) / (
                bytes([i & 0xFF]) * size)
        elif i % 3 == 1:
            p = Ether(**MACS) / IPv6(src="fd00::1", dst="fd00::2") / TCP(sport=i, dport=80) / (
                b"x" * size)
        else:
            p = Ether(**MACS) / IP(src="192.0.2.1", dst="192.0.2.7") / TCP(flags="S", seq=i)
        out.append(bytes(p))
    return out


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "vf.sock")


def roundtrip(fe, frames, qp=0, hdrs=None):
    hdrs = hdrs or [frame_hdr(flags=1, csum_start=34, csum_offset=6)] * len(frames)
    sent = [h + f for h, f in zip(hdrs, frames, strict=True)]
    got = []
    step = max(1, fe.ring(2 * qp + 1).num // 4)  # stay within the rings
    for i in range(0, len(sent), step):
        assert fe.send(qp, sent[i:i + step]) == len(sent[i:i + step])
        got += fe.wait_recv(qp, len(sent[i:i + step]))
    assert len(got) == len(sent)
    return sent, got


def check_echo(sent, got, mergeable=True):
    for s, g in zip(sent, got, strict=True):
        assert g[:10] == s[:10]  # the virtio-net header the device gave is kept
        assert g[12:] == s[12:]
        nb = struct.unpack_from("<H", g, 10)[0]
        assert nb >= 1 and (mergeable or nb == 1)
        eth = dpkt.ethernet.Ethernet(g[12:])  # an independent parser agrees
        assert bytes(eth) == s[12:]


def test_echo_byte_exact_mergeable(path):
    with loopback_server(path) as (srv, dev), VhostUserFrontend(path) as fe:
        fe.start()
        frames = scapy_frames(200)
        sent, got = roundtrip(fe, frames)
        check_echo(sent, got)
        c_tx, c_rx = srv.backend.vq(1).counters(), srv.backend.vq(0).counters()
        assert c_tx["frames"] == c_rx["frames"] == 200
        assert c_tx["bytes"] == sum(len(s) for s in sent)
        assert fe.ring(1).bad_used == fe.ring(0).bad_used == 0
        st = srv.backend.stats()
        assert st["running_queue_pairs"] == [0] and st["memory_regions"] == 1
        assert st["queues"][1]["frames"] == 200 and st["queues"][0]["broken"] is None


def test_large_frames_span_chains_and_buffers(path):
    with loopback_server(path) as (srv, dev), VhostUserFrontend(path, mem_size=16 << 20) as fe:
        fe.start(num=256, buf_size=2048)
        frames = [bytes(Ether(**MACS) / IP(src="192.0.2.1", dst="192.0.2.2") / TCP() / (bytes(range(256)) * (n // 256)))
                  for n in (1500, 9000, 65000)]
        hdrs = [frame_hdr(gso_type=1, hdr_len=54, gso_size=1448)] * 3
        sent, got = roundtrip(fe, frames, hdrs=hdrs)
        check_echo(sent, got)
        for s, g in zip(sent, got, strict=True):  # num_buffers = buffers of 2048 used
            assert struct.unpack_from("<H", g, 10)[0] == -(-len(s) // 2048)


def test_not_mergeable_big_buffers_and_too_big(path):
    feats = NET_FEATURES & ~bits(Feature.MRG_RXBUF, Feature.MQ)
    with loopback_server(path) as (srv, dev), VhostUserFrontend(path, mem_size=16 << 20) as fe:
        fe.start(features=feats, num=32, buf_size=9216)
        sent, got = roundtrip(fe, scapy_frames(40))
        check_echo(sent, got, mergeable=False)
        big = frame_hdr() + bytes(Ether(**MACS) / IP(src="192.0.2.1", dst="192.0.2.2") / (b"z" * 12000))
        fe.send(0, [big])
        assert wait_for(lambda: srv.backend.vq(0).counters()["rx_too_big"] == 1)
        sent, got = roundtrip(fe, scapy_frames(3))  # and it goes on
        check_echo(sent, got, mergeable=False)


def test_legacy_header_without_version_1(path):
    feats = NET_FEATURES & ~bits(Feature.VERSION_1, Feature.MRG_RXBUF, Feature.MQ)
    with loopback_server(path) as (srv, dev), VhostUserFrontend(path) as fe:
        fe.start(features=feats)
        assert srv.backend.hdr_len == 10
        frames = [bytes(range(1, 11)) + f for f in scapy_frames(10)]  # 10-byte header
        assert fe.send(0, frames) == 10
        got = fe.wait_recv(0, 10)
        assert got == frames


@pytest.mark.parametrize("event_idx", [True, False])
def test_two_regions_and_notification_modes(path, event_idx):
    feats = NET_FEATURES & ~bits(Feature.MQ, *([] if event_idx else [Feature.RING_EVENT_IDX]))
    with loopback_server(path) as (srv, dev), VhostUserFrontend(path, regions=2) as fe:
        fe.start(features=feats, tx_region=1)
        assert [r.gpa for r in srv.backend.mem.regions] == [0, 1 << 32]
        sent, got = roundtrip(fe, scapy_frames(100))
        check_echo(sent, got)
        assert fe.ring(0).interrupts() >= 1  # the guest was interrupted for RX


def test_multiqueue_pairs_are_independent(path):
    with loopback_server(path, queue_pairs=3) as (srv, dev), VhostUserFrontend(path) as fe:
        fe.start(queue_pairs=3)
        assert wait_for(lambda: srv.backend.running == {0, 1, 2})
        for qp in range(3):
            sent, got = roundtrip(fe, scapy_frames(20, seed=qp), qp=qp)
            check_echo(sent, got)
            assert srv.backend.vq(2 * qp + 1).counters()["frames"] == 20


def test_hostile_ring_over_socket_breaks_only_that_queue(tmp_path):
    p1, p2 = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    with loopback_server(p1, queue_pairs=2) as (s1, d1), loopback_server(p2) as (s2, d2), \
            VhostUserFrontend(p1) as bad, VhostUserFrontend(p2) as good:
        bad.start(queue_pairs=2)
        good.start()
        err = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            bad.request(Req.GET_VRING_BASE, STATE.pack(1, 0))  # restart ring 1 with an err fd
            bad.request(Req.SET_VRING_ERR, U64.pack(1), fds=[err])
            bad.request(Req.SET_VRING_BASE, STATE.pack(1, 0))
            bad.request(Req.SET_VRING_KICK, U64.pack(1), fds=[bad.ring(1).kick_fd])
            assert wait_for(lambda: 0 in s1.backend.running)
            bad.ring(1).post(bad.ring(1).num + 7)  # head out of range
            assert wait_for(lambda: ("broken", 0, 1, "bad_head") in d1.events)
            assert os.read(err, 8) == U64.pack(1)  # the frontend was told
        finally:
            os.close(err)
        assert s1.backend.vq(1).counters()["bad_head"] == 1
        assert 0 not in s1.backend.running
        sent, got = roundtrip(bad, scapy_frames(5), qp=1)  # the other pair lives on
        check_echo(sent, got)
        sent, got = roundtrip(good, scapy_frames(5))  # and so does the other device
        check_echo(sent, got)
        # the frontend resets the ring: it runs again
        bad.request(Req.GET_VRING_BASE, STATE.pack(1, 0))
        bad.request(Req.SET_VRING_BASE, STATE.pack(1, bad.ring(1).avail_idx))
        bad.request(Req.SET_VRING_KICK, U64.pack(1), fds=[bad.ring(1).kick_fd])
        assert wait_for(lambda: 0 in s1.backend.running)


NEXT, WRITE, INDIRECT = 1, 2, 4


def _scratch(fe, data):
    off = fe.alloc(len(data))
    fe.ram.write(off, data)
    return fe.gpa(off)


def _chain(fe, descs):
    """Posts a chain on TX ring 1 of fe: [(addr, len, flags, next-position)]."""
    r = fe.ring(1)
    ids = [r.take_free() for _ in descs]
    for i, (addr, ln, fl, nx) in enumerate(descs):
        r.write_desc(ids[i], addr, ln, fl, ids[nx] if nx < len(ids) else nx)
    r.post(ids[0])


HOSTILE = {
    "avail_idx_jump": lambda fe: fe.ring(1).set_avail_idx(fe.ring(1).avail_idx + 300) or
    fe.ring(1).kick(),
    "bad_next": lambda fe: _chain(fe, [(_scratch(fe, VNET), 12, NEXT, 999)]),
    "chain_loop": lambda fe: _chain(fe, [(_scratch(fe, VNET), 12, NEXT, 1),
                                         (_scratch(fe, VNET), 12, NEXT, 0)]),
    "indirect_len": lambda fe: _chain(fe, [(_scratch(fe, bytes(32)), 24, INDIRECT, 0)]),
    "indirect_addr": lambda fe: _chain(fe, [(1 << 40, 32, INDIRECT, 0)]),
    "indirect_nested": lambda fe: _chain(fe, [(_scratch(fe, struct.pack(
        "<QIHH", 0, 16, INDIRECT, 0)), 16, INDIRECT, 0)]),
    "bad_addr": lambda fe: _chain(fe, [(1 << 40, 64, 0, 0)]),
    "zero_len": lambda fe: _chain(fe, [(_scratch(fe, VNET), 0, 0, 0)]),
    "desc_order": lambda fe: _chain(fe, [(_scratch(fe, VNET), 12, WRITE, 0)]),
    "tx_too_short": lambda fe: _chain(fe, [(_scratch(fe, VNET), 5, 0, 0)]),
    "tx_too_long": lambda fe: _chain(fe, [(0, 70000, 0, 0)]),
}
VNET = bytes(12)


@pytest.mark.parametrize("reason", sorted(HOSTILE))
def test_each_hostile_ring_case_over_socket(tmp_path, reason):
    p1, p2 = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    fatal = reason not in ("zero_len", "desc_order", "tx_too_short", "tx_too_long")
    with loopback_server(p1) as (s1, d1), loopback_server(p2) as (s2, d2), \
            VhostUserFrontend(p1) as bad, VhostUserFrontend(p2) as good:
        bad.start()
        good.start()
        HOSTILE[reason](bad)
        assert wait_for(lambda: s1.backend.vq(1).counters()[reason] == 1)
        if fatal:
            assert wait_for(lambda: ("broken", 0, 1, reason) in d1.events)
            assert s1.backend.vq(1).broken == reason and not s1.backend.running
        else:
            assert s1.backend.vq(1).broken is None
            check_echo(*roundtrip(bad, scapy_frames(3)))  # the same ring goes on
        check_echo(*roundtrip(good, scapy_frames(3)))  # the other device is untouched


def test_add_and_remove_memory_regions(path):
    with loopback_server(path) as (srv, dev), VhostUserFrontend(path, regions=2) as fe:
        fe.start(tx_region=1)
        b = srv.backend
        r1 = fe.regions[1]
        payload = bytes(8) + REGION.pack(r1.gpa, r1.size, r1.uva, r1.mmap_offset)
        shifted = bytes(8) + REGION.pack(r1.gpa + 4096, r1.size, r1.uva + (1 << 30),
                                         r1.mmap_offset)
        with pytest.raises(VhostError):  # overlaps what is mapped
            fe.request(Req.ADD_MEM_REG, shifted, fds=[fe.memfd])
        # The same region again (QEMU sends the table once per queue pair): one more
        # reference; nothing is remapped and the rings keep running.
        fe.request(Req.ADD_MEM_REG, payload, fds=[fe.memfd])
        assert b.mem.mapped == 2 and b.mem.references(r1) == 2 and b.running == {0}
        fe.request(Req.REM_MEM_REG, payload)
        assert b.mem.mapped == 2 and b.mem.references(r1) == 1 and b.running == {0}
        # removing the region the TX ring lives in stops that pair for good
        fe.request(Req.REM_MEM_REG, payload)
        assert b.mem.mapped == 1
        assert wait_for(lambda: b.vq(1).broken == "ring_addr") and not b.running
        fe.request(Req.ADD_MEM_REG, payload, fds=[fe.memfd])
        assert b.mem.mapped == 2
        extra = Region(1 << 40, 4096, 1 << 45, 0)
        fe.request(Req.ADD_MEM_REG, bytes(8) + REGION.pack(extra.gpa, extra.size, extra.uva, extra.mmap_offset),
                   fds=[fe.memfd])
        assert b.mem.mapped == 3


def _counts():
    maps = open("/proc/self/maps").read().count("memfd:vhost-guest")
    return len(os.listdir("/proc/self/fd")), maps


def test_no_fd_or_mapping_leaks_after_disconnects(path):
    with loopback_server(path, queue_pairs=2) as (srv, dev):
        with VhostUserFrontend(path) as fe:  # warm up lazily created state
            fe.start()
        assert wait_for(lambda: srv.backend is None)
        base = _counts()
        live = GuestMemory.live
        for regions in (1, 2, 2):
            fe = VhostUserFrontend(path, regions=regions).connect()
            fe.start(queue_pairs=2)
            roundtrip(fe, scapy_frames(10))
            fds, maps = _counts()
            assert maps == 1 + regions  # the frontend's RAM + the backend's regions
            assert srv.backend.mem.mapped == regions
            fe.disconnect()  # the VM goes away first, as when QEMU is killed
            assert wait_for(lambda: srv.backend is None)
            assert wait_for(lambda: _counts()[1] == base[1] + 1)
            fe.close()
            assert wait_for(lambda: _counts() == base)
        assert GuestMemory.live == live
    assert dev.events.count(("disconnected",)) == 4


@pytest.mark.parametrize("event_idx", [True, False])
def test_idle_device_asks_for_kicks(path, event_idx):
    feats = NET_FEATURES & ~bits(Feature.MQ, *([] if event_idx else [Feature.RING_EVENT_IDX]))
    with loopback_server(path) as (srv, dev), VhostUserFrontend(path) as fe:
        fe.start(features=feats)
        tx = fe.ring(1)
        latencies = []
        for _ in range(3):
            time.sleep(0.15)  # the worker goes idle and asks for a kick before sleeping
            if not event_idx:
                assert tx.used_flags == 0  # VRING_USED_F_NO_NOTIFY cleared
            kicks = tx.kicks
            t0 = time.monotonic()
            check_echo(*roundtrip(fe, scapy_frames(1)))
            latencies.append(time.monotonic() - t0)
            assert tx.kicks == kicks + 1
        # woken by the kick, not by the worker's 50 ms poll timeout (best of 3: shared CPUs)
        assert min(latencies) < 0.04


def test_memory_table_sent_per_queue_pair_keeps_the_rings_running(path):
    """QEMU has one vhost device per queue pair on the connection, and each sends the
    memory table: the same table again maps nothing and stops no ring."""
    with loopback_server(path, queue_pairs=2) as (srv, dev), \
            VhostUserFrontend(path, regions=2) as fe:
        fe.start(queue_pairs=2)
        b = srv.backend
        assert wait_for(lambda: b.running == {0, 1})
        maps = b.mem.mapped
        fe.set_mem_table()
        for r in fe.regions:         # and the slot-wise form of the same
            fe.request(Req.ADD_MEM_REG, bytes(8) + REGION.pack(r.gpa, r.size, r.uva,
                                                               r.mmap_offset),
                       fds=[fe.memfd])
        assert b.mem.mapped == maps and b.running == {0, 1}
        assert [e for e in dev.events if e[0] == "stopped"] == []
        for qp in (0, 1):
            check_echo(*roundtrip(fe, scapy_frames(4, seed=qp), qp=qp))
        # Region 1 now has two references: one REM_MEM_REG leaves it mapped.
        fe.request(Req.REM_MEM_REG, bytes(8) + REGION.pack(
            fe.regions[1].gpa, fe.regions[1].size, fe.regions[1].uva,
            fe.regions[1].mmap_offset))
        assert b.mem.mapped == maps and b.running == {0, 1}   # one reference of two gone
