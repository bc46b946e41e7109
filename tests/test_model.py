"""The configuration model and the TOML loader: every rule names its field, keys stay hidden,
and the key-length rules agree with independent crypto implementations (`cryptography`,
scapy's ESP algorithm table)."""

import copy
import dataclasses
import ipaddress
import json
import os
import pickle
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softnic.config import ConfigError, load, loads
from softnic.model import (
    SA,
    VF,
    Config,
    FdbEntry,
    Policy,
    Secret,
    Uplink,
    ValidationError,
)

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
KEY20 = "0x" + "5a" * 16 + "c0ffee01"


def sa_dict(**kw):
    d = {"scope": "vm1", "dir": "out", "src": "10.0.0.1", "dst": "10.0.0.2", "spi": 0x1000,
         "alg": "aes-gcm", "key": KEY20}
    d.update(kw)
    return d


def vf_dict(**kw):
    d = {"name": "vm1", "kind": "tap", "mac": "02:00:00:00:00:01", "vni": 100}
    d.update(kw)
    return d


# --- Secret -------------------------------------------------------------------------


def test_secret_never_shows_its_bytes():
    raw = bytes(range(200, 236))
    s = Secret(raw)
    shown = [repr(s), str(s), f"{s}", f"{s!r}", "%s" % (s,), format(s, "x")]  # noqa: UP031
    for text in shown:
        if raw.hex() in text.lower() or "c8c9ca" in text:
            pytest.fail("key bytes shown")  # not assert: it would print them
        assert "redacted" in text
    with pytest.raises(TypeError):
        json.dumps({"k": s})
    with pytest.raises(TypeError):
        pickle.dumps(s)
    assert copy.deepcopy(s) == s and len(s) == 36
    if s.reveal() != raw:
        pytest.fail("reveal() differs")
    sa = SA.from_dict(sa_dict(key="0x" + raw[:20].hex()))
    if raw[:20].hex() in repr(sa) + json.dumps(sa.to_dict()):
        pytest.fail("key bytes shown")
    assert sa.to_dict()["key"] == "<redacted>"


def test_secret_equality_is_by_value():
    assert Secret(b"a" * 20) == Secret(b"a" * 20)
    assert Secret(b"a" * 20) != Secret(b"b" * 20)
    assert Secret(b"a" * 20) != b"a" * 20


# --- per-object validation ------------------------------------------------------------

SA_BAD = [
    ({"spi": 0}, "spi"), ({"spi": 255}, "spi"), ({"spi": 1 << 32}, "spi"), ({"spi": "x"}, "spi"),
    ({"spi": True}, "spi"),
    ({"key": "0x" + "11" * 16}, "key"),       # GCM without the salt
    ({"key": "0x" + "11" * 28}, "key"),       # AES-192: not offered by the engines
    ({"key": "0x1"}, "key"), ({"key": "zz"}, "key"), ({"key": 5}, "key"),
    ({"icv_bits": 100}, "icv_bits"), ({"icv_bits": 32}, "icv_bits"),
    ({"dst": "::1"}, "dst"), ({"src": "10.0.0.300"}, "src"),
    ({"dir": "both"}, "dir"), ({"mode": "beet"}, "mode"), ({"alg": "des"}, "alg"),
    ({"replay_window": 5000}, "replay_window"), ({"replay_window": -1}, "replay_window"),
    ({"esn": 1}, "esn"), ({"engine": "qat"}, "engine"),
    ({"encap_sport": 4500}, "encap_dport"), ({"encap_sport": 0, "encap_dport": 1}, "encap_sport"),
    ({"soft_bytes": 10, "hard_bytes": 5}, "soft_bytes"),
    ({"soft_packets": 0}, "soft_packets"),
    ({"auth_key": "0x" + "11" * 32}, "auth_key"),  # auth key with an AEAD
    ({"scope": "bad name"}, "scope"), ({"reqid": -1}, "reqid"),
    ({"colour": "blue"}, "colour"),
]


@pytest.mark.parametrize("bad,field", SA_BAD)
def test_sa_errors_name_the_field(bad, field):
    with pytest.raises(ValidationError) as ei:
        SA.from_dict(sa_dict(**bad), "sa[2]")
    assert ei.value.field == f"sa[2].{field}"
    assert str(ei.value).startswith(f"sa[2].{field}: ")
    if "5a5a5a5a" in str(ei.value):
        pytest.fail("the key appears in an error")


def test_sa_ids_match_the_crypto_header():
    """alg_id/engine_id are the enums of softnic/csrc/sn_crypto.h (read from the header)."""
    with open(os.path.join(os.path.dirname(HERE), "softnic", "csrc", "sn_crypto.h")) as f:
        hdr = f.read()
    enum = {m.group(1): int(m.group(2)) for m in re.finditer(r"(SN_\w+) = (\d+)", hdr)}
    for alg, name in (("aes-gcm", "SN_ALG_AES_GCM"), ("chacha20-poly1305",
                      "SN_ALG_CHACHA20_POLY1305"), ("aes-cbc-hmac-sha256",
                                                    "SN_ALG_AES_CBC_HMAC_SHA256")):
        d = sa_dict(alg=alg, key="0x" + "11" * (36 if alg != "aes-cbc-hmac-sha256" else 16))
        if alg == "aes-cbc-hmac-sha256":
            d["auth_key"] = "0x" + "22" * 32
        assert SA.from_dict(d).alg_id == enum[name]
    for engine, name in (("auto", "SN_ENGINE_AUTO"), ("openssl", "SN_ENGINE_OPENSSL"),
                         ("ipsec-mb", "SN_ENGINE_IPSECMB")):
        assert SA.from_dict(sa_dict(engine=engine)).engine_id == enum[name]
    assert SA.from_dict(sa_dict(icv_bits=96)).icv_len == 12


def test_sa_missing_field_is_named():
    d = sa_dict()
    del d["spi"]
    with pytest.raises(ValidationError) as ei:
        SA.from_dict(d, "sa[0]")
    assert ei.value.field == "sa[0].spi"


KEY_RULES = [  # (alg, key bytes, auth key bytes, icv, ok)
    ("aes-gcm", 20, None, 128, True), ("aes-gcm", 36, None, 64, True),
    ("aes-gcm", 36, None, 96, True), ("aes-gcm", 16, None, 128, False),
    ("aes-gcm", 32, None, 128, False), ("aes-gcm", 21, None, 128, False),
    ("chacha20-poly1305", 36, None, 128, True), ("chacha20-poly1305", 32, None, 128, False),
    ("chacha20-poly1305", 36, None, 96, False),
    ("aes-cbc-hmac-sha256", 16, 32, 128, True), ("aes-cbc-hmac-sha256", 32, 32, 128, True),
    ("aes-cbc-hmac-sha256", 20, 32, 128, False), ("aes-cbc-hmac-sha256", 16, 20, 128, False),
    ("aes-cbc-hmac-sha256", 16, None, 128, False), ("aes-cbc-hmac-sha256", 16, 32, 96, False),
]


@pytest.mark.parametrize("alg,klen,alen,icv,ok", KEY_RULES)
def test_key_lengths_agree_with_cryptography(alg, klen, alen, icv, ok):
    """What we accept, the `cryptography` AEAD/cipher accepts with the key split as RFC
    4106 / RFC 7634 / RFC 4868 say, and it encrypts; a key length we reject it rejects too
    (ICV sizes and the RFC 4868 auth key size are our rules alone)."""
    from cryptography.hazmat.primitives import hashes, hmac
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    key = os.urandom(klen)
    d = sa_dict(alg=alg, key="0x" + key.hex(), icv_bits=icv)
    if alen is not None:
        d["auth_key"] = "0x" + os.urandom(alen).hex()
    if ok:
        sa = SA.from_dict(d)
        k = bytes(sa.key.reveal())  # a view of the Secret's buffer
        if alg == "aes-gcm":
            ct = AESGCM(k[:-4]).encrypt(k[-4:] + b"\0" * 8, b"x", b"aad")
            assert len(ct) == 1 + 16
        elif alg == "chacha20-poly1305":
            ChaCha20Poly1305(k[:-4]).encrypt(k[-4:] + b"\0" * 8, b"x", b"aad")
        else:
            Cipher(algorithms.AES(k), modes.CBC(b"\0" * 16)).encryptor()
            h = hmac.HMAC(sa.auth_key.reveal(), hashes.SHA256())
            h.update(b"x")
            assert len(h.finalize()) * 8 // 2 == sa.icv_bits  # RFC 4868: truncate to half
    else:
        with pytest.raises(ValidationError) as ei:
            SA.from_dict(d, "")
        assert ei.value.field in ("key", "auth_key", "icv_bits")
        if ei.value.field == "key":  # the oracle refuses that key material as well
            with pytest.raises(ValueError):
                if alg == "aes-gcm":
                    AESGCM(key[:-4])
                elif alg == "chacha20-poly1305":
                    ChaCha20Poly1305(key[:-4])
                else:
                    Cipher(algorithms.AES(key), modes.CBC(b"\0" * 16))


def test_key_lengths_within_scapy_esp_table():
    """scapy's ESP algorithm table (salt apart) contains every key length we accept."""
    from scapy.layers.ipsec import CRYPT_ALGOS

    gcm = CRYPT_ALGOS["AES-GCM"]
    assert {20 - gcm.salt_size, 36 - gcm.salt_size} <= set(gcm.key_size)
    cha = CRYPT_ALGOS["CHACHA20-POLY1305"]
    assert 36 - cha.salt_size in (cha.key_size if isinstance(cha.key_size, tuple)
                                  else (cha.key_size,))
    assert {16, 32} <= set(CRYPT_ALGOS["AES-CBC"].key_size)


VF_BAD = [
    ({"mac": "01:00:5e:00:00:01"}, "mac"), ({"mac": "00:00:00:00:00:00"}, "mac"),
    ({"mac": "02:00:00:00:00"}, "mac"), ({"vni": 1 << 24}, "vni"), ({"mtu": 67}, "mtu"),
    ({"kind": "veth"}, "kind"), ({"ipsec": "on"}, "ipsec"), ({"name": "uplink"}, "name"),
    ({"name": "x" * 40}, "name"), ({"ifname": "a" * 16}, "ifname"),
    ({"socket": "/run/x"}, "socket"), ({"addresses": ["10.0.0.1"]}, "addresses[0]"),
    ({"kind": "vhost-user"}, "socket"),
    ({"kind": "vhost-user", "socket": "relative"}, "socket"),
    ({"kind": "vhost-user", "socket": "/run/x", "queues": 0}, "queues"),
    ({"kind": "vhost-user", "socket": "/run/x", "netns": "ns"}, "netns"),
    ({"kind": "vhost-user", "socket": "/run/x", "vhost_mode": "peer"}, "vhost_mode"),
]


@pytest.mark.parametrize("bad,field", VF_BAD)
def test_vf_errors_name_the_field(bad, field):
    with pytest.raises(ValidationError) as ei:
        VF.from_dict(vf_dict(**bad), "vf[1]")
    assert ei.value.field == f"vf[1].{field}"


def test_vf_defaults_and_canonical_form():
    vf = VF.from_dict(vf_dict(mac="02:AB:00:00:00:01", addresses=["10.0.0.1/24", "fd00::1/64"]))
    assert vf.mac == "02:ab:00:00:00:01" and vf.ifname == "vm1" and vf.mtu == 1500
    assert vf.addresses[1] == ipaddress.ip_interface("fd00::1/64")
    v = VF.from_dict(vf_dict(kind="vhost-user", socket="/run/vm1.sock"))
    assert (v.vhost_mode, v.queues, v.ifname) == ("server", 1, None)


POLICY_BAD = [
    ({"action": "protect"}, "reqid"), ({"action": "protect", "reqid": 1, "spi": 0x1000}, "reqid"),
    ({"action": "bypass", "spi": 0x1000}, "spi"), ({"dst": "fd00::/64"}, "dst"),
    ({"sport": 80}, "sport"), ({"proto": "tcp", "dport": 70000}, "dport"),
    ({"proto": 300}, "proto"), ({"proto": "bogus"}, "proto"), ({"dir": "fwd"}, "dir"),
    ({"src": "10.0.0.0/33"}, "src"), ({"priority": -1}, "priority"),
]


@pytest.mark.parametrize("bad,field", POLICY_BAD)
def test_policy_errors_name_the_field(bad, field):
    d = {"scope": "vm1", "dir": "out", "src": "10.0.0.0/24", "dst": "10.1.0.0/24",
         "action": "bypass"}
    d.update(bad)
    with pytest.raises(ValidationError) as ei:
        Policy.from_dict(d, "policy[0]")
    assert ei.value.field == f"policy[0].{field}"


def test_policy_selector_identity():
    a = Policy.from_dict({"scope": "vm1", "dir": "out", "src": "10.0.0.7/24",
                          "dst": "10.1.0.0/24", "proto": "tcp", "dport": 80,
                          "action": "protect", "reqid": 1})
    b = Policy.from_dict({"scope": "vm1", "dir": "out", "src": "10.0.0.0/24",
                          "dst": "10.1.0.0/24", "proto": 6, "dport": 80, "action": "discard"})
    assert a.ident == b.ident and a != b  # host bits masked, proto by name or number


@pytest.mark.parametrize("bad,field", [({"vni": -1}, "vni"), ({"mac": "ff:ff:ff:ff:ff:ff"}, "mac"),
                                       ({"remote": "224.0.0.1"}, "remote"),
                                       ({"remote": "0.0.0.0"}, "remote")])
def test_fdb_errors_name_the_field(bad, field):
    d = {"vni": 100, "mac": "flood", "remote": "192.0.2.1"}
    d.update(bad)
    with pytest.raises(ValidationError) as ei:
        FdbEntry.from_dict(d, "fdb[3]")
    assert ei.value.field == f"fdb[3].{field}"


def test_uplink_rules():
    assert Uplink.from_dict({"local": "fd00::1"}).mtu == 1500
    for bad, field in (({"mtu": 1000, "local": "fd00::1"}, "mtu"), ({"ipsec": "ah"}, "ipsec"),
                       ({"vxlan_port": 0}, "vxlan_port"), ({"sa_select": "rr"}, "sa_select")):
        d = {"local": "192.0.2.1"}
        d.update(bad)
        with pytest.raises(ValidationError) as ei:
            Uplink.from_dict(d)
        assert ei.value.field == f"uplink.{field}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(
    st.sampled_from(["scope", "dir", "src", "dst", "spi", "alg", "key", "icv_bits", "auth_key",
                     "mode", "replay_window", "esn", "encap_sport", "encap_dport",
                     "soft_bytes", "hard_bytes", "engine", "reqid", "junk"]),
    st.one_of(st.none(), st.booleans(), st.integers(-2, 1 << 33), st.text(max_size=12),
              st.sampled_from(["10.0.0.1", "::1", "aes-gcm", "out", "<KEY20>", "<KEY36>",
                               "tunnel", "chacha20-poly1305"]),
              st.lists(st.integers(), max_size=2), st.dictionaries(st.text(), st.integers(),
                                                                    max_size=1)),
    max_size=19))
def test_hostile_sa_params_only_raise_validation_errors(d):
    """Whatever JSON a client sends, the model answers a ValidationError naming a field
    (or accepts a valid SA) - never another exception."""
    base = sa_dict()
    base.update({k: {"<KEY20>": KEY20, "<KEY36>": "0x" + "ab" * 36}.get(v, v)
                 if isinstance(v, str) else v for k, v in d.items()})
    try:
        sa = SA.from_dict(base)
    except ValidationError as e:
        known = {f.name for f in dataclasses.fields(SA)} | set(base)
        assert e.field and e.field.split(".", 1)[1] in known
        if "5a5a5a5a" in str(e) or "abababab" in str(e):
            pytest.fail("key in error")
    else:
        assert 256 <= sa.spi <= 0xFFFFFFFF


# --- config file -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".toml")))
def test_examples_load(name):
    c = load(os.path.join(EXAMPLES, name))
    assert c.vfs and c.sas and c.uplink is not None
    assert all(isinstance(sa.key, Secret) for sa in c.sas)


BASE = """
[uplink]
local = "192.0.2.1"
[[vf]]
name = "vm1"
kind = "tap"
mac = "02:00:00:00:00:01"
vni = 100
[[vf]]
name = "vm2"
kind = "tap"
mac = "02:00:00:00:00:02"
vni = 200
"""

CONFIG_BAD = [
    (BASE.replace('"02:00:00:00:00:02"', '"02:00:00:00:00"'), "vf[1].mac"),
    (BASE.replace('name = "vm2"', 'name = "vm1"'), "vf[1].name"),
    (BASE.replace('"02:00:00:00:00:02"', '"02:00:00:00:00:01"'), "vf[1].mac"),
    (BASE + '[[sa]]\nscope = "vm9"\ndir = "out"\nsrc = "10.0.0.1"\ndst = "10.0.0.2"\n'
     'spi = 4096\nalg = "aes-gcm"\nkey = "' + KEY20 + '"\n', "sa[0].scope"),
    (BASE + '[[sa]]\nscope = "uplink"\ndir = "out"\nsrc = "fd00::1"\ndst = "fd00::2"\n'
     'spi = 4096\nalg = "aes-gcm"\nkey = "' + KEY20 + '"\n', "sa[0].src"),
    (BASE.replace('local = "192.0.2.1"', 'local = "192.0.2.1"\nipsec = "esp"') +
     '[[sa]]\nscope = "uplink"\ndir = "out"\nsrc = "192.0.2.1"\ndst = "192.0.2.2"\n'
     'spi = 4096\nalg = "aes-gcm"\nencap_sport = 4500\nencap_dport = 4500\nkey = "'
     + KEY20 + '"\n', "sa[0].encap_sport"),
    (BASE + '[[sa]]\nscope = "uplink"\ndir = "out"\nsrc = "192.0.2.1"\ndst = "192.0.2.2"\n'
     'spi = 4096\nalg = "aes-gcm"\nkey = "' + KEY20 + '"\n', "sa[0].scope"),
    (BASE + '[[fdb]]\nvni = 300\nmac = "flood"\nremote = "192.0.2.2"\n', "fdb[0].vni"),
    (BASE + '[[fdb]]\nvni = 100\nmac = "flood"\nremote = "fd00::2"\n', "fdb[0].remote"),
    (BASE + '[[policy]]\nscope = "vm3"\ndir = "out"\nsrc = "0.0.0.0/0"\ndst = "0.0.0.0/0"\n'
     'action = "bypass"\n', "policy[0].scope"),
    (BASE + "[daemon]\nadmin_socket = \"relative.sock\"\n", "daemon.admin_socket"),
    (BASE + "[daemon]\nvhost_max_memory_mib = 0\n", "daemon.vhost_max_memory_mib"),
    (BASE + "[daemon]\nvhost_max_memory_mib = 4194305\n", "daemon.vhost_max_memory_mib"),
    (BASE + "[bogus]\n", "bogus"),
    (BASE.replace("[uplink]", "[uplink]\nmtu = 100"), "uplink.mtu"),
    ("vf = 3\n", "vf"),
]


@pytest.mark.parametrize("text,field", CONFIG_BAD)
def test_config_errors_name_the_field(text, field):
    with pytest.raises(ConfigError) as ei:
        loads(text, "t.toml")
    assert ei.value.field == field
    assert str(ei.value).startswith(f"t.toml: {field}: ")


def test_config_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError) as ei:
        loads('key = "' + KEY20 + '\n', "t.toml")
    assert "line 1" in str(ei.value)
    if "5a5a5a" in str(ei.value):
        pytest.fail("key in error")
    with pytest.raises(ConfigError) as ei:
        load(tmp_path / "nope.toml")
    assert "cannot read" in str(ei.value)


def test_config_roundtrip_equality():
    a = loads(BASE)
    b = loads(BASE)
    assert a == b and isinstance(a, Config)
    assert loads(BASE.replace("vni = 200", "vni = 201")) != a


def test_vhost_memory_cap_defaults_to_64_gib():
    from vhost.memory import DEFAULT_MAX_MEMORY

    cfg = loads(BASE, "t.toml")
    assert cfg.daemon.vhost_max_memory_mib << 20 == DEFAULT_MAX_MEMORY == 64 << 30
    assert loads(BASE + "[daemon]\nvhost_max_memory_mib = 512\n",
                 "t.toml").daemon.vhost_max_memory_mib == 512
