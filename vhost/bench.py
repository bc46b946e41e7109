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
                t0 = time.perf_counter()
                end = t0 + seconds
                while time.perf_counter() < end:
                    sent += tx.send_burst(frame, batch)
                    if mode == "echo":
                        got += rx.recv_count(num)
                # drain what is in flight
                settle = time.perf_counter() + 0.2
                while mode == "echo" and time.perf_counter() < settle:
                    got += rx.recv_count(num)
                elapsed = time.perf_counter() - t0
                tx.reclaim()
                done_frames = got if mode == "echo" else sent - (num - tx.nfree)
                return {"frames_per_s": done_frames / elapsed, "sent": sent,
                        "received": got, "seconds": elapsed}
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
    print(f"{a.size}-byte frames, batch {a.batch}, {os.cpu_count()} cpus")
    print(f"  frontend ceiling (sink): {sink['frames_per_s'] / 1e6:.2f} Mframes/s")
    print(f"  echo (TX -> RX):         {echo['frames_per_s'] / 1e6:.2f} Mframes/s "
          f"({echo['received']} of {echo['sent']} back)")
    print(json.dumps({"frame_bytes": a.size, "batch": a.batch,
                      "sink_fps": round(sink["frames_per_s"]),
                      "echo_fps": round(echo["frames_per_s"]),
                      "echo_sent": echo["sent"], "echo_received": echo["received"]}))


if __name__ == "__main__":
    main()
