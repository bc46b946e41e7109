# ESP crypto transforms (RFC 4303 §3.3.2 / §3.4.4 with RFC 4106, RFC 7634, RFC 3602 +
# RFC 4868): the C API of softnic/csrc/sn_crypto.h and the cdef wrappers other extension
# modules cimport. The C is linked into softnic._crypto only, so a sibling module calls
# the `xform_*` functions below (a C function-pointer call through Cython's C-API
# capsule), never the `sn_*` symbols directly.

from libc.stdint cimport uint8_t, uint32_t


cdef extern from "sn_crypto.h" nogil:
    enum sn_alg:
        SN_ALG_AES_GCM
        SN_ALG_CHACHA20_POLY1305
        SN_ALG_AES_CBC_HMAC_SHA256

    enum sn_engine:
        SN_ENGINE_AUTO
        SN_ENGINE_OPENSSL
        SN_ENGINE_IPSECMB

    ctypedef struct sn_xform:
        pass

    int sn_engine_available(int engine)
    sn_xform *sn_xform_new(int alg, int engine, const uint8_t *key, size_t keylen,
                           const uint8_t *auth_key, size_t auth_keylen, unsigned icv_len,
                           char *err, size_t errlen)
    void sn_xform_free(sn_xform *x)
    int sn_xform_engine(const sn_xform *x)
    unsigned sn_xform_iv_len(const sn_xform *x)
    unsigned sn_xform_icv_len(const sn_xform *x)
    unsigned sn_xform_block(const sn_xform *x)
    int sn_xform_seal(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                      const uint8_t *iv, uint8_t *buf, size_t len, uint8_t *icv)
    int sn_xform_open(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                      const uint8_t *iv, uint8_t *buf, size_t len, const uint8_t *icv)


# Control plane (call with the GIL). Returns NULL and a key-free reason in `err` on failure;
# the caller owns the result and frees it with xform_free (which wipes the key material).
cdef sn_xform *xform_new(int alg, int engine, const uint8_t *key, size_t keylen,
                         const uint8_t *auth_key, size_t auth_keylen, unsigned icv_len,
                         char *err, size_t errlen) noexcept
cdef void xform_free(sn_xform *x) noexcept

# Data plane (no GIL). See sn_crypto.h: seal -> 0 / -1 engine failure;
# open -> 0 / -1 ICV failure (packet left as it came) / -2 engine failure or bad length.
cdef int xform_engine(const sn_xform *x) noexcept nogil
cdef unsigned xform_iv_len(const sn_xform *x) noexcept nogil
cdef unsigned xform_icv_len(const sn_xform *x) noexcept nogil
cdef unsigned xform_block(const sn_xform *x) noexcept nogil
cdef int xform_seal(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                    const uint8_t *iv, uint8_t *buf, size_t len, uint8_t *icv) noexcept nogil
cdef int xform_open(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                    const uint8_t *iv, uint8_t *buf, size_t len,
                    const uint8_t *icv) noexcept nogil


cdef class Xform:
    cdef sn_xform *x
    cdef readonly str alg
    cdef _check(self, const uint8_t[::1] esp_hdr, const uint8_t[::1] iv)
