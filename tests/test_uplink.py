"""The underlay sockets between two namespaces joined by a veth (MTU 1500).

Oracles: the kernel (UDP GSO splits what we send, GRO coalesces what we receive, the
raw ESP and UDP paths deliver), and scapy, which builds what we send and parses
(and checksums) the headers we rebuild on receive."""

import os
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softnic import topo
from softnic._batch import Batch

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(topo.can_netns() is not None, reason=str(topo.can_netns())),
]

from scapy.layers.inet import IP, UDP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402

from softnic.uplink import Uplink  # noqa: E402

POOL = 16


@pytest.fixture(scope="module", params=[4, 6], ids=["v4", "v6"])
def hosts(request):
    with topo.TwoHosts(v6=request.param == 6) as t:
        yield t


@pytest.fixture
def ups(hosts):
    ua = hosts.a.ns.call(Uplink, hosts.a.addr, sport_pool=POOL, esp=True, espinudp=True)
    ub = hosts.b.ns.call(Uplink, hosts.b.addr, sport_pool=POOL, esp=True, espinudp=True)
    yield hosts, ua, ub
    ua.close()
    ub.close()


def outer(t, payload, sport=50001, dport=4789, proto=None):
    """An outer packet from host a to host b, built by scapy."""
    ipl = (IPv6(src=t.a.addr, dst=t.b.addr) if t.v6
           else IP(src=t.a.addr, dst=t.b.addr, flags="DF"))
    if proto is not None:
        if t.v6:
            ipl.nh = proto
        else:
            ipl.proto = proto
        return bytes(ipl / payload)
    return bytes(ipl / UDP(sport=sport, dport=dport) / payload)


def parse(t, raw):
    """scapy's view of a rebuilt packet, after checking its IPv4 header checksum."""
    if t.v6:
        return IPv6(raw)
    p = IP(raw)
    q = IP(raw)
    q.chksum = None
    assert IP(bytes(q)).chksum == p.chksum, "bad rebuilt IPv4 header checksum"
    return p


def receive(ub, want, batch=None, timeout=3.0):
    b = batch or Batch(256)
    topo.wait_until(lambda: ub.recv_burst(b) >= 0 and b.count >= want, timeout=timeout)
    time.sleep(0.02)
    ub.recv_burst(b)
    return b


def test_pool_ports_congruent(ups):
    _, ua, _ = ups
    ports = ua.source_ports()
    assert len(ports) == POOL and len(set(ports)) == POOL
    assert all(49152 <= p <= 65535 and p % POOL == i for i, p in enumerate(ports))


def test_gso_send_gro_receive_byte_exact(ups):
    t, ua, ub = ups
    payloads = [os.urandom(1400) for _ in range(20)] + [os.urandom(333)]
    b = Batch(64)
    for pl in payloads:
        b.push(outer(t, pl, sport=50001))
    assert ua.send_burst(b, 0, b.count) == 21
    c = ua.counters()
    assert c["tx_syscalls"] == 1 and c["tx_gso_msgs"] == 1 and c["tx_pkts"] == 21
    assert c["tx_bytes"] == sum(map(len, payloads))
    r = receive(ub, 21)
    assert r.count == 21
    sport = ua.source_ports()[50001 % POOL]
    for i, pl in enumerate(payloads):
        p = parse(t, r.get(i))
        assert p.src == t.a.addr and p.dst == t.b.addr
        u = p[UDP]
        assert (u.sport, u.dport, u.len) == (sport, 4789, 8 + len(pl))
        assert bytes(u.payload) == pl
    cb = ub.counters()
    assert cb["rx_pkts"] == 21 and cb["rx_vxlan"] == 21
    assert cb["rx_gro_bufs"] >= 1 and cb["rx_syscalls"] < 21


def test_sendmmsg_groups_per_socket(ups):
    t, ua, ub = ups
    b = Batch(64)
    sent = []
    for sport in (49152, 49153, 60000, 65535):          # 4 sockets
        for k in range(8):                                # 8 different lengths each
            pl = os.urandom(100 + 37 * k)
            b.push(outer(t, pl, sport=sport))
            sent.append((sport, pl))
    assert ua.send_burst(b) == 32
    c = ua.counters()
    assert c["tx_syscalls"] == 4 and c["tx_gso_msgs"] == 0
    r = receive(ub, 32)
    ports = ua.source_ports()
    got = sorted((parse(t, r.get(i))[UDP].sport, bytes(parse(t, r.get(i))[UDP].payload))
                 for i in range(r.count))
    assert got == sorted((ports[s % POOL], pl) for s, pl in sent)


def test_raw_esp(ups):
    t, ua, ub = ups
    esps = [bytes.fromhex("00001234") + i.to_bytes(4, "big") + os.urandom(64 + i)
            for i in range(5)]
    b = Batch(8)
    for e in esps:
        b.push(outer(t, e, proto=50))
    assert ua.send_burst(b) == 5
    assert ua.counters()["tx_syscalls"] == 1
    r = receive(ub, 5)
    for i, e in enumerate(esps):
        p = parse(t, r.get(i))
        assert (p.nh if t.v6 else p.proto) == 50
        assert p.src == t.a.addr and p.dst == t.b.addr
        assert bytes(p.payload) == e
    assert ub.counters()["rx_esp"] == 5


def test_esp_in_udp_keepalive_and_ike(ups):
    t, ua, ub = ups
    esp = bytes.fromhex("0000abcd00000001") + os.urandom(100)
    b = Batch(8)
    b.push(outer(t, b"\xff", sport=4500, dport=4500))                 # NAT-keepalive
    b.push(outer(t, bytes(4) + os.urandom(40), sport=4500, dport=4500))  # non-ESP marker
    b.push(outer(t, esp, sport=4500, dport=4500))
    assert ua.send_burst(b) == 3
    r = receive(ub, 1)
    topo.wait_until(lambda: ub.counters()["rx_natt_ike"] == 1)
    c = ub.counters()
    assert r.count == 1 and c["rx_natt"] == 1 and c["rx_natt_keepalive"] == 1
    p = parse(t, r.get(0))
    assert (p[UDP].sport, p[UDP].dport) == (4500, 4500)   # sent from the 4500 socket
    assert bytes(p[UDP].payload) == esp


def test_too_big_is_refused_not_fragmented(ups):
    t, ua, ub = ups
    b = Batch(8)
    b.push(outer(t, bytes(1600)))                     # one datagram above the MTU
    for _ in range(3):
        b.push(outer(t, bytes(1600), sport=50002))     # a GSO train of oversize segments
    b.push(outer(t, bytes(1000), sport=50003))         # fine
    assert ua.send_burst(b) == 1
    assert [b.drop_reason(i) for i in range(5)] == ["too_big"] * 4 + ["ok"]
    assert ua.counters()["tx_emsgsize"] == 4
    r = receive(ub, 1)
    assert r.count == 1 and len(r.get(0)) == (48 if t.v6 else 28) + 1000


def test_receive_into_small_slots_is_counted(ups):
    t, ua, ub = ups
    b = Batch(4)
    b.push(outer(t, bytes(1400)))
    b.push(outer(t, bytes(100), sport=50009))
    ua.send_burst(b)
    small = Batch(8, slot_size=512, headroom=256)
    topo.wait_until(lambda: ub.recv_burst(small) >= 0 and small.count == 1)
    assert ub.counters()["rx_truncated"] == 1
    assert len(small.get(0)) == (48 if t.v6 else 28) + 100


def test_counters_readable_during_io(ups):
    t, ua, ub = ups
    b = Batch(64)
    for _ in range(64):
        b.push(outer(t, bytes(200)))
    stop = threading.Event()

    def blast():
        while not stop.is_set():
            ua.send_burst(b)

    th = threading.Thread(target=blast)
    th.start()
    seen = []
    for _ in range(20):
        seen.append(ua.counters()["tx_pkts"] + ua.counters()["tx_ring_full"])
        time.sleep(0.005)
    stop.set()
    th.join()
    assert seen == sorted(seen) and seen[-1] > seen[0]


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(min_size=0, max_size=200), min_size=1, max_size=16),
       st.booleans())
def test_hostile_outer_headers_are_counted_drops(ups, blobs, keep_version):
    t, ua, _ = ups
    alen = 16 if t.v6 else 4
    dst = bytes(IPv6(dst=t.b.addr))[24:40] if t.v6 else bytes(IP(dst=t.b.addr))[16:20]
    b = Batch(16)
    for blob in blobs:
        pkt = bytearray(blob)
        if keep_version and pkt:
            pkt[0] = (pkt[0] & 0x0F) | (0x60 if t.v6 else 0x40)
        off = 24 if t.v6 else 16
        if len(pkt) >= off + alen:
            pkt[off:off + alen] = dst                    # never anything but host b
        b.push(bytes(pkt))
    before = ua.counters()
    n = ua.send_burst(b)
    after = ua.counters()
    dropped = [i for i in range(b.count) if b.drop_reason(i) != "ok"]
    assert n + len(dropped) == b.count
    moved = sum(after[k] - before[k] for k in
                ("tx_malformed", "tx_emsgsize", "tx_errors", "tx_ring_full", "tx_no_socket"))
    assert moved == len(dropped)


def test_closed_uplink_refuses(hosts):
    u = hosts.a.ns.call(Uplink, hosts.a.addr, sport_pool=4)
    assert "pool=4" in repr(u)
    u.close()
    with pytest.raises(ValueError):
        u.send_burst(Batch(1))


def test_long_train_splits_into_gso_messages_in_one_call(ups):
    t, ua, ub = ups
    payloads = [i.to_bytes(2, "big") * 700 for i in range(100)]   # 1400 bytes each
    b = Batch(128)
    for pl in payloads:
        b.push(outer(t, pl, sport=50005))
    assert ua.send_burst(b) == 100
    c = ua.counters()
    # 46 x 1400 is the most under 65507 bytes: messages of 46, 46, 8 in one sendmmsg
    assert c["tx_syscalls"] == 1 and c["tx_gso_msgs"] == 3
    r = receive(ub, 100)
    assert [bytes(parse(t, r.get(i))[UDP].payload) for i in range(r.count)] == payloads


def test_empty_and_garbage_datagrams(ups):
    import socket

    t, ua, ub = ups
    fam = socket.AF_INET6 if t.v6 else socket.AF_INET
    s = t.a.ns.call(socket.socket, fam, socket.SOCK_DGRAM)
    s.sendto(b"", (t.b.addr, 4789))
    s.sendto(b"\x00garbage", (t.b.addr, 4789))
    s.close()
    r = receive(ub, 1)
    topo.wait_until(lambda: ub.recv_burst(r) >= 0 and ub.counters()["rx_empty"] == 1)
    assert r.count == 1 and bytes(parse(t, r.get(0))[UDP].payload) == b"\x00garbage"
    with pytest.raises(IndexError):
        ua.send_burst(r, 2, -1)


@pytest.mark.slow
def test_bench_gso_gro_beats_sendmmsg():
    sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "benchmarks"))
    from underlay import bench

    r = bench(seconds=0.3)
    assert r["sendmmsg_recv_per_s"] > 0 and r["gso_gro_recv_per_s"] > 0
    # measured ~10x here; a factor of 1 leaves room for a loaded machine
    assert r["ratio_recv"] > 1.0


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=64), st.just(b"\xff"),
                          st.binary(max_size=32).map(lambda b: bytes(4) + b)),
                min_size=1, max_size=8))
def test_natt_receive_accounts_for_every_datagram(ups, datagrams):
    import socket

    t, _, ub = ups
    fam = socket.AF_INET6 if t.v6 else socket.AF_INET
    s = t.a.ns.call(socket.socket, fam, socket.SOCK_DGRAM)
    before = ub.counters()
    for d in datagrams:
        s.sendto(d, (t.b.addr, 4500))
    s.close()
    keys = ("rx_natt", "rx_natt_keepalive", "rx_natt_ike", "rx_empty")
    want = {
        "rx_natt_keepalive": sum(d == b"\xff" for d in datagrams),
        "rx_natt_ike": sum(len(d) >= 4 and d[:4] == bytes(4) for d in datagrams),
        "rx_empty": sum(d == b"" for d in datagrams),
    }
    want["rx_natt"] = len(datagrams) - sum(want.values())
    r = Batch(64)

    def settled():
        ub.recv_burst(r)
        now = ub.counters()
        return all(now[k] - before[k] == want[k] for k in keys)

    topo.wait_until(settled, timeout=3)
    delivered = [bytes(parse(t, r.get(i))[UDP].payload) for i in range(r.count)]
    assert delivered == [d for d in datagrams
                         if d and d != b"\xff" and not (len(d) >= 4 and d[:4] == bytes(4))]


def test_kernel_drops_on_a_full_socket_are_counted(hosts):
    t = hosts
    ua = t.a.ns.call(Uplink, t.a.addr, sport_pool=4, gso=False)
    ub = t.b.ns.call(Uplink, t.b.addr, sport_pool=4, rcvbuf=4096, vxlan_port=4790)
    try:
        b = Batch(64)
        for _ in range(50):
            b.push(outer(t, bytes(1400), dport=4790))
        assert ua.send_burst(b) == 50
        r = Batch(256)
        time.sleep(0.05)
        ub.recv_burst(r)
        assert 0 < r.count < 50                   # the tiny buffer overflowed
        b.clear()
        b.push(outer(t, b"after", dport=4790))    # carries the kernel's drop count
        ua.send_burst(b)

        def all_accounted():
            ub.recv_burst(r)
            c = ub.counters()
            return c["rx_pkts"] + c["rx_overflow"] == 51

        topo.wait_until(all_accounted)
        c = ub.counters()
        assert c["rx_pkts"] + c["rx_overflow"] == 51 and c["rx_overflow"] > 0
    finally:
        ua.close()
        ub.close()


def test_outer_tos_and_ecn_cross_both_ways(ups):
    t, ua, ub = ups
    toss = [0x00, 0x02, 0x02, 0x03, 0xB8, 0xB8, 0x01]     # Not-ECT, ECT(0), CE, EF...
    b = Batch(16)
    for i, tos in enumerate(toss):
        raw = bytearray(outer(t, bytes([i]) * 1000))
        if t.v6:
            raw[0] = 0x60 | (tos >> 4)
            raw[1] = (raw[1] & 0x0F) | ((tos & 0x0F) << 4)
        else:
            raw[1] = tos
        b.push(bytes(raw))
    assert ua.send_burst(b) == len(toss)
    # equal lengths but a TOS change ends a train: trains 0x02 x2 and 0xB8 x2
    assert ua.counters()["tx_gso_msgs"] == 2
    r = receive(ub, len(toss))
    got = {}
    for i in range(r.count):
        p = parse(t, r.get(i))
        got[bytes(p[UDP].payload)[0]] = p.tc if t.v6 else p.tos
    assert got == dict(enumerate(toss))


def test_tx_queues_send_concurrently(ups):
    t, ua, ub = ups
    queues = [ua.tx_queue() for _ in range(3)]
    per = 40

    def sender(k, q):
        b = Batch(per)
        for i in range(per):
            b.push(outer(t, bytes([k, i]) * 300, sport=50100 + k))
        assert q.send_burst(b) == per

    ths = [threading.Thread(target=sender, args=(k, q)) for k, q in enumerate(queues)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    assert [q.counters()["tx_pkts"] for q in queues] == [per] * 3
    assert ua.counters()["tx_pkts"] == 3 * per            # summed over queues
    r = receive(ub, 3 * per)
    got = sorted(bytes(parse(t, r.get(i))[UDP].payload)[:2] for i in range(r.count))
    assert got == sorted(bytes([k, i]) for k in range(3) for i in range(per))
