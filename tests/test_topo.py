"""The namespace harness: names, commands, setns, cleanup (also on failure)."""

import os
import socket
import subprocess

import pytest

from softnic import topo

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(topo.can_netns() is not None, reason=str(topo.can_netns())),
]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def test_unique_names():
    names = {topo.unique_name("sn") for _ in range(50)}
    assert len(names) == 50
    assert all(str(os.getpid()) in n and len(n) <= 15 for n in names)


def test_netns_lifecycle_and_commands():
    with topo.Netns() as ns:
        assert ns.name in _namespaces()
        assert "lo" in ns.ip("-o", "link", "show")
        assert ns.run(["cat", "/proc/sys/net/ipv4/ip_forward"]).strip() in ("0", "1")
        p = ns.popen(["sleep", "30"])
    assert ns.name not in _namespaces()
    assert p.poll() is not None            # close() ended what popen started


def test_cleanup_on_failure():
    name = None
    with pytest.raises(RuntimeError):
        with topo.Netns() as ns:
            name = ns.name
            ns.ip("link", "set", "nosuchdev", "up")   # fails inside the block
    assert name not in _namespaces()


def test_entered_and_call_use_the_namespace():
    own = os.readlink("/proc/thread-self/ns/net")
    with topo.Netns() as ns:
        ns.addr_add("lo", "10.55.0.1/32")
        with ns.entered():
            assert os.readlink("/proc/thread-self/ns/net") != own
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("10.55.0.1", 0))   # only this namespace has the address
        assert os.readlink("/proc/thread-self/ns/net") == own
        s.close()
        assert ns.call(os.readlink, "/proc/thread-self/ns/net") != own
        with pytest.raises(OSError):
            ns.call(socket.create_connection, ("10.55.0.9", 9), 0.2)
    assert os.readlink("/proc/thread-self/ns/net") == own


@pytest.mark.parametrize("v6", [False, True])
def test_two_hosts_underlay(v6):
    with topo.TwoHosts(v6=v6) as t:
        assert "mtu 1500" in t.a.ns.ip("link", "show", "ul0")
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        rx = t.b.ns.call(socket.socket, fam, socket.SOCK_DGRAM)
        tx = t.a.ns.call(socket.socket, fam, socket.SOCK_DGRAM)
        rx.bind((t.b.addr, 7777))
        rx.settimeout(2)
        tx.sendto(b"across the underlay", (t.b.addr, 7777))
        data, peer = rx.recvfrom(100)
        assert data == b"across the underlay" and peer[0] == t.a.addr
        rx.close()
        tx.close()
        names = {t.a.ns.name, t.b.ns.name}
        assert names <= _namespaces()
    assert not names & _namespaces()


def test_host_vm_tap():
    with topo.Host("h") as h:
        vm = h.add_vm()
        tap = h.open_tap(vm, mac="02:00:00:00:00:0a", mtu=1400, addrs=["10.66.0.1/24"])
        link = vm.ip("link", "show", "eth0")
        assert "02:00:00:00:00:0a" in link and "mtu 1400" in link and "UP" in link
        assert tap.fileno() >= 0
        # the TAP's fd lives in the host namespace; the VM has the device
        assert "eth0" not in h.ns.ip("link", "show")
        vmname = vm.name
    assert tap.fileno() == -1 and vmname not in _namespaces()


def test_host_uplink_is_closed_with_host():
    with topo.TwoHosts() as t:
        up = t.a.open_uplink(sport_pool=4)
        assert up.local_addr == t.a.addr
    with pytest.raises(ValueError):
        up.counters()
