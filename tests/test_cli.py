"""softnicctl as a user runs it: a real subprocess against a real admin socket. Each verb,
tables and --json, exit statuses, one-line errors (never a traceback), and no key in any
output. pcap files written by `capture` are read back with dpkt."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import dpkt
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_admin import CONFIG, KEY, KEY_FORMS, RecordingDatapath, short_dir  # noqa: E402

from softnic.admin import AdminServer  # noqa: E402
from softnic.config import load  # noqa: E402
from softnic.control import Controller  # noqa: E402

# An exception in a server or reader thread fails the test, not just warns.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = "0x" + KEY.hex()
K36 = "0x" + (KEY + KEY[:16]).hex()
K16 = "0x" + KEY[:16].hex()
K32 = "0x" + (KEY + KEY[:12]).hex()


class Env:
    pass


@pytest.fixture
def env():
    e = Env()
    e.dir = short_dir()
    e.cfg = os.path.join(e.dir, "softnic.toml")
    with open(e.cfg, "w") as f:
        f.write(CONFIG)
    e.dp = RecordingDatapath()
    e.ctl = Controller(e.dp, load(e.cfg), loader=lambda: load(e.cfg))
    e.sock = os.path.join(e.dir, "admin.sock")
    e.srv = AdminServer(e.ctl, e.sock)
    e.srv.start()
    yield e
    e.srv.stop()
    shutil.rmtree(e.dir, ignore_errors=True)


def cmd(e, line):
    return [sys.executable, "-m", "softnic.cli", "-s", e.sock] + shlex.split(line)


def check_output_clean(out, err):
    assert "Traceback" not in err and "Traceback" not in out
    # pytest.fail, not assert: a failing assertion would print the text, key and all.
    if any(form in out or form in err for form in KEY_FORMS):
        pytest.fail("key material in CLI output")


def ctl(e, line, rc=0):
    r = subprocess.run(cmd(e, line), capture_output=True, text=True, timeout=30, cwd=ROOT)
    check_output_clean(r.stdout, r.stderr)
    assert r.returncode == rc, f"{line!r}: rc={r.returncode} stderr={r.stderr.strip()}"
    return r


def js(e, line):
    return json.loads(ctl(e, "--json " + line).stdout)


GCM_OUT = (f"sa add vf vm1 dir out src 10.0.0.1 dst 10.0.0.3 proto esp spi 0x1001 reqid 1 "
           f"mode tunnel aead 'rfc4106(gcm(aes))' {K} 128 replay-window 128 flag esn")
CHACHA_IN = (f"sa add vf vm1 dir in src 10.0.0.3 dst 10.0.0.1 proto esp spi 0x1002 reqid 1 "
             f"mode transport aead 'rfc7539esp(chacha20,poly1305)' {K36} 128 "
             f"limit byte-soft 1000000 limit packet-hard 5000000")
CBC_UPLINK = (f"sa add uplink dir out src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x2001 reqid 7 "
              f"mode transport enc 'cbc(aes)' {K16} auth-trunc 'hmac(sha256)' {K32} 128 "
              f"encap espinudp 4500 4500 0.0.0.0")


def test_version_and_help(env):
    assert "admin protocol 1" in ctl(env, "version").stdout
    assert js(env, "version")["protocol"] == 1
    assert "usage: softnicctl" in ctl(env, "--help").stdout


def test_vf_verbs(env):
    ctl(env, "vf add vm3 kind tap mac 02:00:00:00:00:03 vni 100 netns ns3 addr 10.0.0.3/24 "
             "ipsec enforce")
    out = ctl(env, "vf list").stdout.splitlines()
    assert out[0].split() == ["NAME", "KIND", "PORT", "MAC", "VNI", "MTU", "IPSEC", "SAS",
                              "LINK", "GUEST"]
    assert out[3].split()[:5] == ["vm3", "tap", "vm3", "02:00:00:00:00:03", "100"]
    assert [v["name"] for v in js(env, "vf list")] == ["vm1", "vm2", "vm3"]
    assert "netns: ns3" in ctl(env, "vf show vm3").stdout
    assert js(env, "vf show vm3")["vf"]["addresses"] == ["10.0.0.3/24"]
    assert ctl(env, "vf del vm3").stdout.strip() == "del vf vm3"
    assert "vm3" not in env.dp.vfs


def test_sa_verbs(env):
    for line in (GCM_OUT, CHACHA_IN, CBC_UPLINK):
        ctl(env, line)
    table = ctl(env, "sa list").stdout.splitlines()
    assert table[0].split()[:4] == ["SCOPE", "DIR", "SPI", "SRC"]
    assert {r.split()[2] for r in table[1:]} == {"0x00001001", "0x00001002", "0x00002001"}
    assert len(js(env, "sa list vf vm1")) == 2
    got = ctl(env, "sa get vf vm1 spi 0x1001").stdout
    assert "aead 'rfc4106(gcm(aes))' <redacted> 128" in got and "flag esn" in got
    assert "packets 5" in got
    assert js(env, "sa get uplink spi 0x2001")["auth_key"] == "<redacted>"
    sa = env.dp.sas[("vm1", "in", 0x1002)]
    if sa.key.reveal() != bytes.fromhex(K36[2:]):
        pytest.fail("key bytes differ")
    assert sa.hard_packets == 5000000
    ctl(env, "sa del vf vm1 spi 0x1001 dir out")
    assert ctl(env, "sa flush vf vm1").stdout.strip() == "del sa vm1/in/0x00001002"
    assert ctl(env, "sa flush").stdout.strip() == "del sa uplink/out/0x00002001"
    assert env.dp.sas == {}


def test_keys_from_file_and_stdin(env):
    """Keys can stay out of argv (which any local user can read in /proc/PID/cmdline)."""
    kf = os.path.join(env.dir, "k.hex")
    with open(kf, "w") as f:
        f.write(K16 + "\n")
    os.chmod(kf, 0o600)
    line = CBC_UPLINK.replace(K32, "-").replace(K16, "@" + kf)
    assert K16 not in line and K32 not in line
    r = subprocess.run(cmd(env, line), input=K32[2:] + "\n", capture_output=True, text=True,
                       timeout=30, cwd=ROOT)
    check_output_clean(r.stdout, r.stderr)
    assert r.returncode == 0, r.stderr
    sa = env.dp.sas[("uplink", "out", 0x2001)]
    if sa.key.reveal() != bytes.fromhex(K16[2:]) or sa.auth_key.reveal() != bytes.fromhex(K32[2:]):
        pytest.fail("key bytes differ")
    r = subprocess.run(cmd(env, line.replace("@" + kf, "@/nonexistent")), input="",
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2 and "key file /nonexistent" in r.stderr


def test_a_key_on_the_command_line_is_warned_about(env):
    """A key typed into argv is readable by every local user while softnicctl runs (ps,
    /proc/PID/cmdline): softnicctl says so, once per key, and points to @FILE or stdin; a
    key from a file or stdin draws no warning. No output holds the key."""
    r = ctl(env, CBC_UPLINK)
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 2, r.stderr       # the cipher key and the auth key
    assert all("@FILE" in w and "ps" in w for w in warnings)
    assert "key given on the command line" in warnings[0]
    assert "auth_key given on the command line" in warnings[1]
    kf = os.path.join(env.dir, "k.hex")
    with open(kf, "w") as f:
        f.write(K16 + "\n")
    line = CBC_UPLINK.replace(K32, "-").replace(K16, "@" + kf).replace("0x2001", "0x2002")
    r = subprocess.run(cmd(env, line), input=K32[2:] + "\n", capture_output=True, text=True,
                       timeout=30, cwd=ROOT)
    check_output_clean(r.stdout, r.stderr)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_policy_and_fdb_verbs(env):
    ctl(env, GCM_OUT)
    ctl(env, "policy add vf vm1 src 10.0.0.1/32 dst 10.0.0.3/32 proto tcp dport 443 dir out "
             "priority 5 tmpl src 192.0.2.1 dst 192.0.2.2 proto esp reqid 1 mode tunnel")
    ctl(env, "policy add vf vm1 dir in action block")
    lines = ctl(env, "policy list vf vm1").stdout.splitlines()
    assert lines == [
        "vf vm1 src 0.0.0.0/0 dst 0.0.0.0/0 dir in priority 0 action discard",
        "vf vm1 src 10.0.0.1/32 dst 10.0.0.3/32 proto tcp dport 443 dir out priority 5 "
        "action protect reqid 1"]
    ctl(env, "policy del vf vm1 dir in")
    assert len(js(env, "policy list")) == 1
    ctl(env, "fdb add vni 100 mac 02:00:00:00:00:0a remote 192.0.2.3")
    rows = ctl(env, "fdb list vni 100").stdout.splitlines()
    assert rows[0].split() == ["VNI", "MAC", "REMOTE"] and len(rows) == 3
    ctl(env, "fdb add vni 100 mac 02:00:00:00:00:0a remote 192.0.2.4", rc=1)  # exists
    mark = len(env.dp.calls)
    ctl(env, "fdb replace vni 100 mac 02:00:00:00:00:0a remote 192.0.2.4")
    assert [c[0] for c in env.dp.calls[mark:]] == ["del_fdb", "add_fdb"]
    ctl(env, "fdb del vni 100 mac 02:00:00:00:00:0a remote 192.0.2.4")
    assert js(env, "fdb list") == [{"vni": 100, "mac": "flood", "remote": "192.0.2.2"}]


def test_stats_reload_top(env):
    ctl(env, GCM_OUT)
    text = ctl(env, "stats").stdout
    assert "drops: icv=1 replay=3" in text and "0x00001001" in text
    assert js(env, "stats")["uplink"]["tx_packets"] == 8
    prom = ctl(env, "stats --prometheus").stdout
    assert 'softnic_drops_total{reason="replay"} 3' in prom
    with open(env.cfg, "a") as f:
        f.write('[[fdb]]\nvni = 200\nmac = "flood"\nremote = "192.0.2.4"\n')
    # The SA added live is kept: reload applies what changed in the file.
    assert ctl(env, "reload").stdout.strip() == "add fdb 200/flood/192.0.2.4"
    assert ("vm1", "out", 0x1001) in env.dp.sas
    assert ctl(env, "reload").stdout.strip() == "no change"
    top = ctl(env, "top --count 1 --interval 0.1").stdout
    assert "OBJECT" in top and "vf vm1" in top


def test_monitor(env):
    p = subprocess.Popen(cmd(env, "--json monitor --count 2"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 10
    while not env.ctl._bus._subs and time.monotonic() < deadline:
        time.sleep(0.05)
    env.dp.sink({"type": "sa-hard-expire", "scope": "vm1", "dir": "out", "spi": "0x00001001",
                 "reason": "packets", "key": KEY.hex()})
    env.dp.sink({"type": "vf-link", "vf": "vm1", "state": "down"})
    out, err = p.communicate(timeout=10)
    check_output_clean(out, err)
    assert p.returncode == 0
    evs = [json.loads(x) for x in out.splitlines()]
    assert [e["type"] for e in evs] == ["sa-hard-expire", "vf-link"]
    # Human form: one line per event. (First the old subscription must be gone.)
    deadline = time.monotonic() + 10
    while env.ctl._bus._subs and time.monotonic() < deadline:
        time.sleep(0.05)
    p = subprocess.Popen(cmd(env, "monitor --count 1"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 10
    while not env.ctl._bus._subs and time.monotonic() < deadline:
        time.sleep(0.05)
    env.dp.sink({"type": "vf-guest", "vf": "vm2", "state": "connected"})
    out, _ = p.communicate(timeout=10)
    assert out.split()[1:] == ["vf-guest", "vf=vm2", "state=connected"]


def test_capture(env):
    pcap = os.path.join(env.dir, "vm1.pcap")
    p = subprocess.Popen(cmd(env, f"capture vf vm1 --count 2 --pcap {pcap}"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 10
    while not env.dp.captures and time.monotonic() < deadline:
        time.sleep(0.05)
    (sink,) = env.dp.captures.values()
    frames = [b"\x02\0\0\0\0\x03\x02\0\0\0\0\x01\x08\x06" + bytes(28) + bytes([i]) * 18
              for i in range(3)]
    for i, fr in enumerate(frames):
        sink(1700000100.5 + i, fr)
    out, err = p.communicate(timeout=10)
    check_output_clean(out, err)
    assert p.returncode == 0 and out.strip() == f"2 packets written to {pcap}"
    with open(pcap, "rb") as f:
        got = [(ts, buf) for ts, buf in dpkt.pcap.Reader(f)]
    assert [b for _, b in got] == frames[:2] and got[1][0] == pytest.approx(1700000101.5)
    assert dpkt.ethernet.Ethernet(got[0][1]).type == dpkt.ethernet.ETH_TYPE_ARP
    # A second, independent reader: scapy decodes the same frames (ARP here).
    from scapy.layers.l2 import ARP
    from scapy.utils import rdpcap
    pkts = rdpcap(pcap)
    assert [bytes(p) for p in pkts] == frames[:2] and pkts[0].haslayer(ARP)
    assert ctl(env, "capture stop 99", rc=1).stderr.startswith("softnicctl: not-found")


ERRORS = [  # (command, exit status, text that must be in stderr)
    ("", 2, "missing COMMAND"),
    ("frobnicate", 2, "unknown command"),
    ("--bogus vf list", 2, "unknown option"),
    ("vf add", 2, "needs NAME"),
    ("vf add vm9 kind tap mac", 2, "missing value after 'mac'"),
    ("vf add vm9 kind tap mac 02:00:00:00:00:09 vni lots", 2, "not a number"),
    ("vf add vm9 kind tap mac 01:00:00:00:00:09 vni 5", 1, "mac: must be a unicast"),
    ("vf add vm1 kind tap mac 02:00:00:00:00:09 vni 5", 1, "exists"),
    ("vf show nope", 1, "not-found: name"),
    ("sa add vf vm1 dir out src 10.0.0.1 dst 10.0.0.3 proto esp spi 0x1001", 2, "alg: missing"),
    (GCM_OUT.replace("spi 0x1001", "spi 0x10"), 1, "invalid-params: spi: must be in 256"),
    (GCM_OUT.replace(K, K[:-2]), 1, "invalid-params: key: aes-gcm needs 20 or 36 bytes"),
    (GCM_OUT.replace(K, "0xnothex" + K[8:]), 2, "key: must be an even number of hex digits"),
    (GCM_OUT.replace("vf vm1", "vf vm7"), 1, "not-found: scope"),
    (GCM_OUT.replace("dst 10.0.0.3", "dst fd00::3"), 1, "dst: address family differs"),
    ("sa get vf vm1 spi 0x4444", 1, "not-found: spi"),
    ("sa list vf", 2, "expected 'vf NAME' or 'uplink'"),
    ("policy add vf vm1 src 10.0.0.0/8 dst 10.0.0.0/8 dir out action protect", 1,
     "reqid: protect needs"),
    ("fdb add vni 100 mac flood", 2, "needs remote"),
    ("capture vf vm1", 2, "needs --pcap"),
    ("monitor --count -1", 2, "must not be negative"),
    ("stats --prometheus extra", 2, "takes no words"),
    ("vf show vm1 --qemu", 2, "VF vm1 is not kind vhost-user"),
]


@pytest.mark.parametrize("line,rc,text", ERRORS, ids=[f"err{i}" for i in range(len(ERRORS))])
def test_errors_are_one_line_and_change_nothing(env, line, rc, text):
    tables, calls = env.dp.tables(), len(env.dp.calls)
    r = ctl(env, line, rc=rc)
    assert text in r.stderr
    assert r.stderr.count("\n") <= 2  # the message (+ a usage hint), no traceback
    assert env.dp.tables() == tables and len(env.dp.calls) == calls


def test_json_errors_and_unreachable_socket(env):
    r = ctl(env, "--json vf show nope", rc=1)
    assert json.loads(r.stdout)["error"] == {"code": "not-found", "message": "no VF named 'nope'",
                                             "field": "name"}
    gone = subprocess.run([sys.executable, "-m", "softnic.cli", "-s",
                           os.path.join(env.dir, "none.sock"), "vf", "list"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert gone.returncode == 1 and gone.stderr.startswith("softnicctl: unreachable: cannot connect")
    assert "Traceback" not in gone.stderr
    env_var = dict(os.environ, SOFTNIC_SOCKET=env.sock)
    r = subprocess.run([sys.executable, "-m", "softnic.cli", "version"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT, env=env_var)
    assert r.returncode == 0 and "softnic" in r.stdout


def _qemu_argv(text):
    """The shell lines of `vf show --qemu` (comments and the XML left out) as argv."""
    shell = []
    for line in text.splitlines():
        if line.startswith("-"):
            shell.append(line.rstrip("\\").strip())
    return shlex.split(" ".join(shell))


def _opts(value):
    """QEMU's KEY=VALUE,... (',,' is a literal comma) -> (type, dict)."""
    parts = value.replace(",,", "\0").split(",")
    kv = dict(p.split("=", 1) for p in parts[1:])
    return parts[0], {k: v.replace("\0", ",") for k, v in kv.items()}


def test_vf_show_qemu_server_mode(env):
    import xml.etree.ElementTree as ET

    out = ctl(env, "vf show vm2 --qemu").stdout
    argv = _qemu_argv(out)
    assert argv == js(env, "vf show vm2 --qemu")["qemu"]
    opt = {argv[i]: argv[i + 1] for i in range(0, len(argv), 2)}
    assert len(opt) * 2 == len(argv)
    kind, mem = _opts(opt["-object"])
    assert kind == "memory-backend-memfd" and mem["share"] == "on"
    assert mem["size"] == opt["-m"]                 # the backend must cover all of RAM
    assert _opts(opt["-numa"]) == ("node", {"memdev": mem["id"]})
    kind, chardev = _opts(opt["-chardev"])
    assert kind == "socket" and chardev["path"] == "/run/softnic/vm2.sock"
    assert "server" not in chardev and chardev["reconnect"] == "1"   # softnic listens
    kind, netdev = _opts(opt["-netdev"])
    assert kind == "vhost-user" and netdev["chardev"] == chardev["id"] and "queues" not in netdev
    kind, dev = _opts(opt["-device"])
    assert kind == "virtio-net-pci" and dev["netdev"] == netdev["id"]
    assert dev["mac"] == "02:00:00:00:00:02" and dev["host_mtu"] == "1500"
    for prop in ("mrg_rxbuf", "csum", "guest_csum", "host_tso4", "guest_tso4"):
        assert dev[prop] == "on", prop
    assert "vectors=0" in out and "TCG" in out
    assert "<access mode='shared'/>" in out and "memfd" in out
    xml = out[out.index("<interface"):]
    iface = ET.fromstring(xml)                      # a real XML parser as the oracle
    assert iface.get("type") == "vhostuser"
    assert iface.find("mac").get("address") == "02:00:00:00:00:02"
    src = iface.find("source")
    assert (src.get("type"), src.get("path"), src.get("mode")) == \
        ("unix", "/run/softnic/vm2.sock", "client")
    assert src.find("reconnect").get("enabled") == "yes"
    assert iface.find("model").get("type") == "virtio"
    assert iface.find("driver/host").get("mrg_rxbuf") == "on"
    assert js(env, "vf show vm2 --qemu")["libvirt"] == xml.strip()


def test_vf_show_qemu_client_mode_and_queues(env):
    import xml.etree.ElementTree as ET

    sock = "/run/softnic/odd, name&.sock"
    ctl(env, f"vf add vm5 kind vhost-user mac 02:00:00:00:00:05 vni 100 mtu 9000 "
             f"socket '{sock}' mode client queues 2")
    r = js(env, "vf show vm5 --qemu")
    argv, xml = r["qemu"], r["libvirt"]
    opt = {argv[i]: argv[i + 1] for i in range(0, len(argv), 2)}
    kind, chardev = _opts(opt["-chardev"])
    assert chardev["path"] == sock                  # the comma survives QEMU's parser
    assert chardev["server"] == "on" and chardev["wait"] == "off" and "reconnect" not in chardev
    # Both queue pairs are served, so QEMU asks for both.
    assert _opts(opt["-netdev"])[1]["queues"] == "2"
    dev = _opts(opt["-device"])[1]
    assert dev["mq"] == "on" and dev["vectors"] == "6" and dev["host_mtu"] == "9000"
    iface = ET.fromstring(xml)
    src = iface.find("source")
    assert src.get("path") == sock and src.get("mode") == "server" and src.find("reconnect") is None
    assert iface.find("driver").get("queues") == "2" and iface.find("mtu").get("size") == "9000"
    text = ctl(env, "vf show vm5 --qemu").stdout
    assert _qemu_argv(text) == argv
    assert "2 queue pairs" in text


def test_qemu_args_multiqueue_shape():
    """Several queue pairs: netdev queues=N, mq=on, 2N+2 vectors (one per ring, config,
    control queue)."""
    from softnic import cli

    vf = {"name": "v", "kind": "vhost-user", "socket": "/s", "mac": "02:00:00:00:00:07",
          "mtu": 1500, "queues": 4, "vhost_mode": "server"}
    argv = cli.qemu_args(vf)
    assert _opts(argv[argv.index("-netdev") + 1])[1]["queues"] == "4"
    dev = _opts(argv[argv.index("-device") + 1])[1]
    assert dev["mq"] == "on" and dev["vectors"] == "10"
    assert "<driver queues='4'>" in cli.libvirt_interface(vf)


# --- config files that hold keys (issue 10, item 16) -----------------------------------------

SA_CFG = f"""
[uplink]
local = "127.0.0.1"
[[vf]]
name = "vm1"
kind = "tap"
mac = "02:00:00:00:00:01"
vni = 100
[[sa]]
scope = "vm1"
dir = "out"
src = "10.0.0.1"
dst = "10.0.0.3"
spi = 0x1001
alg = "aes-gcm"
key = "{K}"
"""


def _daemon_cmd(verb, cfg):
    return [sys.executable, "-m", "softnic.daemon", verb, "-c", cfg]


def test_config_files_with_keys_must_be_private(tmp_path):
    """`softnic run` and `softnic check` refuse a config file that holds keys unless only
    its owner may read it (0600 or stricter) and that owner is root or the daemon's user;
    one line, no key in it, nothing started. A file without keys may be 0644."""
    from softnic.topo import Netns

    cfg = str(tmp_path / "softnic.toml")
    with open(cfg, "w") as f:
        f.write(f'[daemon]\nadmin_socket = "{tmp_path}/a.sock"\n' + SA_CFG)
    with Netns(prefix="snmo") as ns:
        for mode in (0o644, 0o640, 0o604, 0o660):
            os.chmod(cfg, mode)
            for verb in ("run", "check"):
                r = subprocess.run(ns.exec_argv(_daemon_cmd(verb, cfg)), capture_output=True,
                                   text=True, timeout=60, cwd=ROOT)
                check_output_clean(r.stdout, r.stderr)
                assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
                assert f"mode {mode:04o}" in r.stderr and "chmod 600" in r.stderr
        assert not os.path.exists(tmp_path / "a.sock")
        os.chmod(cfg, 0o600)
        if os.geteuid() == 0:
            os.chown(cfg, 65534, -1)
            r = subprocess.run(ns.exec_argv(_daemon_cmd("check", cfg)), capture_output=True,
                               text=True, timeout=60, cwd=ROOT)
            assert r.returncode == 2 and "owned by uid 65534" in r.stderr, r.stderr
            os.chown(cfg, 0, -1)
        for mode in (0o600, 0o400):
            os.chmod(cfg, mode)
            r = subprocess.run(_daemon_cmd("check", cfg), capture_output=True, text=True,
                               timeout=60, cwd=ROOT)
            assert r.returncode == 0 and ": ok (" in r.stdout, r.stderr
    nokeys = str(tmp_path / "nokeys.toml")
    with open(nokeys, "w") as f:
        f.write(SA_CFG.split("[[sa]]")[0])
    os.chmod(nokeys, 0o644)
    r = subprocess.run(_daemon_cmd("check", nokeys), capture_output=True, text=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def test_reload_refuses_a_key_file_others_can_read():
    """The running daemon re-reads its file on `softnicctl reload` by the same rule: a
    file made readable by others is refused (the error says why) and nothing changes."""
    from test_admin import RealDaemon

    d = short_dir()
    try:
        with RealDaemon(d, SA_CFG.split("[uplink]", 1)[1].split("\n", 2)[2]) as dm:
            e = Env()
            e.sock = dm.sock
            before = js(e, "sa list")
            os.chmod(dm.cfg, 0o644)
            r = ctl(e, "reload", rc=1)
            assert "mode 0644" in r.stderr and "chmod 600" in r.stderr
            assert js(e, "sa list") == before and js(e, "version")["consistent"]
            os.chmod(dm.cfg, 0o600)
            assert ctl(e, "reload").stdout.strip() == "no change"
        check_output_clean(dm.tail(), "")
    finally:
        shutil.rmtree(d, ignore_errors=True)
