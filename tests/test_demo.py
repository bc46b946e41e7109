"""`python -m softnic.demo`: its pieces against independent oracles (the real CLI's parser,
scapy building and encrypting packets), then the demo itself, run short in real
namespaces: its exit status, what it claims, no key in its output, nothing left behind
(also when interrupted)."""

from __future__ import annotations

import io
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw

from softnic import demo
from softnic.scenario import KEYS, PLAINTEXT_MARK
from softnic.topo import can_netns
from softnic.xfrm import parse_policy, parse_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DUMMY = "0x" + "ab" * 20

SA_HOST = {"scope": "vm1", "dir": "out", "src": "10.200.0.1", "dst": "10.200.0.2",
           "spi": 0x1001, "reqid": 1, "mode": "tunnel", "alg": "aes-gcm",
           "key": KEYS[0x1001].hex(), "icv_bits": 128, "replay_window": 1024}
SA_DEV = {"scope": "uplink", "dir": "in", "src": "10.99.0.2", "dst": "10.99.0.1",
          "spi": 0x3002, "mode": "transport", "alg": "aes-gcm", "key": KEYS[0x3002].hex(),
          "icv_bits": 128, "replay_window": 1024, "encap_sport": 4500, "encap_dport": 4500}
POLICY = {"scope": "vm2", "dir": "in", "src": "10.201.0.2/32", "dst": "10.201.0.1/32",
          "action": "protect", "reqid": 2}


def _unredact(words: list[str]) -> list[str]:
    return [DUMMY if w == demo.REDACTED else w for w in words]


# ---- the commands shown: what softnicctl's own parser reads back -------------------------

@pytest.mark.parametrize("params", [SA_HOST, SA_DEV], ids=["host-sa", "device-sa"])
def test_sa_command_parses_back_to_the_request(params: dict) -> None:
    words = demo.ctl_words("sa.add", params)
    # pytest.fail with a fixed text, not assert: a failing assert would print the words.
    if words is None or words[:2] != ["sa", "add"] or words.count(demo.REDACTED) != 1:
        pytest.fail("not an `sa add` command with exactly one redacted key")
    got = parse_state(_unredact(words[2:]))
    want = dict(params, key=DUMMY)
    if got != want:     # no key of the request in the message: it was replaced above
        pytest.fail(f"round trip differs in {sorted(k for k in want if got.get(k) != want[k])}")


def test_policy_command_parses_back_to_the_request() -> None:
    words = demo.ctl_words("policy.add", POLICY)
    assert words is not None
    assert parse_policy(words[2:]) == POLICY


def test_cbc_sa_shows_both_keys_redacted() -> None:
    p = dict(SA_HOST, alg="aes-cbc-hmac-sha256", key="0x" + "11" * 20,
             auth_key="0x" + "22" * 32)
    words = demo.ctl_words("sa.add", p)
    assert words is not None and words.count(demo.REDACTED) == 2
    got = parse_state(_unredact(words[2:]))
    assert got["alg"] == "aes-cbc-hmac-sha256" and got["spi"] == 0x1001


def test_command_never_carries_a_key() -> None:
    for p in (SA_HOST, SA_DEV, dict(SA_HOST, key=KEYS[0x1001]), POLICY):
        for method in ("sa.add", "policy.add", "sa.del"):
            try:
                words = demo.ctl_words(method, p)
            except KeyError:
                continue
            text = " ".join(words or [])
            if any(k.hex() in text.lower() for k in KEYS.values()):
                pytest.fail(f"{method}: a key is in the command shown")


def test_read_only_requests_are_not_shown() -> None:
    assert demo.ctl_words("stats", {}) is None
    assert demo.ctl_words("version", {}) is None


# ---- the output filter ---------------------------------------------------------------------

def test_output_redacts_any_key_whatever_its_case() -> None:
    buf = io.StringIO()
    out = demo.Out(KEYS.values(), stream=buf)
    k = KEYS[0x2001].hex()
    out(f"x {k} y {k.upper()} z 0x{k}")
    text = buf.getvalue()
    assert k not in text.lower()
    assert text.count(demo.REDACTED) == 3
    assert text.startswith("x ") and text.rstrip().endswith(demo.REDACTED)


def test_checks_record_failures() -> None:
    buf = io.StringIO()
    check = demo.Checks(demo.Out([], stream=buf))
    check(True, "holds")
    check(0, "does not hold")
    assert check.failed == ["does not hold"]
    assert "[FAIL] does not hold" in buf.getvalue()


# ---- the wire analysis, on packets scapy builds and encrypts -------------------------------

def _host_packet(vni: int, spi: int, sport: int, seq: int = 1) -> bytes:
    key = demo.host_key(vni, spi)
    sa = SecurityAssociation(ESP, spi=spi, seq_num=seq, crypt_algo="AES-GCM", crypt_key=key,
                             crypt_icv_size=16,
                             tunnel_header=IP(src="10.200.0.1", dst="10.200.0.2"))
    inner = sa.encrypt(IP(src="10.200.0.1", dst="10.200.0.2") / TCP(sport=40000, dport=5201)
                       / Raw(PLAINTEXT_MARK * 4))
    outer = (IP(src="10.99.0.1", dst="10.99.0.2") / UDP(sport=sport, dport=4789)
             / VXLAN(vni=vni) / Ether(src="02:00:00:00:0a:01", dst="02:00:00:00:0b:01")
             / inner)
    return bytes(outer)


def _device_packet(spi: int) -> bytes:
    sa = SecurityAssociation(ESP, spi=spi, crypt_algo="AES-GCM", crypt_key=KEYS[spi],
                             crypt_icv_size=16, nat_t_header=UDP(sport=4500, dport=4500))
    inner = (IP(src="10.99.0.1", dst="10.99.0.2") / UDP(sport=50123, dport=4789)
             / VXLAN(vni=100) / Ether() / IP(src="10.200.0.1", dst="10.200.0.2")
             / TCP(sport=1, dport=2) / Raw(PLAINTEXT_MARK))
    return bytes(sa.encrypt(IP(bytes(inner))))


def test_wire_reads_host_terminated_packets_scapy_built() -> None:
    w = demo.Wire()
    for seq in (1, 2):
        w.add(_host_packet(100, 0x1001, 51000, seq))
    w.add(_host_packet(200, 0x1001, 62000))
    assert w.kinds["VXLAN + ESP"] == 3 and w.packets == 3
    assert w.flows[(100, "10.200.0.1", "10.200.0.2", 0x1001)] == [{51000}, 2]
    assert w.vxlan_sports == {51000, 62000}
    assert w.largest == max(len(p) for p in w.esp)
    inner = demo.decrypt("host", w.esp[-1])
    assert inner[TCP].dport == 5201 and PLAINTEXT_MARK in bytes(inner[TCP].payload)


def test_wire_decrypt_fails_with_the_other_vfs_key() -> None:
    # The same SPI under VNI 200 is another VF's SA with another key: it must not open.
    pkt = IP(_host_packet(100, 0x1001, 51000))
    pkt[VXLAN].vni = 200
    with pytest.raises(Exception):  # noqa: B017 - scapy's integrity error
        demo.decrypt("host", bytes(pkt))


def test_wire_reads_device_terminated_packets_scapy_built() -> None:
    w = demo.Wire()
    w.add(_device_packet(0x3001))
    w.add(_device_packet(0x3011))
    assert w.kinds["ESP-in-UDP 4500"] == 2 and dict(w.spis) == {0x3001: 1, 0x3011: 1}
    p = demo.decrypt("device", w.esp[0])
    assert p[UDP].dport == 4789 and p[VXLAN].vni == 100
    text = demo.layers(IP(w.esp[0]), "->")
    assert "UDP 4500 -> 4500 / ESP spi 0x3001 seq 1" in text


def test_wire_counts_clear_tenant_traffic_as_clear() -> None:
    clear = bytes(IP(src="10.99.0.1", dst="10.99.0.2") / UDP(sport=5, dport=4789)
                  / VXLAN(vni=100) / Ether() / IP(src="10.200.0.1", dst="10.200.0.2")
                  / TCP() / Raw(PLAINTEXT_MARK))
    w = demo.Wire()
    w.add(clear)
    assert w.kinds["VXLAN + IP proto 6 (clear)"] == 1 and not w.esp


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 119))
def test_wire_survives_hostile_captures(data: bytes, cut: int) -> None:
    base = _HOST_PKT[:cut] + data
    w = demo.Wire()
    w.add(data)
    w.add(base)
    assert w.packets <= 2


_HOST_PKT = _host_packet(100, 0x1001, 51000)


# ---- the demo itself ----------------------------------------------------------------------

def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def test_without_root_it_says_what_it_needs_and_exits_2() -> None:
    # As root, drop to nobody for real; otherwise the caller is already unprivileged.
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.geteuid() == 0 else []
    p = subprocess.run([*drop, sys.executable, "-m", "softnic.demo", "--short"],
                       capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "root" in p.stdout and "Traceback" not in p.stderr


def test_without_root_in_process(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert demo.main(["--short"]) == 2
    assert "needs root" in capsys.readouterr().out


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.skipif(can_netns() is not None, reason=str(can_netns()))
def test_demo_short_runs_end_to_end() -> None:
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "softnic.demo", "--short"], capture_output=True,
                       text=True, timeout=150, env=_env(), cwd=REPO)
    took = time.monotonic() - t
    text = p.stdout + p.stderr
    for k in KEYS.values():             # checked before anything could print the output
        if k.hex() in text.lower() or k.hex().upper() in text:
            pytest.fail("a key appears in the demo's output")
    assert p.returncode == 0, text[-3000:]
    assert took < 60
    for claim in ("no tenant plaintext on the wire", "largest underlay packet",
                  "distinct UDP source ports", "sampled ESP packets decrypt",
                  "SHA-256 verified", "TSO: host A segmented", "SPIs scoped per VF",
                  "torn down: none of the"):
        assert claim in text, claim
    assert "FAIL" not in text and "✘" not in text
    held = re.search(r"(\d+)/(\d+) checks held", text)
    assert held and held.group(1) == held.group(2) and int(held.group(2)) >= 20
    # A decoded look at each model's underlay.
    assert re.search(r"UDP \d+ \S+ 4789 / VXLAN vni \d+ / Ether .* / ESP spi 0x1001 seq \d+",
                     text)
    assert re.search(r"UDP 4500 \S+ 4500 / ESP spi 0x30[01]1 seq \d+", text)
    # The real CLI's table.
    assert "softnicctl -s $A stats" in text and "SCOPE" in text and "TX_TSO_FRAMES" in text
    # Every command shown is one softnicctl's own parser accepts (keys put back as dummies).
    cmds = [line.split("$ softnicctl -s ", 1)[1] for line in text.splitlines()
            if "$ softnicctl -s $" in line and " add " in line]
    assert len(cmds) == 24, cmds
    for c in cmds:
        words = _unredact(shlex.split(c)[1:])
        (parse_state if words[0] == "sa" else parse_policy)(words[2:])
    # Throughput figures for both models.
    assert re.search(r"host-terminated: \d+\.\d+ Gbit/s", text)
    assert re.search(r"device-terminated: \d+\.\d+ Gbit/s", text)


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.skipif(can_netns() is not None, reason=str(can_netns()))
def test_ctrl_c_tears_everything_down() -> None:
    before = _namespaces()
    p = subprocess.Popen([sys.executable, "-m", "softnic.demo", "--short", "--model", "host"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env(), cwd=REPO)
    assert p.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == "traffic":       # daemons up, SAs in, traffic starting
            break
    assert any("`softnic run` pid" in s for s in lines), "".join(lines)
    pids = [int(m) for s in lines for m in re.findall(r"`softnic run` pid (\d+)", s)]
    p.send_signal(signal.SIGINT)
    rest = p.communicate(timeout=60)[0]
    assert p.returncode == 130, "".join(lines) + rest
    assert "interrupted" in rest
    mine = {n for n in _namespaces() - before if str(p.pid) in n}
    assert not mine, f"left behind: {mine}"
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or \
            open(f"/proc/{pid}/stat").read().split()[2] == "Z", f"daemon {pid} still runs"
