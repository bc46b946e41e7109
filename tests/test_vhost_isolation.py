"""A hostile vhost-user frontend breaks only its own VF (issue 10, "The guest boundary").

One daemon in a namespace with two vhost-user VFs (g1: the hostile guest, g2: a
well-behaved one) and a TAP VF whose kernel side is a VM namespace, all in one VNI. g1's
frontend shrinks its guest RAM under traffic, hands over pipes and saturated eventfds,
asks for more memory than a VF may map, and reconnects while its VF is deleted and
re-added in a loop. Each time the daemon lives, g1 is told no or reported broken, g2
keeps pinging the VM, the admin socket answers, and the daemon's fds, guest-memory
mappings and epoll registrations come back to what they were. Oracles: the VM's kernel
(it answers g2's pings), /proc of the daemon, its counters, events and log.
"""

import os
import subprocess
import sys
import threading
import time

import pytest

from softnic.topo import Netns, can_netns, wait_until

why = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
G1_MAC, G2_MAC, VM_MAC = "02:00:00:00:0e:01", "02:00:00:00:0e:02", "02:00:00:00:0e:03"
G1_IP, G2_IP, VM_IP = "10.212.0.1", "10.212.0.2", "10.212.0.3"
VNI = 320
NO_HDR = bytes(12)
SHM = "/dev/shm"  # noqa: S108 -- a tmpfs on purpose (memory-backend-file's mem-path)

# A guest whose RAM is a tmpfs file (QEMU memory-backend-file,share=on,mem-path=/dev/shm;
# such a file cannot be sealed). It sends echo requests, then truncates its RAM file
# and keeps kicking its TX ring (without touching its RAM: that would fault here too), so
# the daemon's workers go on looking at memory that is gone.
TRUNCATING_GUEST = """
import os, sys, time
from vhost.testing import VhostUserFrontend
frame = bytes.fromhex(sys.argv[2])
fe = VhostUserFrontend(sys.argv[1], ram_path=sys.argv[3]).connect()
fe.start()
print("up", flush=True)
for _ in range(300):
    fe.send(0, [frame] * 8)
    fe.recv(0)
    time.sleep(0.001)
kick = fe.ring(1).kick_fd
os.ftruncate(fe.memfd, 0)
print("truncated", flush=True)
while True:
    os.write(kick, (1).to_bytes(8, "little"))
    time.sleep(0.005)
"""

UDP_FLOOD = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
while True:
    try:
        s.sendto(b"f" * 200, (sys.argv[1], 9))
    except OSError:
        pass
    time.sleep(0.0005)
"""


def _config(g1: str, g2: str, vm: str, extra: str = "") -> str:
    return f"""{extra}
[uplink]
local = "127.0.0.1"
[[vf]]
name = "g1"
kind = "vhost-user"
socket = "{g1}"
mac = "{G1_MAC}"
vni = {VNI}
[[vf]]
name = "g2"
kind = "vhost-user"
socket = "{g2}"
mac = "{G2_MAC}"
vni = {VNI}
[[vf]]
name = "vm"
kind = "tap"
ifname = "sngbtap{os.getpid() % 1000}"
netns = "{vm}"
mac = "{VM_MAC}"
addresses = ["{VM_IP}/24"]
vni = {VNI}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    from softnic.scenario import Daemon

    tmp = tmp_path_factory.mktemp("guest-boundary")
    ns, vm = Netns(prefix="sngh"), Netns(prefix="sngv")
    g1, g2 = str(tmp / "g1.sock"), str(tmp / "g2.sock")
    d = Daemon(ns, _config(g1, g2, vm.name), tmp, ready=[g1, g2])
    ns.ip("link", "set", "lo", "up")
    try:
        d.start()
        dev = next(n for n in vm.run(["ls", "/sys/class/net"]).split() if n.startswith("sn"))
        for ip, mac in ((G1_IP, G1_MAC), (G2_IP, G2_MAC)):
            vm.run(["ip", "neigh", "replace", ip, "lladdr", mac, "dev", dev])
        yield {"d": d, "g1": g1, "g2": g2, "vm": vm, "ns": ns, "tmp": tmp}
    finally:
        d.stop()
        vm.close()
        ns.close()


@pytest.fixture(scope="module")
def g2(host):
    """The well-behaved guest, connected for the whole module."""
    from vhost.testing import VhostUserFrontend

    fe = VhostUserFrontend(host["g2"]).connect()
    fe.start()
    yield fe
    fe.close()


def _echo(mac: str, ip: str, ident: int, seq: int) -> bytes:
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    return NO_HDR + bytes(Ether(src=mac, dst=VM_MAC) / IP(src=ip, dst=VM_IP)
                          / ICMP(id=ident, seq=seq) / (b"i" * 32))


_seq = iter(range(1, 1 << 16))


def _pinged(fe, mac: str = G2_MAC, ip: str = G2_IP, ident: int = 2,
            timeout: float = 10.0) -> bool:
    """One echo request from a frontend to the VM; True when its reply came back."""
    from scapy.layers.inet import ICMP
    from scapy.layers.l2 import Ether

    seq = next(_seq)
    fe.send(0, [_echo(mac, ip, ident, seq)])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for f in fe.recv(0):
            p = Ether(f[12:])
            if ICMP in p and p[ICMP].type == 0 and p[ICMP].id == ident and p[ICMP].seq == seq:
                return True
        fe.ring(1).reclaim()
        time.sleep(0.005)
    return False


def _alive(host) -> bool:
    return host["d"].proc.poll() is None


def _counts(host) -> tuple[int, int, int]:
    """(open fds, guest-memory mappings, epoll registrations) of the daemon."""
    pid = host["d"].pid
    fds = os.listdir(f"/proc/{pid}/fd")
    with open(f"/proc/{pid}/maps") as f:
        maps = sum(1 for ln in f if "memfd:" in ln or f"{SHM}/" in ln)
    watched = 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                watched += sum(1 for ln in f if ln.startswith("tfd:"))
        except OSError:
            continue
    return len(fds), maps, watched


def _settled(host, base, timeout: float = 15.0) -> None:
    """The daemon's counts come back to base (a disconnect is torn down asynchronously)."""
    try:
        wait_until(lambda: _counts(host) == base, timeout=timeout, step=0.05)
    except TimeoutError:
        raise AssertionError(f"(fds, mappings, epoll registrations) were {base}, "
                             f"now {_counts(host)}") from None


def _queues(host, vf: str) -> list[dict]:
    with host["d"].client() as c:
        return c.stats().get("queues", {}).get(vf, [])


def _admin_works(host) -> None:
    """A request that takes every data-plane lock (an FDB entry in and out), answered."""
    from softnic.client import Client

    with Client(host["d"].sock, timeout=10) as c:
        c.fdb_add(VNI, "02:00:00:00:0e:99", "127.0.0.9")
        c.fdb_del(VNI, "02:00:00:00:0e:99", "127.0.0.9")
        assert {v["name"] for v in c.vf_list()} >= {"g1", "g2", "vm"}


def _watch_events(host, types):
    """Events of these types from the daemon's monitor, collected in a thread."""
    from softnic.client import Client

    events: list[dict] = []
    ready = threading.Event()

    def run() -> None:
        try:
            with Client(host["d"].sock, timeout=None) as c:
                stream = c._stream("monitor", {"types": types})
                next(stream)            # the subscription is acknowledged: it is live
                ready.set()
                for msg in stream:
                    if "event" in msg:
                        events.append(msg["event"])
        except Exception as e:  # the daemon went away: the test sees it through _alive
            events.append({"type": "monitor-ended", "error": repr(e)})
        finally:
            ready.set()

    threading.Thread(target=run, daemon=True).start()
    assert ready.wait(10)
    return events


def _g1_works(host) -> None:
    from vhost.testing import VhostUserFrontend

    with VhostUserFrontend(host["g1"]) as fe:
        fe.start()
        assert _pinged(fe, G1_MAC, G1_IP, 1), "g1 does not work for a well-behaved guest"


# ---- 1: guest memory that goes away ---------------------------------------------------------

def test_guest_ram_truncated_under_traffic_breaks_only_that_vf(host, g2):
    """g1's RAM is a tmpfs file; under traffic both ways the guest truncates it to 0. The
    daemon's next look at g1's rings faults (SIGBUS): the guard catches it, g1's ring is
    broken (a vf-broken event with reason guest_memory_fault, its counter, the daemon's
    log), the daemon lives, g2 keeps pinging the VM, and the admin socket answers. Then
    a well-behaved guest uses g1 again and nothing leaks. (On main the daemon died.)"""
    assert _pinged(g2)
    _g1_works(host)
    events = _watch_events(host, ["vf-broken"])     # its admin connection stays open
    assert wait_until(lambda: _counts(host)[1] == 1, timeout=10)   # g2's RAM only
    base = _counts(host)
    env = dict(os.environ, PYTHONPATH=REPO)
    guest = subprocess.Popen([sys.executable, "-c", TRUNCATING_GUEST, host["g1"],
                              _echo(G1_MAC, G1_IP, 1, 0).hex(), SHM],
                             env=env, stdout=subprocess.PIPE, text=True)
    flood = host["vm"].popen([sys.executable, "-c", UDP_FLOOD, G1_IP])
    try:
        assert guest.stdout.readline().strip() == "up"
        assert guest.stdout.readline().strip() == "truncated"
        wait_until(lambda: any(e.get("vf") == "g1" for e in events) or not _alive(host),
                   timeout=30, step=0.05)
        assert _alive(host), host["d"].tail()
        broken = [e for e in events if e.get("vf") == "g1"]
        assert broken and broken[0]["reason"] == "guest_memory_fault", events
        # the other guest and the admin plane go on while g1's frontend keeps kicking
        for _ in range(5):
            assert _pinged(g2)
        _admin_works(host)
        qs = _queues(host, "g1")
        assert any(q["broken"] and q["guest_memory_fault"] >= 1 for q in qs), qs
        with host["d"].client() as c:
            assert c.vf_show("g1")["state"].get("broken") == "guest_memory_fault"
        assert "guest_memory_fault" in host["d"].log.read_text()
    finally:
        for p in (flood, guest):
            p.kill()
            p.wait()
        guest.stdout.close()
    assert _alive(host)
    _g1_works(host)
    _settled(host, base)


def test_memory_that_could_vanish_is_refused_with_a_reason(host, g2):
    """An unsealed memfd (QEMU's memory-backend-memfd with seal=off) and a file on a disk
    file system are refused at SET_MEM_TABLE with a failure reply, and the daemon's log
    says why; a sealed memfd (QEMU's default) on the same VF works."""
    from vhost.protocol import VhostError
    from vhost.testing import VhostUserFrontend

    with VhostUserFrontend(host["g1"], seal=False) as fe:
        fe.negotiate()
        with pytest.raises(VhostError, match="SET_MEM_TABLE"):
            fe.set_mem_table()
    disk = REPO          # the checkout: a disk file system, unless it is on tmpfs
    on_tmpfs = subprocess.run(["stat", "-f", "-c", "%T", disk], capture_output=True,
                              text=True, check=True).stdout.strip() == "tmpfs"
    if not on_tmpfs:
        with VhostUserFrontend(host["g1"], ram_path=disk) as fe:
            fe.negotiate()
            with pytest.raises(VhostError, match="SET_MEM_TABLE"):
                fe.set_mem_table()
    log = host["d"].log.read_text()
    assert "not sealed with F_SEAL_SHRINK" in log
    assert on_tmpfs or "not tmpfs or hugetlbfs" in log
    assert _alive(host) and _pinged(g2)
    _g1_works(host)


# ---- 2: the guest's fds cannot block a shared worker ------------------------------------------

def test_full_eventfd_and_pipes_cannot_block_the_workers(host, g2):
    """g1 replaces its RX call fd with a blocking eventfd whose counter is full, then
    traffic arrives for g1: each notification the RX worker owes g1 fails (counted,
    `notify_failed`) instead of waiting, so g2 keeps pinging the VM and a request that
    takes every data-plane lock is answered. A pipe (filled up) as call fd, a pipe as kick
    fd, a memfd as err fd are refused outright. (On main the RX worker waited forever,
    under its lock, and with it every TX lane and the admin changes.)"""
    from vhost.protocol import STATE, U64, Req, VhostError
    from vhost.testing import VhostUserFrontend

    full = os.eventfd(0)                       # blocking, as a hostile frontend leaves it
    os.write(full, (0xFFFF_FFFF_FFFF_FFFE).to_bytes(8, "little"))
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, bytes(4096))
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    memfd = os.memfd_create("not-an-eventfd")
    flood = None
    fe = VhostUserFrontend(host["g1"]).connect()
    try:
        fe.start()
        assert _pinged(fe, G1_MAC, G1_IP, 1)
        fe.request(Req.SET_VRING_CALL, U64.pack(0), fds=[full])     # an eventfd: taken
        rx0 = _queues(host, "g1")[0]
        flood = host["vm"].popen([sys.executable, "-c", UDP_FLOOD, G1_IP])
        # frames reach g1's RX ring (the counters are read without the workers' locks),
        # and with the first batch a notification g1 cannot take (the first after a
        # ring restarts is never suppressed)
        deadline = time.monotonic() + 30
        while _queues(host, "g1")[0]["frames"] == rx0["frames"]:
            assert time.monotonic() < deadline, _queues(host, "g1")
            fe.recv(0)                          # the guest takes its frames, unnotified
            time.sleep(0.01)
        for _ in range(3):
            fe.recv(0)
            assert _pinged(g2), "g2 cannot reach the VM while g1's call fd is full"
            _admin_works(host)
        assert _queues(host, "g1")[0].get("notify_failed", 0) > rx0.get("notify_failed", 0)
        for req, index, fd in ((Req.SET_VRING_CALL, 0, w), (Req.SET_VRING_KICK, 1, r),
                               (Req.SET_VRING_ERR, 0, memfd)):
            if req is Req.SET_VRING_KICK:      # a kick fd is set on a stopped ring
                fe.request(Req.GET_VRING_BASE, STATE.pack(index, 0))
            with pytest.raises(VhostError, match=req.name):
                fe.request(req, U64.pack(index), fds=[fd])
        assert "not an eventfd" in host["d"].log.read_text()
        assert _pinged(g2)
        _admin_works(host)
    finally:
        if flood is not None:
            flood.kill()
            flood.wait()
        fe.close()
        for fd in (full, r, w, memfd):
            os.close(fd)
    assert _alive(host)
    _g1_works(host)


# ---- 3: bounded guest memory ------------------------------------------------------------------

def test_guest_memory_beyond_the_cap_is_refused(host, g2):
    """The default cap is 64 GiB of guest memory per VF: a table of one 96 GiB region (a
    sparse sealed memfd) is refused, and so is an ADD_MEM_REG that would take a VF with 8
    MiB mapped past 64 GiB; what was mapped stays usable. (On main both were mapped.)"""
    from vhost.protocol import REGION, Region, Req, VhostError
    from vhost.testing import VhostUserFrontend, guest_ram_fd

    big = guest_ram_fd(96 << 30)
    try:
        with VhostUserFrontend(host["g1"]) as fe:
            fe.negotiate()
            with pytest.raises(VhostError, match="SET_MEM_TABLE"):
                fe.request(Req.SET_MEM_TABLE,
                           fe.mem_table_payload([Region(0, 96 << 30, 1 << 44, 0)]), fds=[big])
            fe.set_mem_table()                  # the same connection goes on, as QEMU's
            fe.setup_ring(0)
            fe.setup_ring(1)
            ok = REGION.pack(1 << 36, 60 << 30, 1 << 45, 0)         # 8 MiB + 60 GiB: fits
            fe.request(Req.ADD_MEM_REG, bytes(8) + ok, fds=[big])
            over = REGION.pack(1 << 37, 8 << 30, 1 << 46, 60 << 30)  # + 8 GiB: beyond
            with pytest.raises(VhostError, match="ADD_MEM_REG"):
                fe.request(Req.ADD_MEM_REG, bytes(8) + over, fds=[big])
            assert _pinged(fe, G1_MAC, G1_IP, 1)
    finally:
        os.close(big)
    assert "exceed this device's cap" in host["d"].log.read_text()
    assert _alive(host) and _pinged(g2)


def test_the_cap_comes_from_the_config(tmp_path):
    """[daemon] vhost_max_memory_mib = 16: an 8 MiB guest attaches, a 32 MiB one is
    refused."""
    from softnic.scenario import Daemon
    from vhost.protocol import VhostError
    from vhost.testing import VhostUserFrontend

    ns, vm = Netns(prefix="sngc"), Netns(prefix="sngw")
    g1, g2 = str(tmp_path / "c1.sock"), str(tmp_path / "c2.sock")
    d = Daemon(ns, _config(g1, g2, vm.name, "vhost_max_memory_mib = 16"), tmp_path,
               ready=[g1, g2])
    ns.ip("link", "set", "lo", "up")
    try:
        d.start()
        with VhostUserFrontend(g1, mem_size=8 << 20) as fe:
            fe.start()
        with VhostUserFrontend(g2, mem_size=32 << 20) as fe:
            fe.negotiate()
            with pytest.raises(VhostError, match="SET_MEM_TABLE"):
                fe.set_mem_table()
        assert "exceed this device's cap of 0x1000000" in d.log.read_text()
    finally:
        d.stop()
        vm.close()
        ns.close()


# ---- 5: teardown under traffic ----------------------------------------------------------------

def test_vf_deleted_and_readded_under_a_reconnecting_guest(host, g2):
    """g1's guest reconnects over and over (a QEMU that keeps its eventfds across
    reconnects: the old ones stay open) and sends echo requests, while the admin socket
    deletes and re-adds g1 forty times. The daemon lives, g2 pings the VM every round,
    and afterwards the daemon holds exactly the fds, guest-memory mappings and epoll
    registrations it held before, and g1 serves a new guest. (On main each delete under
    a connected guest left its kick fd registered in a TX worker's epoll.)"""
    from softnic.client import Client
    from vhost.testing import VhostUserFrontend

    assert wait_until(lambda: _counts(host)[1] == 1, timeout=10)
    base = _counts(host)
    stop = threading.Event()
    connects = [0, 0]                          # sessions started, echo replies seen
    frame = _echo(G1_MAC, G1_IP, 7, 1)
    fe = VhostUserFrontend(host["g1"])

    def guest() -> None:
        while not stop.is_set():
            try:
                fe.disconnect()
                fe.rings.clear()
                fe._next = [r.mmap_offset for r in fe.regions]      # RAM laid out anew
                fe.connect(timeout=2)
                fe.start()
                connects[0] += 1
                end = time.monotonic() + 0.05 + (connects[0] % 5) * 0.02
                while time.monotonic() < end and not stop.is_set():
                    fe.send(0, [frame] * 4)
                    connects[1] += len(fe.recv(0))
                    fe.ring(1).reclaim()
                    time.sleep(0.002)
            except Exception:       # the VF went away under us, or not there yet: again
                time.sleep(0.01)

    t = threading.Thread(target=guest, daemon=True)
    t.start()
    vf = {"name": "g1", "kind": "vhost-user", "socket": host["g1"], "mac": G1_MAC, "vni": VNI}
    try:
        with Client(host["d"].sock, timeout=30) as c:
            for i in range(40):
                time.sleep(0.02 + (i % 4) * 0.03)
                c.vf_del("g1")
                assert _pinged(g2), f"g2 after delete {i}"
                c.vf_add(**vf)
                assert _alive(host)
    finally:
        stop.set()
        t.join(timeout=30)
    try:
        print(f"guest sessions: {connects[0]}, echo frames back: {connects[1]}")
        assert connects[0] >= 10 and connects[1] > 0
        fe.disconnect()             # the guest keeps its old eventfds open meanwhile
        assert _alive(host) and _pinged(g2)
        _settled(host, base, timeout=20)
    finally:
        fe.close()
    _g1_works(host)
    assert _alive(host)
