"""TX lanes side by side: one VF's queue pairs spread over several TX workers that all
protect with the VF's one outbound SA, beside the same work in one lane, in one run.

Each thread is one worker: its own input frames (a queue pair of the VF) and output
batches, calling Datapath.tx_burst(qp=its lane) in a loop; the burst releases the GIL, so
lanes run at once. Everything shared is what a real multiqueue VM shares: the VF's SA
(sequence numbers reserved atomically) and the tables. Cases: 64 KB TSO frames (host-
terminated TSO -> ESP -> VXLAN, one sequence reservation per frame) and 64-byte frames
(one per packet: the worst case for the shared counter).

Figures: aggregate packets/s (wall clock, the median of --rounds) and CPU ns per packet
(thread CPU time), for 1 lane and for N lanes; the reference is the one-lane run of the
same case in the same rounds (interleaved), so the ratio is the scaling. With fewer idle
CPUs than lanes the aggregate cannot scale; the CPU cost per packet still shows what
sharing costs. Every packet of every run is counted against the VF's counters: a drop
aborts the run.

    python benchmarks/lanes.py [--lanes 2] [--rounds 5] [--seconds 0.5] [--quick]

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") not in (ROOT, HERE)]
sys.path.append(HERE)

from pipeline import (  # noqa: E402
    KEY_VF,
    MAC_A,
    MAC_B,
    OUT_SLOT,
    SPI_VF,
    UNDERLAY_MTU,
    VM_A,
    VM_B,
    VNI,
    VTEP_A,
    VTEP_B,
    BenchError,
    small_frame,
    tso_frame,
)

from softnic._batch import Batch  # noqa: E402
from softnic._esp import SecurityAssociation  # noqa: E402
from softnic._fastpath import Datapath  # noqa: E402


def host(lanes: int) -> Datapath:
    """Host A of the pipeline benchmark (host-terminated, enforce) with `lanes` lanes."""
    dp = Datapath(VTEP_A, UNDERLAY_MTU, tx_lanes=lanes)
    dp.set_vf(0, MAC_A, VNI, ipsec="enforce")
    dp.fdb_add(VNI, MAC_B, VTEP_B)
    dp.sa_add(0, "out", SecurityAssociation(SPI_VF, "tunnel", VM_A, VM_B, "aes-gcm", KEY_VF,
                                            esn=True))
    dp.policy_set(0, [{"dir": "out", "src": VM_A, "dst": VM_B, "action": "protect",
                       "spi": SPI_VF}])
    return dp


def run_case(lanes: int, frame: bytes, burst: int, seconds: float) -> dict[str, float]:
    """`lanes` threads, each its own lane, for `seconds`: packets/s and CPU ns/packet."""
    dp = host(lanes)
    per_burst = [0] * lanes
    counts = [0] * lanes
    cpu = [0.0] * lanes
    errors: list[BaseException] = []
    start = threading.Barrier(lanes + 1)
    stop = threading.Event()

    def worker(qp: int) -> None:
        try:
            inb = Batch(burst, slot_size=len(frame) + 1024, headroom=64)
            for _ in range(burst):
                inb.push(frame)
            out = Batch(burst * 64, slot_size=OUT_SLOT)
            loc = Batch(16, slot_size=OUT_SLOT)
            dp.tx_burst(0, inb, 0, out, loc, qp=qp)     # warm up, and the packet count
            per_burst[qp] = out.count
            start.wait()
            c0, n = time.thread_time(), 0
            while not stop.is_set():
                out.count = 0
                if dp.tx_burst(0, inb, 0, out, loc, qp=qp) != burst or \
                        out.count != per_burst[qp]:
                    raise BenchError(f"lane {qp}: {out.count} packets, expected "
                                     f"{per_burst[qp]}")
                n += out.count
            cpu[qp] = time.thread_time() - c0
            counts[qp] = n
        except BaseException as e:      # surfaced by the caller
            errors.append(e)
            if not start.broken:
                start.abort()

    threads = [threading.Thread(target=worker, args=(q,)) for q in range(lanes)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    total = sum(counts)
    c = dp.vf_counters(0)
    if c["drops"] or c["tx_packets"] != total + sum(per_burst):
        raise BenchError(f"drops or lost packets: {c}")
    return {"pps": total / wall, "cpu_ns_per_pkt": sum(cpu) * 1e9 / total}


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--quick", action="store_true", help="tiny durations (smoke test)")
    a = ap.parse_args(argv)
    if a.quick:
        a.rounds, a.seconds = 1, 0.05
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cases = {"tso": (tso_frame(), 4), "small": (small_frame(), 128)}
    res: dict[str, Any] = {"benchmark": "softnic-lanes", "lanes": a.lanes, "cpus": cpus,
                           "rounds": a.rounds, "seconds": a.seconds, "quick": a.quick,
                           "loadavg": list(os.getloadavg()), "cases": {}}
    try:
        for name, (frame, burst) in cases.items():
            one: dict[str, list[float]] = {"pps": [], "cpu_ns_per_pkt": []}
            many: dict[str, list[float]] = {"pps": [], "cpu_ns_per_pkt": []}
            for _ in range(a.rounds):          # interleaved: drift hits both alike
                for store, lanes in ((one, 1), (many, a.lanes)):
                    r = run_case(lanes, frame, burst, a.seconds)
                    for k in store:
                        store[k].append(r[k])
            cell = {"one_lane": {k: _summary(v) for k, v in one.items()},
                    f"{a.lanes}_lanes": {k: _summary(v) for k, v in many.items()}}
            cell["scaling"] = (statistics.median(many["pps"]) /
                               statistics.median(one["pps"]))
            cell["cpu_cost_ratio"] = (statistics.median(many["cpu_ns_per_pkt"]) /
                                      statistics.median(one["cpu_ns_per_pkt"]))
            res["cases"][name] = cell
            print(f"{name:5s}  1 lane: {statistics.median(one['pps']) / 1e6:6.2f} Mpkt/s "
                  f"{statistics.median(one['cpu_ns_per_pkt']):6.0f} CPU ns/pkt   "
                  f"{a.lanes} lanes, one SA: {statistics.median(many['pps']) / 1e6:6.2f} "
                  f"Mpkt/s {statistics.median(many['cpu_ns_per_pkt']):6.0f} CPU ns/pkt   "
                  f"scaling x{cell['scaling']:.2f} (on {cpus} CPUs), CPU per packet "
                  f"x{cell['cpu_cost_ratio']:.2f}")
    except BenchError as e:
        print(f"lanes: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
