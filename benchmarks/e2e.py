"""End-to-end TCP throughput (issue 3, "Proof"): VM to VM through two softnic daemons with
ESP (RFC 4303, AES-128-GCM per RFC 4106, host-terminated tunnel mode) then VXLAN
(RFC 7348) over a veth underlay with MTU 1500, against the same run's reference: two
namespaces joined by the same kind of veth, talking through the kernel's own VXLAN device
(no crypto).

    sudo python benchmarks/e2e.py [-t SECONDS] [-P STREAMS] [--profile]

iperf3 is the load generator on both sides. Prints each figure, the daemons' counters
(TSO frames, segments, drops) and, last, one JSON object: both figures and their ratio
(issue 3's floor: softnic >= 25 % of the kernel's VXLAN). --profile samples both daemons
with `perf record` during the softnic run and prints where their time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from softnic import topo  # noqa: E402
from softnic.scenario import VMS, Overlay  # noqa: E402

FLOOR = 0.25


def iperf(server_ns: topo.Netns, client_ns: topo.Netns, addr: str, seconds: int,
          streams: int, port: int = 5201) -> dict[str, Any]:
    """One iperf3 run from client_ns to addr (a server in server_ns); returns its JSON."""
    srv = server_ns.popen(["iperf3", "-s", "-1", "-B", addr, "-p", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        last = ""
        for _ in range(50):                    # the server needs a moment to listen
            p = subprocess.run(client_ns.exec_argv(
                ["iperf3", "-c", addr, "-p", str(port), "-t", str(seconds), "-P",
                 str(streams), "-J"]), capture_output=True, text=True,
                timeout=seconds + 60)
            try:
                r = json.loads(p.stdout)
            except ValueError:
                r = {"error": p.stdout[-400:] + p.stderr[-400:]}
            if p.returncode == 0 and "error" not in r and "sum_received" in r.get("end", {}):
                return r  # type: ignore[no-any-return]
            last = str(r.get("error", "")) or p.stderr[-400:]
            if "connect" not in last and "refused" not in last:
                break
            time.sleep(0.2)
        raise RuntimeError(f"iperf3 failed: {last}")
    finally:
        if srv.poll() is None:
            srv.terminate()
            srv.wait(timeout=5)


def gbps(result: dict[str, Any]) -> float:
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def kernel_vxlan(seconds: int, streams: int) -> dict[str, Any]:
    """The reference: kernel VXLAN (VNI 100, UDP 4789) between two namespaces over a veth
    with MTU 1500; vxlan0 takes the kernel's default MTU for it (1450)."""
    with topo.TwoHosts() as t:
        for h, peer, inner in ((t.a, t.b, "10.210.0.1/24"), (t.b, t.a, "10.210.0.2/24")):
            h.ns.ip("link", "add", "vxlan0", "type", "vxlan", "id", "100", "remote",
                    peer.addr, "local", h.addr, "dstport", "4789", "dev", "ul0")
            h.ns.addr_add("vxlan0", inner)
            h.ns.link_up("vxlan0")
        mtu = t.a.ns.ip("-o", "link", "show", "vxlan0").split(" mtu ")[1].split()[0]
        r = iperf(t.b.ns, t.a.ns, "10.210.0.2", seconds, streams)
        return {"gbps": gbps(r), "retransmits": r["end"]["sum_sent"].get("retransmits", 0),
                "inner_mtu": int(mtu)}


def perf_profile(pids: dict[str, int], seconds: int, outdir: str) -> dict[str, str]:
    """perf record each daemon for `seconds`; return the top of each report."""
    if shutil.which("perf") is None:
        return {side: "perf not installed" for side in pids}
    procs = {}
    for side, pid in pids.items():
        data = os.path.join(outdir, f"perf-{side}.data")
        procs[side] = (data, subprocess.Popen(
            ["perf", "record", "-q", "-F", "499", "-g", "-p", str(pid), "-o", data, "--",
             "sleep", str(seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    out = {}
    for side, (data, p) in procs.items():
        p.wait(timeout=seconds + 30)
        rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--stdio",
                              "--sort", "dso,sym", "-g", "none", "--percent-limit", "1.5"],
                             capture_output=True, text=True, timeout=120)
        out[side] = "\n".join(ln for ln in rep.stdout.splitlines()
                              if ln.strip() and not ln.startswith("#"))[:3000]
    return out


def softnic_run(seconds: int, streams: int, profile: bool) -> dict[str, Any]:
    """VM a1 -> VM b1 through both daemons: ESP AES-128-GCM tunnel, then VXLAN."""
    with Overlay("host", host_mode="tunnel", alg="aes-gcm") as o:
        ping = o.ping("a1", "b1")
        if " 0% packet loss" not in ping:
            raise RuntimeError(f"overlay does not ping:\n{ping}")
        before = {s: o.stats(s) for s in ("a", "b")}
        report: dict[str, str] = {}
        tmp = tempfile.mkdtemp(prefix="softnic-perf-")
        try:
            if profile:
                import threading
                ppids = {s: _daemon_pid(o.daemons[s].pid) for s in ("a", "b")}
                th = threading.Thread(target=lambda: report.update(
                    perf_profile(ppids, max(2, seconds - 4), tmp)))
                th.start()
            pids = {s: _daemon_pid(o.daemons[s].pid) for s in ("a", "b")}
            cpu0 = {s: thread_cpu(pid) for s, pid in pids.items()}
            t0 = time.monotonic()
            r = iperf(o.vm["b1"], o.vm["a1"], VMS["b1"].addr, seconds, streams)
            wall = time.monotonic() - t0
            cpu1 = {s: thread_cpu(pid) for s, pid in pids.items()}
            if profile:
                th.join()
        finally:
            shutil.rmtree(tmp, True)
        after = {s: o.stats(s) for s in ("a", "b")}
        busy = {s: sorted(((cpu1[s].get(t, (0.0, 0.0))[0] - cpu0[s].get(t, (0.0, 0.0))[0])
                           / wall,
                           (cpu1[s].get(t, (0.0, 0.0))[1] - cpu0[s].get(t, (0.0, 0.0))[1])
                           / wall, name)
                          for t, name in _names(pids[s]).items())[::-1]
                for s in pids}
        return {"gbps": gbps(r), "retransmits": r["end"]["sum_sent"].get("retransmits", 0),
                "before": before, "after": after, "profile": report, "threads": busy,
                "iperf_cpu": r["end"].get("cpu_utilization_percent", {})}


def thread_cpu(pid: int) -> dict[int, tuple[float, float]]:
    """(seconds on a CPU, seconds runnable but waiting for one) of each thread of `pid`,
    from schedstat: the second shows when the machine, not softnic, is the limit."""
    out: dict[int, tuple[float, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait = f.read().split()[:2]
            out[int(tid)] = (int(run) / 1e9, int(wait) / 1e9)
        except (OSError, IndexError, ValueError):
            continue
    return out


def _names(pid: int) -> dict[int, str]:
    """tid -> "tid:comm" for each thread of `pid`."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                out[int(tid)] = f"{tid}:{f.read().strip()}"
        except OSError:
            continue
    return out


def _daemon_pid(pid: int) -> int:
    """The python process under `ip netns exec` (which execs, so usually pid itself)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else pid
    except OSError:
        return pid


def counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """The counters the run moved, per host: TSO, segments, ESP, drops."""
    out: dict[str, int] = {}
    for name in ("vm1",):
        b, a = before["vf"].get(name, {}), after["vf"][name]
        for k in ("tx_frames", "tx_tso_frames", "tx_segments", "tx_esp", "rx_frames",
                  "rx_esp", "tap_tx_pkts", "tap_tx_syscalls", "tap_rx_pkts",
                  "tap_rx_syscalls", "tap_tx_ring_full"):
            out[f"{name}.{k}"] = int(a.get(k, 0)) - int(b.get(k, 0))
    ub, ua = before["uplink"], after["uplink"]
    for k in ("io_tx_pkts", "io_tx_syscalls", "io_tx_gso_msgs", "io_tx_eagain",
              "io_rx_pkts", "io_rx_syscalls", "io_rx_gro_bufs", "io_rx_overflow"):
        out[f"uplink.{k}"] = int(ua.get(k, 0)) - int(ub.get(k, 0))
    for k, v in after["drops"].items():
        d = int(v) - int(before["drops"].get(k, 0))
        if d:
            out[f"drop.{k}"] = d
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-t", "--seconds", type=int, default=10)
    ap.add_argument("-P", "--streams", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="perf record both daemons")
    a = ap.parse_args()
    if a.seconds < 10:
        ap.error("issue 3 asks for at least 10 s")
    why = topo.can_netns()
    if why is not None or shutil.which("iperf3") is None:
        sys.exit(f"benchmarks/e2e.py: {why or 'needs iperf3 (make sysdeps)'}")
    load = os.getloadavg()[0]
    ref = kernel_vxlan(a.seconds, a.streams)
    print(f"kernel VXLAN (no crypto), veth MTU 1500, inner MTU {ref['inner_mtu']}: "
          f"{ref['gbps']:.2f} Gbit/s ({ref['retransmits']} retransmits)")
    sn = softnic_run(a.seconds, a.streams, a.profile)
    print(f"softnic ESP AES-128-GCM tunnel + VXLAN, VM to VM over TAP: "
          f"{sn['gbps']:.2f} Gbit/s ({sn['retransmits']} retransmits)")
    for side in ("a", "b"):
        c = counters(sn["before"][side], sn["after"][side])
        print(f"host {side}: " + ", ".join(f"{k}={v}" for k, v in c.items() if v))
    for side, busy in sn["threads"].items():
        print(f"host {side} daemon threads during iperf (on CPU / runnable, waiting for "
              "a CPU, as shares of the run): " + ", ".join(
                  f"{name} {run:.0%}/{wait:.0%}" for run, wait, name in busy if run >= 0.01))
    print(f"iperf3 CPU (sender host / receiver remote): {sn['iperf_cpu']}")
    for side, rep in sn["profile"].items():
        print(f"--- perf, daemon on host {side} (self time by dso/symbol) ---\n{rep}")
    ratio = sn["gbps"] / ref["gbps"] if ref["gbps"] else 0.0
    ca = counters(sn["before"]["a"], sn["after"]["a"])
    print(json.dumps({
        "softnic_esp_vxlan_gbps": round(sn["gbps"], 3),
        "kernel_vxlan_gbps": round(ref["gbps"], 3),
        "ratio": round(ratio, 3),
        "floor": FLOOR,
        "meets_floor": ratio >= FLOOR,
        "seconds": a.seconds,
        "streams": a.streams,
        "tx_tso_frames": ca.get("vm1.tx_tso_frames", 0),
        "tx_segments": ca.get("vm1.tx_segments", 0),
        "loadavg_1m_before": round(load, 2),
    }))


if __name__ == "__main__":
    main()
