"""SA lifecycle through the real daemons and admin sockets (issue 4): make-before-break
rekeys under traffic with nothing lost or duplicated, hard expiry with its event, and
captures of the underlay that a pcap reader (dpkt) and an ESP oracle (scapy) accept.
The daemon's own lifecycle (issue 10): a second daemon leaves the first alone, and a
crash dumps no core.
"""

import os
import pathlib
import shutil
import struct
import subprocess
import sys
import threading
import time

import dpkt
import pytest

from softnic.topo import can_netns

why = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(why is not None, reason=why or "")]

if why is None:
    from softnic.scenario import KEYS, VMS, Overlay, collect_events

N_PACKETS = 6000
RATE = 1500           # packets per second: well under anything that could drop on a veth

RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind((sys.argv[1], 6000)); s.settimeout(3.0)
print("ready", flush=True)
seen = []
try:
    while True:
        seen.append(int.from_bytes(s.recv(64)[:4], "big"))
except TimeoutError:
    pass
print(len(seen), len(set(seen)), min(seen, default=-1), max(seen, default=-1), flush=True)
"""

SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, rate = int(sys.argv[2]), float(sys.argv[3])
t0 = time.perf_counter()
for i in range(n):
    s.sendto(i.to_bytes(4, "big") + b"x" * 60, (sys.argv[1], 6000))
    delay = t0 + (i + 1) / rate - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
"""


@pytest.fixture(scope="module")
def overlay():
    with Overlay(model="host") as ov:
        ov.ping("a1", "b1", 2)
        yield ov


def _rekey(ov, gen: int) -> None:
    """One make-before-break rekey of the a1 -> b1 direction: the receiver learns the new
    SA first, then the sender's policy moves to it, then the old SAs go."""
    old, new = 0x1001 + (gen - 1) * 0x10 if gen > 1 else 0x1001, 0x1001 + gen * 0x10
    key = os.urandom(20)
    a, b = VMS["a1"], VMS["b1"]
    common = dict(src=a.addr, dst=b.addr, reqid=1, mode="tunnel", alg="aes-gcm",
                  key=key.hex(), icv_bits=128, replay_window=1024)
    with ov.client("b") as cb:
        cb.sa_add(scope=b.name, dir="in", spi=new, **common)
    with ov.client("a") as ca:
        ca.sa_add(scope=a.name, dir="out", spi=new, **common)
        ca.sa_del(a.name, old, dir="out")
    time.sleep(0.05)          # packets in flight under the old SPI still arrive
    with ov.client("b") as cb:
        cb.sa_del(b.name, old, dir="in")


def test_ten_rekeys_under_traffic_lose_nothing(overlay):
    ov = overlay
    rx = ov.vm["b1"].popen([sys.executable, "-c", RECEIVER, VMS["b1"].addr],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        tx = ov.vm["a1"].popen([sys.executable, "-c", SENDER, VMS["b1"].addr,
                                str(N_PACKETS), str(RATE)])
        errors = []

        def rekeys():
            try:
                for gen in range(1, 11):
                    time.sleep(N_PACKETS / RATE / 12)
                    _rekey(ov, gen)
            except Exception as e:   # reported below, in the test's thread
                errors.append(e)

        t = threading.Thread(target=rekeys)
        t.start()
        t.join(timeout=60)
        tx.wait(timeout=60)
        out = rx.communicate(timeout=30)[0].split()
    finally:
        for p in (rx,):
            if p.poll() is None:
                p.kill()
    assert not errors, errors
    received, distinct, lo, hi = map(int, out)
    assert (received, distinct, lo, hi) == (N_PACKETS, N_PACKETS, 0, N_PACKETS - 1)
    with ov.client("a") as ca:
        spis = [int(s["spi"], 16) for s in ca.sa_list(VMS["a1"].name) if s["dir"] == "out"]
    assert spis == [0x1001 + 10 * 0x10]


def test_hard_expiry_stops_the_sa_and_raises_an_event(overlay):
    ov = overlay
    a, b = VMS["a2"], VMS["b2"]
    with ov.client("a") as ca:
        events, got = collect_events(ca.monitor(), "sa-hard-expire")
        time.sleep(0.2)
        with ov.client("a") as c2:
            c2.sa_add(scope=a.name, dir="out", src=a.addr, dst=b.addr, spi=0x5001, reqid=9,
                      mode="tunnel", alg="aes-gcm", key=KEYS[0x1001].hex(), icv_bits=128,
                      hard_packets=5)
            c2.policy_add(scope=a.name, dir="out", src=a.addr + "/32", dst="10.201.0.99/32",
                          action="protect", reqid=9)
        # Nobody owns 10.201.0.99: a static neighbour lets the VM send to it anyway.
        dev = next(n for n in ov.vm["a2"].run(["ls", "/sys/class/net"]).split()
                   if n.startswith("sn"))
        ov.vm["a2"].run(["ip", "neigh", "replace", "10.201.0.99", "lladdr", b.mac,
                         "dev", dev])
        ov.vm["a2"].run(["ping", "-c", "8", "-i", "0.1", "-W", "1", "10.201.0.99"],
                        check=False, timeout=30)
        assert got.wait(10), events
    ev = next(e for e in events if e.get("type") == "sa-hard-expire")
    assert ev["spi"] == 0x5001 and "key" not in str(ev).lower()
    with ov.client("a") as ca:
        sa = ca.sa_get(a.name, 0x5001, dir="out")
        stats = ca.stats()
    drops = stats["vf"][a.name]
    assert drops.get("drop_sa_expired", 0) >= 1
    assert KEYS[0x1001].hex() not in str(sa) and KEYS[0x1001].hex() not in str(stats)
    # The other SAs of the same VF are untouched: the a2 <-> b2 pair still talks.
    ov.ping("a2", "b2", 2)


def test_capture_of_the_underlay_is_a_pcap_of_esp(overlay, tmp_path):
    ov = overlay
    path = str(tmp_path / "uplink.pcap")
    out: dict = {}

    def cap():
        with ov.client("a") as ca:
            out["n"] = ca.capture_pcap("uplink", path, count=6)

    t = threading.Thread(target=cap)
    t.start()
    time.sleep(0.5)
    ov.ping("a1", "b1", 4)
    t.join(timeout=20)
    assert out.get("n") == 6
    with open(path, "rb") as f:
        pkts = list(dpkt.pcap.Reader(f))
    assert len(pkts) == 6
    raw = open(path, "rb").read()
    for k in KEYS.values():
        assert k.hex().encode() not in raw and k not in raw
    for _, buf in pkts:
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        assert isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP)
        vx = bytes(ip.data.data)
        assert struct.unpack("!I", vx[4:8])[0] >> 8 in (100, 200)   # VNI
        inner = dpkt.ethernet.Ethernet(vx[8:])
        assert isinstance(inner.data, dpkt.ip.IP) and inner.data.p == 50   # ESP inside


def test_reload_adds_a_vf_without_touching_the_others(overlay):
    """SIGHUP after the config file gains a VF: the new TAP appears, the existing VFs
    keep their TAP devices (same ifindex in their namespaces) and keep forwarding, and
    SAs added live through the admin socket survive the reload."""
    import signal

    from softnic.topo import Netns

    ov = overlay
    vm = ov.vm["a1"]
    dev = ov.vm_dev["a1"]
    ifindex = vm.run(["cat", f"/sys/class/net/{dev}/ifindex"]).strip()
    with ov.client("a") as c:
        sas_before = {(s["scope"], s["dir"], s["spi"]) for s in c.sa_list()}
    extra = Netns(prefix="snrl")
    try:
        cfg = os.path.join(ov.tmp, "a.toml")
        with open(cfg, "a") as f:
            f.write(f'\n[[vf]]\nname = "vm9"\nkind = "tap"\nifname = "snrl{os.getpid() % 1000}"\n'
                    f'netns = "{extra.name}"\nmac = "02:00:00:00:0a:09"\nvni = 300\n'
                    'addresses = ["10.230.0.1/24"]\n')
        ov.daemons["a"].send_signal(signal.SIGHUP)

        def has_vm9():
            with ov.client("a") as c:
                return any(v["name"] == "vm9" for v in c.vf_list())

        deadline = time.monotonic() + 10
        while not has_vm9():
            assert time.monotonic() < deadline, ov.log("a")
            time.sleep(0.1)
        assert extra.run(["ip", "-o", "addr", "show"]).count("10.230.0.1") == 1
        assert vm.run(["cat", f"/sys/class/net/{dev}/ifindex"]).strip() == ifindex
        ov.ping("a1", "b1", 2)
        with ov.client("a") as c:
            assert {(s["scope"], s["dir"], s["spi"]) for s in c.sa_list()} == sas_before
    finally:
        extra.close()


# --- a second daemon, core dumps (issue 10, items 14 and 16) -------------------------------

def _admin_helpers():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import test_admin

    return test_admin


def _run_second(ns, cfg, timeout=60):
    """`softnic run -c cfg` in `ns`, expected to give up: (returncode, stderr). If it runs
    instead, it is stopped and the test fails."""
    env = dict(os.environ, PYTHONPATH=REPO)
    p = ns.popen([sys.executable, "-m", "softnic.daemon", "run", "-c", str(cfg)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.terminate()
        out, err = p.communicate(timeout=30)
        pytest.fail(f"the second daemon kept running: {err[-2000:]}")
    return p.returncode, err


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_second_daemon_never_harms_the_first():
    """A second `softnic run` on the same admin socket stops in one line naming the first
    one's pid and touches nothing: the first daemon's admin socket and VF socket are the
    same files and it stays manageable. A second daemon with its own admin socket but the
    first one's VF socket gives up too, and leaves that socket alone. Once the first stops,
    its lock goes with it and a new daemon starts."""
    from softnic.scenario import Daemon
    from softnic.topo import Netns

    ta = _admin_helpers()
    d = ta.short_dir()
    path = os.path.join(d, "g1.sock")
    body = ta.UPLINK_LO + ta.vhost_vf("g1", path, 1)
    ns1, ns2 = Netns(prefix="snsi"), Netns(prefix="snsi")
    try:
        first = Daemon(ns1, body, pathlib.Path(d), name="d", ready=[path]).start()
        before = {p: os.lstat(p) for p in (first.sock, path)}
        rc, err = _run_second(ns2, first.cfg)
        lines = err.strip().splitlines()
        assert rc != 0 and len(lines) == 1, err
        assert f"already running, pid {first.pid}" in lines[0] and "Traceback" not in err

        other = pathlib.Path(d) / "e.toml"
        other.write_text(f'[daemon]\nadmin_socket = "{d}/e.admin.sock"\n' + body)
        os.chmod(other, 0o600)
        rc, err = _run_second(ns2, other)
        assert rc != 0 and "Traceback" not in err and "listening" in err, err

        for p, st in before.items():
            now = os.lstat(p)
            assert (now.st_dev, now.st_ino, now.st_mtime_ns) == (st.st_dev, st.st_ino,
                                                                 st.st_mtime_ns), p
        assert not os.path.exists(f"{d}/e.admin.sock")
        with first.client() as c:
            assert [v["name"] for v in c.vf_list()] == ["g1"]
        assert ta.vf_serves(path)
        first.stop()
        assert first.proc.returncode == 0
        assert not os.path.exists(first.sock) and not os.path.exists(first.sock + ".lock")
        first.start()
        assert ta.vf_serves(path)
        first.stop()
        first.assert_clean_log()
    finally:
        ns1.close()
        ns2.close()
        shutil.rmtree(d, ignore_errors=True)


def _core_pattern():
    with open("/proc/sys/kernel/core_pattern") as f:
        return f.read().strip()


def test_the_daemon_dumps_no_core():
    """A crash of the daemon (SIGSEGV, with core files allowed by its limits) writes no
    core: it would hold every key. The daemon's output holds none either."""
    import resource
    import signal

    from softnic.client import Client
    from softnic.topo import Netns, wait_until

    ta = _admin_helpers()
    d = ta.short_dir()
    key = os.urandom(20)
    sock = os.path.join(d, "a.sock")
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'[daemon]\nadmin_socket = "{sock}"\n' + ta.UPLINK_LO
                + ta.vhost_vf("g1", os.path.join(d, "g1.sock"), 1) + f"""
[[sa]]
scope = "g1"
dir = "out"
src = "10.0.0.1"
dst = "10.0.0.2"
spi = 0x1000
alg = "aes-gcm"
key = "0x{key.hex()}"
""")
    os.chmod(cfg, 0o600)
    ns = Netns(prefix="sncd")
    log = open(os.path.join(d, "log"), "w+")
    try:
        # The daemon runs in d, where the kernel's default core pattern would put a core.
        p = ns.popen([sys.executable, "-m", "softnic.daemon", "run", "-c", cfg], cwd=d,
                     stdout=log, stderr=subprocess.STDOUT,
                     env=dict(os.environ, PYTHONPATH=REPO))

        def up():
            assert p.poll() is None, open(log.name).read()
            try:
                with Client(sock, timeout=1) as c:
                    return c.sa_list()
            except Exception:
                return False

        wait_until(up, timeout=30, step=0.1)
        resource.prlimit(p.pid, resource.RLIMIT_CORE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        os.kill(p.pid, signal.SIGSEGV)
        _, status = os.waitpid(p.pid, 0)      # the raw status: Popen drops the core flag
        p.returncode = -signal.SIGSEGV
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
        cores = [n for n in os.listdir(d) if n.startswith("core")]
        if not _core_pattern().startswith("|"):
            assert cores == [], cores
        assert not os.WCOREDUMP(status), "the daemon dumped core"
        text = open(log.name).read()
        assert key.hex() not in text and key.hex().upper() not in text
    finally:
        log.close()
        ns.close()
        shutil.rmtree(d, ignore_errors=True)
