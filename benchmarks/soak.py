"""Soak: two softnic hosts under mixed traffic and rekeys for a while; fail on growth.

Topology: softnic.scenario.Overlay (two hosts in network namespaces, each running
`softnic run -c` with two TAP VFs; host-terminated IPsec, AES-GCM tunnel SAs, VXLAN).
Traffic, for --seconds: a TCP stream in each VM pair (a1->b1 and b2->a2, reconnecting in a
loop), pings in both directions of both pairs, and rate-limited UDP a2->b2. Every
--rekey seconds one direction of one pair is rekeyed make-before-break through the admin
sockets, as an IKE daemon would (new inbound SA, new outbound SA with the same reqid,
old ones deleted).

Every --sample seconds, for each daemon: RSS, open fds, threads (/proc/PID) and the sum of
its drop counters. Verdict: a metric "grows without bound" if both its least-squares
slope over the run exceeds a threshold and the last third's maximum exceeds the first
third's maximum by a margin (RSS: 8 MiB and 20 KiB/s; fds and threads: 2 and any slope).
For drops, the rate is judged (drops per second in the last third against the first),
since a counter only ever rises. Prints the samples as a table, then one JSON line; exit 1
on a failure.

    sudo python benchmarks/soak.py --seconds 180
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from softnic.scenario import VMS, Overlay  # noqa: E402
from softnic.topo import can_netns  # noqa: E402

TCP_SINK = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4); n = 0
while True:
    c, _ = s.accept()
    while True:
        b = c.recv(1 << 20)
        if not b: break
        n += len(b)
    c.close(); print(n, flush=True)
"""
TCP_SOURCE = """
import socket, sys, time
block = b"soak" * 16384
while True:
    try:
        s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            s.sendall(block)
            time.sleep(0.002)      # a steady stream, not a CPU hog on a shared machine
        s.close()
    except OSError:
        time.sleep(0.5)
"""
UDP_SOURCE = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); i = 0
while True:
    try:
        s.sendto(i.to_bytes(4, "big") + b"u" * 500, (sys.argv[1], 7001))
    except OSError:
        pass
    i += 1; time.sleep(0.002)
"""
UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 7001))
while True:
    s.recv(2048)
"""


def proc_sample(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        st = dict(line.split(":", 1) for line in f if ":" in line)
    return {"rss_kb": int(st["VmRSS"].split()[0]), "threads": int(st["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def daemon_pid(p: subprocess.Popen[Any]) -> int:
    """The daemon's pid (`ip netns exec` execs it, so normally the Popen's own)."""
    try:
        with open(f"/proc/{p.pid}/cmdline", "rb") as f:
            if b"softnic.daemon" in f.read():
                return p.pid
    except OSError:
        pass
    out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True)
    return int(out.stdout.split()[0])


class Rekeyer:
    """Make-before-break rekeys, alternating pair and direction; counts what it did."""

    def __init__(self, ov: Overlay) -> None:
        self.ov = ov
        self.gen = 0
        # Current SPI per (pair, direction a->b/b->a): the scenario's initial ones.
        self.spi = {("1", "ab"): 0x1001, ("1", "ba"): 0x1002,
                    ("2", "ab"): 0x1001, ("2", "ba"): 0x1002}
        self.errors: list[str] = []

    def once(self) -> None:
        self.gen += 1
        pair, way = ("1", "2")[self.gen % 2], ("ab", "ba")[(self.gen // 2) % 2]
        tx, rx = ("a", "b") if way == "ab" else ("b", "a")
        src, dst = VMS[tx + pair], VMS[rx + pair]
        old = self.spi[(pair, way)]
        new = 0x20000 + self.gen
        common = dict(src=src.addr, dst=dst.addr, reqid=int(pair), mode="tunnel",
                      alg="aes-gcm", key=os.urandom(20).hex(), icv_bits=128,
                      replay_window=1024)
        with self.ov.client(rx) as c:
            c.sa_add(scope=dst.name, dir="in", spi=new, **common)
        with self.ov.client(tx) as c:
            c.sa_add(scope=src.name, dir="out", spi=new, **common)
            c.sa_del(src.name, old, dir="out")
        time.sleep(0.1)       # what was in flight under the old SPI still lands
        with self.ov.client(rx) as c:
            c.sa_del(dst.name, old, dir="in")
        self.spi[(pair, way)] = new


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


# metric -> (margin of last third's max over the first third's, slope limit per second)
LIMITS = {"rss_kb": (8192, 20.0), "fds": (2, 0.0), "threads": (2, 0.0)}


def verdict(samples: list[dict[str, Any]], side: str) -> dict[str, Any]:
    rows = [s for s in samples if s["side"] == side]
    ts = [r["t"] for r in rows]
    third = max(1, len(rows) // 3)
    out: dict[str, Any] = {}
    for m, (margin, lim) in LIMITS.items():
        ys = [float(r[m]) for r in rows]
        first, last = max(ys[:third]), max(ys[-third:])
        sl = slope(ts, ys)
        grew = last > first + margin and sl > lim
        out[m] = {"first_max": first, "last_max": last, "slope_per_s": round(sl, 3),
                  "ok": not grew}
    # Drops: compare rates (a counter only rises).
    d = [(r["t"], r["drops"]) for r in rows]
    def rate(seg: list[tuple[float, int]]) -> float:
        return (seg[-1][1] - seg[0][1]) / max(seg[-1][0] - seg[0][0], 1e-9) \
            if len(seg) > 1 else 0.0
    r1, r3 = rate(d[:third + 1]), rate(d[-third - 1:])
    out["drops"] = {"total": d[-1][1] - d[0][1], "rate_first": round(r1, 2),
                    "rate_last": round(r3, 2), "ok": r3 <= 2 * r1 + 5.0}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--rekey", type=float, default=4.0, help="seconds between rekeys")
    args = ap.parse_args()
    why = can_netns()
    if why is not None:
        print(f"soak: {why}", file=sys.stderr)
        return 2
    samples: list[dict[str, Any]] = []
    procs: list[subprocess.Popen[Any]] = []
    stop = threading.Event()
    with Overlay(model="host") as ov:
        ov.ping("a1", "b1", 1)
        ov.ping("a2", "b2", 1)
        pids = {s: daemon_pid(ov.daemons[s]) for s in ("a", "b")}
        py = sys.executable

        def start(vm: str, code: str, *argv: str) -> None:
            procs.append(ov.vm[vm].popen([py, "-c", code, *argv], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL))

        start("b1", TCP_SINK, VMS["b1"].addr, "5401")
        start("a2", TCP_SINK, VMS["a2"].addr, "5402")
        start("b2", UDP_SINK, VMS["b2"].addr)
        time.sleep(0.5)
        start("a1", TCP_SOURCE, VMS["b1"].addr, "5401")
        start("b2", TCP_SOURCE, VMS["a2"].addr, "5402")
        start("a2", UDP_SOURCE, VMS["b2"].addr)
        pings = [ov.vm[s].popen(["ping", "-q", "-i", "0.2", VMS[d].addr],
                                stdout=subprocess.PIPE, text=True)
                 for s, d in (("a1", "b1"), ("b1", "a1"), ("a2", "b2"), ("b2", "a2"))]
        rk = Rekeyer(ov)

        def rekeys() -> None:
            while not stop.wait(args.rekey):
                try:
                    rk.once()
                except Exception as e:  # reported in the verdict
                    rk.errors.append(f"{type(e).__name__}: {e}")

        t_rk = threading.Thread(target=rekeys, daemon=True)
        t_rk.start()
        t0 = time.monotonic()
        hdr = f"{'t':>6} {'host':>4} {'rss_kb':>8} {'fds':>5} {'thr':>4} {'drops':>8} "\
              f"{'tx_pkts':>10} {'rx_pkts':>10}"
        print(hdr, flush=True)
        try:
            while True:
                t = time.monotonic() - t0
                for side in ("a", "b"):
                    st = ov.stats(side)
                    s = {"t": round(t, 1), "side": side, **proc_sample(pids[side]),
                         "drops": sum(st["drops"].values()),
                         "tx": st["uplink"].get("io_tx_pkts", 0),
                         "rx": st["uplink"].get("io_rx_pkts", 0)}
                    samples.append(s)
                    print(f"{s['t']:>6} {side:>4} {s['rss_kb']:>8} {s['fds']:>5} "
                          f"{s['threads']:>4} {s['drops']:>8} {s['tx']:>10} {s['rx']:>10}",
                          flush=True)
                if t >= args.seconds:
                    break
                time.sleep(min(args.sample, max(0.0, args.seconds - t)))
        finally:
            stop.set()
            t_rk.join(timeout=10)
            for p in procs + pings:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            loss = []
            for p in pings:
                try:
                    out = p.communicate(timeout=5)[0]
                except subprocess.TimeoutExpired:
                    p.kill()
                    out = p.communicate()[0]
                loss.append(next((ln.strip() for ln in out.splitlines()
                                  if "packet loss" in ln), "?"))
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            drops_by_reason = {s: ov.stats(s)["drops"] for s in ("a", "b")}
    result: dict[str, Any] = {"seconds": args.seconds, "samples": len(samples),
                              "rekeys": rk.gen, "rekey_errors": rk.errors[:5],
                              "ping": loss,
                              "drops_by_reason": {s: {k: v for k, v in d.items() if v}
                                                  for s, d in drops_by_reason.items()}}
    ok = not rk.errors
    for side in ("a", "b"):
        v = verdict(samples, side)
        result[side] = v
        ok = ok and all(m["ok"] for m in v.values())
    result["ok"] = ok
    print(json.dumps(result, sort_keys=True))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
