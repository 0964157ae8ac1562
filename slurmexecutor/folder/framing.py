"""The header of a signed blob or record: `length | hmac`, with lengths past 4 GiB.

A length below 2**32 - 1 is 4 bytes, as it always was; `LONG` there says that an 8-byte
length follows (results of 4 GiB or more). The worker imports this.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

HEADER = struct.Struct(">I32s")  # payload length, HMAC-SHA256 digest
LONG = 0xFFFFFFFF  # in the 4-byte length: the real length follows in 8 bytes
LONG_LENGTH = struct.Struct(">Q")


def pack_header(length: int, digest: bytes) -> bytes:
    if length < LONG:
        return HEADER.pack(length, digest)
    return HEADER.pack(LONG, digest) + LONG_LENGTH.pack(length)


def read_header(handle: BinaryIO, available: int) -> tuple[int, bytes, int] | None:
    """(payload length, digest, header size) read from `handle`, or None when fewer
    than a whole header's bytes are `available`."""
    if available < HEADER.size:
        return None
    length, digest = HEADER.unpack(handle.read(HEADER.size))
    if length != LONG:
        return length, digest, HEADER.size
    if available < HEADER.size + LONG_LENGTH.size:
        return None
    (length,) = LONG_LENGTH.unpack(handle.read(LONG_LENGTH.size))
    return length, digest, HEADER.size + LONG_LENGTH.size
