"""Throughput of softnic's whole data plane, each figure beside its limit from the same run.

Issue 2, "Proof": TSO -> ESP (AES-128-GCM, RFC 4106) -> VXLAN (RFC 7348) from 64 KB
frames, with the MSS the data plane derives so every packet fits a 1500-byte underlay,
and 64-byte frames through ESP + VXLAN; TX and RX (decrypt + decap). The limit beside
each figure is benchmarks/rawcrypto.py: an independent cffi-compiled C loop over each
engine's raw AES-128-GCM at the same size as the ESP payload the pipeline produced,
measured in the same rounds (a shared machine drifts; interleaving keeps the ratio fair).
softnic._crypto.bench_seal (softnic's own per-packet crypto call) is shown as well.

Method: one Datapath per simulated host (softnic._fastpath, no kernel, no sockets).
time.perf_counter around many tx_burst / rx_burst calls (each releases the GIL and runs
the whole burst in C); per round at least --seconds; --rounds rounds; median, min, max.
RX replays packets TX produced, in sequence order, with a fresh inbound SA per pass (so
anti-replay sees each sequence number once); refilling the input batches is not timed.
Every burst is checked: a dropped frame or packet aborts the run rather than flatter it.

    python benchmarks/pipeline.py            # full run (about a minute)
    python benchmarks/pipeline.py --quick    # seconds; what the smoke test runs

The last line printed is one JSON object; benchmarks/README.md documents its keys.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The repository first and this folder last (for rawcrypto): benchmarks/vhost.py must not
# shadow the vhost package, whatever put this folder on the path (running the script does).
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or ".") not in (ROOT, HERE)]
sys.path.append(HERE)

import rawcrypto  # noqa: E402

from softnic._batch import Batch  # noqa: E402
from softnic._crypto import bench_seal  # noqa: E402
from softnic._esp import SecurityAssociation  # noqa: E402
from softnic._fastpath import Datapath  # noqa: E402
from softnic._tso import make_vnet_hdr  # noqa: E402

UNDERLAY_MTU = 1500
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"
VM_A, VM_B = "192.168.10.1", "192.168.10.2"
VTEP_A, VTEP_B = "10.99.0.1", "10.99.0.2"
VNI = 100
SPI_VF, SPI_UL = 0x1000, 0x2000
# Benchmark-only key material (AES-128 key || 4-byte salt); never printed.
KEY_VF = bytes(range(16)) + b"\xde\xad\xbe\xef"
KEY_UL = bytes(range(100, 116)) + b"\x01\x02\x03\x04"
TSO_PAYLOAD = 65535 - 20 - 20      # the largest IPv4 TSO frame: 64 KB of IP
SMALL_FRAME = 64                   # Ethernet frame without FCS
GSO_SIZE = 65535                   # the guest leaves the MSS to the data plane
OUT_SLOT = UNDERLAY_MTU + 576      # as the tests: headroom + encapsulations + tail
TSO_FLOOR = 0.70                   # issue 2: full path / raw of the fastest engine
SMALL_FLOOR = 1_000_000            # issue 2: 64-byte packets/s per core


class BenchError(RuntimeError):
    """The pipeline dropped or lost packets: the figure would be meaningless."""


# ---- inputs ----------------------------------------------------------------------------

def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _ipv4(proto: int, l4: bytes, src: str, dst: str) -> bytes:
    sa = bytes(int(x) for x in src.split("."))
    da = bytes(int(x) for x in dst.split("."))
    hdr = bytearray(b"\x45\x00" + (20 + len(l4)).to_bytes(2, "big") + b"\x00\x01\x40\x00"
                    + bytes([64, proto]) + b"\x00\x00" + sa + da)
    hdr[10:12] = (~_csum(bytes(hdr)) & 0xFFFF).to_bytes(2, "big")
    pseudo = sa + da + bytes([0, proto]) + len(l4).to_bytes(2, "big")
    l4b = bytearray(l4)
    off = 16 if proto == 6 else 6
    c = ~_csum(pseudo + bytes(l4b)) & 0xFFFF
    l4b[off:off + 2] = (c or 0xFFFF).to_bytes(2, "big")
    return bytes(hdr) + bytes(l4b)


def _eth(payload: bytes) -> bytes:
    mac = bytes.fromhex(MAC_B.replace(":", "")) + bytes.fromhex(MAC_A.replace(":", ""))
    return mac + b"\x08\x00" + payload


def tso_frame(payload_len: int = TSO_PAYLOAD) -> bytes:
    """virtio-net header (GSO_TCPV4, NEEDS_CSUM) + one 64 KB TCP/IPv4 frame."""
    payload = bytes((i * 7 + 3) & 0xFF for i in range(payload_len))
    tcp = (b"\x9c\x40\x13\x89" + (1000).to_bytes(4, "big") + bytes(4)
           + b"\x50\x18\x02\x00" + bytes(4) + payload)
    frame = _eth(_ipv4(6, tcp, VM_A, VM_B))
    return make_vnet_hdr(1, 1, 14 + 20 + 20, GSO_SIZE, 14 + 20, 16) + frame


def small_frame(size: int = SMALL_FRAME) -> bytes:
    """virtio-net header (no offload) + one `size`-byte UDP/IPv4 Ethernet frame."""
    data = bytes(size - 14 - 20 - 8)
    udp = b"\x9c\x40\x13\x89" + (8 + len(data)).to_bytes(2, "big") + b"\x00\x00" + data
    return make_vnet_hdr() + _eth(_ipv4(17, udp, VM_A, VM_B))


def esp_ct_len(pkt: bytes, model: str) -> int:
    """Bytes AES-GCM encrypted in one underlay packet (ESP payload, padding and trailer;
    no header, IV or ICV): the size the raw reference is measured at."""
    ihl = (pkt[0] & 15) * 4
    if model == "device":           # outer IPv4 / ESP / IV / [UDP VXLAN Eth IP ...] / ICV
        if pkt[9] != 50:
            raise BenchError("device model: outer packet is not ESP")
        return len(pkt) - ihl - 8 - 8 - 16
    inner = ihl + 8 + 8 + 14        # outer IPv4 / UDP / VXLAN / Eth / IPv4 / ESP ...
    if pkt[inner + 9] != 50:
        raise BenchError("host model: inner packet is not ESP")
    return len(pkt) - inner - (pkt[inner] & 15) * 4 - 8 - 8 - 16


# ---- the two hosts ---------------------------------------------------------------------

class Pair:
    """Host A (sender) and host B (receiver) for one model and engine."""

    def __init__(self, model: str, engine: str):
        self.model, self.engine = model, engine
        ul = "esp" if model == "device" else "off"
        self.a = Datapath(VTEP_A, UNDERLAY_MTU, ipsec=ul)
        self.b = Datapath(VTEP_B, UNDERLAY_MTU, ipsec=ul)
        vf_mode = "enforce" if model == "host" else "off"
        self.a.set_vf(0, MAC_A, VNI, ipsec=vf_mode)
        self.b.set_vf(0, MAC_B, VNI, ipsec=vf_mode)
        self.a.fdb_add(VNI, MAC_B, VTEP_B)
        self.b.fdb_add(VNI, MAC_A, VTEP_A)
        if model == "host":
            # Host-terminated: the VM's own SA, tunnel mode between the VMs' addresses.
            self.a.sa_add(0, "out", self._sa("out"))
            self.a.policy_set(0, [{"dir": "out", "src": VM_A, "dst": VM_B, "action": "protect",
                                          "spi": SPI_VF}])
        else:
            # Device-terminated: the host's SA between the VTEPs, transport mode (the
            # outer header already names both ends; tunnel mode would add 20 bytes).
            self.a.sa_add(-1, "out", self._sa("out"))
        self.rx_sa: Any = None

    def _sa(self, direction: str) -> SecurityAssociation:
        window = 4096 if direction == "in" else 64
        if self.model == "host":
            return SecurityAssociation(SPI_VF, "tunnel", VM_A, VM_B, "aes-gcm", KEY_VF,
                                       replay_window=window, engine=self.engine)
        return SecurityAssociation(SPI_UL, "transport", VTEP_A, VTEP_B, "aes-gcm", KEY_UL,
                                   replay_window=window, engine=self.engine)

    def fresh_rx_sa(self) -> None:
        """A new inbound SA (empty replay window) so a pass can replay the same packets."""
        scope = 0 if self.model == "host" else -1
        spi = SPI_VF if self.model == "host" else SPI_UL
        if self.rx_sa is not None:
            self.b.sa_del(scope, "in", spi)
        self.rx_sa = self._sa("in")
        self.b.sa_add(scope, "in", self.rx_sa)
        if self.model == "host":
            self.b.policy_set(0, [{"dir": "in", "src": VM_A, "dst": VM_B, "action": "protect",
                                         "spi": SPI_VF}])


# ---- timing ----------------------------------------------------------------------------

def _pin(cpu: int | None) -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    target = allowed[-1] if cpu is None else cpu
    os.sched_setaffinity(0, {target})
    return target


CHUNK_S = 0.02          # timing chunk: the median chunk is robust to pre-emption


class Timing:
    """Units (bursts or passes) timed in chunks: the rate is the median chunk's."""

    def __init__(self) -> None:
        self.units, self.wall, self.cpu = 0, 0.0, 0.0
        self.rates: list[float] = []

    def add(self, units: int, dt: float) -> None:
        self.units += units
        self.wall += dt
        self.rates.append(units / dt if dt > 0 else 0.0)

    @property
    def rate(self) -> float:
        """Units per second of the median chunk."""
        return statistics.median(self.rates)


class TxRun:
    """A reusable TX burst: the same input frames every call (TX reads them, never
    writes them), the output batches reset by count."""

    def __init__(self, pair: Pair, frame: bytes, burst: int, out_slots: int):
        self.pair = pair
        self.inb = Batch(burst, slot_size=len(frame) + 1024, headroom=64)
        for _ in range(burst):
            self.inb.push(frame)
        self.out = Batch(out_slots, slot_size=OUT_SLOT)
        self.loc = Batch(16, slot_size=OUT_SLOT)
        self.burst = burst
        self.per_burst = -1

    def once(self) -> int:
        """One burst; returns underlay packets produced (checked against the first)."""
        out, loc = self.out, self.loc
        out.count = 0
        loc.count = 0
        if self.pair.a.tx_burst(0, self.inb, 0, out, loc) != self.burst:
            raise BenchError("tx_burst: output batch too small")
        n = out.count
        if self.per_burst < 0:
            self.per_burst = n
        if n != self.per_burst or n == 0 or loc.count:
            raise BenchError(f"tx: {n} packets, expected {self.per_burst} "
                             f"(drops: {self.pair.a.vf_counters(0)['drops']})")
        return n

    def packets(self) -> list[bytes]:
        return [self.out.get(i) for i in range(self.out.count)]

    def timed(self, seconds: float) -> Timing:
        """Bursts for at least `seconds`, in chunks of ~CHUNK_S (as rawcrypto.measure)."""
        clock, once = time.perf_counter, self.once
        chunk = min(CHUNK_S, seconds / 4)
        t = Timing()
        c0 = time.process_time()
        t0 = clock()
        end = t0 + seconds
        while True:
            n = 0
            ts = clock()
            while True:
                once()
                n += 1
                te = clock()
                if te - ts >= chunk:
                    break
            t.add(n, te - ts)
            if te >= end:
                t.cpu = time.process_time() - c0
                return t


class RxRun:
    """RX over a pool of underlay packets in sequence order: each pass installs a fresh
    inbound SA, refills the batches (untimed), then times rx_burst over all of them."""

    def __init__(self, pair: Pair, pool: list[bytes], burst: int):
        self.pair = pair
        self.pool = pool
        self.batches = [Batch(burst) for _ in range((len(pool) + burst - 1) // burst)]

    def _fill(self) -> None:
        self.pair.fresh_rx_sa()
        it = iter(self.pool)
        for b in self.batches:
            b.clear()
            for _ in range(b.size):
                p = next(it, None)
                if p is None:
                    break
                b.push(p)

    def timed(self, seconds: float) -> Timing:
        """Passes over the pool for at least `seconds` of rx_burst, in chunks of passes
        adding up to ~CHUNK_S of rx_burst time (like TX's chunks, so pre-emption weighs
        the same on both). Wall and CPU time count only the rx_burst calls."""
        clock, cpu, rx = time.perf_counter, time.process_time, self.pair.b.rx_burst
        chunk = min(CHUNK_S, seconds / 4)
        t = Timing()
        n, spent = 0, 0.0
        while True:
            self._fill()
            c0 = cpu()
            t0 = clock()
            for b in self.batches:
                if rx(b) != b.count:
                    raise BenchError(f"rx: drops {self.pair.b.vf_counters(0)['drops']} "
                                     f"{self.pair.b.uplink_counters()['drops']}")
            spent += clock() - t0
            t.cpu += cpu() - c0
            n += 1
            if spent >= chunk:
                t.add(n, spent)
                n, spent = 0, 0.0
                if t.wall >= seconds:
                    return t


def raw_cpu_ns(engine: str, size: int, measured: dict[str, Any], chunk: float) -> float:
    """CPU time per seal of the reference C loop (benchmarks/rawcrypto.py's, the loop
    `measure` times by the wall clock): a few ~20 ms chunks, the median. Robust where
    other processes share the CPU, as the pipeline's cpu_ns_per_pkt is."""
    lib = rawcrypto._load()
    eid = rawcrypto.ENGINE_IDS[engine]
    n = max(256, int(chunk * 1e9 / measured["best_ns_per_op"]))
    per_op = []
    for _ in range(3):
        c0 = time.process_time()
        if lib.raw_seal_loop(eid, size, n) < 0:
            raise BenchError(f"{engine}: raw seal loop failed")
        per_op.append((time.process_time() - c0) * 1e9 / n)
    return statistics.median(per_op)


def _summary(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


# ---- one figure: TX and RX of one input shape, both models' engines, raw beside -------

def figure(model: str, kind: str, engines: list[str], args: argparse.Namespace,
           log: Callable[[str], None]) -> dict[str, Any]:
    """TX + RX for `kind` ("tso" or "small") in `model` ("host"/"device"), per engine,
    interleaved round by round with the raw reference at the produced ESP size."""
    frame = tso_frame() if kind == "tso" else small_frame()
    burst = args.tso_burst if kind == "tso" else args.burst
    payload = TSO_PAYLOAD if kind == "tso" else SMALL_FRAME - 14 - 20 - 8
    runs: dict[str, tuple[TxRun, RxRun]] = {}
    shape: dict[str, Any] = {}
    for eng in engines:
        pair = Pair(model, eng)
        tx = TxRun(pair, frame, burst, out_slots=burst * 64 if kind == "tso" else burst)
        tx.once()
        sample = tx.packets()
        # The RX pool: whole TX bursts, in sequence order (at least ~2000 packets).
        pool: list[bytes] = []
        while len(pool) < args.pool:
            tx.once()
            pool.extend(tx.packets())
        cts = [esp_ct_len(p, model) for p in sample]
        shape = {
            "frame_bytes": len(frame) - 12,
            "inner_payload_bytes": payload,
            "burst_frames": burst,
            "packets_per_frame": len(sample) // burst,
            "underlay_bytes_max": max(len(p) for p in sample),
            "esp_ct_bytes": max(cts),          # a full segment: what raw is measured at
            "mss": pair.a.mss_for(0, 4, SPI_VF if model == "host" else -1)
            if kind == "tso" else None,
        }
        if shape["underlay_bytes_max"] > UNDERLAY_MTU:
            raise BenchError("an underlay packet exceeds the MTU")
        runs[eng] = (tx, RxRun(pair, pool, args.burst))
        shape["_ct_per_burst"] = sum(cts)
        shape["_pool_frames"] = len(pool) // len(sample) * burst
    ct_size = shape["esp_ct_bytes"]
    raw_sizes = sorted({ct_size, 64} if kind == "small" else {ct_size})
    ct_per_burst = shape.pop("_ct_per_burst")
    pool_frames = shape.pop("_pool_frames")
    samples: dict[str, dict[str, list[float]]] = {}

    def add(key: str, name: str, v: float) -> None:
        samples.setdefault(key, {}).setdefault(name, []).append(v)

    for _ in range(args.rounds):
        for eng, (tx, rx) in runs.items():
            t = tx.timed(args.seconds)
            add(f"{eng}.tx", "cpu_ns_per_pkt", t.cpu * 1e9 / (t.units * tx.per_burst))
            add(f"{eng}.tx", "cpu_share", t.cpu / t.wall)
            add(f"{eng}.tx", "pps", t.rate * tx.per_burst)
            add(f"{eng}.tx", "inner_gbps", t.rate * burst * payload * 8 / 1e9)
            add(f"{eng}.tx", "ct_gbps", t.rate * ct_per_burst * 8 / 1e9)
            t = rx.timed(args.seconds)
            add(f"{eng}.rx", "cpu_ns_per_pkt", t.cpu * 1e9 / (t.units * len(rx.pool)))
            add(f"{eng}.rx", "cpu_share", t.cpu / t.wall)
            add(f"{eng}.rx", "pps", t.rate * len(rx.pool))
            add(f"{eng}.rx", "inner_gbps", t.rate * pool_frames * payload * 8 / 1e9)
            add(f"{eng}.rx", "ct_gbps",
                t.rate * ct_per_burst * len(rx.pool) / tx.per_burst * 8 / 1e9)
        for eng in engines:
            for size in raw_sizes:
                r = rawcrypto.measure(eng, size, args.raw_seconds)
                add(f"raw.{eng}.{size}", "gbps", r["gbps"])
                add(f"raw.{eng}.{size}", "pps", r["ops_per_s"])
                add(f"raw.{eng}.{size}", "cpu_ns_per_op", raw_cpu_ns(eng, size, r,
                                                                  min(CHUNK_S, args.raw_seconds / 3)))
                iters = max(1000, int(r["ops_per_s"] * args.raw_seconds))
                c0 = time.process_time()
                s = bench_seal("aes-gcm", engine=eng, size=size, iterations=iters)
                cpu_ns = (time.process_time() - c0) * 1e9 / iters
                add(f"softnic_seal.{eng}.{size}", "gbps", s["gbps"])
                add(f"softnic_seal.{eng}.{size}", "pps", s["ops_per_s"])
                add(f"softnic_seal.{eng}.{size}", "cpu_ns_per_op", cpu_ns)
        # Ratios per round: this round's pipeline over this round's fastest raw engine,
        # by the wall clock and by CPU time (the latter stands on a loaded machine).
        best = max(samples[f"raw.{e}.{ct_size}"]["gbps"][-1] for e in engines)
        best_cpu = min(samples[f"raw.{e}.{ct_size}"]["cpu_ns_per_op"][-1] for e in engines)
        for eng in engines:
            for d in ("tx", "rx"):
                cell = samples[f"{eng}.{d}"]
                add(f"{eng}.{d}", "ratio_raw_fastest", cell["ct_gbps"][-1] / best)
                # ct bytes per packet on average (the last TSO segment is short) over
                # ct_size per raw op: the ratio of bytes sealed per CPU-second.
                per_pkt = ct_per_burst / tx.per_burst
                add(f"{eng}.{d}", "ratio_raw_fastest_cpu",
                    (per_pkt / cell["cpu_ns_per_pkt"][-1]) / (ct_size / best_cpu))

    out: dict[str, Any] = dict(shape)
    for key, vals in samples.items():
        node = out
        parts = key.split(".")
        for part in parts:
            node = node.setdefault(part, {})
        for name, xs in vals.items():
            node[name] = _summary(xs)
        if parts[-1] in ("tx", "rx"):
            node["ns_per_pkt"] = 1e9 / node["pps"]["median"]
    raw_med = {e: out["raw"][e][str(ct_size)]["gbps"]["median"] for e in engines}
    out["fastest_engine"] = max(raw_med, key=lambda e: raw_med[e])
    log(_table(model, kind, out, engines, raw_sizes))
    return out


def profile(cell: str, engine: str, args: argparse.Namespace,
            log: Callable[[str], None]) -> dict[str, Any]:
    """One TX or RX cell alone for args.seconds (nothing else runs, so a profiler's
    samples are the pipeline's; RX counts the untimed refills too, Batch.push)."""
    try:
        fig, d = cell.split(".")
        kind, model = fig.split("_")
        if kind not in ("tso", "small") or model not in ("host", "device") or \
                d not in ("tx", "rx"):
            raise ValueError
    except ValueError:
        raise BenchError(f"--profile: {cell!r} is not FIGURE.DIR, e.g. tso_host.tx") from None
    pair = Pair(model, engine)
    frame = tso_frame() if kind == "tso" else small_frame()
    burst = args.tso_burst if kind == "tso" else args.burst
    tx = TxRun(pair, frame, burst, out_slots=burst * 64 if kind == "tso" else burst)
    tx.once()
    if d == "tx":
        t = tx.timed(args.seconds)
        pkts = t.units * tx.per_burst
    else:
        pool: list[bytes] = []
        while len(pool) < args.pool:
            tx.once()
            pool.extend(tx.packets())
        rx = RxRun(pair, pool, args.burst)
        t = rx.timed(args.seconds)
        pkts = t.units * len(pool)
    res = {"cell": cell, "engine": engine, "packets": pkts,
           "cpu_ns_per_pkt": t.cpu * 1e9 / pkts, "pps": t.rate * pkts / t.units}
    log(json.dumps(res))
    return res


def _table(model: str, kind: str, f: dict[str, Any], engines: list[str],
           raw_sizes: list[int]) -> str:
    def m(d: dict[str, Any]) -> float:
        return float(d["median"])

    head = (f"\n== {kind} {model}-terminated: {f['frame_bytes']}-byte frames, "
            f"{f['packets_per_frame']} packets each"
            + (f" (MSS {f['mss']})" if f["mss"] else "")
            + f", ESP payload {f['esp_ct_bytes']} B, underlay <= {f['underlay_bytes_max']} B")
    lines = [head, f"{'':22}{'Mpkt/s':>9}{'ns/pkt':>9}{'inner Gb/s':>12}{'ESP Gb/s':>10}"
             f"{'vs raw':>8}{'cpu ns':>8}{'vs raw':>8}{'  (min..max Mpkt/s)'}"]
    for eng in engines:
        for d in ("tx", "rx"):
            r = f[eng][d]
            lines.append(
                f"{eng + ' ' + d:22}{m(r['pps']) / 1e6:>9.3f}{r['ns_per_pkt']:>9.0f}"
                f"{m(r['inner_gbps']):>12.2f}{m(r['ct_gbps']):>10.2f}"
                f"{m(r['ratio_raw_fastest']):>8.0%}{m(r['cpu_ns_per_pkt']):>8.0f}"
                f"{m(r['ratio_raw_fastest_cpu']):>8.0%}"
                f"  ({r['pps']['min'] / 1e6:.3f}..{r['pps']['max'] / 1e6:.3f})")
    for eng in engines:
        for size in raw_sizes:
            for src in ("raw", "softnic_seal"):
                r = f[src][eng][str(size)]
                lines.append(f"{src + ' ' + eng + ' ' + str(size) + 'B':22}"
                             f"{m(r['pps']) / 1e6:>9.3f}{1e9 / m(r['pps']):>9.0f}"
                             f"{'':>12}{m(r['gbps']):>10.2f}{'':>8}"
                             f"{m(r['cpu_ns_per_op']):>8.0f}")
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny durations (smoke test)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=0.3, help="per round and figure")
    ap.add_argument("--burst", type=int, default=128, help="frames per burst, 64-byte case")
    ap.add_argument("--tso-burst", type=int, default=8, help="64 KB frames per burst")
    ap.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: last)")
    ap.add_argument("--engine", action="append", help="only this engine (repeatable)")
    ap.add_argument("--profile", metavar="FIGURE.DIR",
                    help="run only this cell (e.g. tso_host.tx) for --seconds, without "
                         "the reference, for perf/callgrind; prints CPU ns per packet")
    a = ap.parse_args(argv)
    a.raw_seconds = a.seconds / 2
    a.pool = 2048
    if a.quick:
        a.rounds, a.seconds, a.raw_seconds, a.pool = 2, 0.01, 0.005, 64
        a.burst, a.tso_burst = min(a.burst, 32), 1
    return a


def run(argv: list[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    args = parse_args(argv)
    cpu = _pin(args.cpu)
    engines = rawcrypto.engines()
    if args.engine:
        engines = [e for e in engines if e in args.engine]
    if not engines:
        raise BenchError("no crypto engine available")
    log(f"softnic pipeline benchmark: engines {', '.join(engines)}; pinned to CPU {cpu}; "
        f"{args.rounds} rounds x {args.seconds:g} s; underlay MTU {UNDERLAY_MTU}; "
        f"AES-128-GCM, ICV 16")
    if args.profile:
        return profile(args.profile, engines[0], args, log)
    gc.disable()        # no collector pauses inside a timed round
    try:
        figs = {f"{kind}_{model}": figure(model, kind, engines, args, log)
                for kind in ("tso", "small") for model in ("host", "device")}
    finally:
        gc.enable()
    fastest = figs["tso_host"]["fastest_engine"]
    tso_tx = figs["tso_host"][fastest]["tx"]
    small_tx = figs["small_host"][fastest]["tx"]
    tso_wall = tso_tx["ratio_raw_fastest"]["median"]
    tso_cpu = tso_tx["ratio_raw_fastest_cpu"]["median"]
    small_wall = small_tx["pps"]["median"]
    small_cpu = 1e9 / small_tx["cpu_ns_per_pkt"]["median"]
    result = {
        "benchmark": "softnic-pipeline",
        "version": 1,
        "quick": args.quick,
        "cpu": cpu,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "rounds": args.rounds,
        "seconds_per_round": args.seconds,
        "underlay_mtu": UNDERLAY_MTU,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "engines": engines,
        "fastest_engine": fastest,
        "figures": figs,
        "floors": {
            # The verdicts use CPU time, which a loaded machine does not distort; the
            # wall-clock figures and verdicts are beside them (equal on an idle machine).
            "basis": "cpu",
            "tso_ratio_floor": TSO_FLOOR,
            "tso_ratio_cpu": tso_cpu,
            "tso_ratio_wall": tso_wall,
            "tso_ratio_ok": tso_cpu >= TSO_FLOOR,
            "tso_ratio_wall_ok": tso_wall >= TSO_FLOOR,
            "small_pps_floor": SMALL_FLOOR,
            "small_pps_cpu": small_cpu,
            "small_pps_wall": small_wall,
            "small_pps_ok": small_cpu >= SMALL_FLOOR,
            "small_pps_wall_ok": small_wall >= SMALL_FLOOR,
        },
    }
    f = result["floors"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    log(f"\nfloors ({fastest}, host-terminated TX; CPU time, wall clock in brackets): "
        f"TSO path {tso_cpu:.0%} [{tso_wall:.0%}] of raw, floor {TSO_FLOOR:.0%}: "
        f"{verdict(f['tso_ratio_ok'])} [{verdict(f['tso_ratio_wall_ok'])}]; 64-byte "
        f"{small_cpu / 1e6:.2f} [{small_wall / 1e6:.2f}] Mpkt/s per core, floor 1 M: "
        f"{verdict(f['small_pps_ok'])} [{verdict(f['small_pps_wall_ok'])}]")
    log(json.dumps(result, sort_keys=True))
    return result


def main(argv: list[str] | None = None) -> int:
    try:
        run(argv)
    except BenchError as e:
        print(f"pipeline benchmark: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
