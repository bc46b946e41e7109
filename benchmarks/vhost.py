"""softnic's vhost-user VFs at full speed, beside the frontend's own ceiling, in one run.

What it drives (virtio 1.1 §2.6 split rings and §5.1.6 virtio-net, through
vhost.testing's compiled guest driver; the frontend is this process, softnic is another):

  ceiling   the same frontend, same rings and frames, against vhost's LoopbackDevice in
            "sink" mode in a child process (the device only returns TX buffers), polling
            its ring as softnic's TX worker does.
  vf2vf     two vhost-user VFs of one softnic in one VNI (local switching): VF a sends,
            VF b receives (this process polls both rings).
  underlay  a vhost-user VF with host-terminated ESP (RFC 4303, AES-128-GCM per RFC 4106,
            tunnel mode) then VXLAN (RFC 7348) to a peer VTEP in a second namespace over a
            veth; there a UDP socket that is never read is the sink (the peer kernel
            counts what arrives in /proc/net/snmp and /proc/net/dev; no ICMP goes back).
            The peer's receive work runs in a threaded-NAPI kernel thread (GRO on its veth
            end, TSO off on softnic's end; UDP GSO stays on), not inside softnic's send
            calls, so softnic's CPU time is its own, as with a real NIC.

Frames: 64 and 1500 bytes (Ethernet, IPv4/UDP, GSO_NONE) and 64 KB TSO frames (IPv4/TCP,
virtio-net NEEDS_CSUM + GSO_TCPV4, gso_size 1448, as Linux's virtio_net sends them).

Figures per case: frames/s and Gbit/s (Ethernet frame bytes, without the virtio-net
header) of what left the VF (VF to VF: what reached VF b), as the median of six slices of
the window (also the best slice and the window mean: the machine may be shared); per
core: the window's frames over the CPU seconds (utime + stime, /proc/PID/stat) the device
process used (softnic, or the sink child for the ceiling); fe per core: over this
process's CPU seconds (for the ceiling, the frontend's own cost per frame).

The underlay runs at MTU 9000 by default (--underlay-mtu): ESP + VXLAN add ~100 bytes,
so a 1500-byte guest frame only fits a jumbo underlay, as in most clouds. --perf PREFIX
records softnic with `perf record -g` in each of its windows and prints the hottest
symbols.

    python benchmarks/vhost.py [--seconds 1.5] [--quick]

Needs root (network namespaces, veth). Last line: one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import multiprocessing as mp
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

# This file is benchmarks/vhost.py: its own directory must not shadow the vhost package.
HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from vhost._virtq import FrameBuffers  # noqa: E402
from vhost.backend import VhostUserServer  # noqa: E402
from vhost.testing import LoopbackDevice, VhostUserFrontend, frame_hdr  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
HDR = 12                      # virtio-net header with VERSION_1 / MRG_RXBUF
RX_BUF = 65536 + 1024         # RX buffers take a whole GRO frame: one buffer = one frame
MAC = {"a": "02:00:00:00:0d:01", "b": "02:00:00:00:0d:02", "c": "02:00:00:00:0d:03",
       "peer": "02:00:00:00:0e:03"}
IP_AB = ("10.212.0.1", "10.212.0.2")
IP_C = ("10.213.0.1", "10.213.0.2")    # VF c -> a VM behind the peer VTEP
UL = ("10.98.0.1", "10.98.0.2")
SPI = 0x1001
# A test key for this benchmark only (16-byte AES key || 4-byte salt, RFC 4106).
KEY = "6b1f0e4d2c3a59687786a5b4c3d2e1f0a0b1c2d3"
KINDS = ("64", "1500", "tso64k")


# ---- frames ----------------------------------------------------------------------------

def frame(kind: str, src_mac: str, dst_mac: str, src: str, dst: str) -> bytes:
    """One frame with its virtio-net header, built with scapy (checksums by scapy)."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.l2 import Ether

    eth = Ether(src=src_mac, dst=dst_mac)
    if kind in ("64", "1500"):
        size = int(kind)
        pkt = eth / IP(src=src, dst=dst) / UDP(sport=40000, dport=9) / bytes(size - 42)
        raw = bytes(pkt)
        assert len(raw) == size
        return frame_hdr() + raw
    # 64 KB TSO: the largest IPv4 packet; the TCP checksum field holds the pseudo-header
    # sum without length (what Linux puts there for CHECKSUM_PARTIAL + GSO).
    payload = bytes(range(256)) * 256
    pkt = eth / IP(src=src, dst=dst) / TCP(sport=40000, dport=5001, flags="PA", seq=1,
                                          window=65535) / payload[:65535 - 40]
    tso = bytearray(bytes(pkt))
    ph = sum(struct.unpack("!4H", tso[26:34])) + 6
    while ph >> 16:
        ph = (ph & 0xFFFF) + (ph >> 16)
    tso[50:52] = struct.pack("!H", ph)
    return frame_hdr(flags=1, gso_type=1, hdr_len=54, gso_size=1448, csum_start=34,
                     csum_offset=16) + bytes(tso)


# ---- process CPU -------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _softnic_pid(pid: int) -> int:
    """`ip netns exec` execs the daemon in place; if a shell or a fork came between,
    follow the children until the process is the daemon."""
    for _ in range(4):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"softnic.daemon" in f.read():
                return pid
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        if not kids:
            break
        pid = int(kids[0])
    raise RuntimeError("softnic daemon process not found")


# ---- one measured window ---------------------------------------------------------------------

def drive(tx: Any, data: bytes, seconds: float, dev_pid: int, *, rx: Any = None,
          burst: int = 256, warmup: float = 0.2, slices: int = 6,
          extra: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
    """Sends copies of data on driver ring tx as fast as the device takes them (and drains
    rx, if given) for warmup + seconds; returns the window's counts, wall time, the CPU
    seconds of the device process and of this one, and per-slice counts (the machine is
    shared: the median slice is the rate when we were scheduled)."""
    def spin(until: float) -> tuple[int, int]:
        sent = got = 0
        while time.perf_counter() < until:
            sent += tx.send_burst(data, burst)
            if rx is not None:
                got += rx.recv_count(1024)
        return sent, got

    spin(time.perf_counter() + warmup)
    x0 = extra() if extra else {}
    rx_oct0 = rx.octets if rx is not None else 0
    kicks0 = tx.kicks
    c0, me0, t0 = cpu_seconds(dev_pid), time.process_time(), time.perf_counter()
    parts: list[tuple[float, int, int, int]] = []  # (seconds, sent, received, rx bytes)
    sent = got = 0
    ts = t0
    for i in range(1, slices + 1):
        o0 = rx.octets if rx is not None else 0
        s_, g_ = spin(t0 + seconds * i / slices)
        now = time.perf_counter()
        parts.append((now - ts, s_, g_, (rx.octets - o0 - HDR * g_) if rx is not None else 0))
        ts = now
        sent += s_
        got += g_
    t1 = time.perf_counter()
    c1, me1 = cpu_seconds(dev_pid), time.process_time()
    out: dict[str, Any] = {"sent": sent, "wall": t1 - t0, "dev_cpu": c1 - c0,
                           "fe_cpu": me1 - me0, "kicks": tx.kicks - kicks0, "slices": parts}
    if rx is not None:
        out["received"] = got
        out["rx_octets"] = rx.octets - rx_oct0 - HDR * got
    if extra:
        x1 = extra()
        out.update({k: x1[k] - x0.get(k, 0) for k in x1})
    return out


def figures(r: dict[str, Any], frame_bytes: int,
            count: Callable[[int, int, int], int]) -> dict[str, float]:
    """frames/s and Gbit/s of the frames count(sent, received, rx_bytes) says were done:
    the median slice (wall), the window mean, and per core of the device process (the
    window's frames over its CPU seconds) and of the frontend."""
    total = count(r["sent"], r.get("received", 0), r.get("rx_octets", 0))
    rates = sorted(count(s, g, o) / dt for dt, s, g, o in r["slices"] if dt > 0)
    fps = rates[len(rates) // 2]
    wall, cpu = r["wall"], max(r["dev_cpu"], 1.0 / CLK_TCK)

    def gbps(f: float) -> float:
        return round(f * frame_bytes * 8 / 1e9, 3)

    return {"fps": round(fps), "gbps": gbps(fps), "fps_best": round(rates[-1]),
            "gbps_best": gbps(rates[-1]), "fps_mean": round(total / wall),
            "fps_per_core": round(total / cpu), "gbps_per_core": gbps(total / cpu),
            "fe_fps_per_core": round(total / max(r["fe_cpu"], 1e-3)),
            "dev_cores": round(r["dev_cpu"] / wall, 2), "fe_cores": round(r["fe_cpu"] / wall, 2),
            "frames": total}


def _sent(s: int, g: int, o: int) -> int:
    return s


def _received(s: int, g: int, o: int) -> int:
    return g


def _in_units(frame_bytes: int) -> Callable[[int, int, int], int]:
    def count(s: int, g: int, o: int) -> int:
        return o // frame_bytes
    return count


# ---- the ceiling: the same frontend against a sink device --------------------------------------

class SinkDevice(LoopbackDevice):
    """vhost's LoopbackDevice in sink mode (TX chains popped and returned, nothing else),
    serving its ring the way softnic's TX worker does: bursts while there is work, then
    kicks on, one more look, and sleep on the kick eventfd. (LoopbackDevice's own loop
    calls sched_yield between empty polls; on a loaded machine that starves it, and it
    then measured 3-5x below this and below softnic: no ceiling.)"""

    def _work(self, tx: Any, rx: Any, mergeable: bool, stop: Any) -> None:
        fb = FrameBuffers(self.batch, self.cap)
        while not stop.is_set():
            tx.enable_kicks(False)
            busy = 0
            while fb.pop_from(tx) and busy < 1024:
                busy += 1
            tx.enable_kicks(True)
            if tx.avail_count() or tx.kick_fd < 0:
                continue
            p = select.poll()
            p.register(tx.kick_fd, select.POLLIN)
            if p.poll(50):
                with contextlib.suppress(BlockingIOError):
                    os.read(tx.kick_fd, 8)


def _serve_sink(path: str, ready: Any, done: Any) -> None:
    srv = VhostUserServer(path, SinkDevice(mode="sink", batch=256, cap=RX_BUF)).start()
    ready.set()
    done.wait()
    srv.stop()


@contextlib.contextmanager
def sink_device() -> Iterator[tuple[str, int]]:
    """SinkDevice in a child process (its own GIL, as softnic has): yields its socket
    path and pid."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sink.sock")
        ready, done = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_serve_sink, args=(path, ready, done), daemon=True)
        child.start()
        try:
            if not ready.wait(60) or child.pid is None:
                raise RuntimeError("sink device did not start")
            yield path, child.pid
        finally:
            done.set()
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join()


# ---- softnic in a namespace ------------------------------------------------------------------

def _config(tmp: str, mtu: int) -> str:
    vfs = ""
    for name, vni, extra in (("a", 100, ""), ("b", 100, ""), ("c", 200, 'ipsec = "enforce"\n')):
        vfs += (f'[[vf]]\nname = "vf{name}"\nkind = "vhost-user"\n'
                f'socket = "{tmp}/{name}.sock"\nmac = "{MAC[name]}"\nvni = {vni}\n{extra}\n')
    return f"""[daemon]
admin_socket = "{tmp}/admin.sock"

[uplink]
local = "{UL[0]}"
mtu = {mtu}

{vfs}
[[sa]]
scope = "vfc"
dir = "out"
src = "{IP_C[0]}"
dst = "{IP_C[1]}"
spi = {SPI}
reqid = 1
mode = "tunnel"
alg = "aes-gcm"
key = "0x{KEY}"
icv_bits = 128

[[policy]]
scope = "vfc"
dir = "out"
src = "{IP_C[0]}/32"
dst = "{IP_C[1]}/32"
action = "protect"
reqid = 1

[[fdb]]
vni = 200
mac = "{MAC['peer']}"
remote = "{UL[1]}"
"""


ETHTOOL_STSO, ETHTOOL_SGRO = 0x1F, 0x2C


def _ethtool(dev: str, cmd: int, value: int) -> None:
    """One ETHTOOL_S* feature switch through the SIOCETHTOOL ioctl (no ethtool binary)."""
    val = ctypes.create_string_buffer(struct.pack("II", cmd, value))
    ifr = struct.pack("16sP", dev.encode(), ctypes.addressof(val))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), 0x8946, ifr)


def peer_rx_threaded(h: Any, p: Any) -> bool:
    """Moves the peer's receive path off softnic's CPU account: with GRO on, the peer's
    veth end has a NAPI context, threaded NAPI runs it in a kernel thread, and with TSO
    off on softnic's end (UDP GSO stays on) veth hands GSO packets to that NAPI context
    (veth_skb_is_eligible_for_gro). Otherwise the peer's UDP receive (GSO splitting,
    socket queueing, the drop) runs in softirq inside softnic's own send call and is
    charged to softnic, as no real NIC's receiver would be."""
    try:
        h.call(_ethtool, "ul0", ETHTOOL_STSO, 0)
        p.call(_ethtool, "ul0", ETHTOOL_SGRO, 1)
        p.run(["sh", "-c", "echo 1 > /sys/class/net/ul0/threaded"])
        return True
    except (OSError, RuntimeError):
        return False


@contextlib.contextmanager
def softnic_host(mtu: int, threaded: bool = True) -> Iterator[dict[str, Any]]:
    """Namespace H runs `softnic run` with VFs a, b (VNI 100) and c (VNI 200, ESP); a veth
    joins H to namespace P, where a UDP socket on the VXLAN port is the sink."""
    from softnic.client import Client
    from softnic.topo import Netns, veth, wait_until

    with tempfile.TemporaryDirectory() as tmp, Netns(prefix="snbh") as h, \
            Netns(prefix="snbp") as p:
        veth(h, "ul0", p, "ul0", mtu=mtu)
        h.addr_add("ul0", UL[0] + "/24")
        p.addr_add("ul0", UL[1] + "/24")
        threaded = threaded and peer_rx_threaded(h, p)
        cfg = os.path.join(tmp, "softnic.toml")
        with open(cfg, "w") as f:
            f.write(_config(tmp, mtu))
        os.chmod(cfg, 0o600)

        def sink() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.bind((UL[1], 4789))
            return s

        udp = p.call(sink)
        log = open(os.path.join(tmp, "daemon.log"), "w+")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = h.popen([sys.executable, "-m", "softnic.daemon", "run", "-c", cfg],
                       stdout=log, stderr=subprocess.STDOUT, env=env)
        sock = os.path.join(tmp, "admin.sock")

        def up() -> bool:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError("softnic exited: " + log.read()[-2000:])
            try:
                with Client(sock, timeout=1) as c:
                    c.version()
                return all(os.path.exists(f"{tmp}/{n}.sock") for n in "abc")
            except Exception:
                return False

        try:
            wait_until(up, timeout=60, step=0.1)
            yield {"tmp": tmp, "pid": _softnic_pid(proc.pid), "admin": sock, "peer": p, "host": h,
                   "log": log, "peer_rx_threaded": threaded}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            udp.close()
            log.close()


def _netdev(dev: str) -> list[int]:
    """This thread's namespace's /proc/net/dev fields of dev (rx bytes, packets, errs,
    drop, ..., then tx bytes, packets, errs, drop, ...)."""
    with open("/proc/thread-self/net/dev") as f:
        return [int(x) for x in next(ln.split(":", 1)[1].split() for ln in f
                                     if ln.strip().startswith(dev + ":"))]


def peer_counters(h: Any, p: Any) -> dict[str, int]:
    """What reached the peer VTEP: UDP datagrams (delivered + dropped at the full socket:
    the kernel has split any GSO packet by then) and IP bytes on its veth; and veth
    drops on softnic's side (the peer's NAPI ring full)."""
    def read() -> dict[str, int]:
        with open("/proc/thread-self/net/snmp") as f:
            udp = [ln.split() for ln in f if ln.startswith("Udp:")]
        u = dict(zip(udp[0][1:], map(int, udp[1][1:]), strict=True))
        dev = _netdev("ul0")
        return {"peer_datagrams": u["InDatagrams"] + u["InErrors"],
                "peer_octets": dev[0] - 14 * dev[1]}
    out: dict[str, int] = p.call(read)
    out["veth_tx_dropped"] = h.call(_netdev, "ul0")[11]
    return out


def softnic_counters(admin: str, *vfs: str) -> dict[str, int]:
    """softnic's own counters (admin socket) of the given VFs and the uplink, flattened;
    `drops` sums every drop reason of those VFs."""
    from softnic.client import Client

    with Client(admin, timeout=5) as c:
        st = c.stats()
    out = {f"ul_{k}": v for k, v in st["uplink"].items() if isinstance(v, int)}
    out["drops"] = 0
    for vf in vfs:
        for k, v in st["vf"][vf].items():
            if isinstance(v, int):
                out[f"{vf}_{k}"] = v
                if k.startswith("drop_"):
                    out["drops"] += v
    return out


@contextlib.contextmanager
def perf_record(pid: int, out: str | None) -> Iterator[None]:
    """perf record -g of process pid for the block (nothing if out is None); then prints
    the hottest symbols (perf report), so a slow case says where its time went."""
    if out is None:
        yield
        return
    rec = subprocess.Popen(["perf", "record", "-q", "-g", "-F", "999", "-p", str(pid),
                            "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)  # perf attaches
        yield
    finally:
        rec.send_signal(signal.SIGINT)
        rec.wait(20)
    rep = subprocess.run(["perf", "report", "-i", out, "--stdio", "--no-children",
                          "--sort", "dso,symbol", "-g", "none", "--percent-limit", "1.5"],
                         capture_output=True, text=True)
    lines = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    print(f"  perf {out}:\n    " + "\n    ".join(lines[:25]), file=sys.stderr)


def run_all(frames_ab: dict[str, bytes], frames_c: dict[str, bytes], seconds: float,
            num: int, mtu: int, perf: str | None = None,
            peer_threaded: bool = True) -> dict[str, Any]:
    """For each frame kind, back to back (so the three see the same machine load): the
    ceiling, VF to VF, VF to underlay. Returns {case: {kind: figures}} and raw counts."""
    res: dict[str, Any] = {"ceiling": {}, "vf2vf": {}, "underlay": {}, "raw": {}}
    with sink_device() as (sink_path, sink_pid), softnic_host(mtu, peer_threaded) as sn, \
            VhostUserFrontend(sink_path, mem_size=8 << 20) as fs, \
            VhostUserFrontend(f"{sn['tmp']}/a.sock", mem_size=8 << 20) as fa, \
            VhostUserFrontend(f"{sn['tmp']}/b.sock", mem_size=num * RX_BUF + (8 << 20)) as fb, \
            VhostUserFrontend(f"{sn['tmp']}/c.sock", mem_size=8 << 20) as fc:
        pid = sn["pid"]
        res["peer_rx_threaded"] = sn["peer_rx_threaded"]
        fs.start(num=num, buf_size=2048)
        fa.start(num=num, buf_size=2048)
        fb.negotiate()
        fb.set_mem_table()
        fb.setup_ring(0, num=num, buf_size=RX_BUF)
        fb.setup_ring(1, num=num, buf_size=2048)
        fc.start(num=num, buf_size=2048)
        time.sleep(0.3)  # the VFs' links come up

        def counters_c() -> dict[str, int]:
            return softnic_counters(sn["admin"], "vfc") | peer_counters(sn["host"], sn["peer"])

        for kind in frames_ab:
            fl = len(frames_ab[kind]) - HDR
            r = drive(fs.ring(1), frames_ab[kind], seconds, sink_pid)
            res["ceiling"][kind] = figures(r, fl, _sent)
            res["raw"][f"ceiling_{kind}"] = r

            with perf_record(pid, f"{perf}.vf2vf-{kind}" if perf else None):
                r = drive(fa.ring(1), frames_ab[kind], seconds, pid, rx=fb.ring(0),
                          extra=lambda: softnic_counters(sn["admin"], "vfa", "vfb"))
            # Frames delivered to VF b; a TSO frame may arrive re-coalesced in other sizes,
            # so for TSO delivered bytes count in units of the frame sent.
            done = _received if kind != "tso64k" else _in_units(fl)
            res["vf2vf"][kind] = {**figures(r, fl, done), "frames_sent": r["sent"],
                                  "frames_received": r["received"],
                                  "softnic_drops": r["drops"],
                                  "rx_gbps": round(r["rx_octets"] * 8 / r["wall"] / 1e9, 3)}
            res["raw"][f"vf2vf_{kind}"] = r

            with perf_record(pid, f"{perf}.underlay-{kind}" if perf else None):
                r = drive(fc.ring(1), frames_c[kind], seconds, pid, extra=counters_c)
            f = figures(r, fl, _sent)
            # What left softnic: packets the uplink socket took; the rest softnic dropped
            # (socket full: the peer's NAPI thread did not keep up) and counted.
            out = r["ul_io_tx_pkts"] / max(r["vfc_tx_packets"], 1)
            res["underlay"][kind] = {
                **f, "fps_out": round(f["fps_mean"] * out),
                "gbps_out": round(f["fps_mean"] * out * fl * 8 / 1e9, 3),
                "underlay_pkts": r["ul_io_tx_pkts"],
                "veth_dropped_skbs": r["veth_tx_dropped"],
                "softnic_drops": r["drops"] + r["vfc_tx_packets"] - r["ul_io_tx_pkts"],
                "peer_datagrams": r["peer_datagrams"],
                "peer_dgram_per_s": round(r["peer_datagrams"] / r["wall"]),
                "peer_gbps": round(r["peer_octets"] * 8 / r["wall"] / 1e9, 3)}
            res["raw"][f"underlay_{kind}"] = r
        # The whole run's totals, once the peer's queue has drained: every packet the
        # uplink socket took either reached the peer's UDP layer or was a counted veth drop.
        last: dict[str, int] = {}
        for _ in range(50):
            now = peer_counters(sn["host"], sn["peer"])
            if now == last:
                break
            last = now
            time.sleep(0.05)
        st = softnic_counters(sn["admin"], "vfc")
        res["underlay_totals"] = {"ul_io_tx_pkts": st["ul_io_tx_pkts"], **last}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="window per figure")
    ap.add_argument("--num", type=int, default=256, help="ring size (descriptors)")
    ap.add_argument("--underlay-mtu", type=int, default=9000)
    ap.add_argument("--quick", action="store_true", help="tiny windows (smoke test)")
    ap.add_argument("--verbose", action="store_true", help="raw counters per window")
    ap.add_argument("--peer-inline", action="store_true",
                    help="leave the peer's receive in softirq inside softnic's sends (its CPU "
                         "then counts as softnic's; nothing is dropped between them)")
    ap.add_argument("--perf", metavar="PREFIX",
                    help="perf record softnic in its windows to PREFIX.CASE-KIND and print "
                         "the hottest symbols (stderr)")
    a = ap.parse_args(argv)
    from softnic.topo import can_netns

    why = can_netns()
    if why:
        print(f"benchmarks/vhost.py: {why}", file=sys.stderr)
        return 2
    seconds = 0.2 if a.quick else a.seconds
    ab = {k: frame(k, MAC["a"], MAC["b"], *IP_AB) for k in KINDS}
    c = {k: frame(k, MAC["c"], MAC["peer"], *IP_C) for k in KINDS}
    t0 = time.monotonic()
    res = run_all(ab, c, seconds, a.num, a.underlay_mtu, a.perf, not a.peer_inline)
    ceil, vf2vf, under, raw = res["ceiling"], res["vf2vf"], res["underlay"], res["raw"]

    print(f"softnic vhost-user VFs, frontend in this process, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}, window {seconds} s, ring {a.num}, "
          f"underlay MTU {a.underlay_mtu}, peer receive in "
          f"{'a NAPI thread' if res['peer_rx_threaded'] else 'the softirq of softnic'}")
    print("  Mfps, Gbit/s: median of 6 slices of the window (Ethernet bytes, no virtio "
          "header); /core: the window's frames over the CPU seconds of the device process "
          "(softnic; the sink for the ceiling); fe: frames over this process's CPU seconds")
    print(f"  {'case':16s} {'Mfps':>7s} {'Gbit/s':>7s} {'Mfps/core':>9s} {'Gbit/s/core':>11s} "
          f"{'dev cores':>9s} {'fe Mfps/core':>12s} | {'ceil Mfps':>9s} {'ceil Gbit/s':>11s} "
          f"{'ceil fe Mfps/core':>17s}")
    for name, table in (("vf2vf", vf2vf), ("underlay", under)):
        for kind in KINDS:
            f, cl = table[kind], ceil[kind]
            print(f"  {name + ' ' + kind:16s} {f['fps'] / 1e6:7.3f} {f['gbps']:7.2f} "
                  f"{f['fps_per_core'] / 1e6:9.3f} {f['gbps_per_core']:11.2f} "
                  f"{f['dev_cores']:9.2f} {f['fe_fps_per_core'] / 1e6:12.3f} | "
                  f"{cl['fps'] / 1e6:9.3f} {cl['gbps']:11.2f} {cl['fe_fps_per_core'] / 1e6:17.3f}")
    for kind in KINDS:
        r = vf2vf[kind]
        print(f"  vf2vf {kind}: {r['frames_sent']} frames sent, {r['frames_received']} received "
              f"({r['rx_gbps']} Gbit/s delivered), {r['softnic_drops']} dropped by softnic")
    for kind in KINDS:
        r = under[kind]
        print(f"  underlay {kind}: {r['fps_out'] / 1e6:.3f} Mframes/s ({r['gbps_out']} Gbit/s) "
              f"left softnic, {r['softnic_drops']} packets dropped by softnic; peer got "
              f"{r['peer_dgram_per_s']} datagrams/s, {r['peer_gbps']} Gbit/s of IP "
              f"(veth dropped {r['veth_dropped_skbs']} GSO packets)")
    if a.verbose:
        for k, r in raw.items():
            nz = {kk: (round(v, 3) if isinstance(v, float) else v) for kk, v in r.items()
                  if v and kk != "slices"}
            print(f"  {k}: {nz}")
    print(f"  total {time.monotonic() - t0:.1f} s")
    print(json.dumps({"window_s": seconds, "cpus": os.cpu_count(),
                      "loadavg": round(os.getloadavg()[0], 2), "underlay_mtu": a.underlay_mtu,
                      "peer_rx_threaded": res["peer_rx_threaded"],
                      "ceiling": ceil, "vf2vf": vf2vf, "underlay": under,
                      "underlay_totals": res["underlay_totals"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
