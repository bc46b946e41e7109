"""Two softnic hosts in network namespaces: the topology the demo, the end-to-end tests
and benchmarks/e2e.py share.

    VM a1 ─TAP─┐                                       ┌─TAP─ VM b1
               host A (softnic) ══ veth underlay ══ host B (softnic)
    VM a2 ─TAP─┘      10.99.0.1      MTU 1500      10.99.0.2   └─TAP─ VM b2

VM a1 and b1 share VNI 100 (10.200.0.0/24), VM a2 and b2 VNI 200 (10.201.0.0/24). Each
host runs `softnic run -c` as its own process inside its namespace; SAs are installed
live through each daemon's admin socket, as an operator would. Everything exists only in
namespaces made here and is removed on exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softnic.client import Client
from softnic.topo import Netns, TwoHosts, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class VM:
    name: str
    mac: str
    addr: str
    vni: int


VMS = {
    "a1": VM("vm1", "02:00:00:00:0a:01", "10.200.0.1", 100),
    "a2": VM("vm2", "02:00:00:00:0a:02", "10.201.0.1", 200),
    "b1": VM("vm1", "02:00:00:00:0b:01", "10.200.0.2", 100),
    "b2": VM("vm2", "02:00:00:00:0b:02", "10.201.0.2", 200),
}

# Test keys, generated for this scenario only (key || 4-byte salt).
KEYS = {
    0x1001: bytes.fromhex("5e8b1c2d3f4a5b6c7d8e9fa0b1c2d3e4f5061728"),
    0x1002: bytes.fromhex("a1b2c3d4e5f60718293a4b5c6d7e8f9011223344"),
    0x2001: bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f055667788"),
    0x2002: bytes.fromhex("99aabbccddeeff00112233445566778899aabbcc"),
    0x3001: bytes.fromhex("c0ffee00112233445566778899aabbccddeeff01"),
    0x3002: bytes.fromhex("deadbeef00112233445566778899aabbccddeeff"),
    0x3011: bytes.fromhex("0123456789abcdeffedcba987654321000112233"),
    0x3012: bytes.fromhex("fedcba98765432100123456789abcdef44556677"),
}
PLAINTEXT_MARK = b"SOFTNIC-TENANT-PLAINTEXT"


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def guest_and_vm_config(vsock: str, guest_mac: str, vm_ns: str, vm_mac: str, vm_ip: str,
                        vni: int, ifname: str, *, queues: int = 1,
                        tx_workers: int | None = None) -> str:
    """A one-host configuration for Daemon (without its [daemon] table's head): a
    vhost-user VF "guest" on socket vsock and a TAP VF "vm" whose kernel side, with
    address vm_ip/24, is in namespace vm_ns; both in one VNI, the uplink on loopback."""
    head = f"tx_workers = {tx_workers}\n" if tx_workers else ""
    q = f"queues = {queues}\n" if queues != 1 else ""
    return f"""{head}
[uplink]
local = "127.0.0.1"
[[vf]]
name = "guest"
kind = "vhost-user"
socket = {_toml_str(vsock)}
mac = "{guest_mac}"
vni = {vni}
{q}[[vf]]
name = "vm"
kind = "tap"
ifname = "{ifname}"
netns = "{vm_ns}"
mac = "{vm_mac}"
addresses = ["{vm_ip}/24"]
vni = {vni}
"""


def collect_events(monitor: Iterator[dict[str, Any]], until: str
                   ) -> tuple[list[dict[str, Any]], threading.Event]:
    """Read a Client.monitor() stream in a thread: every event goes into the list; the
    Event is set when one of type `until` arrives (and the reading stops there)."""
    events: list[dict[str, Any]] = []
    got = threading.Event()

    def watch() -> None:
        for ev in monitor:
            events.append(ev)
            if ev.get("type") == until:
                got.set()
                return

    threading.Thread(target=watch, daemon=True).start()
    return events, got


@contextlib.contextmanager
def guest_and_vm(tmp: Path, prefix: str, guest_mac: str, guest_ip: str, vm_mac: str,
                 vm_ip: str, vni: int, **cfg: Any) -> Iterator[dict[str, Any]]:
    """A daemon in a fresh namespace with guest_and_vm_config's two VFs (cfg: queues,
    tx_workers), the VM's kernel told the guest's MAC. Yields {"sock": admin socket,
    "vhost": the guest's socket, "vm": its Netns, "d": the Daemon}."""
    host, vm = Netns(prefix=prefix + "h"), Netns(prefix=prefix + "v")
    vhost_sock = str(tmp / "guest.sock")
    d = Daemon(host, guest_and_vm_config(vhost_sock, guest_mac, vm.name, vm_mac, vm_ip, vni,
                                         f"{prefix}tap{os.getpid() % 1000}", **cfg),
               tmp, ready=[vhost_sock])
    host.ip("link", "set", "lo", "up")
    try:
        d.start()
        dev = next(n for n in vm.run(["ls", "/sys/class/net"]).split() if n.startswith("sn"))
        vm.run(["ip", "neigh", "replace", guest_ip, "lladdr", guest_mac, "dev", dev])
        yield {"sock": d.sock, "vhost": vhost_sock, "vm": vm, "d": d}
    finally:
        d.stop()
        vm.close()
        host.close()


class Daemon:
    """`softnic.daemon run -c CFG` inside a namespace; can be SIGKILLed and started again."""

    def __init__(self, ns: Netns, cfg: str, tmp: Path, name: str = "d",
                 ready: Sequence[str] = ()) -> None:
        """cfg: the configuration without its [daemon] table (the admin socket is made
        here, in tmp). ready: paths (e.g. vhost-user sockets) that must exist before
        start() returns."""
        self.ns, self.tmp, self.name, self.ready = ns, tmp, name, tuple(ready)
        self.sock = str(tmp / f"{name}.admin.sock")
        self.cfg = tmp / f"{name}.toml"
        self.cfg.write_text(f'[daemon]\nadmin_socket = "{self.sock}"\n' + cfg)
        os.chmod(self.cfg, 0o600)
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.starts = 0

    def start(self) -> Daemon:
        env = dict(os.environ, PYTHONPATH=REPO)
        with open(self.log, "a") as log:
            log.write(f"---- start {self.starts}\n")
            log.flush()
            self.proc = p = self.ns.popen(
                [sys.executable, "-m", "softnic.daemon", "run", "-c", str(self.cfg)],
                stdout=log, stderr=subprocess.STDOUT, env=env)
        self.starts += 1

        def up() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"softnic exited: {self.tail()}")
            try:
                with Client(self.sock, timeout=1) as c:
                    c.version()
            except Exception:
                return False
            return all(os.path.exists(r) for r in self.ready)

        wait_until(up, timeout=30, step=0.1)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid   # `ip netns exec` execs the daemon: same pid

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def stats(self) -> dict[str, Any]:
        with Client(self.sock, timeout=5) as c:
            return c.stats()

    def client(self) -> Client:
        return Client(self.sock, timeout=10)

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def assert_clean_log(self) -> None:
        """No traceback, and no ring a real guest is said to have broken: a guest's coming
        and going is routine."""
        text = self.log.read_text()
        bad = [ln for ln in text.splitlines() if "Traceback" in ln or "broke ring" in ln]
        assert not bad, "\n".join(bad[:20]) + "\n" + text[-3000:]

    def thread_names(self) -> set[str]:
        """The kernel's names of the daemon's threads (a thread may end while read)."""
        names = set()
        for t in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                with open(f"/proc/{self.pid}/task/{t}/comm") as f:
                    names.add(f.read().strip())
        return names

    def counts(self) -> tuple[int, int]:
        """(open fds, memfd mappings) of the daemon process."""
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        with open(f"/proc/{self.pid}/maps") as f:
            maps = sum(1 for ln in f if "memfd" in ln)
        return fds, maps


class Overlay:
    """Build and run the two-host overlay.

    model: "host" (host-terminated: each VM pair has its own SAs, SPI 0x1001/0x1002 for
    both pairs, different keys, i.e. SPIs scoped per VF; ESP then VXLAN), "device"
    (device-terminated: VXLAN then ESP between the VTEPs), or "off" (VXLAN only).
    device_encap: "esp" (IP protocol 50) or "espinudp" (UDP 4500).
    host_mode: "tunnel" or "transport" for the VMs' SAs.
    tx_workers: the daemons' TX workers (None: their default). Each host's two VFs are in
    different lanes when there are two.
    """

    def __init__(self, model: str = "host", device_encap: str = "esp",
                 host_mode: str = "tunnel", vf_ipsec: str = "enforce",
                 alg: str = "aes-gcm", verbose: bool = False,
                 tx_workers: int | None = None) -> None:
        self.model = model
        self.tx_workers = tx_workers
        self.seq_state: set[str] = set()    # sides whose daemon keeps sequence numbers
        self.device_encap = device_encap
        self.host_mode = host_mode
        self.vf_ipsec = vf_ipsec if model == "host" else "off"
        self.alg = alg
        self.verbose = verbose
        self._stack = contextlib.ExitStack()
        self.tmp = ""
        self.topo: TwoHosts
        self.vm: dict[str, Netns] = {}
        self.daemons: dict[str, subprocess.Popen[Any]] = {}
        self.sockets: dict[str, str] = {}
        self.logs: dict[str, str] = {}
        self.vm_dev: dict[str, str] = {}      # VM key -> its interface inside the VM netns

    # ---- setup ---------------------------------------------------------------------------

    def __enter__(self) -> Overlay:
        try:
            self.tmp = tempfile.mkdtemp(prefix="softnic-")
            self._stack.callback(shutil.rmtree, self.tmp, True)
            self.topo = self._stack.enter_context(TwoHosts())
            for key in VMS:
                host = self.topo.a if key[0] == "a" else self.topo.b
                self.vm[key] = host.add_vm(key)
            for side in ("a", "b"):
                self._start_daemon(side)
            self._stack.callback(self._stop_daemons)
            for side in ("a", "b"):
                self._install(side)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def close(self) -> None:
        self._stack.close()

    def host(self, side: str) -> Any:
        return self.topo.a if side == "a" else self.topo.b

    def _config(self, side: str) -> str:
        host = self.host(side)
        peer = self.host("b" if side == "a" else "a")
        sock = os.path.join(self.tmp, f"{side}.sock")
        self.sockets[side] = sock
        ul_ipsec = self.device_encap if self.model == "device" else "off"
        lines = [
            "[daemon]", f"admin_socket = {_toml_str(sock)}",
            *([f"tx_workers = {self.tx_workers}"] if self.tx_workers else []),
            *([f"seq_state = {_toml_str(os.path.join(self.tmp, side + '.seq'))}"]
              if side in self.seq_state else []), "",
            "[uplink]", f"local = {_toml_str(host.addr)}", "mtu = 1500",
            f"ipsec = {_toml_str(ul_ipsec)}", "",
        ]
        for key, vm in VMS.items():
            if key[0] != side:
                continue
            self.vm_dev[key] = f"sn{key}{os.getpid() % 10000}"
            lines += [
                "[[vf]]", f"name = {_toml_str(vm.name)}", 'kind = "tap"',
                f"ifname = {_toml_str(self.vm_dev[key])}",
                f"netns = {_toml_str(self.vm[key].name)}", f"mac = {_toml_str(vm.mac)}",
                f"addresses = [{_toml_str(vm.addr + '/24')}]", f"vni = {vm.vni}",
                f"ipsec = {_toml_str(self.vf_ipsec)}", "",
            ]
            other = VMS[("b" if side == "a" else "a") + key[1]]
            lines += [
                "[[fdb]]", f"vni = {vm.vni}", f"mac = {_toml_str(other.mac)}",
                f"remote = {_toml_str(peer.addr)}", "",
                "[[fdb]]", f"vni = {vm.vni}", 'mac = "flood"',
                f"remote = {_toml_str(peer.addr)}", "",
            ]
        path = os.path.join(self.tmp, f"{side}.toml")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        os.chmod(path, 0o600)
        return path

    def _daemon_argv(self, side: str, cfg: str) -> list[str]:
        """The command that runs host `side`'s daemon on config file cfg."""
        return [sys.executable, "-m", "softnic.daemon", "run", "-c", cfg]

    def _start_daemon(self, side: str) -> None:
        """Start (or restart) host `side`'s daemon and wait for its admin socket; the log
        keeps every run's output."""
        cfg = self._config(side)
        log = os.path.join(self.tmp, f"{side}.log")
        self.logs[side] = log
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(log, "a") as out:
            p = self.host(side).ns.popen(self._daemon_argv(side, cfg), stdout=out,
                                         stderr=subprocess.STDOUT, env=env)
        self.daemons[side] = p

        def up() -> bool:
            if p.poll() is not None:
                raise RuntimeError(f"softnic on host {side} exited: {self.log(side)}")
            try:
                with Client(self.sockets[side], timeout=2) as c:
                    c.version()
                return True
            except (OSError, Exception):
                return False

        wait_until(up, timeout=30, step=0.1)

    def _stop_daemons(self) -> None:
        for p in self.daemons.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.daemons.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log(self, side: str) -> str:
        try:
            with open(self.logs[side]) as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def client(self, side: str) -> Client:
        return Client(self.sockets[side], timeout=10)

    def _install(self, side: str) -> None:
        """Install SAs and policies through the admin socket, as an operator would."""
        me, peer = self.host(side), self.host("b" if side == "a" else "a")
        with self.client(side) as c:
            if self.model == "host":
                for n in ("1", "2"):
                    local, remote = VMS[side + n], VMS[("b" if side == "a" else "a") + n]
                    # SPI 0x1001 carries a->b, 0x1002 b->a, for BOTH VM pairs: the SPI
                    # space is the VF's; the keys differ per pair.
                    spi_out, spi_in = (0x1001, 0x1002) if side == "a" else (0x1002, 0x1001)
                    keyset = 0 if n == "1" else 0x1000
                    for d, spi, src, dst in (("out", spi_out, local.addr, remote.addr),
                                             ("in", spi_in, remote.addr, local.addr)):
                        c.sa_add(scope=local.name, dir=d, src=src, dst=dst, spi=spi,
                                 reqid=int(n), mode=self.host_mode, alg=self.alg,
                                 key=KEYS[spi + keyset].hex(), icv_bits=128,
                                 replay_window=1024)
                        c.policy_add(scope=local.name, dir=d, src=src + "/32",
                                     dst=dst + "/32", action="protect", reqid=int(n))
            elif self.model == "device":
                encap = {"encap_sport": 4500, "encap_dport": 4500} \
                    if self.device_encap == "espinudp" else {}
                # Two SAs per direction: the inner flow hash picks one (entropy, and no
                # shared sequence counter between flows on different workers).
                for spi_a, spi_b in ((0x3001, 0x3002), (0x3011, 0x3012)):
                    out_spi, in_spi = (spi_a, spi_b) if side == "a" else (spi_b, spi_a)
                    for d, spi, src, dst in (("out", out_spi, me.addr, peer.addr),
                                             ("in", in_spi, peer.addr, me.addr)):
                        c.sa_add(scope="uplink", dir=d, src=src, dst=dst, spi=spi,
                                 mode="transport", alg=self.alg,
                                 key=KEYS[spi].hex(),
                                 icv_bits=128, replay_window=1024, **encap)

    # ---- traffic ---------------------------------------------------------------------------

    def ping(self, src: str, dst: str, count: int = 3) -> str:
        return self.vm[src].run(["ping", "-c", str(count), "-i", "0.2", "-W", "2",
                                 VMS[dst].addr], timeout=30)

    def tcp_transfer(self, src: str, dst: str, nbytes: int, port: int = 5201,
                     timeout: float = 120) -> dict[str, Any]:
        """Send nbytes of marked data from VM src to VM dst over TCP; the receiver hashes
        what arrives. Returns bytes, seconds, Gbit/s and whether the digests matched."""
        receiver = (
            "import hashlib,socket,sys\n"
            "s=socket.socket(socket.AF_INET,socket.SOCK_STREAM)\n"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(('{VMS[dst].addr}',{port}));s.listen(1)\n"
            "print('ready',flush=True)\n"
            "c,_=s.accept();h=hashlib.sha256();n=0\n"
            "while True:\n"
            "    b=c.recv(1<<20)\n"
            "    if not b: break\n"
            "    h.update(b);n+=len(b)\n"
            "print(n,h.hexdigest(),flush=True)\n"
        )
        rx = self.vm[dst].popen([sys.executable, "-c", receiver], stdout=subprocess.PIPE,
                                text=True)
        try:
            assert rx.stdout is not None
            if rx.stdout.readline().strip() != "ready":
                raise RuntimeError("receiver did not start")
            block = _pattern(1 << 20)
            sender = (
                "import socket,sys,time\n"
                f"block=bytes.fromhex('{block[:4096].hex()}')*256\n"
                f"n={nbytes};s=socket.create_connection(('{VMS[dst].addr}',{port}),timeout=30)\n"
                "t=time.perf_counter();left=n\n"
                "while left>0:\n"
                "    k=min(left,len(block));s.sendall(block[:k]);left-=k\n"
                "s.shutdown(socket.SHUT_WR);s.recv(1);t=time.perf_counter()-t\n"
                "print(t,flush=True)\n"
            )
            out = self.vm[src].run([sys.executable, "-c", sender], timeout=timeout)
            seconds = float(out.split()[-1])
            line = rx.communicate(timeout=timeout)[0].split()
        finally:
            if rx.poll() is None:
                rx.kill()
                rx.wait()
        want = hashlib.sha256()
        block = _pattern(4096) * 256
        left = nbytes
        while left > 0:
            k = min(left, len(block))
            want.update(block[:k])
            left -= k
        got_n, got_h = int(line[0]), line[1]
        return {"bytes": got_n, "seconds": seconds, "gbps": got_n * 8 / seconds / 1e9,
                "ok": got_n == nbytes and got_h == want.hexdigest()}

    def tcp_parallel(self, src: str, dst: str, nbytes: int, streams: int = 4,
                     port: int = 5301, timeout: float = 120) -> list[dict[str, Any]]:
        """`streams` concurrent tcp_transfer()s of nbytes each, on ports port.., i.e.
        distinct TCP flows between the same two VMs. Returns each transfer's result."""
        results: list[dict[str, Any] | BaseException] = [RuntimeError("not run")] * streams

        def one(i: int) -> None:
            try:
                results[i] = self.tcp_transfer(src, dst, nbytes, port=port + i,
                                               timeout=timeout)
            except BaseException as e:  # handed back below
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    def stats(self, side: str) -> dict[str, Any]:
        with self.client(side) as c:
            return c.stats()

    def vf_stats(self, key: str) -> dict[str, int]:
        """The counters of VM `key`'s VF on its host ("a1" -> host a, vf vm1)."""
        return self.stats(key[0])["vf"][VMS[key].name]  # type: ignore[no-any-return]


def _pattern(n: int) -> bytes:
    """Tenant data with a marker every 64 bytes, so a capture can prove none is in clear."""
    unit = PLAINTEXT_MARK + bytes(range(40))
    return (unit * (n // len(unit) + 1))[:n]


class Sniffer:
    """Capture what an interface inside a namespace sends (AF_PACKET), in a thread.

    The kernel hands UDP GSO trains to a veth whole, so the socket asks for the
    virtio-net header (PACKET_VNET_HDR) and `datagrams()` splits each train into the
    packets the wire would carry. Keeps the first `keep` captures whole. outgoing=False
    captures what the interface receives instead (e.g. a VM's side of its TAP)."""

    PACKET_VNET_HDR = 15

    def __init__(self, ns: Netns, dev: str = "ul0", keep: int = 4000,
                 outgoing: bool = True, rcvbuf: int = 32 << 20) -> None:
        self.keep = keep
        self.outgoing = outgoing          # False: what the interface receives instead
        self.captures: list[tuple[int, bytes]] = []     # (gso_size, frame)
        self.marks = 0
        self.count = 0
        self.max_wire = 0                                 # largest IP packet on the wire
        self.dropped = 0                                  # the kernel's capture drops
        self._stop = threading.Event()
        self.sock = ns.call(socket.socket, socket.AF_PACKET, socket.SOCK_RAW,
                            socket.htons(0x0003))
        self.sock.setsockopt(263, self.PACKET_VNET_HDR, 1)   # SOL_PACKET
        try:     # a burst must not overflow the capture (root: beyond rmem_max)
            self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)   # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((dev, 0))
        self.sock.settimeout(0.2)
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535 + 10)
            except TimeoutError:
                continue
            except OSError:
                return
            if (addr[2] == socket.PACKET_OUTGOING) != self.outgoing:
                continue
            gso_type, gso_size = data[1], int.from_bytes(data[4:6], "little")
            frame = data[10:]
            if PLAINTEXT_MARK in frame:
                self.marks += 1
            for pkt in _split(frame, gso_size if gso_type else 0):
                self.count += 1
                self.max_wire = max(self.max_wire, len(pkt))
            if len(self.captures) < self.keep:
                self.captures.append((gso_size if gso_type else 0, frame))

    def datagrams(self) -> list[bytes]:
        """Every kept IP capture (not ARP) as the IP packets the wire carries."""
        out: list[bytes] = []
        for gso, frame in self.captures:
            if frame[12:14] in (b"\x08\x00", b"\x86\xdd"):     # IPv4, IPv6; not ARP
                out.extend(_split(frame, gso))
        return out

    def __enter__(self) -> Sniffer:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(timeout=2)
        try:      # struct tpacket_stats: packets, drops (since the last read)
            st = self.sock.getsockopt(263, 6, 8)                  # PACKET_STATISTICS
            self.dropped = int.from_bytes(st[4:8], "little")
        except OSError:
            pass
        self.sock.close()


def _split(frame: bytes, gso_size: int) -> list[bytes]:
    """An Ethernet frame (maybe a UDP GSO train) -> the IP packets on the wire."""
    ip = frame[14:]
    if not gso_size or len(ip) < 20:
        return [ip]
    v6 = ip[0] >> 4 == 6
    hl = 40 if v6 else (ip[0] & 15) * 4
    if len(ip) < hl + 8:
        return [ip]
    hdr, udp, payload = bytearray(ip[:hl]), bytearray(ip[hl:hl + 8]), ip[hl + 8:]
    out = []
    for off in range(0, len(payload), gso_size):
        chunk = payload[off:off + gso_size]
        u = bytearray(udp)
        u[4:6] = (8 + len(chunk)).to_bytes(2, "big")
        u[6:8] = b"\0\0"      # the NIC (here the kernel) fills it per segment
        h = bytearray(hdr)
        if v6:
            h[4:6] = (8 + len(chunk)).to_bytes(2, "big")
        else:
            h[2:4] = (hl + 8 + len(chunk)).to_bytes(2, "big")
            h[10:12] = b"\0\0"
            s = sum(int.from_bytes(h[i:i + 2], "big") for i in range(0, hl, 2))
            while s >> 16:
                s = (s & 0xFFFF) + (s >> 16)
            h[10:12] = (~s & 0xFFFF).to_bytes(2, "big")
        out.append(bytes(h + u) + chunk)
    return out


def wait_for(pred: Any, timeout: float = 10.0) -> Any:
    return wait_until(pred, timeout=timeout)


def now() -> float:
    return time.monotonic()
