# cython: language_level=3
"""ESP crypto transforms: RFC 4303 §3.3.2 / §3.4.4 with AES-GCM (RFC 4106),
ChaCha20-Poly1305 (RFC 7634) and AES-CBC + HMAC-SHA-256-128 (RFC 3602, RFC 4868).

The engines are C (softnic/csrc/sn_crypto.c). This module links them, exports the cdef
`xform_*` wrappers that sibling extension modules cimport, and offers a small Python
surface for tests, the management plane and benchmarks. Keys never appear in a repr or
an error.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

ALGS = {
    "aes-gcm": SN_ALG_AES_GCM,
    "chacha20-poly1305": SN_ALG_CHACHA20_POLY1305,
    "aes-cbc-hmac-sha256": SN_ALG_AES_CBC_HMAC_SHA256,
}
ENGINES = {"auto": SN_ENGINE_AUTO, "openssl": SN_ENGINE_OPENSSL, "ipsec-mb": SN_ENGINE_IPSECMB}
_ENGINE_NAMES = {SN_ENGINE_OPENSSL: "openssl", SN_ENGINE_IPSECMB: "ipsec-mb"}


# ---------------------------------------------------------------- cdef wrappers

cdef sn_xform *xform_new(int alg, int engine, const uint8_t *key, size_t keylen,
                         const uint8_t *auth_key, size_t auth_keylen, unsigned icv_len,
                         char *err, size_t errlen) noexcept:
    return sn_xform_new(alg, engine, key, keylen, auth_key, auth_keylen, icv_len,
                        err, errlen)


cdef void xform_free(sn_xform *x) noexcept:
    sn_xform_free(x)


cdef int xform_engine(const sn_xform *x) noexcept nogil:
    return sn_xform_engine(x)


cdef unsigned xform_iv_len(const sn_xform *x) noexcept nogil:
    return sn_xform_iv_len(x)


cdef unsigned xform_icv_len(const sn_xform *x) noexcept nogil:
    return sn_xform_icv_len(x)


cdef unsigned xform_block(const sn_xform *x) noexcept nogil:
    return sn_xform_block(x)


cdef int xform_seal(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                    const uint8_t *iv, uint8_t *buf, size_t len, uint8_t *icv) noexcept nogil:
    return sn_xform_seal(x, esp_hdr, seq_hi, esn, iv, buf, len, icv)


cdef int xform_open(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                    const uint8_t *iv, uint8_t *buf, size_t len,
                    const uint8_t *icv) noexcept nogil:
    return sn_xform_open(x, esp_hdr, seq_hi, esn, iv, buf, len, icv)


# ---------------------------------------------------------------- Python surface

def engines():
    """Names of the engines compiled in and usable on this CPU, fastest first."""
    out = []
    if sn_engine_available(SN_ENGINE_IPSECMB):
        out.append("ipsec-mb")
    if sn_engine_available(SN_ENGINE_OPENSSL):
        out.append("openssl")
    return out


cdef sn_xform *_new(str alg, const uint8_t[::1] key, object auth_key, unsigned icv_len,
                    str engine) except NULL:
    """Validate the names, then build an sn_xform; errors name the parameter only."""
    cdef char err[160]
    cdef const uint8_t[::1] ak
    cdef const uint8_t *akp = NULL
    cdef size_t akl = 0
    cdef sn_xform *x
    if alg not in ALGS:
        raise ValueError(f"alg: unknown algorithm {alg!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine: unknown engine {engine!r}")
    if auth_key is not None:
        ak = auth_key
        akl = ak.shape[0]
        if akl:
            akp = &ak[0]
        else:
            akp = <const uint8_t *>""
    x = sn_xform_new(ALGS[alg], ENGINES[engine],
                     &key[0] if key.shape[0] else <const uint8_t *>"", key.shape[0],
                     akp, akl, icv_len, err, sizeof(err))
    if x == NULL:
        raise ValueError(err.decode("ascii", "replace"))
    return x


cdef class Xform:
    """One ESP transform (an SA and a direction) with its key set once.

    `key` is the cipher key material as `ip xfrm` takes it (AES-GCM and ChaCha20-Poly1305:
    key || 4-byte salt); `auth_key` the HMAC key for aes-cbc-hmac-sha256.
    """

    def __cinit__(self, str alg, key, auth_key=None, unsigned icv_len=16,
                  str engine="auto"):
        self.x = NULL
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError("key must be bytes")
        if auth_key is not None and not isinstance(auth_key, (bytes, bytearray, memoryview)):
            raise TypeError("auth_key must be bytes or None")
        self.x = _new(alg, key, auth_key, icv_len, engine)
        self.alg = alg

    def __dealloc__(self):
        if self.x != NULL:
            sn_xform_free(self.x)
            self.x = NULL

    @property
    def engine(self):
        return _ENGINE_NAMES[sn_xform_engine(self.x)]

    @property
    def iv_len(self):
        return sn_xform_iv_len(self.x)

    @property
    def icv_len(self):
        return sn_xform_icv_len(self.x)

    @property
    def block(self):
        return sn_xform_block(self.x)

    def __repr__(self):
        return (f"Xform(alg={self.alg!r}, engine={self.engine!r}, "
                f"icv_len={self.icv_len})")

    def __reduce__(self):
        raise TypeError("Xform holds key material and cannot be pickled")

    cdef _check(self, const uint8_t[::1] esp_hdr, const uint8_t[::1] iv):
        if esp_hdr.shape[0] != 8:
            raise ValueError("esp_hdr: must be 8 bytes (SPI, sequence number)")
        if <unsigned>iv.shape[0] != sn_xform_iv_len(self.x):
            raise ValueError(f"iv: must be {sn_xform_iv_len(self.x)} bytes")

    def seal(self, const uint8_t[::1] esp_hdr, const uint8_t[::1] iv,
             const uint8_t[::1] plaintext, uint32_t seq_hi=0, bint esn=False):
        """Encrypt and authenticate; returns ciphertext || ICV."""
        self._check(esp_hdr, iv)
        cdef size_t n = plaintext.shape[0]
        cdef unsigned icv = sn_xform_icv_len(self.x)
        out = bytearray(n + icv)
        cdef uint8_t[::1] o = out
        cdef int rc
        if n:
            o[:n] = plaintext
        with nogil:
            rc = sn_xform_seal(self.x, &esp_hdr[0], seq_hi, esn, &iv[0], &o[0], n, &o[n])
        if rc != 0:
            raise RuntimeError("crypto engine failure")
        return bytes(out)

    def open(self, const uint8_t[::1] esp_hdr, const uint8_t[::1] iv,
             const uint8_t[::1] ciphertext_and_icv, uint32_t seq_hi=0, bint esn=False):
        """Verify the ICV and decrypt; returns the plaintext or raises ValueError."""
        self._check(esp_hdr, iv)
        cdef unsigned icv = sn_xform_icv_len(self.x)
        cdef size_t total = ciphertext_and_icv.shape[0]
        if total < icv:
            raise ValueError("ciphertext_and_icv: shorter than the ICV")
        cdef size_t n = total - icv
        buf = bytearray(ciphertext_and_icv)
        cdef uint8_t[::1] b = buf
        cdef int rc
        with nogil:
            rc = sn_xform_open(self.x, &esp_hdr[0], seq_hi, esn, &iv[0], &b[0], n, &b[n])
        if rc == -1:
            raise ValueError("authentication failed")
        if rc != 0:
            raise ValueError("ciphertext_and_icv: rejected by the engine (bad length)")
        return bytes(buf[:n])

    def open_raw(self, const uint8_t[::1] esp_hdr, const uint8_t[::1] iv, uint8_t[::1] buf,
                 uint32_t seq_hi=0, bint esn=False):
        """sn_xform_open in place on `buf` = ciphertext || ICV; returns its code
        (0, -1 ICV failure, -2 engine failure). For tests of the in-place contract."""
        self._check(esp_hdr, iv)
        cdef unsigned icv = sn_xform_icv_len(self.x)
        cdef size_t total = buf.shape[0]
        if total < icv or total == 0:
            raise ValueError("buf: shorter than the ICV")
        cdef size_t n = total - icv
        cdef int rc
        with nogil:
            rc = sn_xform_open(self.x, &esp_hdr[0], seq_hi, esn, &iv[0], &buf[0], n, &buf[n])
        return rc


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


def bench_seal(str alg="aes-gcm", key=None, auth_key=None, unsigned icv_len=16,
               str engine="auto", size_t size=1420, long iterations=100000):
    """Seal one `size`-byte buffer `iterations` times through softnic's own xform_seal,
    GIL released, and return {"engine", "ns_per_op", "ops_per_s", "gbps"}.

    Without `key`, a fixed test key of the right length for `alg` is used (AES-128 for
    aes-gcm and aes-cbc).
    """
    if key is None:
        key = bytes(range(36)) if alg == "chacha20-poly1305" else (
            bytes(range(16)) if alg == "aes-cbc-hmac-sha256" else bytes(range(20)))
    if auth_key is None and alg == "aes-cbc-hmac-sha256":
        auth_key = bytes(range(32, 64))
    if iterations <= 0:
        raise ValueError("iterations: must be > 0")
    cdef Xform xf = Xform(alg, key, auth_key, icv_len, engine)
    cdef sn_xform *x = xf.x
    cdef uint8_t hdr[8]
    cdef uint8_t iv[16]
    cdef uint8_t icv[16]
    cdef uint8_t *buf = <uint8_t *>malloc(size + 1)
    cdef long i
    cdef int rc = 0
    cdef uint64_t t0, t1
    if buf == NULL:
        raise MemoryError()
    if alg == "aes-cbc-hmac-sha256":
        size -= size % 16
    memset(buf, 0xab, size + 1)
    memset(hdr, 0, 8)
    memset(iv, 0x5a, 16)
    try:
        with nogil:
            t0 = _now_ns()
            for i in range(iterations):
                # A fresh sequence number and IV per packet, as the ESP layer does.
                hdr[7] = <uint8_t>i
                iv[7] = <uint8_t>i
                rc |= xform_seal(x, hdr, 0, 0, iv, buf, size, icv)
            t1 = _now_ns()
    finally:
        free(buf)
    if rc != 0:
        raise RuntimeError("crypto engine failure")
    ns = <double>(t1 - t0) / iterations
    return {
        "engine": xf.engine,
        "alg": alg,
        "size": size,
        "ns_per_op": ns,
        "ops_per_s": 1e9 / ns if ns else float("inf"),
        "gbps": size * 8 / ns if ns else float("inf"),
    }
