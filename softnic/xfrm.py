"""`ip xfrm state` / `ip xfrm policy` argument syntax (iproute2's ip-xfrm(8)) -> model params.

So an administrator's habits carry over, `softnicctl sa add` takes the words of
`ip xfrm state add`, scoped with `vf NAME` or `uplink`, plus `dir in|out` (as in iproute2
6.10+, because softnic's SA tables are keyed by (VF, SPI, direction)):

    vf vm1 dir out src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x1000 reqid 1 mode tunnel
        aead 'rfc4106(gcm(aes))' 0xKEY 128 replay-window 128 flag esn
        encap espinudp 4500 4500 0.0.0.0 limit byte-soft 1000000 limit packet-hard 5000

The parsers return plain JSON-able dicts (keys stay "0x..." hex strings) which the daemon
validates with `model.SA.from_dict` / `model.Policy.from_dict`. Parse errors are
`XfrmError` (a ValidationError naming the field); no error ever echoes a key token.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any

from .model import ALGS, PROTOCOLS, REDACTED, UPLINK, ValidationError

__all__ = ["XfrmError", "parse_state", "parse_state_id", "parse_policy", "parse_policy_id",
           "format_state", "format_policy"]

AEAD_NAMES = {"rfc4106(gcm(aes))": "aes-gcm", "rfc7539esp(chacha20,poly1305)": "chacha20-poly1305"}
ENC_NAMES = {"cbc(aes)": "aes-cbc-hmac-sha256"}
AUTH_NAMES = {"hmac(sha256)"}
LIMITS = {"byte-soft": "soft_bytes", "byte-hard": "hard_bytes",
          "packet-soft": "soft_packets", "packet-hard": "hard_packets"}


class XfrmError(ValidationError):
    """A word of the xfrm-style argument list was missing or wrong."""


class _Words:
    def __init__(self, argv: Sequence[str],
                 read_secret: Callable[[str], str] | None = None,
                 inline_key: Callable[[str], None] | None = None) -> None:
        self.w = list(argv)
        self.i = 0
        self.read_secret = read_secret
        self.inline_key = inline_key

    def more(self) -> bool:
        return self.i < len(self.w)

    def peek(self) -> str | None:
        return self.w[self.i] if self.more() else None

    def take(self, field: str, what: str) -> str:
        if not self.more():
            raise XfrmError(field, f"missing {what}")
        self.i += 1
        return self.w[self.i - 1]

    def secret(self, field: str) -> str:
        # The token is a key: never echoed, only checked to be hex.
        tok = self.take(field, "key (0x...)")
        if self.read_secret is not None and (tok == "-" or tok.startswith("@")):
            # `@FILE` or `-` (a line of stdin): keeps the key out of argv, which every
            # local user can read in /proc/PID/cmdline.
            tok = self.read_secret(tok).strip()
            tok = tok if tok[:2] in ("0x", "0X") else "0x" + tok
        elif self.inline_key is not None:
            self.inline_key(field)  # the key was a word of argv: visible in ps
        s = tok[2:] if tok[:2] in ("0x", "0X") else ""
        if not s or len(s) % 2 or any(c not in "0123456789abcdefABCDEF" for c in s):
            raise XfrmError(field, "must be an even number of hex digits after 0x")
        return "0x" + s.lower()


def _num(tok: str, field: str) -> int:
    try:
        return int(tok, 0)
    except ValueError:
        raise XfrmError(field, f"'{tok[:40]}' is not a number") from None


def _scope(w: _Words, out: dict[str, Any], tok: str) -> bool:
    if tok == "vf":
        out["scope"] = w.take("scope", "VF name after 'vf'")
        return True
    if tok == UPLINK:
        out["scope"] = UPLINK
        return True
    return False


def _dir(w: _Words) -> str:
    d = w.take("dir", "in|out after 'dir'")
    if d not in ("in", "out"):
        raise XfrmError("dir", "must be in|out")
    return d


def _common_id(w: _Words, out: dict[str, Any], tok: str) -> bool:
    """Words shared by state add and state del/get: scope, dir, src, dst, proto, spi."""
    if _scope(w, out, tok):
        return True
    if tok == "dir":
        out["dir"] = _dir(w)
    elif tok in ("src", "dst"):
        out[tok] = w.take(tok, f"address after '{tok}'")
    elif tok == "proto":
        p = w.take("proto", "protocol after 'proto'")
        if p != "esp":
            raise XfrmError("proto", "only esp is supported")
    elif tok == "spi":
        out["spi"] = _num(w.take("spi", "SPI after 'spi'"), "spi")
    else:
        return False
    return True


def parse_state(argv: Sequence[str],
                read_secret: Callable[[str], str] | None = None,
                inline_key: Callable[[str], None] | None = None) -> dict[str, Any]:
    """`ip xfrm state add` words -> SA params (model.SA.from_dict shape). With
    `read_secret`, a key word `@FILE` or `-` is replaced by read_secret(word) (hex);
    `inline_key(field)` is called for each key given as a word itself."""
    w = _Words(argv, read_secret, inline_key)
    out: dict[str, Any] = {}
    while w.more():
        tok = w.take("", "")
        if _common_id(w, out, tok):
            continue
        if tok == "reqid":
            out["reqid"] = _num(w.take("reqid", "number after 'reqid'"), "reqid")
        elif tok == "mode":
            out["mode"] = w.take("mode", "tunnel|transport after 'mode'")
            if out["mode"] not in ("tunnel", "transport"):
                raise XfrmError("mode", "must be tunnel|transport")
        elif tok == "aead":
            name = w.take("alg", "algorithm name after 'aead'")
            if name not in AEAD_NAMES:
                raise XfrmError("alg", "aead must be one of " + ", ".join(AEAD_NAMES))
            out["alg"] = AEAD_NAMES[name]
            out["key"] = w.secret("key")
            out["icv_bits"] = _num(w.take("icv_bits", "ICV length in bits"), "icv_bits")
        elif tok == "enc":
            name = w.take("alg", "algorithm name after 'enc'")
            if name not in ENC_NAMES:
                raise XfrmError("alg", "enc must be one of " + ", ".join(ENC_NAMES))
            out["alg"] = ENC_NAMES[name]
            out["key"] = w.secret("key")
        elif tok == "auth-trunc":
            name = w.take("auth_key", "algorithm name after 'auth-trunc'")
            if name not in AUTH_NAMES:
                raise XfrmError("auth_key", "auth-trunc must be hmac(sha256)")
            out["auth_key"] = w.secret("auth_key")
            out["icv_bits"] = _num(w.take("icv_bits", "truncation length in bits"), "icv_bits")
        elif tok == "auth":
            raise XfrmError("auth_key", "use auth-trunc 'hmac(sha256)' KEY 128 (RFC 4868)")
        elif tok == "replay-window":
            out["replay_window"] = _num(w.take("replay_window", "window size"),
                                        "replay_window")
        elif tok == "flag":
            f = w.take("esn", "flag name after 'flag'")
            if f != "esn":
                raise XfrmError("esn", "only flag esn is supported")
            out["esn"] = True
        elif tok == "encap":
            t = w.take("encap_sport", "encap type")
            if t != "espinudp":
                raise XfrmError("encap_sport", "only encap espinudp is supported (RFC 3948)")
            out["encap_sport"] = _num(w.take("encap_sport", "source port"), "encap_sport")
            out["encap_dport"] = _num(w.take("encap_dport", "destination port"), "encap_dport")
            oa = w.take("encap_oa", "original address (0.0.0.0)")
            try:
                ipaddress.ip_address(oa)
            except ValueError:
                raise XfrmError("encap_oa", "must be an address (0.0.0.0)") from None
        elif tok == "limit":
            # One LIMIT per `limit` word, as ip-xfrm(8) parses it.
            k = w.take("limit", "byte-soft|byte-hard|packet-soft|packet-hard")
            if k not in LIMITS:
                raise XfrmError("limit", "must be byte-soft|byte-hard|packet-soft|packet-hard"
                                " (time limits are not supported)")
            out[LIMITS[k]] = _num(w.take(LIMITS[k], f"number after '{k}'"), LIMITS[k])
        elif tok == "engine":
            out["engine"] = w.take("engine", "auto|openssl|ipsec-mb after 'engine'")
        else:
            raise XfrmError("", f"unknown word '{tok[:40]}'")
    for f, what in (("scope", "'vf NAME' or 'uplink'"), ("dir", "'dir in|out'"),
                    ("spi", "'spi N'"), ("alg", "'aead ...' or 'enc ... auth-trunc ...'")):
        if f not in out:
            raise XfrmError(f, f"missing {what}")
    if out["alg"] == "aes-cbc-hmac-sha256" and "auth_key" not in out:
        raise XfrmError("auth_key", "enc 'cbc(aes)' needs auth-trunc 'hmac(sha256)' KEY 128")
    return out


def parse_state_id(argv: Sequence[str]) -> dict[str, Any]:
    """`ip xfrm state del|get` words -> {scope, spi, [dir, src, dst]}."""
    w = _Words(argv)
    out: dict[str, Any] = {}
    while w.more():
        tok = w.take("", "")
        if not _common_id(w, out, tok):
            raise XfrmError("", f"unknown word '{tok[:40]}'")
    for f, what in (("scope", "'vf NAME' or 'uplink'"), ("spi", "'spi N'")):
        if f not in out:
            raise XfrmError(f, f"missing {what}")
    return out


def _policy_words(argv: Sequence[str], want_action: bool) -> dict[str, Any]:
    w = _Words(argv)
    out: dict[str, Any] = {}
    in_tmpl = False
    while w.more():
        tok = w.take("", "")
        if tok == "tmpl":
            in_tmpl = True
            out.setdefault("action", "protect")
            continue
        if in_tmpl:
            # Template words: only the SA reference matters; the rest is accepted as
            # ip-xfrm(8) writes it (src/dst/proto esp/mode) and ignored.
            if tok in ("reqid", "spi"):
                out[tok] = _num(w.take(tok, f"number after '{tok}'"), tok)
            elif tok in ("src", "dst", "proto", "mode"):
                w.take(tok, f"value after '{tok}'")
            elif tok == "level":
                w.take("level", "required|use")
            else:
                raise XfrmError("", f"unknown template word '{tok[:40]}'")
            continue
        if _scope(w, out, tok):
            continue
        if tok == "dir":
            out["dir"] = _dir(w)
        elif tok in ("src", "dst"):
            out[tok] = w.take(tok, f"prefix after '{tok}'")
        elif tok == "proto":
            p = w.take("proto", "protocol after 'proto'")
            out["proto"] = PROTOCOLS[p] if p in PROTOCOLS else _num(p, "proto")
        elif tok in ("sport", "dport"):
            out[tok] = _num(w.take(tok, f"port after '{tok}'"), tok)
        elif tok in ("priority", "reqid", "spi"):
            out[tok] = _num(w.take(tok, f"number after '{tok}'"), tok)
        elif tok == "action" and want_action:
            a = w.take("action", "protect|bypass|discard")
            # ip xfrm's allow/block: allow + tmpl = protect, allow alone = bypass.
            a = {"block": "discard", "allow": "bypass"}.get(a, a)
            if a not in ("protect", "bypass", "discard"):
                raise XfrmError("action", "must be protect|bypass|discard (or allow|block)")
            if not (a == "bypass" and out.get("action") == "protect"):
                out["action"] = a
        else:
            raise XfrmError("", f"unknown word '{tok[:40]}'")
    for f, what in (("scope", "'vf NAME' or 'uplink'"), ("dir", "'dir in|out'")):
        if f not in out:
            raise XfrmError(f, f"missing {what}")
    # A missing selector address is "any" of the other one's family, as in ip-xfrm(8).
    v6 = any(":" in str(out.get(f, "")) for f in ("src", "dst"))
    for f in ("src", "dst"):
        out.setdefault(f, "::/0" if v6 else "0.0.0.0/0")
    return out


def parse_policy(argv: Sequence[str]) -> dict[str, Any]:
    """`ip xfrm policy add` words -> Policy params (model.Policy.from_dict shape).
    Without `action`, a policy with an SA reference protects, else it bypasses."""
    out = _policy_words(argv, want_action=True)
    if "action" not in out:
        out["action"] = "protect" if ("reqid" in out or "spi" in out) else "bypass"
    return out


def parse_policy_id(argv: Sequence[str]) -> dict[str, Any]:
    """`ip xfrm policy del` words -> the selector {scope, dir, src, dst, [proto, ports]}."""
    out = _policy_words(argv, want_action=False)
    for f in ("reqid", "spi", "priority", "action"):
        out.pop(f, None)
    return out


def format_state(d: dict[str, Any]) -> str:
    """An SA's public view (model.SA.to_dict) as ip-xfrm-like text. Keys print redacted."""
    xname = ALGS.get(d.get("alg", ""), ("?",))[0]
    words = [("vf " + d["scope"]) if d["scope"] != UPLINK else UPLINK, "dir", d["dir"],
             "src", d["src"], "dst", d["dst"], "proto esp spi", d["spi"],
             "reqid", str(d["reqid"]), "mode", d["mode"], "\n   "]
    if d["alg"] == "aes-cbc-hmac-sha256":
        words += ["enc", f"'{xname}'", REDACTED, "auth-trunc 'hmac(sha256)'", REDACTED,
                  str(d["icv_bits"])]
    else:
        words += ["aead", f"'{xname}'", REDACTED, str(d["icv_bits"])]
    words += ["replay-window", str(d["replay_window"])]
    if d.get("esn"):
        words.append("flag esn")
    if d.get("encap_sport") is not None:
        words += ["encap espinudp", str(d["encap_sport"]), str(d["encap_dport"]), "0.0.0.0"]
    for word, key in LIMITS.items():
        if d.get(key) is not None:
            words += ["limit", word, str(d[key])]
    if d.get("engine", "auto") != "auto":
        words += ["engine", d["engine"]]
    return " ".join(words).replace(" \n    ", "\n    ")


def format_policy(d: dict[str, Any]) -> str:
    """A policy's public view (model.Policy.to_dict) as ip-xfrm-like text."""
    words = [("vf " + d["scope"]) if d["scope"] != UPLINK else UPLINK,
             "src", d["src"], "dst", d["dst"]]
    if d.get("proto") is not None:
        words += ["proto", str(d["proto"])]
    for p in ("sport", "dport"):
        if d.get(p) is not None:
            words += [p, str(d[p])]
    words += ["dir", d["dir"], "priority", str(d["priority"]), "action", d["action"]]
    if d.get("reqid") is not None:
        words += ["reqid", str(d["reqid"])]
    if d.get("spi") is not None:
        words += ["spi", str(d["spi"])]
    return " ".join(words)
