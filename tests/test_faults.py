"""Fault injection against running softnic daemons (issue 6, "Faults").

Each fault is one that a NIC serving tenants lives through in production: a guest's
vhost-user frontend killed at random points while it sends, the daemon itself SIGKILLed
and restarted, the underlay link going down, its MTU shrinking under traffic, the peer host
vanishing, and an SA running out of 32-bit sequence numbers (RFC 4303 §3.3.3: the sender
must not wrap). Oracles: the VMs' own kernels (they answer pings), /proc of the daemon
(fds and mappings), the daemon's counters and events, and a capture of the underlay decoded
with dpkt. docs/faults.md describes what each fault does and what the counters say.
"""

import os
import random
import signal
import subprocess
import sys
import time

import dpkt
import pytest

from softnic.topo import Netns, can_netns, wait_until

why = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]

if why is None:
    from softnic.scenario import KEYS, VMS, Overlay, Sniffer, collect_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_HDR = bytes(12)

# The admin socket has no way to set an SA's starting sequence number (model.SA has no
# such field), so the daemon of host A is started through this launcher: the same
# `softnic.daemon` main, with one test hook that makes SAs of SPI EXHAUST_SPI start at
# EXHAUST_START. Every other SA, and everything else in the daemon, is untouched.
EXHAUST_SPI = 0x6001
EXHAUST_LEFT = 40                              # sequence numbers left before 2^32 - 1
EXHAUST_START = 0xFFFFFFFF - EXHAUST_LEFT      # the last one used; the next is START + 1
LAUNCHER = f"""
import sys
import softnic._esp as esp
import softnic.dataplane as dataplane
_real = esp.SecurityAssociation
def _sa(spi, *a, **kw):
    if spi == {EXHAUST_SPI}:
        kw["seq"] = {EXHAUST_START}
    return _real(spi, *a, **kw)
dataplane.SecurityAssociation = _sa
from softnic.daemon import main
sys.exit(main(["run", "-c", sys.argv[1]]))
"""


def _toml(s: str) -> str:
    return '"' + s + '"'


if why is None:
    class FaultOverlay(Overlay):
        """The scenario's two hosts (host-terminated IPsec, VFs in enforce mode), with VM
        pair 1's SAs and policies *static* in each daemon's config file and pair 2's
        installed live through the admin socket, so that a restart shows the difference."""

        def _config(self, side: str) -> str:
            path = super()._config(side)
            peer = "b" if side == "a" else "a"
            local, remote = VMS[side + "1"], VMS[peer + "1"]
            spi_out, spi_in = (0x1001, 0x1002) if side == "a" else (0x1002, 0x1001)
            lines = []
            for d, spi, src, dst in (("out", spi_out, local.addr, remote.addr),
                                     ("in", spi_in, remote.addr, local.addr)):
                lines += ["[[sa]]", f"scope = {_toml(local.name)}", f"dir = {_toml(d)}",
                          f"src = {_toml(src)}", f"dst = {_toml(dst)}", f"spi = {spi}",
                          "reqid = 1", 'mode = "tunnel"', 'alg = "aes-gcm"',
                          f"key = {_toml('0x' + KEYS[spi].hex())}", "icv_bits = 128",
                          "replay_window = 1024", "",
                          "[[policy]]", f"scope = {_toml(local.name)}", f"dir = {_toml(d)}",
                          f"src = {_toml(src + '/32')}", f"dst = {_toml(dst + '/32')}",
                          'action = "protect"', "reqid = 1",
                          "priority = 100", ""]   # a narrower live policy may win
            with open(path, "a") as f:
                f.write("\n" + "\n".join(lines))
            return path

        def _daemon_argv(self, side: str, cfg: str) -> list[str]:
            # Host A's daemon runs through LAUNCHER (see above).
            if side != "a":
                return super()._daemon_argv(side, cfg)
            return [sys.executable, "-c", LAUNCHER, cfg]

        def _install(self, side: str) -> None:
            self.install_live(side)

        def install_live(self, side: str) -> None:
            """Pair 2's SAs and policies, added live (lost on a restart)."""
            peer = "b" if side == "a" else "a"
            local, remote = VMS[side + "2"], VMS[peer + "2"]
            spi_out, spi_in = (0x1001, 0x1002) if side == "a" else (0x1002, 0x1001)
            with self.client(side) as c:
                for d, spi, src, dst in (("out", spi_out, local.addr, remote.addr),
                                         ("in", spi_in, remote.addr, local.addr)):
                    c.sa_add(scope=local.name, dir=d, src=src, dst=dst, spi=spi, reqid=2,
                             mode="tunnel", alg="aes-gcm", key=KEYS[spi + 0x1000].hex(),
                             icv_bits=128, replay_window=1024)
                    c.policy_add(scope=local.name, dir=d, src=src + "/32", dst=dst + "/32",
                                 action="protect", reqid=2)

        def refresh_in(self, side: str, pair: str) -> None:
            """Re-install the inbound SA of VM pair `pair` on `side` with its key, i.e. a
            fresh replay window: what a rekey does after the peer restarted (see
            test_daemon_sigkill_and_restart)."""
            peer = "b" if side == "a" else "a"
            local, remote = VMS[side + pair], VMS[peer + pair]
            spi = 0x1002 if side == "a" else 0x1001
            with self.client(side) as c:
                c.sa_del(local.name, spi, dir="in")
                c.sa_add(scope=local.name, dir="in", src=remote.addr, dst=local.addr,
                         spi=spi, reqid=int(pair), mode="tunnel", alg="aes-gcm",
                         key=KEYS[spi + (0 if pair == "1" else 0x1000)].hex(),
                         icv_bits=128, replay_window=1024)

        def kill(self, side: str) -> None:
            p = self.daemons[side]
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)


@pytest.fixture(scope="module")
def overlay():
    with FaultOverlay(model="host") as ov:
        ov.ping("a1", "b1", 2)
        ov.ping("a2", "b2", 2)
        yield ov


def _ping_ok(ov, src: str, dst: str, count: int = 3) -> bool:
    try:
        ov.ping(src, dst, count)
        return True
    except Exception:
        return False


def _wait_ping(ov, src: str, dst: str, timeout: float = 20.0) -> float:
    """Seconds until one ping from src answers (fails the test after timeout)."""
    t0 = time.monotonic()
    wait_until(lambda: _ping_ok(ov, src, dst, 1), timeout=timeout, step=0.2)
    return time.monotonic() - t0


def _uplink(ov, side: str) -> dict:
    return ov.stats(side)["uplink"]


def _delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items()
            if isinstance(v, int) and v != before.get(k, 0)}


# ---- sequence-number exhaustion ------------------------------------------------------------

UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(i.to_bytes(4, "big") + b"s" * 60, (sys.argv[1], 6000))
    time.sleep(0.005)
"""
UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 6000)); s.settimeout(2.0)
print("ready", flush=True)
seen = []
try:
    while True:
        seen.append(int.from_bytes(s.recv(64)[:4], "big"))
except TimeoutError:
    pass
print(" ".join(map(str, seen)), flush=True)
"""


def _esp_seqs(datagrams: list[bytes], spi: int) -> list[int]:
    """ESP sequence numbers of `spi` in underlay datagrams (VXLAN, then tunnel-mode ESP of
    the VM pair), in wire order."""
    out = []
    for raw in datagrams:
        try:
            ip = dpkt.ip.IP(raw)
            if not isinstance(ip.data, dpkt.udp.UDP) or ip.data.dport != 4789:
                continue
            inner = dpkt.ethernet.Ethernet(bytes(ip.data.data)[8:])
            if not isinstance(inner.data, dpkt.ip.IP) or inner.data.p != 50:
                continue
            esp = bytes(inner.data.data)
        except (dpkt.UnpackError, AttributeError):
            continue
        if int.from_bytes(esp[:4], "big") == spi:
            out.append(int.from_bytes(esp[4:8], "big"))
    return out


def test_sequence_exhaustion_stops_the_sa_without_wrapping(overlay):
    """An SA (no ESN) added live with 40 sequence numbers left carries UDP from a1 to b1:
    exactly 40 datagrams go out and arrive, with strictly rising sequence numbers ending at
    2^32-1; then the SA stops (counted drops, an event on the monitor), nothing wraps, and
    the VM pairs' other SAs keep working."""
    ov = overlay
    a, b = VMS["a1"], VMS["b1"]
    key = os.urandom(20).hex()
    common = dict(src=a.addr, dst=b.addr, spi=EXHAUST_SPI, mode="tunnel", alg="aes-gcm",
                  key=key, icv_bits=128, replay_window=1024)
    with ov.client("a") as ca:
        events, got = collect_events(ca.monitor(), "sa-seq-exhausted")
        time.sleep(0.2)
        # b accepts it under pair 1's inbound policy (reqid 1); on a, its own reqid and a
        # narrower policy (UDP to port 6000) keep pair 1's other traffic on SPI 0x1001.
        with ov.client("b") as cb:
            cb.sa_add(scope=b.name, dir="in", reqid=1, **common)
        with ov.client("a") as c2:
            c2.sa_add(scope=a.name, dir="out", reqid=6, **common)
            c2.policy_add(scope=a.name, dir="out", src=a.addr + "/32", dst=b.addr + "/32",
                          proto="udp", dport=6000, action="protect", reqid=6)
            before = c2.stats()["vf"][a.name]
        rx = ov.vm["b1"].popen([sys.executable, "-c", UDP_RECEIVER, b.addr],
                               stdout=subprocess.PIPE, text=True)
        try:
            assert rx.stdout.readline().strip() == "ready"
            with Sniffer(ov.host("a").ns) as snif:
                ov.vm["a1"].run([sys.executable, "-c", UDP_SENDER, b.addr, "100"], timeout=30)
                arrived = [int(x) for x in rx.communicate(timeout=20)[0].split()]
                time.sleep(0.2)
            assert got.wait(10), events
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait()
        with ov.client("a") as c2:
            sa = c2.sa_get(a.name, EXHAUST_SPI, dir="out")
            after = c2.stats()["vf"][a.name]
            c2.policy_del(scope=a.name, dir="out", src=a.addr + "/32", dst=b.addr + "/32",
                          proto="udp", dport=6000)
            c2.sa_del(a.name, EXHAUST_SPI, dir="out")
        with ov.client("b") as cb:
            cb.sa_del(b.name, EXHAUST_SPI, dir="in")

    seqs = _esp_seqs(snif.datagrams(), EXHAUST_SPI)
    assert seqs == list(range(EXHAUST_START + 1, 0x100000000)), seqs[:5]  # nothing wraps
    assert arrived == list(range(EXHAUST_LEFT))
    ev = next(e for e in events if e.get("type") == "sa-seq-exhausted")
    assert ev["spi"] == EXHAUST_SPI and ev["scope"] == a.name
    assert key not in str(events) and key not in str(sa)
    dropped = after.get("drop_seq_exhausted", 0) - before.get("drop_seq_exhausted", 0)
    assert dropped == 100 - EXHAUST_LEFT, _delta(after, before)
    assert sa["stats"]["seq"] == 0xFFFFFFFF and sa["stats"].get("drop_seq_exhausted", 0) > 0
    # Pair 1's own SAs (ICMP still selects reqid 1) and pair 2 are untouched.
    ov.ping("a1", "b1", 2)
    ov.ping("a2", "b2", 2)


# ---- the underlay --------------------------------------------------------------------------

def test_underlay_link_down_and_up(overlay):
    """ul0 of host A down: the daemon's sends fail (counted, not fatal), pings stop; up
    again: pings resume, nothing wedged."""
    ov = overlay
    ns = ov.host("a").ns
    before = _uplink(ov, "a")
    ns.ip("link", "set", "ul0", "down")
    try:
        assert not _ping_ok(ov, "a1", "b1", 3)
        down = _delta(_uplink(ov, "a"), before)
    finally:
        ns.ip("link", "set", "ul0", "up")
    print("link down, uplink of A:", down)
    # The kernel refuses to route to a peer behind a down link: each refused send is a
    # counted TX error of the uplink, and no packet is claimed as sent.
    assert down.get("io_tx_errors", 0) + down.get("io_tx_eagain", 0) > 0, down
    secs = _wait_ping(ov, "a1", "b1")
    ov.ping("a2", "b2", 2)
    assert secs < 15


TCP_SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5301)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
print(n, flush=True)
"""
TCP_SOURCE = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 5301), timeout=60)
end = time.monotonic() + float(sys.argv[2]); block = b"m" * 65536
while time.monotonic() < end:
    s.sendall(block)
s.shutdown(socket.SHUT_WR); s.recv(1)
"""


def test_underlay_mtu_lowered_under_traffic(overlay):
    """A TCP stream from a1 to b1 while host A's underlay shrinks to MTU 1400 (the
    daemon still believes 1500): the encapsulated packets that no longer fit are refused
    by the kernel and counted (too_big), the daemon keeps serving, and once the MTU is back
    the stream and pings flow."""
    ov = overlay
    ns = ov.host("a").ns
    sink = ov.vm["b1"].popen([sys.executable, "-c", TCP_SINK, VMS["b1"].addr],
                             stdout=subprocess.PIPE, text=True)
    src = None
    try:
        assert sink.stdout.readline().strip() == "ready"
        before = ov.stats("a")
        src = ov.vm["a1"].popen([sys.executable, "-c", TCP_SOURCE, VMS["b1"].addr, "6"])
        time.sleep(1.5)
        ns.ip("link", "set", "ul0", "mtu", "1400")
        try:
            time.sleep(2.0)
            # Small packets still fit: the daemon is alive and forwarding.
            ov.ping("a2", "b2", 2)
            during = ov.stats("a")
        finally:
            ns.ip("link", "set", "ul0", "mtu", "1500")
        src.wait(timeout=60)
        total = int(sink.communicate(timeout=60)[0].split()[-1])
    finally:
        for p in (sink, src):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    ul = _delta(during["uplink"], before["uplink"])
    drops = _delta(during["drops"], before["drops"])
    print("MTU 1400, uplink of A:", ul, "drops:", drops, "stream bytes:", total)
    assert ul.get("io_tx_emsgsize", 0) > 0 or drops.get("too_big", 0) > 0, (ul, drops)
    assert total > 0
    ov.ping("a1", "b1", 2)


def test_peer_host_gone_and_back(overlay):
    """Host B's daemon killed: A keeps encrypting and sending into the void (its uplink TX
    counter rises; the pings are lost). B restarted from its config: its outbound SAs
    start again at sequence number 1, below what A's inbound SA has already accepted, so
    A counts B's packets as replays (the counter says what happened) until the SA is
    refreshed, as an IKE rekey would; then pings resume in both pairs."""
    ov = overlay
    before = _uplink(ov, "a")
    ov.kill("b")
    try:
        assert not _ping_ok(ov, "a1", "b1", 3)
        gone = _delta(_uplink(ov, "a"), before)
    finally:
        ov._start_daemon("b")
    print("peer gone, uplink of A:", gone)
    assert gone.get("io_tx_pkts", 0) >= 2, gone
    replay0 = ov.stats("a")["vf"][VMS["a1"].name].get("drop_replay", 0)
    assert not _ping_ok(ov, "a1", "b1", 2)
    replay1 = ov.stats("a")["vf"][VMS["a1"].name].get("drop_replay", 0)
    assert replay1 - replay0 >= 1
    ov.refresh_in("a", "1")
    _wait_ping(ov, "a1", "b1")
    ov.install_live("b")          # pair 2's live SAs were lost with B's daemon
    ov.refresh_in("a", "2")
    _wait_ping(ov, "a2", "b2")


# ---- the daemon itself ---------------------------------------------------------------------

def test_daemon_sigkill_and_restart(overlay):
    """Host A's daemon SIGKILLed under traffic and restarted with the same config: its VFs
    (TAPs into the VM namespaces), uplink and static SAs come back; pair 2's SAs, added
    live, are gone (its VFs are in enforce mode: nothing passes) until re-added.

    What does not survive either: the outbound sequence numbers. A's static SA restarts at
    1, which B's inbound SA has already seen, so B drops A's packets as replays (counted)
    until its inbound SA is refreshed -- a rekey, which an IKE daemon does on its peer's
    restart (RFC 7296 §2.4 liveness)."""
    ov = overlay
    a1 = VMS["a1"].name
    b_replay0 = ov.stats("b")["vf"][VMS["b1"].name].get("drop_replay", 0)
    pinger = ov.vm["a1"].popen(["ping", "-i", "0.2", "-c", "50", "-W", "1", VMS["b1"].addr],
                               stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        ov.kill("a")
        time.sleep(0.5)
        t0 = time.monotonic()
        ov._start_daemon("a")
        with ov.client("a") as ca:
            vfs = sorted(v["name"] for v in ca.vf_list())
            static = {(s["dir"], int(s["spi"], 16)) for s in ca.sa_list(a1)}
            live = ca.sa_list(VMS["a2"].name)
        assert vfs == sorted({a1, VMS["a2"].name})
        assert static == {("out", 0x1001), ("in", 0x1002)}
        assert live == []
        restarted = time.monotonic() - t0
        time.sleep(1.0)
        b_replay1 = ov.stats("b")["vf"][VMS["b1"].name].get("drop_replay", 0)
        assert b_replay1 > b_replay0
        ov.refresh_in("b", "1")
        back = _wait_ping(ov, "a1", "b1") + (time.monotonic() - t0)
        assert not _ping_ok(ov, "a2", "b2", 2)
    finally:
        pinger.kill()
        pinger.wait()
    assert restarted < 15 and back < 25
    ov.install_live("a")
    ov.refresh_in("b", "2")
    ov.ping("a2", "b2", 2)


def test_restart_with_seq_state_needs_no_rekey(overlay):
    """The same static SAs with [daemon] seq_state on host A. The first restart finds no
    marks (B refreshes, as above); from then on A's outbound SA starts 2^26 above anything
    it sent, so after the second SIGKILL and restart B takes A's packets at once: no new
    drop_replay at B, nothing refreshed."""
    from softnic.seqstate import STEP

    ov = overlay
    b1 = VMS["b1"].name
    ov.seq_state.add("a")
    try:
        ov.kill("a")
        ov._start_daemon("a")
        ov.refresh_in("b", "1")
        _wait_ping(ov, "a1", "b1")
        ov.ping("a1", "b1", 3)
        with ov.client("a") as ca:
            sent = ca.sa_get(VMS["a1"].name, 0x1001, dir="out")["stats"]["seq"]
        assert 0 < sent < STEP
        replay0 = ov.stats("b")["vf"][b1].get("drop_replay", 0)
        ov.kill("a")
        ov._start_daemon("a")
        with ov.client("a") as ca:
            start = ca.sa_get(VMS["a1"].name, 0x1001, dir="out")["stats"]["seq"]
        assert start == STEP
        back = _wait_ping(ov, "a1", "b1", timeout=10)
        assert ov.stats("b")["vf"][b1].get("drop_replay", 0) == replay0
        assert back < 5
    finally:
        ov.seq_state.discard("a")
        ov.kill("a")
        ov._start_daemon("a")
        ov.refresh_in("b", "1")
        ov.install_live("a")
        ov.refresh_in("b", "2")


# ---- vhost-user frontends killed -----------------------------------------------------------

G1_MAC, G2_MAC, VM_MAC = "02:00:00:00:0d:01", "02:00:00:00:0d:02", "02:00:00:00:0d:03"
G1_IP, G2_IP, VM_IP = "10.211.0.1", "10.211.0.2", "10.211.0.3"
KILLS = 50

GUEST = """
import os, sys, time
from vhost.testing import VhostUserFrontend
frame = bytes.fromhex(sys.argv[2])
fe = VhostUserFrontend(sys.argv[1]).connect()
fe.start()
print("up", flush=True)
while True:
    try:
        fe.send(0, [frame] * 16)
        fe.recv(0)
    except Exception:
        pass
    time.sleep(0.0005)
"""


@pytest.fixture(scope="module")
def vhost_host(tmp_path_factory):
    from softnic.scenario import Daemon

    tmp = tmp_path_factory.mktemp("faults-vhost")
    host, vm = Netns(prefix="snfh"), Netns(prefix="snfv")
    g1, g2 = str(tmp / "g1.sock"), str(tmp / "g2.sock")
    d = Daemon(host, f"""
[uplink]
local = "127.0.0.1"
[[vf]]
name = "g1"
kind = "vhost-user"
socket = "{g1}"
mac = "{G1_MAC}"
vni = 310
[[vf]]
name = "g2"
kind = "vhost-user"
socket = "{g2}"
mac = "{G2_MAC}"
vni = 310
[[vf]]
name = "vm"
kind = "tap"
ifname = "snfltap{os.getpid() % 1000}"
netns = "{vm.name}"
mac = "{VM_MAC}"
addresses = ["{VM_IP}/24"]
vni = 310
""", tmp, ready=[g1, g2])
    host.ip("link", "set", "lo", "up")
    try:
        d.start()
        dev = next(n for n in vm.run(["ls", "/sys/class/net"]).split() if n.startswith("sn"))
        for ip, mac in ((G1_IP, G1_MAC), (G2_IP, G2_MAC)):
            vm.run(["ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev])
        yield {"sock": d.sock, "g1": g1, "g2": g2, "vm": vm, "proc": d.proc, "log": d.log}
    finally:
        d.stop()
        vm.close()
        host.close()


def _vf_stats(vhost_host, name: str) -> dict:
    from softnic.client import Client

    with Client(vhost_host["sock"], timeout=5) as c:
        return c.stats()["vf"][name]


def _echo_frame(mac: str, ip: str, ident: int, seq: int) -> bytes:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    return NO_HDR + bytes(Ether(src=mac, dst=VM_MAC) / IP(src=ip, dst=VM_IP)
                          / ICMP(id=ident, seq=seq) / (b"f" * 32))


def _pinged(fe, mac: str, ip: str, ident: int, seq: int, timeout: float = 5.0) -> bool:
    """One echo request from a frontend to the VM; True when its reply comes back."""
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import Ether

    fe.send(0, [_echo_frame(mac, ip, ident, seq)])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for f in fe.recv(0):
            p = Ether(f[12:])
            if ICMP in p and p[ICMP].type == 0 and p[ICMP].id == ident \
                    and p[ICMP].seq == seq:
                return True
        time.sleep(0.005)
    return False


def test_frontend_killed_50_times_under_traffic(vhost_host):
    """A guest frontend in a child process, sending echo requests as fast as the ring
    takes them, SIGKILLed at a random point (during start-up, negotiation or traffic) 50
    times. After each kill the VF works again (a new frontend pings the VM), the other
    vhost VF keeps forwarding throughout, and in the end the daemon holds exactly the fds
    and guest-memory mappings it held before."""
    from vhost.testing import VhostUserFrontend

    pid = vhost_host["proc"].pid

    def counts():
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/maps") as f:
            maps = sum(1 for ln in f if "memfd" in ln)
        return fds, maps

    g2 = VhostUserFrontend(vhost_host["g2"]).connect()
    g2.start()
    try:
        assert _pinged(g2, G2_MAC, G2_IP, 2, 0)
        with VhostUserFrontend(vhost_host["g1"]) as fe:
            fe.start()
            assert _pinged(fe, G1_MAC, G1_IP, 1, 0)
        wait_until(lambda: counts()[1] == 1, timeout=5)   # only g2's guest RAM is mapped
        base = counts()
        sent0 = _vf_stats(vhost_host, "g1")["tx_frames"]
        rng = random.Random(6)
        env = dict(os.environ, PYTHONPATH=REPO)
        flood = _echo_frame(G1_MAC, G1_IP, 99, 1).hex()
        alive_at_kill = up_at_kill = mapped_at_kill = 0
        for i in range(KILLS):
            child = subprocess.Popen([sys.executable, "-c", GUEST, vhost_host["g1"], flood],
                                     env=env, stdout=subprocess.PIPE, text=True)
            # Kill points spread over interpreter start-up, the vhost-user handshake and
            # the traffic phase.
            if rng.random() < 0.7:
                assert child.stdout.readline().strip() == "up"
                up_at_kill += 1
            time.sleep(rng.uniform(0, 0.25))
            alive_at_kill += child.poll() is None
            mapped_at_kill += counts()[1] > base[1]
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            # The other VF keeps forwarding, and this one serves its next guest.
            assert _pinged(g2, G2_MAC, G2_IP, 2, i + 1), f"g2 after kill {i}"
            with VhostUserFrontend(vhost_host["g1"]) as fe:
                fe.start()
                assert _pinged(fe, G1_MAC, G1_IP, 1, i + 1), f"g1 after kill {i}"
        print(f"kills: {KILLS}, child alive at kill: {alive_at_kill}, past start-up: "
              f"{up_at_kill}, its memory mapped by the daemon: {mapped_at_kill}; "
              f"fds/memfd mappings before: {base}")
        assert alive_at_kill == KILLS and up_at_kill >= KILLS // 2
        assert mapped_at_kill >= up_at_kill     # the counting sees a guest's mapping
        # Under traffic: the killed guests' floods went through the VF (not only the pings).
        flooded = _vf_stats(vhost_host, "g1")["tx_frames"] - sent0
        print(f"frames from g1 over the kills: {flooded}")
        assert flooded > 20 * KILLS
        wait_until(lambda: counts() == base, timeout=10)
        assert vhost_host["proc"].poll() is None
    finally:
        g2.close()


# ---- the daemon restarted under a running guest (vhost-user client mode) -------------------

def _reattach(fe, conn) -> None:
    """What QEMU does when its vhost-user back-end reconnects after a crash: negotiate
    again, send the same memory table, and hand over the *same* rings (same addresses,
    same eventfds), each resuming at the used index found in guest memory (the back-end
    died without a GET_VRING_BASE). The guest driver sees nothing of it."""
    import struct

    from vhost.protocol import Feature, Req

    fe.sock = conn
    fe.negotiate()
    fe.set_mem_table()
    for index, ring in sorted(fe.rings.items()):
        fe.request(Req.SET_VRING_NUM, struct.pack("<II", index, ring.num))
        fe.request(Req.SET_VRING_BASE, struct.pack("<II", index, ring.used_idx))
        fe.request(Req.SET_VRING_ADDR, struct.pack(
            "<IIQQQQ", index, 0, fe.uva(ring.desc_off), fe.uva(ring.used_off),
            fe.uva(ring.avail_off), 0))
        fe.request(Req.SET_VRING_CALL, struct.pack("<Q", index), fds=[ring.call_fd])
        fe.request(Req.SET_VRING_KICK, struct.pack("<Q", index), fds=[ring.kick_fd])
        if fe.features >> Feature.PROTOCOL_FEATURES & 1:
            fe.request(Req.SET_VRING_ENABLE, struct.pack("<II", index, 1))


def test_daemon_restart_under_a_running_guest_in_client_mode(tmp_path):
    """The guest's frontend listens (QEMU `server=on`); softnic's VF connects in client
    mode. softnic SIGKILLed and started again from its config: it reconnects by itself,
    the frontend hands over its unchanged rings, and the guest's pings flow again, the
    guest having lost only the packets sent during the gap."""
    import socket as socketmod

    from softnic.client import Client
    from vhost.testing import VhostUserFrontend

    host, vm = Netns(prefix="snfr"), Netns(prefix="snfw")
    sock, vhost_sock = str(tmp_path / "admin.sock"), str(tmp_path / "guest.sock")
    cfg = tmp_path / "softnic.toml"
    cfg.write_text(f"""
[daemon]
admin_socket = "{sock}"
[uplink]
local = "127.0.0.1"
[[vf]]
name = "g1"
kind = "vhost-user"
vhost_mode = "client"
socket = "{vhost_sock}"
mac = "{G1_MAC}"
vni = 320
[[vf]]
name = "vm"
kind = "tap"
ifname = "snfrtap{os.getpid() % 1000}"
netns = "{vm.name}"
mac = "{VM_MAC}"
addresses = ["{VM_IP}/24"]
vni = 320
""")
    env = dict(os.environ, PYTHONPATH=REPO)
    listener = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    listener.bind(vhost_sock)
    listener.listen(1)
    listener.settimeout(20)
    logf = open(tmp_path / "daemon.log", "w")
    procs = []

    def start():
        p = host.popen([sys.executable, "-m", "softnic.daemon", "run", "-c", str(cfg)],
                       stdout=logf, stderr=subprocess.STDOUT, env=env)
        procs.append(p)

        def up():
            if p.poll() is not None:
                raise RuntimeError((tmp_path / "daemon.log").read_text())
            try:
                with Client(sock, timeout=1) as c:
                    c.version()
                return True
            except Exception:
                return False

        wait_until(up, timeout=20, step=0.1)
        dev = next(n for n in vm.run(["ls", "/sys/class/net"]).split() if n.startswith("sn"))
        vm.run(["ip", "neigh", "replace", G1_IP, "lladdr", G1_MAC, "dev", dev])
        conn, _ = listener.accept()
        conn.settimeout(5)
        return p, conn

    fe = VhostUserFrontend(vhost_sock)
    try:
        p, conn = start()
        fe.sock = conn
        fe.start()
        assert _pinged(fe, G1_MAC, G1_IP, 5, 0)
        for i in range(1, 4):
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
            lost = 0
            for seq in range(2):          # the gap: nothing answers
                lost += not _pinged(fe, G1_MAC, G1_IP, 5, 100 * i + seq, timeout=0.3)
            assert lost == 2
            conn.close()
            p, conn = start()
            _reattach(fe, conn)
            assert _pinged(fe, G1_MAC, G1_IP, 5, 100 * i + 50), f"after restart {i}"
    finally:
        fe.close()
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        listener.close()
        logf.close()
        vm.close()
        host.close()
