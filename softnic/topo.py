"""Network-namespace topologies for the tests, the demo and the benchmarks.

Built on the kernel's network namespaces (ip-netns(8), setns(2) with CLONE_NEWNET) and veth
pairs (veth(4)). Everything created here has a unique name (prefix + pid + counter), lives
only inside namespaces this process made, and is removed by the context managers, also on
failure, and by an atexit hook as a last resort. Addresses (10.x, fd00::) exist only inside
those namespaces; nothing touches the caller's own network.

Shape: a Host is a "hypervisor" namespace with an underlay veth (`ul0`); "VM" namespaces are
attached to it later through TAP ports (softnic.tap.TapPort) whose fd stays in the host
namespace. TwoHosts joins two hosts by one veth pair, MTU 1500.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()
_live: set[str] = set()        # namespaces this process created and has not deleted
_live_lock = threading.Lock()

T = TypeVar("T")


def can_netns() -> str | None:
    """None if namespaces can be built here, else the reason they cannot (for skips)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, TAP)"
    if shutil.which("ip") is None:
        return "needs iproute2 (`ip`)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def unique_name(prefix: str = "sn") -> str:
    """A name no other process or earlier call uses: prefix + pid + counter (<= 15 chars,
    so it also fits an interface name)."""
    name = f"{prefix}{os.getpid()}x{next(_counter)}"
    if len(name) > 15:
        raise ValueError(f"name {name!r} longer than IFNAMSIZ-1; use a shorter prefix")
    return name


def run(cmd: Sequence[str], check: bool = True, timeout: float = 60) -> str:
    """Run a command (no shell) and return its stdout; raise with stderr on failure."""
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, step: float = 0.02) -> Any:
    """Poll pred() until it returns something true; return it, or raise TimeoutError."""
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > end:
            raise TimeoutError("condition not met in time")
        time.sleep(step)


class Netns:
    """One network namespace, created on construction, deleted by close() / `with`."""

    def __init__(self, name: str | None = None, prefix: str = "sn") -> None:
        self.name = name or unique_name(prefix)
        run(["ip", "netns", "add", self.name])
        with _live_lock:
            _live.add(self.name)
        self._procs: list[subprocess.Popen[Any]] = []
        self.closed = False
        try:
            self.ip("link", "set", "lo", "up")
        except Exception:
            self.close()
            raise

    # -- commands inside the namespace
    def ip(self, *args: str, check: bool = True) -> str:
        return run(["ip", "-n", self.name, *args], check=check)

    def exec_argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], check: bool = True, timeout: float = 60) -> str:
        return run(self.exec_argv(cmd), check=check, timeout=timeout)

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in the namespace; it is terminated on close() if still alive."""
        p = subprocess.Popen(self.exec_argv(cmd), **kw)
        self._procs.append(p)
        return p

    # -- this process inside the namespace
    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the calling thread (only it) into the namespace for the block.

        Sockets and TAPs opened inside stay in this namespace for their whole life;
        the thread returns to its previous namespace afterwards, also on error."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(os.path.join(NETNS_RUN_DIR, self.name),
                             os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def call(self, fn: Callable[..., T], *args: Any, **kw: Any) -> T:
        """Run fn(*args, **kw) in a fresh thread inside the namespace; return its result
        (or raise its exception). The caller's threads never change namespace."""
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                with self.entered():
                    box["r"] = fn(*args, **kw)
            except BaseException as e:  # handed back to the caller
                box["e"] = e

        t = threading.Thread(target=body, name=f"netns-{self.name}")
        t.start()
        t.join()
        if "e" in box:
            raise box["e"]
        return box["r"]  # type: ignore[no-any-return]

    # -- configuration helpers
    def addr_add(self, dev: str, cidr: str) -> None:
        extra = ["nodad"] if ipaddress.ip_interface(cidr).version == 6 else []
        self.ip("addr", "add", cidr, "dev", dev, *extra)

    def link_up(self, dev: str, mtu: int | None = None) -> None:
        if mtu is not None:
            self.ip("link", "set", dev, "mtu", str(mtu))
        self.ip("link", "set", dev, "up")

    def route_add(self, prefix: str, via: str | None = None, dev: str | None = None) -> None:
        args = ["route", "add", prefix]
        if via:
            args += ["via", via]
        if dev:
            args += ["dev", dev]
        self.ip(*args)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        run(["ip", "netns", "del", self.name], check=False)
        with _live_lock:
            _live.discard(self.name)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def veth(a: Netns, a_dev: str, b: Netns, b_dev: str, mtu: int = 1500) -> None:
    """A veth pair between two namespaces, both ends up at `mtu`. Deleting either
    namespace deletes the pair."""
    a.ip("link", "add", a_dev, "mtu", str(mtu), "type", "veth",
         "peer", "name", b_dev, "netns", b.name, "mtu", str(mtu))
    a.link_up(a_dev)
    b.link_up(b_dev)


class Host:
    """A "hypervisor": a namespace with an underlay interface `ul0`, and VM namespaces
    attached behind TAP ports (the TAP fd lives here, the kernel side in the VM)."""

    def __init__(self, label: str = "h") -> None:
        self.ns = Netns(prefix=f"sn{label}")
        self.vms: list[Netns] = []
        self.taps: list[Any] = []
        self.uplinks: list[Any] = []
        self.addr: str = ""               # underlay address, set by the topology
        self.dev = "ul0"

    def add_vm(self, label: str = "v") -> Netns:
        vm = Netns(prefix=f"sn{label}")
        self.vms.append(vm)
        return vm

    def open_tap(self, vm: Netns, *, ifname: str = "eth0", mac: str | None = None,
                 mtu: int | None = None, addrs: Sequence[str] = (), **kw: Any) -> Any:
        """Open a TAP in this host's namespace with its kernel side moved into `vm`
        (renamed `ifname`, given `mac`/`mtu`/`addrs`, up). Returns the TapPort; it is
        closed with the host."""
        from softnic.tap import TapPort

        tap = self.ns.call(TapPort, None, netns=vm.name, peer_name=ifname, mac=mac, mtu=mtu,
                           addrs=addrs, **kw)
        self.taps.append(tap)
        return tap

    def open_uplink(self, **kw: Any) -> Any:
        """Open a softnic.uplink.Uplink on this host's underlay address, inside its
        namespace; it is closed with the host."""
        from softnic.uplink import Uplink

        up = self.ns.call(Uplink, self.addr, **kw)
        self.uplinks.append(up)
        return up

    def close(self) -> None:
        errors: list[BaseException] = []
        for obj in [*self.uplinks, *self.taps, *self.vms, self.ns]:
            try:
                obj.close()
            except Exception as e:  # keep cleaning up; report the first
                errors.append(e)
        self.uplinks.clear()
        self.taps.clear()
        self.vms.clear()
        if errors:
            raise errors[0]

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TwoHosts:
    """Two hosts joined by a veth underlay (`ul0` on both sides, MTU 1500 by default).

    IPv4: 10.99.0.1/24 and 10.99.0.2/24; IPv6: fd00:99::1/64 and fd00:99::2/64 (no DAD).
    Use as a context manager; everything is removed on exit, also after a failure."""

    def __init__(self, v6: bool = False, mtu: int = 1500) -> None:
        self.v6 = v6
        self.mtu = mtu
        self._stack = contextlib.ExitStack()
        self.a: Host
        self.b: Host

    def __enter__(self) -> TwoHosts:
        try:
            self.a = self._stack.enter_context(Host("a"))
            self.b = self._stack.enter_context(Host("b"))
            veth(self.a.ns, "ul0", self.b.ns, "ul0", self.mtu)
            if self.v6:
                self.a.addr, self.b.addr, plen = "fd00:99::1", "fd00:99::2", 64
            else:
                self.a.addr, self.b.addr, plen = "10.99.0.1", "10.99.0.2", 24
            self.a.ns.addr_add("ul0", f"{self.a.addr}/{plen}")
            self.b.ns.addr_add("ul0", f"{self.b.addr}/{plen}")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def close(self) -> None:
        self._stack.close()


@atexit.register
def _cleanup_leftovers() -> None:
    with _live_lock:
        names = list(_live)
        _live.clear()
    for name in names:
        run(["ip", "netns", "del", name], check=False)
