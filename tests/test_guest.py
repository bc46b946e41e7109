"""The QEMU guest harness (softnic.guest): command line, initramfs format, and real guests.

The guest tests boot a Debian cloud kernel under QEMU TCG. Oracles nobody here wrote: the
guest's Linux virtio_net, TCP and ICMP stacks, busybox's ping, nc, sha256sum and cpio,
iproute2, and Python's hashlib on the host side.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from softnic import guest as G

FAKE_IMG = G.GuestImage(Path("/img/vmlinuz"), Path("/img/initrd.gz"), "6.1.0-test", "k", ("ip",))


def _need_qemu() -> None:
    if G.qemu_available() is None:
        pytest.skip("qemu-system-x86_64 not installed (Debian package qemu-system-x86)")
    for tool in ("busybox", "apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: cannot build the guest image")


@pytest.fixture(scope="module")
def img() -> G.GuestImage:
    _need_qemu()
    t0 = time.monotonic()
    image = G.image()
    print(f"\nguest image {image.release} ready in {time.monotonic() - t0:.1f} s")
    return image


# ------------------------------------------------------------------ no QEMU needed


def test_cmdline_vhost_user_shares_memory_and_uses_intx() -> None:
    args = ["-chardev", "socket,id=c0,path=/run/vf0.sock", "-netdev", "vhost-user,id=n0,chardev=c0"]
    g = G.Guest(args, "52:54:00:aa:bb:cc", "true", mem_mb=512, img=FAKE_IMG)
    argv = g.cmdline()
    line = shlex.join(argv)
    assert "memory-backend-memfd,id=mem0,size=512M,share=on" in argv
    assert argv[argv.index("-numa") + 1] == "node,memdev=mem0"
    assert argv[argv.index("-m") + 1] == "512M"
    dev = argv[argv.index("-device") + 1]
    assert dev == "virtio-net-pci,netdev=n0,mac=52:54:00:aa:bb:cc,vectors=0"
    assert "-netdev vhost-user,id=n0,chardev=c0" in line
    assert argv[argv.index("-accel") + 1] in ("tcg", "kvm")
    assert "sn.mac=52:54:00:aa:bb:cc" in argv[argv.index("-append") + 1]


def test_cmdline_tap_in_netns_no_shared_memory() -> None:
    g = G.Guest(
        ["-netdev", "tap,id=t7,ifname=tap0,script=no,downscript=no"],
        "52:54:00:00:00:01",
        netns="ns1",
        device_opts="mrg_rxbuf=on",
        msix=True,
        img=FAKE_IMG,
    )
    argv = g.cmdline()
    assert argv[:4] == ["ip", "netns", "exec", "ns1"]
    assert not any("memory-backend" in a for a in argv)
    assert (
        argv[argv.index("-device") + 1]
        == "virtio-net-pci,netdev=t7,mac=52:54:00:00:00:01,mrg_rxbuf=on"
    )


def test_print_cmdline_round_trips_through_shell_quoting(
    capsys: pytest.CaptureFixture[str],
) -> None:
    g = G.Guest(["-netdev", "user,id=n0"], img=FAKE_IMG, append="foo='a b'")
    line = G.print_cmdline(g)
    assert capsys.readouterr().out.strip() == line
    assert shlex.split(line) == g.cmdline()


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        G.Guest(["-netdev", "user"], img=FAKE_IMG)  # no id=
    with pytest.raises(ValueError):
        G.Guest([], mac="52:54:00:00:00", img=FAKE_IMG)
    with pytest.raises(ValueError):
        G.Guest([], accel="hvf", img=FAKE_IMG)


def test_cpio_is_read_by_busybox(tmp_path: Path) -> None:
    if shutil.which("busybox") is None:
        pytest.skip("busybox not installed")
    c = G.Cpio()
    c.file("a/b/c.txt", b"hello\n")
    c.file("x", b"12345", 0o755)  # length not a multiple of 4: padding must be right
    c.symlink("a/link", "/x")
    c.mkdir("empty/dir")
    (tmp_path / "ar.cpio").write_bytes(c.bytes())
    subprocess.run(
        "busybox cpio -i -d < ar.cpio", shell=True, cwd=tmp_path, check=True, capture_output=True
    )
    assert (tmp_path / "a/b/c.txt").read_bytes() == b"hello\n"
    assert (tmp_path / "x").read_bytes() == b"12345"
    assert os.stat(tmp_path / "x").st_mode & 0o777 == 0o755
    assert os.readlink(tmp_path / "a/link") == "/x"
    assert (tmp_path / "empty/dir").is_dir()


# ------------------------------------------------------------------ real guests


@pytest.mark.qemu
def test_image_contents(img: G.GuestImage, tmp_path: Path) -> None:
    """busybox cpio lists what the kernel will unpack; modules.dep lists real files."""
    (tmp_path / "i.cpio").write_bytes(gzip.decompress(img.initrd.read_bytes()))
    out = subprocess.run(
        ["busybox", "cpio", "-t"], stdin=open(tmp_path / "i.cpio", "rb"),  # noqa: SIM115
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    names = set(out)
    assert {"init", "bin/busybox", "dev/console", "usr/local/sbin/ip"} <= names
    base = f"lib/modules/{img.release}"
    dep = subprocess.run(
        ["busybox", "cpio", "-i", "--to-stdout", f"{base}/modules.dep"],
        stdin=open(tmp_path / "i.cpio", "rb"), capture_output=True, text=True, check=True,  # noqa: SIM115
    ).stdout  # fmt: skip
    for line in dep.splitlines():
        mod, _, deps = line.partition(":")
        for f in [mod, *deps.split()]:
            assert f"{base}/{f}" in names, f
    assert re.search(r"^kernel/net/ipv4/esp4\.ko: .*xfrm_algo\.ko", dep, re.M)


@pytest.mark.qemu
def test_wait_timeout_kills_qemu(img: G.GuestImage) -> None:
    g = G.Guest([], script="echo sleeping; sleep 1000\n", timeout=60, img=img)
    with g:
        g.wait_for(r"(?m)^sleeping$", 60)  # the script runs; now it never ends
        assert g.running and g.boot_seconds is not None
        t0 = time.monotonic()
        rc, _ = g.wait(timeout=2)
        assert time.monotonic() - t0 < 15
        assert rc is None
        assert not g.running
    with pytest.raises(G.GuestError):  # wait_for on a dead guest raises at once
        g.wait_for("never", timeout=1)


@pytest.mark.qemu
def test_guest_loads_esp4_and_vxlan(img: G.GuestImage) -> None:
    """The modules path works: esp4/vxlan load, an AEAD SA and a vxlan link are created
    (the SA pulls gcm/ctr/seqiv/drbg in by alias, as later ESP tests will need)."""
    script = r"""
set -e
modprobe esp4; echo OK-esp4
modprobe vxlan; echo OK-vxlan
ip link add vx0 type vxlan id 4242 dstport 4789 local 192.0.2.1 remote 192.0.2.2
ip -d link show vx0 | grep -q 'vxlan id 4242' && echo OK-vxlan-link
# Random key, never printed.
KEY=0x$(head -c 20 /dev/urandom | xxd -p -c 64)
ip xfrm state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x1234 mode transport \
    aead 'rfc4106(gcm(aes))' "$KEY" 128
ip xfrm state count | grep -q 'count 1' && echo OK-xfrm
lsmod | cut -d' ' -f1 | sort | tr '\n' ' '; echo
"""
    # Also the vhost-user memory layout (shared memfd RAM, NUMA node, INTx NIC) on QEMU's
    # user-mode netdev: the guest must boot and bring the NIC up with that configuration.
    netdev = ["-netdev", "user,id=n0,restrict=on"]
    with G.Guest(
        netdev, script=script + "echo IF=$SN_IF\n", timeout=60, shared_mem=True, img=img
    ) as g:
        assert "share=on" in " ".join(g.cmdline())
        rc, out = g.wait()
    assert rc == 0, out[-3000:]
    assert "IF=eth0" in g.script_output
    for tag in ("OK-esp4", "OK-vxlan", "OK-vxlan-link", "OK-xfrm"):
        assert tag in g.script_output, out[-3000:]
    loaded = g.script_output.strip().splitlines()[-2].split()
    assert {"esp4", "vxlan", "xfrm_user", "gcm"} <= set(loaded)
    print(f"boot {g.boot_seconds:.1f} s, run {g.run_seconds:.1f} s")


@pytest.mark.qemu
def test_device_opts_reach_the_negotiated_features(img: G.GuestImage) -> None:
    """The guest's virtio_net reports what it negotiated with QEMU's device (virtio 1.x
    §5.1.3, §6): with event_idx=off and mrg_rxbuf=off (both on by default) those bits are
    clear; VERSION_1, MAC and INDIRECT_DESC are set. (A user netdev has no vnet header, so
    QEMU offers no checksum/TSO bits here; a TAP or vhost-user netdev does.)"""
    mac_bit, mrg_rxbuf, indirect, event_idx, version_1 = 5, 15, 28, 29, 32
    netdev = ["-netdev", "user,id=n0,restrict=on"]
    opts = "event_idx=off,mrg_rxbuf=off"
    # Also a per-guest host tool (iperf3, with its libraries) in the overlay archive.
    tools = ("iperf3",) if shutil.which("iperf3") else ()
    script = "iperf3 --version\n" if tools else "true\n"
    with G.Guest(netdev, script=script, timeout=60, device_opts=opts, tools=tools, img=img) as g:
        rc, out = g.wait()
    assert rc == 0, out[-3000:]
    assert not tools or g.script_output.startswith("iperf 3"), g.script_output
    f = g.virtio_features
    assert f is not None, out[-3000:]
    for bit in (version_1, mac_bit, indirect):
        assert f >> bit & 1, (bit, hex(f))
    for bit in (event_idx, mrg_rxbuf):
        assert not f >> bit & 1, (bit, hex(f))


@pytest.fixture
def tap_netns():
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and a TAP device")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 not installed")
    ns = f"sngst{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            "ip tuntap add dev sntap0 mode tap",
            "ip addr add 10.77.0.1/24 dev sntap0",
            "ip link set sntap0 up",
            "ip link set lo up",
        ):
            subprocess.run(["ip", "netns", "exec", ns, *cmd.split()], check=True)
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.mark.qemu
@pytest.mark.netns
def test_guest_on_tap_pings_and_exchanges_tcp(img: G.GuestImage, tap_netns: str) -> None:
    n = 1 << 20
    server = subprocess.Popen(
        ["ip", "netns", "exec", tap_netns, *G.exchange_server_argv("10.77.0.1", 5555, n)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        G.wait_listening(server)
        script = f"""
ip addr add 10.77.0.2/24 dev $SN_IF
ping -c 3 -W 5 10.77.0.1 || exit 10
dd if=/dev/urandom of=/tmp/tx bs=4096 count={n // 4096} 2>/dev/null
echo "TX $(sha256sum < /tmp/tx | cut -d' ' -f1) $(wc -c < /tmp/tx)"
nc 10.77.0.1 5555 < /tmp/tx > /tmp/rx || exit 11
echo "RX $(sha256sum < /tmp/rx | cut -d' ' -f1) $(wc -c < /tmp/rx)"
"""
        netdev = ["-netdev", "tap,id=n0,ifname=sntap0,script=no,downscript=no"]
        with G.Guest(
            netdev, "52:54:00:77:00:02", script, timeout=90, netns=tap_netns, img=img
        ) as g:
            rc, out = g.wait()
        sout, serr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    assert rc == 0, out[-3000:]
    text = g.script_output
    assert "3 packets transmitted, 3 packets received" in text, text
    tx, rx = G.TX_RE.search(text), G.RX_RE.search(text)
    assert tx and rx, text
    res = json.loads(sout.strip().splitlines()[-1])
    # host -> guest: what the host sent is what busybox hashed in the guest
    assert (rx.group(1), int(rx.group(2))) == (res["sent"], n)
    # guest -> host: what the guest hashed is what the host received
    assert (tx.group(1), int(tx.group(2))) == (res["recv"], res["recv_len"])
    assert res["recv_len"] == n
    # A TAP netdev has a vnet header: the guest negotiated CSUM (bit 0) and HOST_TSO4 (11).
    f = g.virtio_features
    assert f is not None and f & 1 and f >> 11 & 1, f
    print(f"boot {g.boot_seconds:.1f} s, run {g.run_seconds:.1f} s")


def _free_udp_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.qemu
def test_two_guests_ping_and_tcp_over_udp_socket_netdev(img: G.GuestImage) -> None:
    """Two guests at once, wired by QEMU's UDP socket netdev on loopback (no root): B pings
    A and sends it 256 KiB over TCP; both guests' busybox sha256sum must agree."""
    pa, pb = _free_udp_ports(2)
    recv = r"""
ip addr add 10.78.0.1/24 dev $SN_IF
printf '#!/bin/sh\ncat > /tmp/rx\n' > /tmp/recv.sh; chmod +x /tmp/recv.sh
echo LISTENING
nc -l -p 5000 -e /tmp/recv.sh || exit 12
echo "RX $(sha256sum < /tmp/rx | cut -d' ' -f1) $(wc -c < /tmp/rx)"
"""
    send = r"""
ip addr add 10.78.0.2/24 dev $SN_IF
ping -c 3 -W 5 10.78.0.1 || exit 10
dd if=/dev/urandom of=/tmp/tx bs=4096 count=64 2>/dev/null
echo "TX $(sha256sum < /tmp/tx | cut -d' ' -f1) $(wc -c < /tmp/tx)"
i=0
until nc 10.78.0.1 5000 < /tmp/tx; do
    i=$((i + 1)); [ $i -ge 30 ] && exit 11; sleep 1
done
"""
    na = ["-netdev", f"socket,id=n0,udp=127.0.0.1:{pb},localaddr=127.0.0.1:{pa}"]
    nb = ["-netdev", f"socket,id=n0,udp=127.0.0.1:{pa},localaddr=127.0.0.1:{pb}"]
    with (
        G.Guest(na, "52:54:00:78:00:01", recv, timeout=90, img=img) as a,
        G.Guest(nb, "52:54:00:78:00:02", send, timeout=90, img=img) as b,
    ):
        rcb, outb = b.wait()
        rca, outa = a.wait(30)
    assert rcb == 0, outb[-3000:]
    assert rca == 0, outa[-3000:]
    assert "3 packets transmitted, 3 packets received" in b.script_output
    tx = re.search(r"^TX ([0-9a-f]{64}) (\d+)$", b.script_output, re.M)
    rx = re.search(r"^RX ([0-9a-f]{64}) (\d+)$", a.script_output, re.M)
    assert tx and rx, (a.script_output, b.script_output)
    assert tx.groups() == rx.groups() and int(rx.group(2)) == 64 * 4096
    assert a.guest_uptime is not None and b.guest_uptime is not None
    print(
        f"guest uptime at script {a.guest_uptime:.1f}/{b.guest_uptime:.1f} s, run {b.run_seconds:.1f} s"
    )
