"""The underlay's own ceilings, measured in one run between two namespaces: datagrams/s
over a veth with plain sendmmsg/recvmmsg against UDP GSO + GRO (the choice that sets the
underlay's ceiling), and, with --tap, TCP through two TAPs joined by a batch forwarder.
Needs root. Last line: one JSON object.

    python benchmarks/underlay.py [--seconds 2] [--payload 1400] [--v6] [--tap]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from softnic._batch import Batch  # noqa: E402
from softnic.tap import forward  # noqa: E402
from softnic.topo import Host, TwoHosts  # noqa: E402
from softnic.uplink import Uplink  # noqa: E402


def _outer_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A minimal outer IPv4/IPv6 + UDP packet (checksums left 0: the kernel writes its own)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if s.version == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                           s.packed, d.packed) + udp
    return struct.pack("!IHBB16s16s", 0x60000000, len(udp), 17, 64, s.packed, d.packed) + udp


def bench(seconds: float = 2.0, payload: int = 1400, burst: int = 64,
          v6: bool = False) -> dict[str, float]:
    """Datagrams/s from one namespace to another over a veth (MTU 1500), for plain
    sendmmsg/recvmmsg and for UDP GSO + GRO, in one run. Needs root."""
    out: dict[str, float] = {}
    with TwoHosts(v6=v6) as t:
        for mode, offload in (("sendmmsg", False), ("gso_gro", True)):
            ua = t.a.ns.call(Uplink, t.a.addr, sport_pool=8, gso=offload, gro=offload)
            ub = t.b.ns.call(Uplink, t.b.addr, sport_pool=8, gso=offload, gro=offload)
            pkt = _outer_udp(t.a.addr, t.b.addr, 50000, 4789, bytes(payload))
            tx = Batch(burst)
            stop = threading.Event()
            got = [0]

            def receive(ub: Uplink = ub, stop: threading.Event = stop,
                        got: list[int] = got) -> None:
                rb = Batch(1024)
                pl = select.poll()
                for fd in ub.filenos():
                    pl.register(fd, select.POLLIN)
                while not stop.is_set():
                    rb.clear()
                    n = ub.recv_burst(rb)
                    got[0] += n
                    if n == 0:
                        pl.poll(10)

            th = threading.Thread(target=receive)
            th.start()
            sent = 0
            t0 = time.monotonic()
            end = t0 + seconds
            for _ in range(burst):
                tx.push(pkt)
            while time.monotonic() < end:
                k = ua.send_burst(tx, 0, burst)
                sent += k
                if k < burst:              # refused slots keep their drop mark: reload
                    tx.clear()
                    for _ in range(burst):
                        tx.push(pkt)
            elapsed = time.monotonic() - t0
            time.sleep(0.2)
            stop.set()
            th.join()
            out[f"{mode}_sent_per_s"] = sent / elapsed
            out[f"{mode}_recv_per_s"] = got[0] / elapsed
            out[f"{mode}_tx_syscalls"] = ua.counters()["tx_syscalls"]
            out[f"{mode}_rx_syscalls"] = ub.counters()["rx_syscalls"]
            out[f"{mode}_rx_overflow"] = ub.counters()["rx_overflow"]
            ua.close()
            ub.close()
    out["ratio_recv"] = out["gso_gro_recv_per_s"] / max(out["sendmmsg_recv_per_s"], 1.0)
    return out


def tap_forward_bench(seconds: float = 3.0) -> dict[str, float]:
    """TCP throughput between two VM namespaces whose TAPs are joined by `forward`
    (TSO on both sides, so 64 KB frames cross). Uses iperf3. Needs root."""
    if shutil.which("iperf3") is None:
        raise SystemExit("bench needs iperf3")
    with Host("f") as h:
        v1, v2 = h.add_vm(), h.add_vm()
        t1 = h.open_tap(v1, addrs=["10.77.0.1/24"])
        t2 = h.open_tap(v2, addrs=["10.77.0.2/24"])
        stop = threading.Event()
        th = threading.Thread(target=forward, args=(t1, t2, stop))
        th.start()
        try:
            srv = v2.popen(["iperf3", "-s", "-1", "-B", "10.77.0.2"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
            out = v1.run(["iperf3", "-c", "10.77.0.2", "-t", str(seconds), "-J"],
                         timeout=seconds + 30)
            srv.wait(timeout=10)
        finally:
            stop.set()
            th.join()
        c1 = t1.counters()
        r = json.loads(out)["end"]["sum_received"]
        return {
            "gbit_per_s": r["bits_per_second"] / 1e9,
            "frames_from_sender": c1["rx_pkts"],
            "avg_frame_bytes": c1["rx_bytes"] / max(c1["rx_pkts"], 1),
            "read_syscalls": c1["rx_syscalls"],
        }


def main() -> None:
    ap = argparse.ArgumentParser(description="underlay datagram rate (sendmmsg vs UDP GSO+GRO) "
                                 "and the TAP forwarding ceiling")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--payload", type=int, default=1400)
    ap.add_argument("--v6", action="store_true")
    ap.add_argument("--tap", action="store_true", help="also the TAP-to-TAP iperf3 ceiling")
    a = ap.parse_args()
    r = bench(a.seconds, a.payload, v6=a.v6)
    for mode in ("sendmmsg", "gso_gro"):
        print(f"{mode:9s} sent {r[mode + '_sent_per_s'] / 1e6:6.3f} M/s  "
              f"received {r[mode + '_recv_per_s'] / 1e6:6.3f} M/s  "
              f"({int(r[mode + '_tx_syscalls'])} send / {int(r[mode + '_rx_syscalls'])} "
              f"recv syscalls, {int(r[mode + '_rx_overflow'])} dropped by the kernel)")
    if a.tap:
        r.update({f"tap_{k}": v for k, v in tap_forward_bench(a.seconds).items()})
    print(json.dumps({k: round(v, 3) for k, v in r.items()}))


if __name__ == "__main__":
    main()
