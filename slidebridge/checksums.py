"""CRC-32C (Castagnoli) helpers in the encoding the Platform API uses for ``checksum_base64_crc32c``.

The encoding (PLATFORM_API §8, same as GCS ``crc32c=`` and S3's full-object ``ChecksumCRC32C``) is the
standard, padded base64 of the 4-byte big-endian CRC-32C of the whole file: always 8 characters,
e.g. ``b"hello"`` → ``"mnG7TA=="``.

The CRC itself comes from ``google-crc32c`` (hardware-accelerated C extension). ``crc32c_combine`` is
ours because that library has no combine function; parallel ranged downloads need it to join the
CRCs of parts that land out of order without re-reading the file.
"""

from __future__ import annotations

import base64
from pathlib import Path

import google_crc32c

__all__ = [
    "Crc32cHasher",
    "crc32c_b64_of_bytes",
    "crc32c_b64_of_file",
    "crc32c_combine",
    "crc32c_of_bytes",
    "int_to_b64",
]

DEFAULT_FILE_CHUNK = 8 * 1024 * 1024  # bytes read per step when hashing a file

# Reflected Castagnoli polynomial (the bit-reversed form of 0x1EDC6F41).
_CASTAGNOLI_REFLECTED = 0x82F63B78


def int_to_b64(crc: int) -> str:
    """Standard padded base64 of the 4-byte big-endian encoding of ``crc``."""
    if not 0 <= crc <= 0xFFFFFFFF:
        raise ValueError(f"CRC-32C value out of range: {crc}")
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def b64_to_int(value: str) -> int:
    """Inverse of :func:`int_to_b64`; raises ``ValueError`` unless ``value`` encodes exactly 4 bytes."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a base64 CRC-32C: {value!r}") from exc
    if len(raw) != 4:
        raise ValueError(f"not a base64 CRC-32C (decodes to {len(raw)} bytes, want 4): {value!r}")
    return int.from_bytes(raw, "big")


def crc32c_of_bytes(data: bytes) -> int:
    """CRC-32C of ``data`` as an unsigned 32-bit integer."""
    return int(google_crc32c.value(data))


def crc32c_b64_of_bytes(data: bytes) -> str:
    """``checksum_base64_crc32c`` of ``data``."""
    return int_to_b64(crc32c_of_bytes(data))


def crc32c_b64_of_file(path: Path, chunk: int = DEFAULT_FILE_CHUNK) -> str:
    """``checksum_base64_crc32c`` of a file, read in ``chunk``-byte steps (bounded memory)."""
    hasher = Crc32cHasher()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            hasher.update(block)
    return hasher.b64


class Crc32cHasher:
    """Incremental CRC-32C: feed ``update`` in order, read ``value`` / ``b64`` at any point."""

    __slots__ = ("_crc", "_length")

    def __init__(self, data: bytes = b"") -> None:
        self._crc = 0
        self._length = 0
        if data:
            self.update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        # The C extension accepts only ``bytes`` (not bytearray/memoryview), hence the copy.
        self._crc = int(google_crc32c.extend(self._crc, data if isinstance(data, bytes) else bytes(data)))
        self._length += len(data)

    @property
    def value(self) -> int:
        return self._crc

    @property
    def length(self) -> int:
        """Bytes fed so far (the ``len2`` a later :func:`crc32c_combine` needs)."""
        return self._length

    @property
    def b64(self) -> str:
        return int_to_b64(self._crc)


# --- combine -------------------------------------------------------------------------------------
# zlib's crc32_combine (GF(2) matrix method, Mark Adler), with the Castagnoli polynomial in place of
# the IEEE one. Appending len2 zero bytes to a CRC register is a linear map over GF(2); we build the
# operator for one zero bit, square it repeatedly to get 2^k zero bytes, and apply the operators
# matching the bits of len2. Cost is O(log len2) 32x32 matrix products, independent of the data.


def _gf2_matrix_times(mat: list[int], vec: int) -> int:
    total = 0
    i = 0
    while vec:
        if vec & 1:
            total ^= mat[i]
        vec >>= 1
        i += 1
    return total


def _gf2_matrix_square(mat: list[int]) -> list[int]:
    return [_gf2_matrix_times(mat, mat[n]) for n in range(32)]


def _one_zero_bit_operator() -> list[int]:
    # Row 0 is the polynomial (a 1 shifted out of bit 0 feeds back), rows n>=1 shift bit n to n-1.
    return [_CASTAGNOLI_REFLECTED] + [1 << (n - 1) for n in range(1, 32)]


def _build_zero_byte_operators() -> list[list[int]]:
    """``ops[k]`` appends 2^k zero bytes; 64 entries cover any length up to 2^64 - 1 bytes."""
    odd = _one_zero_bit_operator()
    even = _gf2_matrix_square(odd)  # 2 zero bits
    odd = _gf2_matrix_square(even)  # 4 zero bits
    op = _gf2_matrix_square(odd)  # 8 zero bits = 1 zero byte
    ops = [op]
    for _ in range(63):
        op = _gf2_matrix_square(op)
        ops.append(op)
    return ops


_ZERO_BYTE_OPERATORS = _build_zero_byte_operators()


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC-32C of ``A + B`` from ``crc1 = crc(A)``, ``crc2 = crc(B)`` and ``len2 = len(B)`` in bytes."""
    if len2 < 0:
        raise ValueError("len2 must be >= 0")
    if len2 >= 1 << 64:
        raise ValueError("len2 too large")
    k = 0
    while len2:
        if len2 & 1:
            crc1 = _gf2_matrix_times(_ZERO_BYTE_OPERATORS[k], crc1)
        len2 >>= 1
        k += 1
    return (crc1 ^ crc2) & 0xFFFFFFFF
