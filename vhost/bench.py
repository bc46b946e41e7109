"""Frames per second through a vhost-user loopback device (virtio 1.1 §2.6 split rings,
§5.1.6 virtio-net) driven by vhost.testing's frontend.

The back-end runs in a child process (its own GIL, as a real daemon would); the frontend
runs here. Two runs, same frontend, same frame: "sink" (the device only returns TX
buffers: the frontend's own ceiling) and "echo" (TX -> RX back to the frontend).

    python -m vhost.bench [--size 64] [--seconds 3] [--batch 256]

Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time

from vhost.backend import VhostUserServer
from vhost.testing import VNET_HDR, LoopbackDevice, VhostUserFrontend


def _serve(path: str, mode: str, batch: int, ready: mp.synchronize.Event,
           done: mp.synchronize.Event) -> None:
    srv = VhostUserServer(path, LoopbackDevice(mode=mode, batch=batch, cap=2048)).start()
    ready.set()
    done.wait()
    srv.stop()


def run(mode: str, size: int, seconds: float, batch: int, num: int = 1024) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bench.sock")
        ready, done = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_serve, args=(path, mode, batch, ready, done), daemon=True)
        child.start()
        try:
            ready.wait(30)
            with VhostUserFrontend(path, mem_size=16 << 20) as fe:
                fe.start(num=num, buf_size=2048)
                tx, rx = fe.ring(1), fe.ring(0)
                frame = VNET_HDR + bytes(range(256)) * (size // 256) + bytes(size % 256)
                sent = got = 0
                rates: list[float] = []  # per 0.25 s window: the machine is shared
                t0 = time.perf_counter()
                end = t0 + seconds
                w_start, w_done = t0, 0
                while True:
                    now = time.perf_counter()
                    if now >= w_start + 0.25:
                        done_now = got if mode == "echo" else sent
                        rates.append((done_now - w_done) / (now - w_start))
                        w_start, w_done = now, done_now
                        if now >= end:
                            break
                    sent += tx.send_burst(frame, batch)
                    if mode == "echo":
                        got += rx.recv_count(num)
                settle = time.perf_counter() + 0.2  # drain what is in flight
                while mode == "echo" and time.perf_counter() < settle:
                    got += rx.recv_count(num)
                rates.sort()
                return {"median_fps": rates[len(rates) // 2], "best_fps": rates[-1],
                        "sent": sent, "received": got}
        finally:
            done.set()
            child.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="Ethernet frame bytes")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    sink = run("sink", a.size, a.seconds, a.batch)
    echo = run("echo", a.size, a.seconds, a.batch)
    print(f"{a.size}-byte frames, batch {a.batch}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}; median (best) of 0.25 s windows")
    for name, r in (("frontend ceiling (sink)", sink), ("echo (TX -> RX)", echo)):
        print(f"  {name:24s} {r['median_fps'] / 1e6:6.2f} ({r['best_fps'] / 1e6:.2f}) Mframes/s")
    print(f"  echo delivered {echo['received']} of {echo['sent']} frames")
    print(json.dumps({"frame_bytes": a.size, "batch": a.batch,
                      "sink_fps": round(sink["median_fps"]),
                      "sink_best_fps": round(sink["best_fps"]),
                      "echo_fps": round(echo["median_fps"]),
                      "echo_best_fps": round(echo["best_fps"]),
                      "echo_sent": echo["sent"], "echo_received": echo["received"]}))


if __name__ == "__main__":
    main()
