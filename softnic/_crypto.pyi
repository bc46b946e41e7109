"""Type stub for softnic._crypto (the compiled ESP crypto transforms)."""

from typing import TypedDict

ALGS: dict[str, int]
ENGINES: dict[str, int]

class BenchResult(TypedDict):
    engine: str
    alg: str
    size: int
    ns_per_op: float
    ops_per_s: float
    gbps: float

def engines() -> list[str]: ...

class Xform:
    alg: str
    def __init__(
        self,
        alg: str,
        key: bytes | bytearray | memoryview,
        auth_key: bytes | bytearray | memoryview | None = None,
        icv_len: int = 16,
        engine: str = "auto",
    ) -> None: ...
    @property
    def engine(self) -> str: ...
    @property
    def iv_len(self) -> int: ...
    @property
    def icv_len(self) -> int: ...
    @property
    def block(self) -> int: ...
    def seal(
        self, esp_hdr: bytes, iv: bytes, plaintext: bytes, seq_hi: int = 0, esn: bool = False
    ) -> bytes: ...
    def open(
        self,
        esp_hdr: bytes,
        iv: bytes,
        ciphertext_and_icv: bytes,
        seq_hi: int = 0,
        esn: bool = False,
    ) -> bytes: ...
    def open_raw(
        self, esp_hdr: bytes, iv: bytes, buf: bytearray, seq_hi: int = 0, esn: bool = False
    ) -> int: ...

def bench_seal(
    alg: str = "aes-gcm",
    key: bytes | None = None,
    auth_key: bytes | None = None,
    icv_len: int = 16,
    engine: str = "auto",
    size: int = 1420,
    iterations: int = 100000,
) -> BenchResult: ...
