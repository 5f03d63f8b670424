from __future__ import annotations

import base64
import itertools
import random
from pathlib import Path

import pytest

from slidebridge.checksums import (
    Crc32cHasher,
    b64_to_int,
    crc32c_b64_of_bytes,
    crc32c_b64_of_file,
    crc32c_combine,
    crc32c_of_bytes,
    int_to_b64,
)

# PLATFORM_API §8 test vectors.
VECTORS = [
    (b"hello", "mnG7TA=="),
    (b"123456789", "4waSgw=="),
    (b"", "AAAAAA=="),
]


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_vectors_bytes(data: bytes, expected: str) -> None:
    assert crc32c_b64_of_bytes(data) == expected


def test_check_value_is_castagnoli() -> None:
    # The standard CRC-32C check value; the IEEE CRC-32 of the same input is 0xCBF43926.
    assert crc32c_of_bytes(b"123456789") == 0xE3069283


@pytest.mark.parametrize(("data", "expected"), VECTORS)
def test_vectors_file(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert crc32c_b64_of_file(path) == expected


def test_file_small_chunks_match_bytes(tmp_path: Path) -> None:
    data = random.Random(1).randbytes(100_003)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    # A chunk size that does not divide the length, so the last read is short.
    assert crc32c_b64_of_file(path, chunk=4096) == crc32c_b64_of_bytes(data)


def test_hasher_incremental_matches_one_shot() -> None:
    data = random.Random(2).randbytes(50_000)
    hasher = Crc32cHasher()
    for start in range(0, len(data), 777):
        hasher.update(memoryview(data)[start : start + 777])
    assert hasher.value == crc32c_of_bytes(data)
    assert hasher.b64 == crc32c_b64_of_bytes(data)
    assert hasher.length == len(data)


def test_hasher_accepts_bytearray_and_initial_data() -> None:
    hasher = Crc32cHasher(b"hel")
    hasher.update(bytearray(b"lo"))
    assert hasher.b64 == "mnG7TA=="


def test_b64_is_big_endian_and_always_8_chars() -> None:
    assert int_to_b64(0xE3069283) == "4waSgw=="
    assert base64.b64decode(int_to_b64(1)) == b"\x00\x00\x00\x01"
    assert all(len(int_to_b64(v)) == 8 for v in (0, 1, 0xFFFFFFFF))
    assert b64_to_int("4waSgw==") == 0xE3069283


@pytest.mark.parametrize("bad", [-1, 1 << 32])
def test_int_to_b64_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        int_to_b64(bad)


@pytest.mark.parametrize("bad", ["752f9554", "AAAA", "not base64!"])
def test_b64_to_int_rejects_non_crc(bad: str) -> None:
    with pytest.raises(ValueError, match="CRC-32C"):
        b64_to_int(bad)


def test_combine_matches_direct_crc_on_random_splits() -> None:
    rng = random.Random(3)
    data = rng.randbytes(200_000)
    splits = [0, 1, len(data) - 1, len(data), *(rng.randrange(len(data)) for _ in range(20))]
    for split in splits:
        a, b = data[:split], data[split:]
        assert crc32c_combine(crc32c_of_bytes(a), crc32c_of_bytes(b), len(b)) == crc32c_of_bytes(data), split


def test_combine_folds_many_parts_in_order() -> None:
    # How the downloader uses it: parts of uneven size folded left to right.
    rng = random.Random(4)
    data = rng.randbytes(300_000)
    cuts = sorted({0, len(data), *(rng.randrange(len(data)) for _ in range(9))})
    crc = 0
    for start, end in itertools.pairwise(cuts):
        crc = crc32c_combine(crc, crc32c_of_bytes(data[start:end]), end - start)
    assert int_to_b64(crc) == crc32c_b64_of_bytes(data)


def test_combine_with_huge_length_is_fast_and_consistent() -> None:
    # Lengths far beyond memory are only matrix powers: check associativity instead of the data.
    a, b, c = 0x12345678, 0x9ABCDEF0, 0x0F0F0F0F
    len_b, len_c = 5 * 2**30, 7 * 2**40
    left = crc32c_combine(crc32c_combine(a, b, len_b), c, len_c)
    right = crc32c_combine(a, crc32c_combine(b, c, len_c), len_b + len_c)
    assert left == right


def test_combine_rejects_negative_length() -> None:
    with pytest.raises(ValueError, match="len2"):
        crc32c_combine(0, 0, -1)
