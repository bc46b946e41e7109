"""QEMU guest harness for integration tests (issue 5, "Proof with real QEMU").

A guest is a Debian cloud kernel and a busybox initramfs booted by QEMU (TCG where there is
no KVM), with one virtio-net NIC (virtio 1.x §5.1, driven by the guest's own ``virtio_net``)
on whatever netdev the caller passes: ``tap``, ``socket``, ``user`` or ``vhost-user``. For
vhost-user the guest RAM is a shared memfd (QEMU ``docs/interop/vhost-user.rst``, "Memory
regions": the backend maps the guest's memory, so it must be ``share=on``).

How a test script gets in and its output out:

- The image (kernel + ``initrd.gz``) is built once and cached (see :func:`image`). Each
  guest appends a second, uncompressed newc archive holding ``/test.sh`` (and any extra host
  tools) to a copy of the initrd: the kernel unpacks concatenated archives in order (Linux
  ``Documentation/driver-api/early-userspace/buffer-format.rst``). No 9p, no disk image.
- ``/init`` mounts proc/sys/dev/tmp, loads ``virtio_pci`` and ``virtio_net``, brings up the
  NIC whose MAC is the guest's (its name is exported as ``$SN_IF``, the MAC as ``$SN_MAC``),
  prints ``@@SOFTNIC-GUEST-BEGIN ...@@``, runs ``sh /test.sh`` and prints
  ``@@SOFTNIC-GUEST-END rc=N@@``, then ``poweroff -f``; QEMU (``-no-reboot``) exits.
- The serial console goes to a log file that :meth:`Guest.wait` polls; every wait has a
  timeout after which QEMU is killed, so a test never hangs on a guest.

The guest has busybox (``sh``, ``ping``, ``nc``, ``sha256sum``, ``modprobe``, ...) plus the
host's iproute2 ``ip`` (busybox's cannot create vxlan links or xfrm states), and the modules
of :data:`MODULES` with their dependencies; ``modprobe esp4`` / ``modprobe vxlan`` work.

Cache: ``$SOFTNIC_GUEST_CACHE``, else ``$XDG_CACHE_HOME/softnic-guest``, else
``~/.cache/softnic-guest``; one directory per (kernel package and version, busybox, host
tools, harness version), built in a temporary directory and renamed into place under a lock.
The kernel package is ``$SOFTNIC_GUEST_KERNEL_PKG`` or the one Debian's
``linux-image-cloud-amd64`` depends on, fetched with ``apt-get download``.

Command line: ``python -m softnic.guest build`` builds the cache and prints its paths;
``python -m softnic.guest cmdline --netdev ARG...`` prints the exact QEMU command line;
``python -m softnic.guest run --script FILE --netdev ARG...`` boots a guest.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import functools
import gzip
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODULES",
    "Guest",
    "GuestError",
    "GuestImage",
    "image",
    "qemu_available",
    "print_cmdline",
]

# Bump when the image layout or /init changes: it is part of the cache key.
HARNESS_VERSION = "7"
KERNEL_META_PKG = "linux-image-cloud-amd64"
QEMU = "qemu-system-x86_64"
BEGIN_MARK = "@@SOFTNIC-GUEST-BEGIN"
END_RE = re.compile(r"@@SOFTNIC-GUEST-END rc=(\d+)@@")

# Modules copied into the image (with everything they depend on). Crypto templates that the
# kernel loads by alias at SA creation (gcm -> ctr, ghash) are listed so `ip xfrm` works.
MODULES: tuple[str, ...] = (
    "virtio_pci", "virtio_net", "tun", "veth",
    "esp4", "esp6", "esp4_offload", "esp6_offload", "xfrm_user", "xfrm_interface",
    "vxlan", "udp_tunnel", "ip6_udp_tunnel",
    "aesni_intel", "gcm", "ctr", "ghash_generic", "ghash_clmulni_intel", "seqiv",
    "echainiv", "authenc", "authencesn", "chacha20poly1305", "chacha_generic",
    "poly1305_generic", "sha512_generic", "cryptd", "crypto_simd",
    "drbg", "jitterentropy_rng",  # seqiv/echainiv IVs need "stdrng"
)  # fmt: skip

# Host programs copied into the image with their shared libraries (ldd closure).
HOST_TOOLS: tuple[str, ...] = ("ip",)

_INIT = r"""#!/bin/sh
# softnic guest /init: mount, load the NIC driver, run /test.sh, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmp /tmp
mount -t tmpfs run /run
ip link set lo up
SN_MAC=$(sed -n 's/.*sn\.mac=\([0-9a-f:]*\).*/\1/p' /proc/cmdline)
SN_IF=
if [ -n "$SN_MAC" ]; then
    modprobe virtio_pci
    modprobe virtio_net
    # The driver probes asynchronously; give it up to 10 s (TCG is slow).
    i=0
    while [ -z "$SN_IF" ] && [ $i -lt 200 ]; do
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address" 2>/dev/null)" = "$SN_MAC" ] && SN_IF=${d##*/}
        done
        [ -z "$SN_IF" ] && usleep 50000
        i=$((i + 1))
    done
    if [ -n "$SN_IF" ]; then ip link set "$SN_IF" up; else echo "softnic-guest: no NIC $SN_MAC"; fi
fi
# Negotiated virtio feature bits ('0'/'1', bit 0 first), for tests of offload negotiation.
SN_FEATURES=$(cat "/sys/class/net/$SN_IF/device/features" 2>/dev/null)
export SN_IF SN_MAC SN_FEATURES
cd /root
echo "@@SOFTNIC-GUEST-BEGIN uptime=$(cut -d' ' -f1 /proc/uptime) if=$SN_IF features=$SN_FEATURES@@"
sh /test.sh </dev/null 2>&1
echo "@@SOFTNIC-GUEST-END rc=$?@@"
sync
poweroff -f
"""


class GuestError(RuntimeError):
    """The guest image could not be built, or QEMU could not be started."""


# --------------------------------------------------------------------------- image build


def cache_root() -> Path:
    env = os.environ.get("SOFTNIC_GUEST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "softnic-guest"


def qemu_available() -> str | None:
    """Path of qemu-system-x86_64, or None."""
    return shutil.which(QEMU)


def _run(cmd: Sequence[str], cwd: str | Path | None = None, timeout: float = 300) -> str:
    try:
        res = subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise GuestError(f"{cmd[0]}: {e}") from e
    if res.returncode != 0:
        raise GuestError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def kernel_package() -> tuple[str, str]:
    """(package, version) of the guest kernel, from the local apt cache (no network).

    One apt-cache call: the meta-package pins its kernel with ``Depends: PKG (= VERSION)``."""
    pkg = os.environ.get("SOFTNIC_GUEST_KERNEL_PKG")
    out = _run(["apt-cache", "show", "--no-all-versions", pkg or KERNEL_META_PKG])
    if pkg:
        m = re.search(r"^Version:\s*(\S+)", out, re.M)
        if m:
            return pkg, m.group(1)
    else:
        m = re.search(r"^Depends:.*?(linux-image-\S+) \(= ([^)]+)\)", out, re.M)
        if m:
            return m.group(1), m.group(2)
    raise GuestError(f"cannot resolve {pkg or KERNEL_META_PKG} from apt (run apt-get update?)")


def _file_id(path: str) -> str:
    st = os.stat(path)
    return f"{path}:{st.st_size}:{int(st.st_mtime)}"


def _ldd_closure(binary: str) -> list[str]:
    """The binary's shared libraries and loader, as absolute paths (from ldd)."""
    libs = []
    for line in _run(["ldd", binary]).splitlines():
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


def _tool_files(tools: Iterable[str]) -> dict[str, str]:
    """Map image path -> host path for each tool (in /usr/local/sbin) and its libraries."""
    files: dict[str, str] = {}
    for name in tools:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
        if path is None:
            raise GuestError(f"host tool {name!r} not found")
        files[f"usr/local/sbin/{name}"] = path
        for lib in _ldd_closure(path):
            files[lib.lstrip("/")] = lib
    return files


class Cpio:
    """A newc cpio archive writer (the format the kernel's initramfs unpacker reads)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1
        self._dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        namez = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(namez), 0,
        )  # fmt: skip
        self._ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields) + namez
        self._parts.append(hdr + b"\0" * (-len(hdr) % 4))
        self._parts.append(data + b"\0" * (-len(data) % 4))

    def mkdir(self, name: str) -> None:
        name = name.strip("/")
        if not name or name in self._dirs:
            return
        self.mkdir(os.path.dirname(name))
        self._dirs.add(name)
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = name.strip("/")
        self.mkdir(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def bytes(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        data = b"".join(self._parts)
        return data + b"\0" * (-len(data) % 512)


def _modinfo(ko: bytes) -> dict[str, list[str]]:
    """Fields of an ELF64 kernel module's .modinfo section (key=value, NUL-separated)."""
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise GuestError("not an ELF64 module")
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, off, size = section(i)
        if ko[stroff + name : ko.index(b"\0", stroff + name)] == b".modinfo":
            for field in ko[off : off + size].split(b"\0"):
                k, sep, v = field.decode("ascii", "replace").partition("=")
                if sep:
                    info.setdefault(k, []).append(v)
    return info


def _modname(path: str) -> str:
    base = os.path.basename(path)
    return base[: base.index(".ko")].replace("-", "_")


def _decompress_ko(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        import lzma

        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko"):
        return data
    raise GuestError(f"unsupported module compression: {path.name}")


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel, base initramfs and the kernel release they belong to."""

    kernel: Path
    initrd: Path
    release: str
    key: str
    tools: tuple[str, ...] = ()


def _image_key(pkg: str, ver: str, modules: Sequence[str], tools: Sequence[str]) -> str:
    h = hashlib.sha256()
    busybox = shutil.which("busybox") or "/bin/busybox"
    tool_ids = [_file_id(p) for p in sorted(_tool_files(tools).values())]
    for part in (HARNESS_VERSION, _INIT, _file_id(busybox), *modules, *tool_ids):
        h.update(part.encode() + b"\0")
    return f"{pkg}_{ver}-{h.hexdigest()[:12]}".replace("/", "_").replace(":", "_")


def image(modules: Sequence[str] = MODULES, tools: Sequence[str] = HOST_TOOLS) -> GuestImage:
    """The cached guest image, built on first use (download ~27 MB, a few seconds).

    Raises GuestError naming what is missing (apt, busybox, the kernel package)."""
    return _image(tuple(modules), tuple(tools))


@functools.lru_cache(maxsize=8)
def _image(modules: tuple[str, ...], tools: tuple[str, ...]) -> GuestImage:
    pkg, ver = kernel_package()
    key = _image_key(pkg, ver, modules, tools)
    root = cache_root()
    final = root / key
    if not (final / "info.json").exists():
        root.mkdir(parents=True, exist_ok=True)
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait, then reuse
            if not (final / "info.json").exists():
                _build(final, pkg, modules, tools)
    info = json.loads((final / "info.json").read_text())
    return GuestImage(
        final / "vmlinuz", final / "initrd.gz", info["release"], key, tuple(info["tools"])
    )


def _build(final: Path, pkg: str, modules: Sequence[str], tools: Sequence[str]) -> None:
    busybox = shutil.which("busybox")
    if busybox is None:
        raise GuestError("busybox not found (Debian package busybox-static)")
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as tmp:
        t = Path(tmp)
        _run(["apt-get", "download", pkg], cwd=t)
        debs = list(t.glob("*.deb"))
        if len(debs) != 1:
            raise GuestError(f"apt-get download {pkg} gave {debs}")
        _run(["dpkg-deb", "-x", str(debs[0]), str(t / "root")])
        vmlinuz = sorted((t / "root" / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestError(f"{pkg} has no /boot/vmlinuz-*")
        release = vmlinuz[0].name[len("vmlinuz-") :]
        moddir = t / "root" / "lib" / "modules" / release

        cpio = Cpio()
        for d in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "mnt", "var/run"):
            cpio.mkdir(d)
        # The kernel opens /dev/console before /init runs, so it must exist in the archive.
        cpio.chardev("dev/console", 5, 1)
        cpio.chardev("dev/null", 1, 3, 0o666)
        cpio.file("bin/busybox", Path(busybox).read_bytes(), 0o755)
        for applet in _run([busybox, "--list-full"]).split():
            if applet != "bin/busybox":
                cpio.symlink(applet, "/bin/busybox")
        for dst, src in sorted(_tool_files(tools).items()):
            cpio.file(dst, Path(src).read_bytes(), 0o755)
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("init", _INIT.encode(), 0o755)
        _add_modules(cpio, moddir, release, modules)

        out = t / "out"
        out.mkdir()
        shutil.copyfile(vmlinuz[0], out / "vmlinuz")
        (out / "initrd.gz").write_bytes(gzip.compress(cpio.bytes(), compresslevel=6, mtime=0))
        (out / "info.json").write_text(
            json.dumps({"package": pkg, "release": release, "tools": list(tools)})
        )
        try:
            os.rename(out, final)
        except OSError:
            if not (final / "info.json").exists():
                raise


def _add_modules(cpio: Cpio, moddir: Path, release: str, wanted: Sequence[str]) -> None:
    """Copy the wanted modules and their dependency closure; write modules.dep/.alias."""
    files = {_modname(str(p)): p for p in moddir.rglob("*.ko*")}
    builtin_txt = (
        (moddir / "modules.builtin").read_text() if (moddir / "modules.builtin").exists() else ""
    )
    builtin = {_modname(line) for line in builtin_txt.split()}
    todo = [m.replace("-", "_") for m in wanted]
    missing = [m for m in todo if m not in files and m not in builtin]
    if missing:
        raise GuestError(f"modules not in {release}: {missing}")
    infos: dict[str, dict[str, list[str]]] = {}
    data: dict[str, bytes] = {}
    while todo:
        name = todo.pop()
        if name in infos or name in builtin:
            continue
        data[name] = _decompress_ko(files[name])
        infos[name] = _modinfo(data[name])
        todo += [
            d.replace("-", "_")
            for dep in infos[name].get("depends", [])
            for d in dep.split(",")
            if d
        ]
    base = f"lib/modules/{release}"

    def rel(name: str) -> str:
        p = files[name].relative_to(moddir).as_posix()
        return p[: p.index(".ko")] + ".ko"

    def closure(name: str) -> list[str]:
        # kmod's modules.dep order: every transitive dependency, each one before its own
        # dependencies, so loading the list from its end up is a valid order.
        post: list[str] = []

        def visit(m: str) -> None:
            for d in infos[m].get("depends", [""])[0].split(","):
                d = d.replace("-", "_")
                if d and d in infos and d not in post:
                    visit(d)
                    post.append(d)

        visit(name)
        return post[::-1]

    dep_lines, alias_lines = [], []
    for name in sorted(infos):
        cpio.file(f"{base}/{rel(name)}", data[name])
        dep_lines.append(f"{rel(name)}: " + " ".join(rel(d) for d in closure(name)))
        alias_lines += [f"alias {a} {name}" for a in infos[name].get("alias", [])]
    cpio.file(f"{base}/modules.dep", ("\n".join(dep_lines) + "\n").encode())
    aliases = ("\n".join(alias_lines) + "\n").encode()
    cpio.file(f"{base}/modules.alias", aliases)
    # busybox modprobe takes aliases only from modprobe.d; the kernel asks for
    # "crypto-rfc4106(gcm(aes))", "net-pf-16-proto-6" and the like when an SA is created.
    cpio.file("etc/modprobe.d/aliases.conf", aliases)
    cpio.file(f"{base}/modules.builtin", builtin_txt.encode())


# --------------------------------------------------------------------------- the guest


def _prelude(tools: Iterable[str]) -> str:
    """Shell functions that make each host tool win over the busybox applet of that name:
    Debian's busybox shell runs its applets before searching PATH (SH_STANDALONE)."""
    return "".join(f'{t}() {{ /usr/local/sbin/{t} "$@"; }}\n' for t in dict.fromkeys(tools))


def _die_with_parent() -> None:
    """Child side of fork: QEMU gets SIGKILL if the test process dies first (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _netdev_id(netdev_args: Sequence[str]) -> str | None:
    args = list(netdev_args)
    for i, a in enumerate(args[:-1]):
        if a in ("-netdev", "--netdev"):
            m = re.search(r"(?:^|,)id=([^,]+)", args[i + 1])
            if m:
                return m.group(1)
    return None


class Guest:
    """One QEMU guest running a shell script; a context manager that always kills QEMU.

    netdev_args: QEMU arguments that define exactly one netdev (e.g. ``["-netdev",
      "tap,id=n0,ifname=tap0,script=no,downscript=no"]`` or ``["-chardev",
      "socket,id=c0,path=SOCK", "-netdev", "vhost-user,id=n0,chardev=c0"]``), or ``[]`` for a
      guest without a NIC. The harness adds the ``virtio-net-pci`` device on that netdev.
    mac: the NIC's MAC; inside the guest the NIC with it is ``$SN_IF`` (already up).
    script: ``sh`` script run as root in the guest; its exit status is the guest's result.
    mem_mb: guest RAM. shared_mem: back it with a shared memfd (needed by vhost-user);
      None means "when the netdev is vhost-user".
    device_opts: extra ``virtio-net-pci`` properties, e.g. ``"mrg_rxbuf=on,host_tso4=on"``.
    msix: False (default) adds ``vectors=0``: legacy INTx. QEMU 7.2 under TCG crashes when a
      guest starts a vhost-user NIC with MSI-X vectors (KVM-only path in vhost_net_start).
    netns: run QEMU inside this network namespace (``ip netns exec``), e.g. to open a TAP
      device that lives there.
    tools: extra host programs to copy into this guest (with their libraries).
    accel: "tcg" (default, or $SOFTNIC_GUEST_ACCEL) or "kvm" (with ``-cpu host``).
    smp: vCPUs (a Linux guest enables as many virtio-net queue pairs as it has vCPUs).
    timeout: default for :meth:`wait`, seconds.

    With a vhost-user netdev QEMU connects to (or, with ``server=on``, waits for) the
    backend before the guest runs at all, even with ``wait=off``: start the backend first,
    or count its start-up in the timeout. The script is not logged; never echo keys in it.
    """

    def __init__(
        self,
        netdev_args: Sequence[str],
        mac: str = "52:54:00:12:34:56",
        script: str = "true\n",
        mem_mb: int = 256,
        timeout: float = 120.0,
        *,
        shared_mem: bool | None = None,
        device_opts: str = "",
        msix: bool = False,
        netns: str | None = None,
        tools: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        append: str = "",
        accel: str | None = None,
        img: GuestImage | None = None,
        smp: int = 1,
    ) -> None:
        if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", mac):
            raise ValueError(f"bad MAC {mac!r}")
        self.netdev_args = list(netdev_args)
        self.netdev_id = _netdev_id(self.netdev_args)
        if self.netdev_args and self.netdev_id is None:
            raise ValueError("netdev_args must contain '-netdev TYPE,id=NAME,...'")
        self.mac = mac.lower()
        self.script = script
        self.mem_mb = int(mem_mb)
        if not 1 <= int(smp) <= 8:
            raise ValueError("smp must be 1..8")
        self.smp = int(smp)
        self.timeout = float(timeout)
        joined = " ".join(self.netdev_args)
        self.shared_mem = "vhost-user" in joined if shared_mem is None else shared_mem
        self.device_opts = device_opts
        self.msix = msix
        self.netns = netns
        self.tools = tuple(tools)
        self.extra_args = list(extra_args)
        self.append = append
        # TCG unless asked: /dev/kvm may exist yet be unusable (nested, MSR faults).
        self.accel = accel or os.environ.get("SOFTNIC_GUEST_ACCEL", "tcg")
        if self.accel not in ("tcg", "kvm"):
            raise ValueError(f"accel must be 'tcg' or 'kvm', not {self.accel!r}")
        self._img = img
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._t0 = 0.0
        self.console = ""
        self._raw = b""
        self._pos = 0
        self.returncode: int | None = None
        # QEMU start to the BEGIN marker, as seen by wait()/wait_for() polling (20 Hz); use
        # guest_uptime for a guest that was not being polled while it booted.
        self.boot_seconds: float | None = None
        self.run_seconds: float | None = None  # QEMU start to exit

    # -- command line

    def cmdline(self, initrd: str | Path | None = None) -> list[str]:
        """The exact QEMU argv (with ``ip netns exec`` in front when netns is set)."""
        img = self._image()
        argv = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]
        argv += (
            ["-accel", "kvm", "-cpu", "host"]
            if self.accel == "kvm"
            else ["-accel", "tcg", "-cpu", "max"]
        )
        argv += ["-smp", str(self.smp), "-m", f"{self.mem_mb}M"]
        if self.shared_mem:
            argv += [
                "-object", f"memory-backend-memfd,id=mem0,size={self.mem_mb}M,share=on",
                "-numa", "node,memdev=mem0",
            ]  # fmt: skip
        cmdline = "console=ttyS0 panic=-1 loglevel=4"
        if self.netdev_args:  # /init waits for the NIC with this MAC
            cmdline += f" sn.mac={self.mac}"
        cmdline = f"{cmdline} {self.append}".strip()
        argv += ["-kernel", str(img.kernel), "-initrd", str(initrd or img.initrd)]
        argv += ["-append", cmdline, "-serial", "stdio"]
        if self.netdev_args:
            dev = f"virtio-net-pci,netdev={self.netdev_id},mac={self.mac}"
            if not self.msix:
                dev += ",vectors=0"
            if self.device_opts:
                dev += "," + self.device_opts
            argv += self.netdev_args + ["-device", dev]
        argv += self.extra_args
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        return argv

    def _image(self) -> GuestImage:
        if self._img is None:
            self._img = image()
        return self._img

    # -- lifecycle

    def start(self) -> Guest:
        """Build this guest's initrd (image + /test.sh) and start QEMU. Returns self."""
        if self._proc is not None:
            raise GuestError("guest already started")
        if qemu_available() is None:
            raise GuestError(f"{QEMU} not found (Debian package qemu-system-x86)")
        img = self._image()
        self._dir = tempfile.TemporaryDirectory(prefix="softnic-guest-")
        d = Path(self._dir.name)
        overlay = Cpio()
        overlay.file("test.sh", (_prelude((*img.tools, *self.tools)) + self.script).encode(), 0o755)
        for dst, src in sorted(_tool_files(self.tools).items()):
            overlay.file(dst, Path(src).read_bytes(), 0o755)
        initrd = d / "initrd"
        with open(initrd, "wb") as f:
            f.write(img.initrd.read_bytes())
            f.write(gzip.compress(overlay.bytes(), compresslevel=1, mtime=0))
        self._log = d / "console.log"
        argv = self.cmdline(initrd)
        with open(self._log, "wb") as log:
            self._t0 = time.monotonic()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=_die_with_parent,
                )
            except OSError as e:
                raise GuestError(f"cannot start QEMU: {e}") from e
        return self

    def _read(self) -> str:
        """The console so far; reads only what QEMU appended since the last call."""
        if self._log is None:
            return self.console
        try:
            with open(self._log, "rb") as f:
                f.seek(self._pos)
                chunk = f.read()
        except OSError:
            return self.console
        if chunk:
            self._pos += len(chunk)
            self._raw += chunk
            self.console = self._raw.decode("utf-8", "replace").replace("\r\n", "\n")
        return self.console

    def _note_boot(self, text: str) -> None:
        if self.boot_seconds is None and BEGIN_MARK in text:
            self.boot_seconds = time.monotonic() - self._t0

    def wait_for(self, pattern: str, timeout: float | None = None) -> re.Match[str]:
        """Wait until the console matches the regex; on timeout or QEMU exit, kill and raise."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        rx = re.compile(pattern)
        while True:
            text = self._read()
            self._note_boot(text)
            m = rx.search(text)
            if m:
                return m
            exited = self._proc is None or self._proc.poll() is not None
            if exited or time.monotonic() > deadline:
                self.kill()
                why = "QEMU exited" if exited else "timeout"
                raise GuestError(f"{why} waiting for {pattern!r}; console:\n{self._read()[-4000:]}")
            time.sleep(0.05)

    def wait(self, timeout: float | None = None) -> tuple[int | None, str]:
        """Wait for QEMU to exit (the script ends with poweroff) at most `timeout` seconds.

        Returns (script exit status, console text). The status is None when the END marker
        never came: timeout (QEMU is then killed), QEMU error, kernel panic."""
        if self._proc is None:
            raise GuestError("guest not started")
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while self._proc.poll() is None and time.monotonic() < deadline:
            self._note_boot(self._read())
            time.sleep(0.05)
        if self._proc.poll() is None:
            self.kill()
        elif self.run_seconds is None:
            self.run_seconds = time.monotonic() - self._t0
        text = self._read()
        self._note_boot(text)
        m = END_RE.search(text)
        self.returncode = int(m.group(1)) if m else None
        return self.returncode, text

    @property
    def script_output(self) -> str:
        """The console between the BEGIN and END markers (kernel messages may interleave)."""
        text = self._read()
        start = text.find(BEGIN_MARK)
        if start < 0:
            return ""
        start = text.find("\n", start) + 1
        m = END_RE.search(text, start)
        return text[start : m.start() if m else len(text)]

    @property
    def virtio_features(self) -> int | None:
        """The NIC's negotiated virtio feature bits as the guest driver reports them (sysfs),
        e.g. ``1 << 11`` is VIRTIO_NET_F_HOST_TSO4 (virtio 1.x §5.1.3); None before boot or
        without a NIC."""
        m = re.search(BEGIN_MARK + r" .*?features=([01]*)@@", self._read())
        if not m or not m.group(1):
            return None
        return sum(1 << i for i, c in enumerate(m.group(1)) if c == "1")

    @property
    def guest_uptime(self) -> float | None:
        """The guest kernel's uptime when /init started the script (kernel boot + driver
        probe), from the BEGIN marker; None before that."""
        m = re.search(BEGIN_MARK + r" uptime=([0-9.]+)", self._read())
        return float(m.group(1)) if m else None

    @property
    def running(self) -> bool:
        """QEMU started and not yet exited."""
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """Kill QEMU (if running) and reap it. Idempotent."""
        p = self._proc
        if p is not None and p.poll() is None:
            p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    def close(self) -> None:
        """Kill QEMU and remove the temporary directory (the console text is kept)."""
        self.kill()
        self._read()
        self._log = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Guest:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = (
            "new" if self._proc is None else ("running" if self._proc.poll() is None else "exited")
        )
        return f"<Guest mac={self.mac} netdev={self.netdev_id} {state}>"


# ---- a TCP exchange between a guest and a host-side peer (for tests)

# The host side, run with ``python -c`` (in a namespace): accept one connection, send N
# random bytes while receiving until EOF, then print both digests as JSON.
EXCHANGE_SERVER = r"""
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
print(json.dumps({"sent": hashlib.sha256(payload).hexdigest(), "sent_len": n,
                  "recv": hashlib.sha256(got).hexdigest(), "recv_len": len(got)}), flush=True)
"""
# What a guest script prints of the bytes it sent (TX) and received (RX): sha256, length.
TX_RE = re.compile(r"^TX ([0-9a-f]{64}) (\d+)$", re.M)
RX_RE = re.compile(r"^RX ([0-9a-f]{64}) (\d+)$", re.M)


def exchange_server_argv(addr: str, port: int, n: int) -> list[str]:
    """The command of EXCHANGE_SERVER listening on addr:port, sending n bytes."""
    return [sys.executable, "-c", EXCHANGE_SERVER, addr, str(port), str(n)]


def wait_listening(server: subprocess.Popen[str], timeout: float = 20) -> None:
    """Return once the exchange server (started with stdout=PIPE, text=True) listens."""
    import select

    assert server.stdout is not None
    ready, _, _ = select.select([server.stdout], [], [], timeout)
    if not ready or server.stdout.readline().strip() != "ready":
        raise GuestError("the exchange server did not start")


def print_cmdline(guest: Guest, file=None) -> str:  # type: ignore[no-untyped-def]
    """Print (and return) the guest's exact QEMU command line, shell-quoted."""
    line = shlex.join(guest.cmdline())
    print(line, file=file or sys.stdout)
    return line


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m softnic.guest", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build (or find) the cached image and print its paths")
    for name in ("cmdline", "run"):
        p = sub.add_parser(name)
        p.add_argument("--netdev", nargs=argparse.REMAINDER, default=[],
                       help="QEMU netdev arguments (last option)")  # fmt: skip
        p.add_argument("--mac", default="52:54:00:12:34:56")
        p.add_argument("--mem", type=int, default=256)
        p.add_argument("--script", help="file with the guest script (run only)")
        p.add_argument("--netns")
        p.add_argument("--timeout", type=float, default=120)
    a = ap.parse_args(argv)
    if a.cmd == "build":
        t0 = time.monotonic()
        img = image()
        print(f"kernel {img.kernel}\ninitrd {img.initrd}\nrelease {img.release}")
        print(f"({time.monotonic() - t0:.1f} s)")
        return 0
    script = Path(a.script).read_text() if a.script else "uname -a\n"
    g = Guest(a.netdev, a.mac, script, a.mem, a.timeout, netns=a.netns)
    if a.cmd == "cmdline":
        print_cmdline(g)
        return 0
    with g:
        rc, out = g.wait()
    print(out)
    print(f"rc={rc} boot={g.boot_seconds} total={g.run_seconds}", file=sys.stderr)
    return 1 if rc is None else rc


if __name__ == "__main__":
    sys.exit(main())
