/*
 * sn_crypto.h — the ESP transforms, over two engines.
 *
 * One sn_xform per SA and direction. It owns the expanded key schedule (set once at
 * creation) and knows how each algorithm builds its nonce and AAD for ESP:
 *   AES-GCM        RFC 4106: key material = AES key || 4-byte salt, nonce = salt || IV(8),
 *                  AAD = SPI || seq (8 bytes), or SPI || seq_hi || seq_lo with ESN (12).
 *   ChaCha20-Poly1305  RFC 7634: key material = 32-byte key || 4-byte salt, nonce and
 *                  AAD as for GCM, ICV 16.
 *   AES-CBC + HMAC-SHA-256-128  RFC 3602 / RFC 4868: explicit 16-byte IV, ICV =
 *                  HMAC(SPI || seq || IV || ciphertext [|| seq_hi with ESN]) truncated to 16.
 * Engines: intel-ipsec-mb (when built with SN_HAVE_IPSEC_MB) and OpenSSL libcrypto.
 *
 * Ownership: an sn_xform is created and freed by the control plane (with the GIL);
 * seal/open are called from the data plane without the GIL. Several threads may seal
 * with one xform at once: ipsec-mb's key data is read-only after creation and its
 * per-call contexts live on the caller's stack; OpenSSL's EVP contexts are taken under
 * a per-xform spinlock. (Decryption is single-threaded by the ESP layer's contract,
 * but open is as safe.)
 */
#ifndef SN_CRYPTO_H
#define SN_CRYPTO_H

#include <stddef.h>
#include <stdint.h>

enum sn_alg {
    SN_ALG_AES_GCM = 1,            /* key 16 or 32 bytes (+4 salt); ICV 8, 12 or 16 */
    SN_ALG_CHACHA20_POLY1305 = 2,  /* key 32 (+4 salt); ICV 16 */
    SN_ALG_AES_CBC_HMAC_SHA256 = 3 /* enc key 16 or 32; auth key 32; ICV 16 */
};

enum sn_engine {
    SN_ENGINE_AUTO = 0,     /* intel-ipsec-mb where it supports the algorithm, else OpenSSL */
    SN_ENGINE_OPENSSL = 1,
    SN_ENGINE_IPSECMB = 2
};

typedef struct sn_xform sn_xform;

/* 1 if the engine was compiled in and initialises on this CPU. */
int sn_engine_available(int engine);

/*
 * Create a transform. `key`/`keylen` is the cipher key material as `ip xfrm` takes it
 * (for GCM and ChaCha20 the 4-byte salt is its tail); `auth_key` is the HMAC key for
 * CBC+HMAC (NULL otherwise). On failure returns NULL and writes a reason (never key
 * bytes) to err.
 */
sn_xform *sn_xform_new(int alg, int engine, const uint8_t *key, size_t keylen,
                       const uint8_t *auth_key, size_t auth_keylen, unsigned icv_len,
                       char *err, size_t errlen);
void sn_xform_free(sn_xform *x);           /* wipes key material */
int sn_xform_engine(const sn_xform *x);    /* the engine actually chosen */
unsigned sn_xform_iv_len(const sn_xform *x);    /* explicit IV in the packet: 8 or 16 */
unsigned sn_xform_icv_len(const sn_xform *x);
unsigned sn_xform_block(const sn_xform *x);     /* ciphertext alignment: 4 (AEAD) or 16 */

/*
 * Seal an ESP payload in place. `esp_hdr` points at the 8-byte ESP header (SPI, seq low)
 * as it will be on the wire; `seq_hi` is the ESN high half (used only when `esn`).
 * `iv` is the explicit IV (already written to the packet by the caller). `buf[0:len]` is
 * the plaintext (payload, padding, pad length, next header), encrypted in place; the ICV
 * is written to `icv`. Returns 0, or -1 on an engine failure.
 */
int sn_xform_seal(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                  const uint8_t *iv, uint8_t *buf, size_t len, uint8_t *icv);

/* Verify the ICV, then decrypt in place. Returns 0, -1 on authentication failure
 * (buf then holds no plaintext that may be used), -2 on an engine failure. */
int sn_xform_open(sn_xform *x, const uint8_t *esp_hdr, uint32_t seq_hi, int esn,
                  const uint8_t *iv, uint8_t *buf, size_t len, const uint8_t *icv);

#endif
