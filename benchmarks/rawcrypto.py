"""Raw AES-128-GCM of each crypto engine: the reference softnic's figures are set against.

Deliberately independent of softnic's code: a tight C loop, built here with cffi (API
mode) into build/rawcrypto on first use, seals one buffer N times with each engine's
fastest call for an ESP packet (RFC 4106: 12-byte nonce salt || IV, 8-byte AAD, 16-byte
ICV), advancing the IV every packet as an ESP sender does:

  ipsec-mb  IMB_AES128_GCM_ENC, the one-shot direct API, key data precomputed once;
  openssl   EVP with the key set once; per packet EVP_EncryptInit_ex(NULL cipher, NULL
            key, IV), AAD update, update, final, GET_TAG.

    python benchmarks/rawcrypto.py            # table for 64, 1420 and 9000 bytes
    from rawcrypto import measure; measure("openssl", 1420)

softnic's own path through the same engines is `softnic._crypto.bench_seal`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from types import ModuleType
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(os.path.dirname(HERE), "build", "rawcrypto")
ENGINE_IDS = {"ipsec-mb": 1, "openssl": 2}

CDEF = """
int raw_available(int engine);
int64_t raw_seal_loop(int engine, size_t size, uint64_t iterations);
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/evp.h>
#ifdef RAW_HAVE_IPSEC_MB
#include <intel-ipsec-mb.h>
#endif

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static const uint8_t KEY[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

#ifdef RAW_HAVE_IPSEC_MB
static IMB_MGR *mgr;
static int mgr_state; /* 0 unknown, 1 ok, -1 absent */

static int imb_ok(void)
{
    IMB_ARCH arch = IMB_ARCH_NONE;
    if (mgr_state == 0) {
        mgr = alloc_mb_mgr(0);
        mgr_state = -1;
        if (mgr != NULL) {
            init_mb_mgr_auto(mgr, &arch);
            if (imb_get_errno(mgr) == 0 && arch != IMB_ARCH_NONE && arch != IMB_ARCH_NOAESNI)
                mgr_state = 1;
        }
    }
    return mgr_state == 1;
}

static int64_t imb_loop(uint8_t *buf, size_t size, uint64_t n)
{
    struct gcm_key_data *key = aligned_alloc(64, (sizeof(*key) + 63) & ~(size_t)63);
    struct gcm_context_data ctx;
    uint8_t nonce[12] = {0xca, 0xfe, 0xba, 0xbe}, aad[8] = {0}, tag[16];
    int64_t t0, t1;
    uint64_t i;

    if (key == NULL)
        return -1;
    IMB_AES128_GCM_PRE(mgr, KEY, key);
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        memcpy(nonce + 4, &i, 8);
        memcpy(aad + 4, &i, 4);
        IMB_AES128_GCM_ENC(mgr, key, &ctx, buf, buf, size, nonce, aad, 8, tag, 16);
    }
    t1 = now_ns();
    free(key);
    return t1 - t0;
}
#endif

static int64_t ossl_loop(uint8_t *buf, size_t size, uint64_t n)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    uint8_t nonce[12] = {0xca, 0xfe, 0xba, 0xbe}, aad[8] = {0}, tag[16];
    int outl, ok = 1;
    int64_t t0, t1;
    uint64_t i;

    if (c == NULL || EVP_EncryptInit_ex(c, EVP_aes_128_gcm(), NULL, KEY, nonce) != 1) {
        EVP_CIPHER_CTX_free(c);
        return -1;
    }
    t0 = now_ns();
    for (i = 0; i < n; i++) {
        memcpy(nonce + 4, &i, 8);
        memcpy(aad + 4, &i, 4);
        ok &= EVP_EncryptInit_ex(c, NULL, NULL, NULL, nonce);
        ok &= EVP_EncryptUpdate(c, NULL, &outl, aad, 8);
        ok &= EVP_EncryptUpdate(c, buf, &outl, buf, (int)size);
        ok &= EVP_EncryptFinal_ex(c, buf + size, &outl);
        ok &= EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_AEAD_GET_TAG, 16, tag);
    }
    t1 = now_ns();
    EVP_CIPHER_CTX_free(c);
    return ok == 1 ? t1 - t0 : -1;
}

int raw_available(int engine)
{
#ifdef RAW_HAVE_IPSEC_MB
    if (engine == 1)
        return imb_ok();
#endif
    return engine == 2;
}

/* Nanoseconds for `iterations` seals of one `size`-byte buffer; -1 if unavailable. */
int64_t raw_seal_loop(int engine, size_t size, uint64_t iterations)
{
    uint8_t *buf;
    int64_t ns = -1;

    if (!raw_available(engine) || size > (1u << 24))
        return -1;
    buf = aligned_alloc(64, (size + 16 + 63) & ~(size_t)63);
    if (buf == NULL)
        return -1;
    memset(buf, 0xab, size + 16);
#ifdef RAW_HAVE_IPSEC_MB
    if (engine == 1)
        ns = imb_loop(buf, size, iterations);
#endif
    if (engine == 2)
        ns = ossl_loop(buf, size, iterations);
    free(buf);
    return ns;
}
"""


def _have_ipsec_mb_header() -> bool:
    return any(
        os.path.exists(os.path.join(d, "intel-ipsec-mb.h"))
        for d in ("/usr/include", "/usr/local/include")
    )


_lib: Any = None


def _load() -> Any:
    """Build (once, cached by a hash of the source) and import the C loop."""
    global _lib
    if _lib is not None:
        return _lib
    imb = _have_ipsec_mb_header() and not os.environ.get("SOFTNIC_NO_IPSEC_MB")
    tag = hashlib.sha256((SOURCE + CDEF + str(imb)).encode()).hexdigest()[:12]
    name = f"_rawcrypto_{tag}"
    os.makedirs(CACHE, exist_ok=True)
    so = [f for f in os.listdir(CACHE) if f.startswith(name + ".") and f.endswith(".so")]
    if not so:
        from cffi import FFI

        ffi = FFI()
        ffi.cdef(CDEF)
        ffi.set_source(
            name,
            SOURCE,
            define_macros=[("RAW_HAVE_IPSEC_MB", "1")] if imb else [],
            libraries=["crypto"] + (["IPSec_MB"] if imb else []),
            extra_compile_args=["-O2"],
        )
        # Build in a private directory, then move into the cache: concurrent first runs
        # never import a half-written module.
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            built = ffi.compile(tmpdir=tmp, verbose=False)
            final = os.path.join(CACHE, os.path.basename(built))
            os.replace(built, final)
        so = [os.path.basename(final)]
    spec = importlib.util.spec_from_file_location(name, os.path.join(CACHE, so[0]))
    assert spec is not None and spec.loader is not None
    mod: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _lib = mod.lib  # type: ignore[attr-defined]
    return _lib


def engines() -> list[str]:
    """Engines the reference can run on this machine."""
    lib = _load()
    return [e for e, i in ENGINE_IDS.items() if lib.raw_available(i)]


def measure(engine: str, size: int, seconds: float = 0.5) -> dict[str, Any]:
    """Seal a `size`-byte buffer with AES-128-GCM on `engine` for about `seconds`.

    Runs in chunks of ~20 ms and reports the median chunk (robust to other processes on
    a shared machine) as ns_per_op, with the best chunk as best_ns_per_op.
    Raises ValueError for an engine not present.
    """
    if engine not in ENGINE_IDS:
        raise ValueError(f"engine: unknown engine {engine!r}")
    lib = _load()
    eid = ENGINE_IDS[engine]
    if not lib.raw_available(eid):
        raise ValueError(f"engine: {engine} is not available here")
    # Calibrate: grow a chunk until it takes >= 20 ms.
    n = 256
    while True:
        ns = lib.raw_seal_loop(eid, size, n)
        if ns < 0:
            raise RuntimeError(f"{engine}: seal loop failed")
        if ns >= 20_000_000 or n >= 1 << 30:
            break
        n *= 2
    per_op = [ns / n]
    deadline = time.monotonic() + max(0.0, seconds - ns / 1e9)
    while time.monotonic() < deadline:
        ns = lib.raw_seal_loop(eid, size, n)
        if ns < 0:
            raise RuntimeError(f"{engine}: seal loop failed")
        per_op.append(ns / n)
    med = statistics.median(per_op)
    return {
        "engine": engine,
        "alg": "aes-128-gcm",
        "size": size,
        "ns_per_op": med,
        "best_ns_per_op": min(per_op),
        "ops_per_s": 1e9 / med,
        "gbps": size * 8 / med,
        "chunks": len(per_op),
    }


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="raw AES-128-GCM of each engine, in a tight C "
                                 "loop compiled apart from softnic (the benchmarks' reference)")
    ap.add_argument("seconds", nargs="?", type=float, default=0.5,
                    help="time per figure (default 0.5)")
    seconds = ap.parse_args(argv[1:]).seconds
    print(f"raw AES-128-GCM seal (RFC 4106 ESP shape), {seconds:g} s per cell")
    print(f"{'engine':<10}{'bytes':>7}{'ns/op':>10}{'best':>10}{'Mops/s':>9}{'Gbit/s':>9}")
    for engine in engines():
        for size in (64, 1420, 9000):
            r = measure(engine, size, seconds)
            print(
                f"{engine:<10}{size:>7}{r['ns_per_op']:>10.1f}{r['best_ns_per_op']:>10.1f}"
                f"{r['ops_per_s'] / 1e6:>9.2f}{r['gbps']:>9.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
