"""Multiqueue vhost-user (VIRTIO_NET_F_MQ) in the running daemon: a guest (the in-process
frontend) with four queue pairs on a daemon with two TX workers, switched to a TAP VF in
a VM namespace whose kernel answers.

What a guest with several queues relies on: every TX queue it uses is served, whichever
worker serves it; received flows spread over its RX rings and each flow stays on one ring
(so its packets stay in order); queue pairs the guest stops leave the others running.
"""

import sys
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from softnic.topo import can_netns

why = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]

GUEST_MAC, VM_MAC = "02:00:00:00:0d:01", "02:00:00:00:0d:02"
GUEST_IP, VM_IP = "10.211.0.1", "10.211.0.2"
NO_HDR = bytes(12)
PAIRS = 4


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from softnic.scenario import guest_and_vm

    with guest_and_vm(tmp_path_factory.mktemp("vhostmq"), "snmq", GUEST_MAC, GUEST_IP,
                      VM_MAC, VM_IP, 310, queues=PAIRS, tx_workers=2) as d:
        yield d


@pytest.fixture
def guest(daemon):
    from vhost.testing import VhostUserFrontend

    fe = VhostUserFrontend(daemon["vhost"]).connect()
    fe.start(queue_pairs=PAIRS)
    yield fe
    fe.close()


def _stats(daemon):
    from softnic.client import Client

    with Client(daemon["sock"], timeout=5) as c:
        return c.stats()


def _collect(guest, pairs, pred, want, timeout=5.0):
    """Frames pred accepts, as (pair, scapy packet), from the RX rings of `pairs`, until
    `want` of them arrived (the VM also floods multicast of its own: ignored)."""
    got = []
    end = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < end:
        for qp in pairs:
            for f in guest.recv(qp):
                pkt = Ether(f[12:])
                if pred(pkt):
                    got.append((qp, pkt))
        time.sleep(0.005)
    return got


def test_queue_pairs_are_offered_and_spread_over_the_workers(daemon, guest):
    st = _stats(daemon)
    rings = st["queues"]["guest"]
    assert len(rings) == 2 * PAIRS and all(r["ready"] for r in rings)
    # Pair p of VF i is in lane (i + p) % 2: both workers have pairs of this one VF.
    assert {r["lane"] for r in rings} == {0, 1}
    assert all(rings[2 * p]["lane"] == rings[2 * p + 1]["lane"] for p in range(PAIRS))
    names = daemon["d"].thread_names()
    assert {"softnic-tx0", "softnic-tx1", "softnic-rx"} <= names


def test_every_tx_queue_is_served(daemon, guest):
    """An echo request on each TX queue: the VM's kernel answers each one."""
    for qp in range(PAIRS):
        req = Ether(src=GUEST_MAC, dst=VM_MAC) / IP(src=GUEST_IP, dst=VM_IP) / \
            ICMP(id=100 + qp, seq=1) / (b"queue %d" % qp)
        assert guest.send(qp, [NO_HDR + bytes(req)]) == 1
    replies = _collect(guest, range(PAIRS), lambda p: ICMP in p and p[ICMP].type == 0,
                       PAIRS)
    assert sorted(p[ICMP].id for _, p in replies) == [100 + q for q in range(PAIRS)]
    for _, p in replies:
        assert bytes(p[ICMP].payload) == b"queue %d" % (p[ICMP].id - 100)
    tx = [r["frames"] for r in _stats(daemon)["queues"]["guest"][1::2]]
    assert all(n >= 1 for n in tx), tx


SENDER = """
import socket, sys
dst, n_flows, per_flow = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = []
for i in range(n_flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("", 20000 + i))
    socks.append(s)
for k in range(per_flow):
    for i, s in enumerate(socks):
        s.sendto(b"%d:%d" % (i, k), (dst, 9000))
"""


def _send_flows(daemon, n_flows, per_flow):
    daemon["vm"].run([sys.executable, "-c", SENDER, GUEST_IP, str(n_flows), str(per_flow)])


def _udp_to_guest(p):
    return UDP in p and p[UDP].dport == 9000 and p[IP].dst == GUEST_IP


def test_received_flows_spread_over_rx_rings_and_keep_their_ring_and_order(daemon, guest):
    n_flows, per_flow = 32, 4
    _send_flows(daemon, n_flows, per_flow)
    got = _collect(guest, range(PAIRS), _udp_to_guest, n_flows * per_flow)
    assert len(got) == n_flows * per_flow
    ring_of: dict[int, set[int]] = {}
    order: dict[int, list[int]] = {}
    for qp, p in got:
        flow, k = (int(x) for x in bytes(p[UDP].payload).split(b":"))
        assert p[UDP].sport == 20000 + flow
        ring_of.setdefault(flow, set()).add(qp)
        order.setdefault(flow, []).append(k)
    assert all(len(r) == 1 for r in ring_of.values()), ring_of     # a flow keeps its ring
    assert all(ks == list(range(per_flow)) for ks in order.values())    # and its order
    used = {next(iter(r)) for r in ring_of.values()}
    # 32 flows over 4 rings by a good hash: every ring gets some (P(miss) ~ 4 * 0.75^32).
    assert used == set(range(PAIRS)), used


def test_a_stopped_pair_leaves_the_others_running(daemon, guest):
    """The guest disables pair 3 (as Linux does on `ethtool -L combined 3`): flows go to
    the remaining rings and its TX ring is no longer served."""
    from vhost.protocol import Req

    for ring in (2 * (PAIRS - 1), 2 * (PAIRS - 1) + 1):
        guest.request(Req.SET_VRING_ENABLE, ring.to_bytes(4, "little") + bytes(4))
    st = _stats(daemon)
    assert [r["ready"] for r in st["queues"]["guest"]] == [1] * (2 * PAIRS - 2) + [0, 0]
    n_flows = 24
    _send_flows(daemon, n_flows, 1)
    got = _collect(guest, range(PAIRS), _udp_to_guest, n_flows)
    assert len(got) == n_flows
    assert {qp for qp, _ in got} <= set(range(PAIRS - 1))
    assert guest.recv(PAIRS - 1) == []
    # Pair 0 still carries the guest's traffic out.
    req = Ether(src=GUEST_MAC, dst=VM_MAC) / IP(src=GUEST_IP, dst=VM_IP) / ICMP(id=77)
    guest.send(0, [NO_HDR + bytes(req)])
    assert _collect(guest, range(PAIRS - 1),
                    lambda p: ICMP in p and p[ICMP].id == 77 and p[ICMP].type == 0, 1)


def test_guest_reconnect_with_fewer_pairs(daemon):
    """A guest that starts only one of the offered pairs (a one-vCPU Linux guest does)
    gets everything on it."""
    from vhost.testing import VhostUserFrontend

    with VhostUserFrontend(daemon["vhost"]) as fe:
        fe.start(queue_pairs=1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and \
                not _stats(daemon)["queues"].get("guest", [{}])[0].get("ready"):
            time.sleep(0.02)
        _send_flows(daemon, 8, 1)
        got = _collect(fe, [0], _udp_to_guest, 8)
        assert len(got) == 8


def test_no_data_plane_errors(daemon):
    """Nothing above should have left a drop the tests did not ask for."""
    drops = _stats(daemon)["vf"]["guest"]
    assert not {k: v for k, v in drops.items()
                if k.startswith("drop_") and k not in ("drop_no_fdb",) and v}, drops
