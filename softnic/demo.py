"""`make demo` (`python -m softnic.demo`): softnic's main job, end to end.

Two "hypervisors" in network namespaces, joined by a 1500-byte veth underlay, each running
`softnic run` with two VMs behind TAP VFs (softnic.scenario). SAs and policies go in
through each daemon's admin socket; traffic (ping, a hashed TCP transfer) crosses both
IPsec models of DESIGN.md:

  host-terminated    RFC 4303 ESP tunnel mode between the VMs' own addresses, SPIs scoped
                     per VF, then RFC 7348 VXLAN (outer UDP source port from SPI + inner
                     addresses);
  device-terminated  VXLAN first, then ESP transport mode between the VTEPs, carried in
                     UDP 4500 (RFC 3948), two SAs per direction chosen by the inner flow.

A capture of the underlay is checked with an implementation nobody here wrote (scapy
decodes and decrypts it). Every claim printed is a check; exit status 0 only if all hold,
1 if one failed, 2 if the machine cannot run the demo (it needs root), 130 if interrupted.
Keys never appear in the output: the commands shown carry `<redacted>` in their place,
and everything printed passes a filter that would redact a key all the same.
"""

from __future__ import annotations

import argparse
import collections
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

MTU = 1500
REDACTED = "<redacted>"
VXLAN_PORT = 4789
NATT_PORT = 4500

# Drop reasons a clean run must never count: each would mean corrupted or misrouted ESP.
# (no_sa / policy do occur: packets the VMs send before the SAs exist, or IPv6 chatter
# that an `enforce` VF discards because no policy protects it.)
NEVER_DROPS = ("icv", "bad_trailer", "malformed_esp", "crypto", "bad_vxlan")

WHY = {
    "no_sa": "no SA yet / for that SPI", "policy": "no policy protects it (enforce)",
    "replay": "anti-replay window", "icv": "ICV check failed", "ring_full": "receiver full",
    "no_fdb": "no remote VTEP", "unknown_vni": "VNI of no VF", "too_big": "over tunnel MTU",
}

THROUGHPUT: dict[str, float] = {}     # model -> Gbit/s of the headline transfer

ALG_XFRM = {"aes-gcm": "rfc4106(gcm(aes))", "chacha20-poly1305": "rfc7539esp(chacha20,poly1305)"}


# ---- output ------------------------------------------------------------------------------

class Out:
    """All the demo prints goes through here: redaction of key material (defence in
    depth: nothing should ever carry a key here), optional colour on a terminal."""

    def __init__(self, secrets: Iterable[bytes], stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.secrets = sorted({s.hex() for s in secrets if s}, key=len, reverse=True)
        self.colour = bool(getattr(self.stream, "isatty", lambda: False)())
        enc = (getattr(self.stream, "encoding", "") or "").lower().replace("-", "")
        self.uni = enc in ("utf8", "utf_8")

    def redact(self, text: str) -> str:
        low = text.lower()
        for s in self.secrets:
            while s in low:
                i = low.index(s)
                text, low = text[:i] + REDACTED + text[i + len(s):], \
                    low[:i] + REDACTED + low[i + len(s):]
        return text

    def __call__(self, text: str = "") -> None:
        self.stream.write(self.redact(text) + "\n")
        self.stream.flush()

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def title(self, text: str) -> None:
        self()
        self(self.paint(text, "1"))
        self(("═" if self.uni else "=") * min(len(text), 88))

    def arrow(self) -> str:
        return "→" if self.uni else "->"

    def mark(self, ok: bool) -> str:
        if self.uni:
            return self.paint("✔", "32") if ok else self.paint("✘", "31;1")
        return "[ ok ]" if ok else "[FAIL]"


@dataclass
class Checks:
    """Every claim the demo makes, with whether it held."""

    out: Out
    items: list[tuple[str, bool]] = field(default_factory=list)

    def __call__(self, ok: object, text: str) -> bool:
        ok = bool(ok)
        self.items.append((text, ok))
        self.out(f"  {self.out.mark(ok)} {text}")
        return ok

    @property
    def failed(self) -> list[str]:
        return [t for t, ok in self.items if not ok]


# ---- the admin commands, shown as softnicctl would take them -----------------------------

def ctl_words(method: str, params: dict[str, Any]) -> list[str] | None:
    """The softnicctl words equivalent to an admin request, or None for a read-only one.

    Built from a whitelist of fields: a key (`key`, `auth_key`) is never read, only
    replaced by `<redacted>`, so no formatting mistake can leak one."""
    p = dict(params)
    scope = p.pop("scope", None)
    where = ["uplink"] if scope == "uplink" else ["vf", str(scope)]
    if method == "sa.add":
        w = ["sa", "add", *where, "dir", str(p["dir"]), "src", str(p["src"]),
             "dst", str(p["dst"]), "proto", "esp", "spi", f"0x{int(p['spi']):x}"]
        if p.get("reqid") is not None:
            w += ["reqid", str(p["reqid"])]
        w += ["mode", str(p.get("mode", "tunnel"))]
        alg = p.get("alg", "aes-gcm")
        if alg == "aes-cbc-hmac-sha256":
            w += ["enc", "cbc(aes)", REDACTED, "auth-trunc", "hmac(sha256)", REDACTED,
                  str(p.get("icv_bits", 128))]
        else:
            w += ["aead", ALG_XFRM.get(alg, alg), REDACTED, str(p.get("icv_bits", 128))]
        if p.get("replay_window") is not None:
            w += ["replay-window", str(p["replay_window"])]
        if p.get("esn"):
            w += ["flag", "esn"]
        if p.get("encap_sport") is not None:
            w += ["encap", "espinudp", str(p["encap_sport"]), str(p["encap_dport"]),
                  "0.0.0.0"]
        return w
    if method == "policy.add":
        w = ["policy", "add", *where, "src", str(p["src"]), "dst", str(p["dst"])]
        for k in ("proto", "sport", "dport"):
            if p.get(k) is not None:
                w += [k, str(p[k])]
        w += ["dir", str(p["dir"])]
        for k in ("priority", "action", "reqid", "spi"):
            if p.get(k) is not None:
                w += [k, str(p[k])]
        return w
    if method == "fdb.add":
        return ["fdb", "replace" if p.get("replace") else "add", "vni", str(p["vni"]),
                "mac", str(p["mac"]), "remote", str(p["remote"])]
    if method in ("sa.del", "policy.del", "fdb.del", "vf.del", "sa.flush", "vf.add"):
        return [*method.split("."), *where, "(...)"]
    return None


def _make_overlay_class(echo: Callable[[str, str, list[str]], None]) -> type:
    """softnic.scenario.Overlay, with each admin request it issues echoed as the
    equivalent softnicctl command (a wrapper: the scenario itself is not changed)."""
    from softnic.client import Client
    from softnic.scenario import Overlay

    class EchoClient(Client):
        def __init__(self, path: str, side: str, timeout: float) -> None:
            super().__init__(path, timeout=timeout)
            self.side = side

        def call(self, method: str, **params: Any) -> Any:
            words = ctl_words(method, params)
            if words is not None:
                echo(self.side, self.path, words)
            return super().call(method, **params)

    class EchoOverlay(Overlay):  # type: ignore[misc]
        def client(self, side: str) -> Client:
            return EchoClient(self.sockets[side], side, timeout=10)

    return EchoOverlay


# ---- the underlay, as captured ------------------------------------------------------------

@dataclass
class Wire:
    """What host A put on the underlay, from the capture (plain parsing, every offset
    checked: a capture may hold anything)."""

    packets: int = 0
    largest: int = 0
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    vxlan_sports: set[int] = field(default_factory=set)
    # host-terminated: (vni, inner src, inner dst, spi) -> outer source ports, packets
    flows: dict[tuple[Any, ...], list[Any]] = field(default_factory=dict)
    spis: collections.Counter[int] = field(default_factory=collections.Counter)
    esp: list[bytes] = field(default_factory=list)       # IP packets carrying ESP
    first: dict[Any, bytes] = field(default_factory=dict)  # first ESP packet per SA

    def _esp(self, spi: int, ip: bytes, vni: int | None = None) -> None:
        self.spis[spi] += 1
        self.esp.append(ip)
        self.first.setdefault((vni, spi), ip)

    def add(self, ip: bytes) -> None:
        if len(ip) < 20 or ip[0] >> 4 != 4:
            self.kinds["non-IPv4 (ARP ...)"] += 1
            return
        self.packets += 1
        self.largest = max(self.largest, len(ip))
        hl = (ip[0] & 15) * 4
        proto = ip[9]
        if proto == 50 and len(ip) >= hl + 8:
            self.kinds["ESP (IP proto 50)"] += 1
            self._esp(struct.unpack_from("!I", ip, hl)[0], ip)
            return
        if proto != 17 or len(ip) < hl + 8:
            self.kinds[f"IP proto {proto}"] += 1
            return
        sport, dport = struct.unpack_from("!HH", ip, hl)
        u = hl + 8
        if dport == NATT_PORT and len(ip) >= u + 8 and ip[u:u + 4] != b"\0\0\0\0":
            self.kinds["ESP-in-UDP 4500"] += 1
            self._esp(struct.unpack_from("!I", ip, u)[0], ip)
            return
        if dport != VXLAN_PORT or len(ip) < u + 8 + 14:
            self.kinds[f"UDP {dport}"] += 1
            return
        vni = int.from_bytes(ip[u + 4:u + 7], "big")
        self.vxlan_sports.add(sport)
        inner = u + 8 + 14
        etype = ip[inner - 2:inner]
        if etype == b"\x08\x00" and len(ip) >= inner + 20:
            ihl = (ip[inner] & 15) * 4
            src = ".".join(map(str, ip[inner + 12:inner + 16]))
            dst = ".".join(map(str, ip[inner + 16:inner + 20]))
            if ip[inner + 9] == 50 and len(ip) >= inner + ihl + 8:
                spi = struct.unpack_from("!I", ip, inner + ihl)[0]
                self.kinds["VXLAN + ESP"] += 1
                self._esp(spi, ip, vni)
                f = self.flows.setdefault((vni, src, dst, spi), [set(), 0])
                f[0].add(sport)
                f[1] += 1
                return
            self.kinds[f"VXLAN + IP proto {ip[inner + 9]} (clear)"] += 1
            return
        self.kinds["VXLAN + ARP/other"] += 1


def host_key(vni: int, spi: int) -> bytes:
    """The key softnic.scenario configured for a host-terminated SA (per VM pair)."""
    from softnic.scenario import KEYS
    return KEYS[spi + (0 if vni == 100 else 0x1000)]


def decrypt(model: str, ip: bytes) -> Any:
    """Decrypt one captured ESP packet with scapy and the configured key. Returns the
    decrypted scapy packet (inner IP for host-terminated, IP/UDP/VXLAN/... for device-
    terminated); raises on failure (wrong key, bad ICV, not ESP)."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.ipsec import ESP, SecurityAssociation
    from scapy.layers.vxlan import VXLAN

    from softnic.scenario import KEYS

    pkt = IP(ip)
    if model == "host":
        vx = pkt[VXLAN]
        inner = vx.payload.payload          # Ether -> IP
        sa = SecurityAssociation(ESP, spi=inner[ESP].spi, crypt_algo="AES-GCM",
                                 crypt_key=host_key(vx.vni, inner[ESP].spi),
                                 crypt_icv_size=16,
                                 tunnel_header=IP(src=inner.src, dst=inner.dst))
        return sa.decrypt(IP(bytes(inner)))
    nat = UDP(sport=NATT_PORT, dport=NATT_PORT) if UDP in pkt else None
    spi = pkt[ESP].spi
    sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=KEYS[spi],
                             crypt_icv_size=16, nat_t_header=nat)
    return sa.decrypt(pkt)


def layers(pkt: Any, arrow: str) -> str:
    """One line per packet: each layer's few fields a person wants to see."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.ipsec import ESP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    parts = []
    layer = pkt
    while layer is not None and layer.name != "NoPayload":
        if isinstance(layer, IP):
            parts.append(f"IP {layer.src} {arrow} {layer.dst} len {layer.len}")
        elif isinstance(layer, UDP):
            parts.append(f"UDP {layer.sport} {arrow} {layer.dport}")
        elif isinstance(layer, VXLAN):
            parts.append(f"VXLAN vni {layer.vni}")
        elif isinstance(layer, Ether):
            parts.append(f"Ether {layer.src} {arrow} {layer.dst}")
        elif isinstance(layer, ESP):
            parts.append(f"ESP spi 0x{layer.spi:x} seq {layer.seq} "
                         f"[{len(layer.data)} B encrypted+ICV]")
            break
        elif isinstance(layer, TCP):
            parts.append(f"TCP {layer.sport} {arrow} {layer.dport} [{layer.flags}] "
                         f"{len(layer.payload)} B")
            break
        elif isinstance(layer, ICMP):
            parts.append(f"ICMP type {layer.type} id {layer.id} seq {layer.seq}")
            break
        else:
            parts.append(f"{layer.name} {len(layer)} B")
            break
        layer = layer.payload
    return " / ".join(parts)


# ---- one model, end to end ----------------------------------------------------------------

@dataclass
class Plan:
    big: int            # bytes of the headline transfer (VM pair 1)
    small: int          # bytes of the second transfer (VM pair 2)
    pings: int
    sample: int         # ESP packets decrypted with scapy


def _ping_ok(text: str, count: int) -> tuple[bool, str]:
    rx = 0
    rtt = ""
    for line in text.splitlines():
        if "packets transmitted" in line:
            try:
                rx = int(line.split(",")[1].split()[0])
            except (IndexError, ValueError):
                rx = 0
        if line.startswith("rtt"):
            rtt = line.split("=")[1].split("/")[1] + " ms avg"
    return rx == count, f"{rx}/{count} replies, {rtt or 'no rtt'}"


def _fmt_counts(d: dict[str, int], keys: Sequence[str]) -> str:
    return "  ".join(f"{k}={d.get(k, 0):,}" for k in keys)


def _drops(st: dict[str, Any]) -> dict[str, int]:
    return {k: int(v) for k, v in st.get("drops", {}).items() if v}


def run_model(model: str, plan: Plan, out: Out, check: Checks, ctl_stats: bool,
              namespaces: list[str]) -> None:
    from softnic.scenario import VMS, Sniffer

    ar = out.arrow()
    headline = {"host": "host-terminated: ESP tunnel between the VMs (SPIs per VF), then VXLAN",
                "device": "device-terminated: VXLAN, then ESP-in-UDP 4500 between the VTEPs"}
    out.title(headline[model])
    sockets: dict[str, str] = {}
    said: list[int] = []

    def echo(side: str, path: str, words: list[str]) -> None:
        if not said:
            out("  SAs and policies, installed through each daemon's admin socket "
                "(softnicctl equivalent; keys redacted):")
            said.append(1)
        if side not in sockets:
            out(f"    ${side.upper()}={path}")
        sockets[side] = path
        out(f"    $ softnicctl -s ${side.upper()} " + shlex.join(words)
            .replace(shlex.quote(REDACTED), REDACTED))

    cls = _make_overlay_class(echo)
    t0 = time.monotonic()
    out("  building two hosts + four VMs in network namespaces, starting two daemons")
    with cls(model=model, device_encap="espinudp") as ov:
        namespaces += [ov.host(s).ns.name for s in "ab"] + [n.name for n in ov.vm.values()]
        for side in "ab":
            out(f"  host {side.upper()}: netns {ov.host(side).ns.name}, underlay "
                f"{ov.host(side).addr}, `softnic run` pid {ov.daemons[side].pid}, VMs "
                + ", ".join(f"{ov.vm[side + n].name} ({VMS[side + n].addr})" for n in "12"))
        out(f"  up in {time.monotonic() - t0:.1f} s")

        try:
            sn = Sniffer(ov.host("a").ns, keep=800)
            # A deep socket buffer, so the capture keeps up with GSO trains (root may force it).
            sn.sock.setsockopt(1, 33, 64 << 20)                 # SOL_SOCKET, SO_RCVBUFFORCE
            with sn:
                out()
                out("  traffic")
                for n in ("1", "2"):
                    a, b = VMS["a" + n], VMS["b" + n]
                    ok, txt = _ping_ok(ov.ping("a" + n, "b" + n, plan.pings), plan.pings)
                    check(ok, f"ping {a.name}@A {a.addr} {ar} {b.name}@B {b.addr} "
                              f"(VNI {a.vni}): {txt}")
                results = {}
                for n, nbytes, port in (("2", plan.small, 5202), ("1", plan.big, 5201)):
                    r = ov.tcp_transfer("a" + n, "b" + n, nbytes, port=port, timeout=60)
                    results[n] = r
                    a = VMS["a" + n]
                    check(r["ok"], f"TCP {a.name}@A {ar} {a.name}@B: {r['bytes'] / 1e6:,.0f} MB "
                                   f"in {r['seconds']:.2f} s = {r['gbps']:.2f} Gbit/s, "
                                   "SHA-256 verified on arrival")
                time.sleep(0.3)                      # let the capture drain its socket
            st = {s: ov.stats(s) for s in "ab"}
            if ctl_stats:
                show_softnicctl(ov.sockets["a"], out, check)
            report_counters(model, st, out, check)
            report_wire(model, sn, st, plan, out, check)
        except Exception:
            # What the daemons said last, for whoever reads a failure (keys never appear
            # in their logs; the output filter would redact one all the same).
            for side in "ab":
                tail = ov.log(side).strip().splitlines()[-8:]
                out(f"  host {side.upper()} daemon log, last lines:")
                for line in tail:
                    out("    " + line)
            raise
        out()
        out(f"  tearing down (SIGTERM to both daemons, namespaces deleted) {ar}")
    out(f"  {model} model done in {time.monotonic() - t0:.1f} s; headline "
        f"{results['1']['gbps']:.2f} Gbit/s")
    THROUGHPUT[model] = results["1"]["gbps"]


def show_softnicctl(sock: str, out: Out, check: Checks) -> None:
    """The real CLI, once, as an operator would run it."""
    exe = shutil.which("softnicctl")
    argv = [exe] if exe else [sys.executable, "-m", "softnic.cli"]
    out()
    out(f"  $ softnicctl -s $A stats        (the real CLI{'' if exe else ': python -m softnic.cli'})")
    p = subprocess.run([*argv, "-s", sock, "stats"], capture_output=True, text=True,
                       timeout=20)
    for line in (p.stdout + p.stderr).rstrip().splitlines():
        out("    " + line)
    check(p.returncode == 0 and "VF" in p.stdout,
          f"softnicctl stats exit status {p.returncode}")


def report_counters(model: str, st: dict[str, dict[str, Any]], out: Out, check: Checks
                    ) -> None:
    ar = out.arrow()
    out()
    out("  counters from each daemon (admin socket `stats`)")
    for side in "ab":
        s = st[side]
        for name, c in sorted(s.get("vf", {}).items()):
            out(f"    host {side.upper()} {name:4} TSO frames {c.get('tx_tso_frames', 0):>6,} "
                f"{ar} segments {c.get('tx_segments', 0):>7,}   ESP out {c.get('tx_esp', 0):>7,} "
                f"in {c.get('rx_esp', 0):>6,}   to VM {c.get('rx_frames', 0):>6,}")
        u = s.get("uplink", {})
        ul_esp = f"ESP out {u.get('tx_esp', 0):,} in {u.get('rx_esp', 0):,}   " \
            if model == "device" else ""
        out(f"    host {side.upper()} uplink  {ul_esp}datagrams sent {u.get('io_tx_pkts', 0):,} in "
            f"{u.get('io_tx_syscalls', 0):,} syscalls ({u.get('io_tx_gso_msgs', 0):,} UDP GSO "
            f"trains)   received {u.get('io_rx_pkts', 0):,}")
        for sa in s.get("sa", []):
            if sa.get("packets"):
                out(f"    host {side.upper()} SA {sa['scope']:6} {sa['dir']:3} spi {sa['spi']}"
                    f"  {sa['packets']:>7,} packets  {sa['bytes'] / 1e6:8.1f} MB")
        d = _drops(s)
        out(f"    host {side.upper()} drops: " + (", ".join(
            f"{k}={v} ({WHY.get(k, k)})" for k, v in sorted(d.items())) or "none"))
    a1 = st["a"]["vf"].get("vm1", {})
    check(a1.get("tx_tso_frames", 0) > 0 and a1.get("tx_segments", 0) > a1["tx_tso_frames"],
          f"TSO: host A segmented {a1.get('tx_tso_frames', 0):,} large frames from vm1 into "
          f"{a1.get('tx_segments', 0):,} segments")
    if model == "host":
        esp = [st[s]["vf"].get(v, {}).get(k, 0) for s in "ab" for v in ("vm1", "vm2")
               for k in ("tx_esp", "rx_esp")]
        check(all(esp), "ESP by the VFs' own SAs, both VMs, both hosts, both directions")
    else:
        esp = [st[s]["uplink"].get(k, 0) for s in "ab" for k in ("tx_esp", "rx_esp")]
        check(all(esp), "ESP by the uplink SAs, both hosts, both directions")
    bad = {k: v for s in "ab" for k, v in _drops(st[s]).items() if k in NEVER_DROPS}
    check(not bad, "no ICV failure, bad trailer, malformed ESP or bad VXLAN on either host"
          + (f" (got {bad})" if bad else ""))


def report_wire(model: str, sn: Any, st: dict[str, Any], plan: Plan, out: Out,
                check: Checks) -> None:
    ar = out.arrow()
    wire = Wire()
    for ip in sn.datagrams():
        wire.add(ip)
    sent = st["a"]["uplink"].get("io_tx_pkts", 0)
    out()
    out(f"  the underlay, captured on host A's ul0: {sn.count:,} packets seen (softnic "
        f"sent {sent:,}), every one searched for plaintext; the first {wire.packets:,} "
        "kept and decoded")
    out("    " + ", ".join(f"{k}: {v:,}" for k, v in wire.kinds.most_common()))
    if model == "host":
        for (vni, src, dst, spi), (ports, n) in sorted(wire.flows.items()):
            out(f"    VNI {vni}  {src} {ar} {dst}  SPI 0x{spi:x}  outer UDP source port "
                f"{', '.join(map(str, sorted(ports)))}  ({n:,} packets)")
    else:
        out("    SPIs in use: " + ", ".join(f"0x{s:x} ({n:,} packets)"
                                           for s, n in sorted(wire.spis.items())))

    # A decoded look: the first ESP packet of each flow/SPI, and the largest one.
    from scapy.layers.inet import IP
    picks = [ip for _k, ip in sorted(wire.first.items(), key=lambda kv: str(kv[0]))][:2]
    if wire.esp:
        picks.append(max(wire.esp, key=len))
    out()
    out("  a decoded look (scapy), then the same packet decrypted by scapy with the "
        "configured key")
    for i, ip in enumerate(picks, 1):
        out(f"    #{i} {layers(IP(ip), ar)}")
        try:
            out(f"       {ar} {layers(decrypt(model, ip), ar)}")
        except Exception as e:  # shown, and counted by the sample check below
            out(f"       {ar} does not decrypt: {type(e).__name__}")

    # Decrypt a sample spread over the capture: every one must open with the configured key.
    # The first packet of every SA, then packets spread evenly over the capture.
    step = max(1, len(wire.esp) // max(1, plan.sample))
    sample = list(wire.first.values()) + wire.esp[::step][:plan.sample]
    ok = 0
    inner_sports: set[int] = set()
    by_sa: dict[int, set[str]] = collections.defaultdict(set)   # SPI -> inner flows
    for ip in sample:
        try:
            p = decrypt(model, ip)
        except Exception:
            continue
        ok += 1
        if model == "device":
            from scapy.layers.inet import UDP
            from scapy.layers.vxlan import VXLAN
            if UDP in p and p[UDP].dport == VXLAN_PORT:
                inner_sports.add(p[UDP].sport)
                spi = struct.unpack_from("!I", ip, 28)[0]
                inner = layers(p[VXLAN].payload, ar).split(" / ", 1)[-1]
                inner = re.sub(r" len \d+| seq \d+| \[[A-Z]+\]| \d+ B$", "", inner)
                by_sa[spi].add(f"VXLAN sport {p[UDP].sport}, VNI {p[VXLAN].vni}: {inner}")
    if by_sa:
        out()
        out("  which SA carries which inner flow (decrypted sample; the inner flow hash "
            "picks the SA)")
        for spi, flows in sorted(by_sa.items()):
            for f in sorted(flows)[:4]:
                out(f"    SPI 0x{spi:x}  {ar}  {f}")
    out()
    out("  proof")
    check(sn.count > 0 and sn.marks == 0,
          f"no tenant plaintext on the wire: the marker that fills every TCP payload is in "
          f"none of {sn.count:,} captured packets")
    check(0 < wire.largest <= MTU and sn.max_wire <= MTU,
          f"largest underlay packet {max(wire.largest, sn.max_wire):,} <= {MTU} "
          "(no fragmentation: MSS derived from the exact ESP + VXLAN overhead)")
    check(len(sample) > 0 and ok == len(sample),
          f"{ok}/{len(sample)} sampled ESP packets decrypt with the configured keys (scapy)")
    if model == "host":
        ports = [p for p, _n in wire.flows.values()]
        n = len(set().union(*ports)) if ports else 0
        check(n >= 2 and all(len(p) == 1 for p in ports) and n == len(ports),
              f"{n} distinct UDP source ports for {len(ports)} ESP flows on the VXLAN outer "
              "header, one per flow (SPI + inner addresses hashed: spread over ECMP paths "
              "and RX queues, never reordered within a flow)")
        spi_vfs = {spi for (_v, _s, _d, spi) in wire.flows}
        vnis = {v for (v, _s, _d, _spi) in wire.flows}
        check(len(vnis) == 2 and len(spi_vfs) == 1,
              f"the same SPI {', '.join(f'0x{s:x}' for s in sorted(spi_vfs))} used by "
              f"{len(vnis)} VFs with different keys: SPIs scoped per VF")
    else:
        n = len(inner_sports)
        check(n >= 2, f"{n} distinct UDP source ports inside ESP (the VXLAN header, seen "
                      f"after decryption), over {len(wire.spis)} SPI(s) outside: outer "
                      f"UDP is {NATT_PORT} {ar} {NATT_PORT}, RFC 3948")


# ---- main -----------------------------------------------------------------------------------

def needs() -> str | None:
    """None if this machine can run the demo, else what it lacks."""
    from softnic.topo import can_netns
    why = can_netns()
    if why:
        return why
    if shutil.which("ping") is None:
        return "needs ping (Debian: iputils-ping)"
    return None


class Interrupted(Exception):
    pass


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m softnic.demo",
                                 description="softnic end to end: two hosts, two IPsec "
                                             "models, traffic, counters, a look at the wire.")
    ap.add_argument("--short", action="store_true",
                    help="a quick run (small transfers; for tests)")
    ap.add_argument("--mb", type=int, default=None, help="size of the main TCP transfer, MB")
    ap.add_argument("--model", choices=("host", "device", "both"), default="both")
    args = ap.parse_args(argv)

    from softnic.scenario import KEYS
    out = Out(KEYS.values())
    why = needs()
    if why:
        out(f"softnic demo: {why}.")
        out("It builds network namespaces, veth pairs and TAP devices, so run it as root: "
            "sudo make demo")
        return 2
    try:
        # Every layer the capture is decoded with, bound before the first packet is.
        import scapy.layers.inet  # noqa: F401
        import scapy.layers.ipsec  # noqa: F401
        import scapy.layers.l2  # noqa: F401
        import scapy.layers.vxlan  # noqa: F401

        import softnic._fastpath  # noqa: F401
    except ImportError as e:
        out(f"softnic demo: needs the built extension and scapy ({e.name}): make build")
        return 2

    mb = args.mb if args.mb is not None else (16 if args.short else 200)
    plan = Plan(big=mb * 1_000_000, small=(4 if args.short else 20) * 1_000_000,
                pings=2 if args.short else 3, sample=12 if args.short else 40)

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted()

    old = signal.signal(signal.SIGTERM, on_term)
    check = Checks(out)
    namespaces: list[str] = []
    t0 = time.monotonic()
    out(out.paint("softnic demo", "1") + " — two hypervisors in network namespaces, a "
        f"{MTU}-byte veth underlay, two VMs each behind TAP VFs, AES-128-GCM")
    status = 0
    try:
        models = ("host", "device") if args.model == "both" else (args.model,)
        for i, model in enumerate(models):
            run_model(model, plan, out, check, ctl_stats=(i == 0), namespaces=namespaces)
    except (KeyboardInterrupt, Interrupted):
        status = 130
    except Exception as e:
        out()
        out(f"FAILED: {type(e).__name__}: {e}")
        check(False, "the demo ran to the end")
    finally:
        signal.signal(signal.SIGTERM, old)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    still = [n for n in namespaces if n in left.split()]
    if status == 0:
        out()
        out(out.paint("summary", "1"))
        for model, g in THROUGHPUT.items():
            out(f"  {model}-terminated: {g:.2f} Gbit/s VM to VM over TCP, "
                f"{plan.big / 1e6:,.0f} MB")
        check(bool(namespaces) and not still,
              f"torn down: none of the {len(namespaces)} namespaces is left")
        good = len(check.items) - len(check.failed)
        out(f"  {good}/{len(check.items)} checks held in {time.monotonic() - t0:.1f} s")
        if check.failed:
            out("  failed: " + "; ".join(check.failed))
            status = 1
    elif status == 130:
        out()
        out("interrupted: " + (f"left behind: {' '.join(still)}" if still else
                               "everything was torn down on the way out"))
    return status


if __name__ == "__main__":
    sys.exit(main())
