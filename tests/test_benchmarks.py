"""Smoke tests for benchmarks/pipeline.py: it runs, its JSON is complete, and what it
measures is what it says (scapy decrypts the packets it times; drops abort the run)."""

import json
import os
import re
import subprocess
import sys

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.ipsec import ESP
from scapy.layers.ipsec import SecurityAssociation as ScapySA
from scapy.layers.vxlan import VXLAN

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# Appended, not prepended: benchmarks/vhost.py must not shadow the vhost package.
sys.path.append(os.path.join(ROOT, "benchmarks"))

import pipeline  # noqa: E402
import rawcrypto  # noqa: E402

ENGINES = rawcrypto.engines()


@pytest.fixture(scope="module")
def quick_run():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "pipeline.py"),
                        "--quick"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_quick_run_last_line_is_complete_json(quick_run):
    last = quick_run.strip().splitlines()[-1]
    res = json.loads(last)
    assert res["quick"] is True and res["engines"] == ENGINES
    assert set(res["figures"]) == {"tso_host", "tso_device", "small_host", "small_device"}
    for name, fig in res["figures"].items():
        assert fig["underlay_bytes_max"] <= pipeline.UNDERLAY_MTU
        size = str(fig["esp_ct_bytes"])
        for eng in ENGINES:
            for d in ("tx", "rx"):
                cell = fig[eng][d]
                for k in ("pps", "inner_gbps", "ct_gbps", "ratio_raw_fastest",
                          "ratio_raw_fastest_cpu", "cpu_ns_per_pkt", "cpu_share"):
                    assert 0 < cell[k]["min"] <= cell[k]["median"] <= cell[k]["max"], (name, k)
                assert cell["ns_per_pkt"] > 0
            assert fig["raw"][eng][size]["gbps"]["median"] > 0
            assert fig["raw"][eng][size]["cpu_ns_per_op"]["median"] > 0
            assert fig["softnic_seal"][eng][size]["gbps"]["median"] > 0
        if name.startswith("small"):
            assert "64" in fig["raw"][ENGINES[0]]
            assert fig["frame_bytes"] == 64 and fig["packets_per_frame"] == 1
        else:
            # 64 KB of IP in, MSS from the data plane: ~48 packets of ~1500 bytes out.
            assert fig["frame_bytes"] == 65535 + 14
            assert fig["underlay_bytes_max"] > pipeline.UNDERLAY_MTU - 20
            assert fig["packets_per_frame"] == -(-pipeline.TSO_PAYLOAD // fig["mss"])
    fl = res["floors"]
    assert fl["basis"] == "cpu"
    assert fl["tso_ratio_ok"] == (fl["tso_ratio_cpu"] >= 0.70)
    assert fl["tso_ratio_wall_ok"] == (fl["tso_ratio_wall"] >= 0.70)
    assert fl["small_pps_ok"] == (fl["small_pps_cpu"] >= 1_000_000)
    assert fl["small_pps_wall_ok"] == (fl["small_pps_wall"] >= 1_000_000)
    fast = res["fastest_engine"]
    tso = res["figures"]["tso_host"]
    assert fl["tso_ratio_wall"] == tso[fast]["tx"]["ratio_raw_fastest"]["median"]
    assert fl["tso_ratio_cpu"] == tso[fast]["tx"]["ratio_raw_fastest_cpu"]["median"]
    assert res["fastest_engine"] in ENGINES


def test_readme_documents_every_json_key(quick_run):
    res = json.loads(quick_run.strip().splitlines()[-1])
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        doc = f.read()
    keys = set(res) | set(res["floors"]) | set(res["figures"]["tso_host"])
    keys |= set(res["figures"]["tso_host"][ENGINES[0]]["tx"])
    keys |= set(res["figures"]["tso_host"]["raw"][ENGINES[0]][str(
        res["figures"]["tso_host"]["esp_ct_bytes"])])
    keys -= set(ENGINES)
    missing = [k for k in sorted(keys) if not re.search(rf"`{re.escape(k)}`", doc)]
    assert not missing


def test_key_never_printed(quick_run):
    for key in (pipeline.KEY_VF, pipeline.KEY_UL):
        assert key.hex() not in quick_run and repr(key) not in quick_run


@pytest.mark.parametrize("model", ["host", "device"])
@pytest.mark.parametrize("kind", ["tso", "small"])
def test_timed_packets_decrypt_with_scapy(model, kind):
    """The packets the benchmark times are real: scapy decrypts them, the ESP payload
    size the raw reference is measured at is scapy's, and RX delivers them all."""
    pair = pipeline.Pair(model, ENGINES[0])
    frame = pipeline.tso_frame() if kind == "tso" else pipeline.small_frame()
    tx = pipeline.TxRun(pair, frame, 1, out_slots=64)
    tx.once()
    pkts = tx.packets()
    if model == "host":
        sa = ScapySA(ESP, spi=pipeline.SPI_VF, crypt_algo="AES-GCM", crypt_key=pipeline.KEY_VF,
                     auth_algo="NULL", tunnel_header=IP(src=pipeline.VM_A, dst=pipeline.VM_B))
    else:
        sa = ScapySA(ESP, spi=pipeline.SPI_UL, crypt_algo="AES-GCM", crypt_key=pipeline.KEY_UL,
                     auth_algo="NULL")
    inner_payload = b""
    for p in pkts:
        outer = IP(p)
        esp_ip = outer[VXLAN].payload[IP] if model == "host" else outer
        assert len(esp_ip[ESP].data) - 8 - 16 == pipeline.esp_ct_len(p, model)
        plain = sa.decrypt(esp_ip)
        if model == "device":
            plain = plain[VXLAN].payload
        if kind == "tso":
            inner_payload += bytes(plain[TCP].payload)
        else:
            assert plain[UDP].dport == 5001 and len(plain[UDP].payload) == 22
    if kind == "tso":
        assert inner_payload == bytes(pipeline.tso_frame()[12 + 54:])
    rx = pipeline.RxRun(pair, pkts, burst=16)
    assert rx.timed(0.0).units == 1
    delivered = (pair.b.vf_counters(0)["rx_esp"] if model == "host"
                 else pair.b.uplink_counters()["rx_esp"])
    assert delivered == len(pkts)
    rx.timed(0.0)       # a second pass over the same packets: a fresh SA accepts them


def test_drops_abort_the_figure():
    """A burst that loses frames is an error, never a faster figure."""
    pair = pipeline.Pair("host", ENGINES[0])
    bad = pipeline.make_vnet_hdr() + b"\x01" * 13
    tx = pipeline.TxRun(pair, bad, 4, out_slots=8)
    with pytest.raises(pipeline.BenchError):
        tx.once()
    good = pipeline.TxRun(pair, pipeline.small_frame(), 4, out_slots=8)
    good.once()
    # The same sequence numbers twice in one pass: anti-replay drops, the run stops.
    rx = pipeline.RxRun(pair, good.packets() + good.packets(), burst=8)
    with pytest.raises(pipeline.BenchError):
        rx.timed(0.0)


def test_small_frame_is_64_bytes_and_valid():
    f = pipeline.small_frame()[12:]
    assert len(f) == 64
    from scapy.layers.l2 import Ether
    pkt = Ether(f)
    chk = pkt[UDP].chksum, pkt[IP].chksum
    del pkt[UDP].chksum, pkt[IP].chksum
    pkt = Ether(bytes(pkt))
    assert (pkt[UDP].chksum, pkt[IP].chksum) == chk


def test_profile_mode_runs_one_cell():
    args = pipeline.parse_args(["--quick", "--profile", "tso_device.rx"])
    lines: list[str] = []
    res = pipeline.profile(args.profile, ENGINES[0], args, lines.append)
    assert res["packets"] > 0 and res["cpu_ns_per_pkt"] > 0
    assert json.loads(lines[-1]) == res
    with pytest.raises(pipeline.BenchError):
        pipeline.profile("tso_host.sideways", ENGINES[0], args, lines.append)


def test_lanes_quick_run_reports_both_cases():
    """benchmarks/lanes.py: one lane beside two sharing one SA, every packet counted."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "lanes.py"),
                        "--quick"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["benchmark"] == "softnic-lanes" and res["lanes"] == 2
    for case in ("tso", "small"):
        cell = res["cases"][case]
        for run in ("one_lane", "2_lanes"):
            assert cell[run]["pps"]["median"] > 0 and cell[run]["cpu_ns_per_pkt"]["median"] > 0
        assert cell["scaling"] > 0 and cell["cpu_cost_ratio"] > 0
