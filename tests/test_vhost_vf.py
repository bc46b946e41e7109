"""A vhost-user VF in the running daemon, driven by the in-process frontend (vhost.testing)
as a guest driver would, switched to a TAP VF whose kernel side is a VM namespace.

The VM's own kernel is the oracle: it answers the guest's ICMP echo and UDP, and it
accepts (or counts as bad) the checksums softnic completes for the guest.
"""

import os
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether

from softnic.topo import can_netns, wait_until

why = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]

GUEST_MAC, VM_MAC = "02:00:00:00:0c:01", "02:00:00:00:0c:02"
GUEST_IP, VM_IP = "10.210.0.1", "10.210.0.2"
NO_HDR = bytes(12)

ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7000)); print("ready", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data[::-1], peer)
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from softnic.scenario import guest_and_vm

    with guest_and_vm(tmp_path_factory.mktemp("vhostvf"), "snvh", GUEST_MAC, GUEST_IP,
                      VM_MAC, VM_IP, 300) as d:
        yield d


@pytest.fixture
def guest(daemon):
    from vhost.testing import VhostUserFrontend

    fe = VhostUserFrontend(daemon["vhost"]).connect()
    fe.start()
    yield fe
    fe.close()


def recv_match(guest, pred, timeout=5.0):
    """The first frame the guest receives that pred accepts (the VM's kernel also sends
    multicast of its own, e.g. IPv6 MLD, which the VNI floods to the guest)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for f in guest.recv(0):
            pkt = Ether(f[12:])
            if pred(pkt):
                return pkt
        time.sleep(0.01)
    raise AssertionError("no matching frame")


def _stats(daemon):
    from softnic.client import Client

    with Client(daemon["sock"], timeout=5) as c:
        return c.stats()["vf"]


def test_guest_pings_a_vm_namespace(daemon, guest):
    req = bytes(Ether(src=GUEST_MAC, dst=VM_MAC) / IP(src=GUEST_IP, dst=VM_IP)
                / ICMP(id=7, seq=1) / (b"softnic" * 8))
    guest.send(0, [NO_HDR + req])
    reply = recv_match(guest, lambda p: ICMP in p and p[ICMP].id == 7)
    assert reply[IP].src == VM_IP and reply[ICMP].type == 0 and reply[ICMP].id == 7
    assert bytes(reply[ICMP].payload) == b"softnic" * 8
    from softnic.client import Client

    with Client(daemon["sock"], timeout=5) as c:
        queues = c.stats()["queues"]["guest"]
        metrics = c.metrics()
    assert [q["ready"] for q in queues] == [1, 1] and not any(q["broken"] for q in queues)
    assert 'softnic_queue_frames_total{vf="guest",queue="1"}' in metrics


def test_guest_udp_with_checksum_offload(daemon, guest):
    """The guest leaves the UDP checksum to the device (NEEDS_CSUM): the VM kernel only
    accepts the datagram if softnic completed it correctly."""
    vm = daemon["vm"]
    echo = vm.popen([sys.executable, "-c", ECHO, VM_IP], stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout.readline().strip() == "ready"
        payload = os.urandom(1000)
        pkt = Ether(src=GUEST_MAC, dst=VM_MAC) / IP(src=GUEST_IP, dst=VM_IP) / \
            UDP(sport=5555, dport=7000) / payload
        raw = bytearray(bytes(pkt))
        # Put the pseudo-header sum in the checksum field, as a driver does for NEEDS_CSUM.
        udp_off = 14 + 20
        ph = sum(int.from_bytes(x, "big") for x in (
            raw[26:28], raw[28:30], raw[30:32], raw[32:34])) + 17 + len(raw) - udp_off
        while ph >> 16:
            ph = (ph & 0xFFFF) + (ph >> 16)
        raw[udp_off + 6:udp_off + 8] = ph.to_bytes(2, "big")
        hdr = bytes([1, 0]) + (0).to_bytes(2, "little") + (0).to_bytes(2, "little") + \
            udp_off.to_bytes(2, "little") + (6).to_bytes(2, "little") + bytes(2)
        guest.send(0, [hdr + bytes(raw)])
        reply = recv_match(guest, lambda p: UDP in p and p[UDP].sport == 7000)
        assert reply[UDP].sport == 7000 and bytes(reply[UDP].payload) == payload[::-1]
    finally:
        echo.kill()
        echo.wait()


def test_guest_tso_frame_reaches_the_vm_whole(daemon, guest):
    """A 60 KB GSO frame from the guest to a VF on the same host crosses whole (both ends
    speak GSO); the VM's kernel takes it with valid checksums (its own counters)."""
    from scapy.layers.inet import TCP

    vm = daemon["vm"]
    before = _stats(daemon)["guest"]
    vm_before = after_vm(daemon)
    payload = os.urandom(60000)
    frame = bytes(Ether(src=GUEST_MAC, dst=VM_MAC) / IP(src=GUEST_IP, dst=VM_IP)
                  / TCP(sport=40000, dport=9, flags="PA", seq=1) / payload)
    hdr = bytes([1, 1]) + (54).to_bytes(2, "little") + (1448).to_bytes(2, "little") + \
        (34).to_bytes(2, "little") + (16).to_bytes(2, "little") + bytes(2)
    snmp_before = vm.run(["cat", "/proc/net/snmp"])
    guest.send(0, [hdr + frame])
    wait_until(lambda: _stats(daemon)["guest"]["tx_local"] > before["tx_local"], timeout=5)
    time.sleep(0.3)
    after = _stats(daemon)["guest"]
    assert after["tx_tso_frames"] == before["tx_tso_frames"]      # not segmented here
    assert after_vm(daemon)["rx_frames"] - vm_before["rx_frames"] == 1
    assert after_vm(daemon)["rx_bytes"] - vm_before["rx_bytes"] == len(frame)
    snmp_after = vm.run(["cat", "/proc/net/snmp"])

    def tcp_counter(text, name):
        lines = [ln.split() for ln in text.splitlines() if ln.startswith("Tcp:")]
        return int(lines[1][lines[0].index(name)])

    assert tcp_counter(snmp_after, "InSegs") > tcp_counter(snmp_before, "InSegs")
    assert tcp_counter(snmp_after, "InCsumErrors") == tcp_counter(snmp_before, "InCsumErrors")


def after_vm(daemon):
    return _stats(daemon)["vm"]


def test_guest_reconnect_and_no_leaks(daemon):
    """Ten connect/disconnect cycles of the guest: the daemon's fds and mappings return to
    where they were, and the VF works after each."""
    from vhost.testing import VhostUserFrontend

    counts = daemon["d"].counts

    fe = VhostUserFrontend(daemon["vhost"]).connect()
    fe.start()
    fe.close()
    time.sleep(0.3)
    base = counts()
    req = bytes(Ether(src=GUEST_MAC, dst=VM_MAC) / IP(src=GUEST_IP, dst=VM_IP)
                / ICMP(id=9, seq=1))
    for _ in range(10):
        fe = VhostUserFrontend(daemon["vhost"]).connect()
        fe.start()
        fe.send(0, [NO_HDR + req])
        assert recv_match(fe, lambda p: ICMP in p and p[ICMP].id == 9)[ICMP].type == 0
        fe.close()
    wait_until(lambda: counts() == base, timeout=5)


def test_capture_on_a_vhost_vf_sees_both_directions(daemon, guest):
    import threading

    from softnic.client import Client

    got = []

    def cap():
        with Client(daemon["sock"], timeout=10) as c:
            for _ts, frame, _n in c.capture("guest", count=50):
                pkt = Ether(frame)
                if ICMP in pkt and pkt[ICMP].id == 11:
                    got.append(pkt)
                if len(got) == 2:
                    return

    t = threading.Thread(target=cap)
    t.start()
    time.sleep(0.3)
    req = bytes(Ether(src=GUEST_MAC, dst=VM_MAC) / IP(src=GUEST_IP, dst=VM_IP)
                / ICMP(id=11, seq=1))
    guest.send(0, [NO_HDR + req])
    recv_match(guest, lambda p: ICMP in p and p[ICMP].id == 11)
    t.join(timeout=10)
    icmp = [p for p in got if ICMP in p and p[ICMP].id == 11]
    assert {p[ICMP].type for p in icmp} == {8, 0}     # the request out, the reply in


def test_workers_are_named_in_the_kernel(daemon):
    """top -H and perf tell the workers apart."""
    names = daemon["d"].thread_names()
    assert {"softnic-tx0", "softnic-rx"} <= names
