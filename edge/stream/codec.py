"""Decompression of DECTRIS Stream V2 byte strings: ``bslz4`` and ``lz4`` (HDF5 framings).

Both algorithms of the DECTRIS compression tag (CBOR tag 56500) use the HDF5
filter framings, so a chunk read raw from an HDF5 dataset written with the
bitshuffle (``bslz4``) or LZ4 filter decodes with the same functions:

``bslz4`` (bitshuffle HDF5 filter, LZ4 variant)
    big-endian u64 uncompressed size in bytes, big-endian u32 block size in
    bytes (0 = default 8192), then per block a big-endian u32 compressed
    length and an LZ4 block. Each block holds ``block_size / elem_size``
    elements (the last one fewer, rounded down to a multiple of 8) that were
    bit-transposed before compression: bit ``b`` of byte ``j`` of all the
    block's elements form bit-plane ``8 j + b`` (one bit per element, least
    significant bit first in each byte). The ``n % 8`` trailing elements are
    stored uncompressed after the last block.
``lz4`` (HDF5 LZ4 filter)
    the same 12-byte header (block size 0 = 1 GiB), then per block a
    big-endian u32 compressed length and an LZ4 block; a block whose length
    equals its uncompressed size is stored as is.

LZ4 blocks are handled by the ``lz4`` package (wheels for aarch64 and
x86-64); the bit (un)transpose is a Numba kernel, checked against the plain
NumPy references :func:`bitshuffle_reference` / :func:`bitunshuffle_reference`.

Every size in a header is checked against the size the caller expects
*before* anything is allocated, so a corrupt or hostile header cannot make
the decoder allocate gigabytes.
"""

from __future__ import annotations

import struct
import threading

import lz4.block
import numpy as np
from numba import njit

__all__ = ["CodecError", "warmup", "decode_bslz4", "encode_bslz4", "decode_lz4", "encode_lz4", "decompress",
           "bitshuffle", "bitunshuffle", "bitshuffle_reference", "bitunshuffle_reference",
           "DEFAULT_BLOCK_BYTES"]

#: Default bitshuffle block: 8192 bytes (the HDF5 filter's default target).
DEFAULT_BLOCK_BYTES = 8192
#: HDF5 LZ4 filter default block size (used when the header says 0).
LZ4_DEFAULT_BLOCK_BYTES = 1 << 30
_HEADER = struct.Struct(">QI")
_U32 = struct.Struct(">I")
_MIN_BLOCK_ELEMS = 128  # the bitshuffle filter never writes smaller default blocks


class CodecError(ValueError):
    """A compressed byte string is malformed, truncated or not of the expected size."""


# --------------------------------------------------------------------------- kernels
@njit(cache=True, nogil=True, inline="always")
def _transpose8x8(x):
    # Swap bit (8 r + c) with bit (8 c + r) of a 64-bit word: three delta swaps
    # (1x1, 2x2 and 4x4 sub-blocks). Its own inverse.
    t = (x ^ (x >> np.uint64(7))) & np.uint64(0x00AA00AA00AA00AA)
    x = x ^ t ^ (t << np.uint64(7))
    t = (x ^ (x >> np.uint64(14))) & np.uint64(0x0000CCCC0000CCCC)
    x = x ^ t ^ (t << np.uint64(14))
    t = (x ^ (x >> np.uint64(28))) & np.uint64(0x00000000F0F0F0F0)
    x = x ^ t ^ (t << np.uint64(28))
    return x


@njit(cache=True, nogil=True)
def _unshuffle_blocks(src, dst, n_elem, block_elems):
    """Bit-untranspose the blocked part of ``src`` (uint8) into ``dst`` (typed, ``n_elem`` long).

    ``src`` holds the decompressed blocks back to back; elements past the
    last multiple of 8 are not touched (the caller copies them). Per block,
    two passes through an L1-sized scratch: bit-planes -> byte lanes (one
    8x8 bit transpose and one 64-bit store per 8 elements and lane), then
    byte lanes -> elements (a loop the compiler vectorises).
    """
    es = dst.itemsize
    n_full = n_elem // block_elems
    last = (n_elem - n_full * block_elems) // 8 * 8
    lanes64 = np.empty(max(block_elems * es // 8, 1), dtype=np.uint64)
    lanes = lanes64.view(np.uint8)
    off = 0  # byte offset of the block in src
    e0 = 0   # first element of the block
    for blk in range(n_full + 1):
        n = block_elems if blk < n_full else last
        if n == 0:
            break
        nb = n // 8  # bytes per bit-plane
        # local slices let the compiler drop index arithmetic and vectorise (5-10x)
        for j in range(es):
            p0 = off + 8 * j * nb
            r0, r1 = src[p0:p0 + nb], src[p0 + nb:p0 + 2 * nb]
            r2, r3 = src[p0 + 2 * nb:p0 + 3 * nb], src[p0 + 3 * nb:p0 + 4 * nb]
            r4, r5 = src[p0 + 4 * nb:p0 + 5 * nb], src[p0 + 5 * nb:p0 + 6 * nb]
            r6, r7 = src[p0 + 6 * nb:p0 + 7 * nb], src[p0 + 7 * nb:p0 + 8 * nb]
            lane = lanes64[j * nb:(j + 1) * nb]
            for k in range(nb):
                x = (np.uint64(r0[k]) | (np.uint64(r1[k]) << np.uint64(8))
                     | (np.uint64(r2[k]) << np.uint64(16)) | (np.uint64(r3[k]) << np.uint64(24))
                     | (np.uint64(r4[k]) << np.uint64(32)) | (np.uint64(r5[k]) << np.uint64(40))
                     | (np.uint64(r6[k]) << np.uint64(48)) | (np.uint64(r7[k]) << np.uint64(56)))
                lane[k] = _transpose8x8(x)  # byte m = byte j of element 8 k + m
        d = dst[e0:e0 + n]
        if es == 1:
            l0 = lanes[0:n]
            for i in range(n):
                d[i] = l0[i]
        elif es == 2:
            l0, l1 = lanes[0:n], lanes[n:2 * n]
            for i in range(n):
                d[i] = np.uint16(l0[i]) | (np.uint16(l1[i]) << np.uint16(8))
        elif es == 4:
            l0, l1, l2, l3 = lanes[0:n], lanes[n:2 * n], lanes[2 * n:3 * n], lanes[3 * n:4 * n]
            for i in range(n):
                d[i] = (np.uint32(l0[i]) | (np.uint32(l1[i]) << np.uint32(8))
                        | (np.uint32(l2[i]) << np.uint32(16)) | (np.uint32(l3[i]) << np.uint32(24)))
        else:
            for i in range(n):
                v = np.uint64(0)
                for j in range(es):
                    v |= np.uint64(lanes[j * n + i]) << np.uint64(8 * j)
                d[i] = v
        off += n * es
        e0 += n


@njit(cache=True, nogil=True)
def _shuffle_blocks(src, dst, n_elem, block_elems):
    """Inverse of :func:`_unshuffle_blocks`: typed ``src`` -> bit-transposed blocks in ``dst`` (uint8).

    Per block: elements -> byte lanes (scratch), then one 8x8 bit transpose
    per 8 elements and lane, written as 8 bit-plane bytes.
    """
    es = src.itemsize
    n_full = n_elem // block_elems
    last = (n_elem - n_full * block_elems) // 8 * 8
    lanes64 = np.empty(max(block_elems * es // 8, 1), dtype=np.uint64)
    lanes = lanes64.view(np.uint8)
    off = 0
    e0 = 0
    for blk in range(n_full + 1):
        n = block_elems if blk < n_full else last
        if n == 0:
            break
        nb = n // 8
        s = src[e0:e0 + n]
        for j in range(es):
            lane = lanes[j * n:(j + 1) * n]
            sh = np.uint64(8 * j)
            for i in range(n):
                lane[i] = np.uint8((np.uint64(s[i]) >> sh) & np.uint64(0xFF))
        for j in range(es):
            p0 = off + 8 * j * nb
            lane = lanes64[j * nb:(j + 1) * nb]
            r0, r1 = dst[p0:p0 + nb], dst[p0 + nb:p0 + 2 * nb]
            r2, r3 = dst[p0 + 2 * nb:p0 + 3 * nb], dst[p0 + 3 * nb:p0 + 4 * nb]
            r4, r5 = dst[p0 + 4 * nb:p0 + 5 * nb], dst[p0 + 5 * nb:p0 + 6 * nb]
            r6, r7 = dst[p0 + 6 * nb:p0 + 7 * nb], dst[p0 + 7 * nb:p0 + 8 * nb]
            for k in range(nb):
                x = _transpose8x8(lane[k])
                r0[k] = np.uint8(x & np.uint64(0xFF))
                r1[k] = np.uint8((x >> np.uint64(8)) & np.uint64(0xFF))
                r2[k] = np.uint8((x >> np.uint64(16)) & np.uint64(0xFF))
                r3[k] = np.uint8((x >> np.uint64(24)) & np.uint64(0xFF))
                r4[k] = np.uint8((x >> np.uint64(32)) & np.uint64(0xFF))
                r5[k] = np.uint8((x >> np.uint64(40)) & np.uint64(0xFF))
                r6[k] = np.uint8((x >> np.uint64(48)) & np.uint64(0xFF))
                r7[k] = np.uint8(x >> np.uint64(56))
        off += n * es
        e0 += n


def _unsigned(elem_size: int) -> np.dtype:
    try:
        return np.dtype({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[elem_size])
    except KeyError:
        raise CodecError(f"bitshuffle element size must be 1, 2, 4 or 8 bytes, got {elem_size!r}") from None


def _block_elems(block_bytes: int, elem_size: int) -> int:
    if block_bytes == 0:
        block_bytes = DEFAULT_BLOCK_BYTES
    if block_bytes % elem_size or (block_bytes // elem_size) % 8 or block_bytes < 8 * elem_size:
        raise CodecError(f"bslz4 block size {block_bytes} bytes is not a positive multiple of 8 elements of "
                         f"{elem_size} bytes")
    return block_bytes // elem_size


# --------------------------------------------------------------------------- bit transpose
def bitshuffle(data: np.ndarray, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """Bit-transpose ``data`` blockwise as the bitshuffle filter does (Numba kernel).

    Parameters
    ----------
    data : ndarray
        Elements of 1, 2, 4 or 8 bytes (any shape; flattened in C order).
    block_bytes : int
        Block size in bytes (a multiple of 8 elements).

    Returns
    -------
    ndarray of uint8
        ``data.nbytes`` bytes: the transposed blocks, then the ``n % 8``
        trailing elements unchanged.
    """
    flat = np.ascontiguousarray(data).reshape(-1)
    es = flat.itemsize
    u = flat.view(_unsigned(es))
    be = _block_elems(block_bytes, es)
    out = np.empty(flat.nbytes, dtype=np.uint8)
    _shuffle_blocks(u, out, u.size, be)
    tail = u.size // 8 * 8
    out[tail * es:] = u[tail:].view(np.uint8)
    return out


def bitunshuffle(raw: np.ndarray, dtype, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """Inverse of :func:`bitshuffle`: transposed bytes -> 1-D array of ``dtype`` (Numba kernel)."""
    dt = np.dtype(dtype)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size % dt.itemsize:
        raise CodecError(f"{raw.size} bytes is not a whole number of {dt} elements")
    n = raw.size // dt.itemsize
    out = np.empty(n, dtype=_unsigned(dt.itemsize))
    _unshuffle_blocks(raw, out, n, _block_elems(block_bytes, dt.itemsize))
    tail = n // 8 * 8
    out[tail:] = raw[tail * dt.itemsize:].view(out.dtype)
    return out.view(dt)


def bitshuffle_reference(data: np.ndarray, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """Plain NumPy :func:`bitshuffle` (reference for tests; slow)."""
    flat = np.ascontiguousarray(data).reshape(-1)
    es = flat.itemsize
    be = _block_elems(block_bytes, es)
    n = flat.size
    parts = []
    for e0 in range(0, n // 8 * 8, be):
        blk = flat[e0:min(e0 + be, n // 8 * 8)]
        bits = np.unpackbits(blk.view(np.uint8).reshape(-1, es), axis=1, bitorder="little")  # (n, 8 es)
        parts.append(np.packbits(bits.T, axis=1, bitorder="little").reshape(-1))            # planes
    parts.append(flat[n // 8 * 8:].view(np.uint8))
    return np.concatenate(parts) if parts else np.zeros(0, np.uint8)


def bitunshuffle_reference(raw: np.ndarray, dtype, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> np.ndarray:
    """Plain NumPy :func:`bitunshuffle` (reference for tests; slow)."""
    dt = np.dtype(dtype)
    es = dt.itemsize
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    n = raw.size // es
    be = _block_elems(block_bytes, es)
    out = np.empty(n * es, dtype=np.uint8)
    for e0 in range(0, n // 8 * 8, be):
        m = min(be, n // 8 * 8 - e0)
        planes = raw[e0 * es:(e0 + m) * es].reshape(8 * es, m // 8)
        bits = np.unpackbits(planes, axis=1, bitorder="little")  # (8 es, m)
        out[e0 * es:(e0 + m) * es] = np.packbits(bits.T, axis=1, bitorder="little").reshape(-1)
    out[n // 8 * 8 * es:] = raw[n // 8 * 8 * es:]
    return out.view(dt)


# --------------------------------------------------------------------------- framing
def _header(buf, expected_nbytes: int | None, what: str) -> tuple[int, int]:
    if len(buf) < _HEADER.size:
        raise CodecError(f"{what}: {len(buf)} bytes is shorter than the 12-byte header")
    total, block = _HEADER.unpack_from(buf, 0)
    if expected_nbytes is not None and total != expected_nbytes:
        raise CodecError(f"{what}: header says {total} uncompressed bytes, expected {expected_nbytes} "
                         f"(from the array's dims and type)")
    return total, block


def _lz4_blocks(buf, pos: int, sizes, what: str, *, stored_ok: bool):
    """Yield the decompressed framed LZ4 blocks of the given uncompressed sizes; returns the end position."""
    n = len(buf)
    for i, size in enumerate(sizes):
        if pos + 4 > n:
            raise CodecError(f"{what}: truncated before block {i} of {len(sizes)}")
        (clen,) = _U32.unpack_from(buf, pos)
        pos += 4
        if clen > n - pos:
            raise CodecError(f"{what}: block {i} claims {clen} compressed bytes, only {n - pos} left (truncated?)")
        chunk = buf[pos:pos + clen]
        pos += clen
        if stored_ok and clen == size:
            yield chunk  # HDF5 LZ4 filter: incompressible block stored as is
            continue
        yield _lz4_block(chunk, size, f"{what}: block {i} of {len(sizes)}")
    return pos


def _lz4_block(chunk, size: int, what: str) -> bytes:
    """One bare LZ4 block that must decompress to exactly ``size`` bytes."""
    try:
        block = lz4.block.decompress(chunk, uncompressed_size=size)
    except lz4.block.LZ4BlockError as exc:
        raise CodecError(f"{what}: corrupt LZ4 block: {exc}") from None
    if len(block) != size:
        raise CodecError(f"{what}: decompressed to {len(block)} bytes, expected {size}")
    return block


_GROUP_BYTES = 1 << 18  # blocks decompressed per kernel call: stays in L2, few Python round trips
_scratch = threading.local()


def _scratch_buffer(nbytes: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _scratch.buf = np.empty(nbytes, dtype=np.uint8)
    return buf


def _check_size(total: int, clen: int, what: str) -> None:
    # LZ4 expands at most ~255x: a header claiming more is corrupt; refuse before allocating
    if total > 256 * clen + 4096:
        raise CodecError(f"{what}: header claims {total} bytes from {clen} compressed bytes (corrupt header)")


def decode_bslz4(buf, dtype, *, n_elem: int | None = None) -> np.ndarray:
    """Decode a ``bslz4`` byte string (bitshuffle HDF5 filter framing).

    Parameters
    ----------
    buf : bytes-like
        The compressed byte string (tag 56500 content or an HDF5 chunk).
    dtype : dtype
        Element type; its size is the bitshuffle element size.
    n_elem : int, optional
        Expected number of elements: checked against the header before
        any allocation.

    Returns
    -------
    ndarray
        1-D array of ``dtype`` (writable, owns its memory).

    Raises
    ------
    CodecError
        Truncated or corrupt data, or a size other than expected.
    """
    dt = np.dtype(dtype)
    es = dt.itemsize
    mv = memoryview(buf).cast("B")
    total, block_bytes = _header(mv, None if n_elem is None else n_elem * es, "bslz4")
    if total % es:
        raise CodecError(f"bslz4: {total} bytes is not a whole number of {es}-byte elements")
    _check_size(total, len(mv), "bslz4")
    n = total // es
    be = _block_elems(block_bytes, es)
    n_full, last = n // be, (n % be) // 8 * 8
    sizes = [be * es] * n_full + ([last * es] if last else [])
    out = np.empty(n, dtype=_unsigned(es))
    per_group = max(1, _GROUP_BYTES // (be * es))
    scratch = _scratch_buffer(per_group * be * es)
    smv = memoryview(scratch)
    blocks = _lz4_blocks(mv, _HEADER.size, sizes, "bslz4", stored_ok=False)
    e0 = 0
    for g in range(0, len(sizes), per_group):
        filled = 0
        for size in sizes[g:g + per_group]:
            smv[filled:filled + size] = next(blocks)
            filled += size
        m = filled // es
        _unshuffle_blocks(scratch[:filled], out[e0:e0 + m], m, be)
        e0 += m
    try:
        next(blocks)
    except StopIteration as stop:
        pos = _HEADER.size if stop.value is None else stop.value
    tail_bytes = (n - n // 8 * 8) * es
    if len(mv) - pos != tail_bytes:
        raise CodecError(f"bslz4: {len(mv) - pos} bytes after the last block, expected {tail_bytes} "
                         f"(the {n % 8} trailing elements)")
    if tail_bytes:
        out[n // 8 * 8:] = np.frombuffer(mv[pos:], dtype=out.dtype)
    return out.view(dt)


def encode_bslz4(data: np.ndarray, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> bytes:
    """Encode ``data`` as a ``bslz4`` byte string (bitshuffle HDF5 filter framing).

    Parameters
    ----------
    data : ndarray
        Elements of 1, 2, 4 or 8 bytes, little-endian (flattened in C order).
    block_bytes : int
        Block size in bytes written to the header (multiple of 8 elements).
    """
    flat = np.ascontiguousarray(data).reshape(-1)
    es = flat.itemsize
    be = _block_elems(block_bytes, es)
    shuffled = bitshuffle(flat, block_bytes=be * es)
    n = flat.size
    parts = [_HEADER.pack(flat.nbytes, be * es)]
    blocked = n // 8 * 8 * es
    mv = memoryview(shuffled)
    for off in range(0, blocked, be * es):
        c = lz4.block.compress(mv[off:min(off + be * es, blocked)], store_size=False)
        parts += [_U32.pack(len(c)), c]
    parts.append(bytes(mv[blocked:]))
    return b"".join(parts)


def decode_lz4(buf, dtype, *, n_elem: int | None = None) -> np.ndarray:
    """Decode an ``lz4`` byte string (HDF5 LZ4 filter framing) into a 1-D array of ``dtype``.

    Parameters and errors as :func:`decode_bslz4`.
    """
    dt = np.dtype(dtype)
    mv = memoryview(buf).cast("B")
    total, block_bytes = _header(mv, None if n_elem is None else n_elem * dt.itemsize, "lz4")
    if total % dt.itemsize:
        raise CodecError(f"lz4: {total} bytes is not a whole number of {dt.itemsize}-byte elements")
    _check_size(total, len(mv), "lz4")
    block_bytes = block_bytes or LZ4_DEFAULT_BLOCK_BYTES
    sizes = [block_bytes] * (total // block_bytes) + ([total % block_bytes] if total % block_bytes else [])
    out = bytearray(total)
    omv = memoryview(out)
    blocks = _lz4_blocks(mv, _HEADER.size, sizes, "lz4", stored_ok=True)
    off = 0
    for size in sizes:
        omv[off:off + size] = next(blocks)
        off += size
    try:
        next(blocks)
    except StopIteration as stop:
        pos = _HEADER.size if stop.value is None else stop.value
    if pos != len(mv):
        raise CodecError(f"lz4: {len(mv) - pos} unexpected bytes after the last block")
    return np.frombuffer(out, dtype=dt)


def encode_lz4(data: np.ndarray, *, block_bytes: int = 0) -> bytes:
    """Encode ``data`` as an ``lz4`` byte string (HDF5 LZ4 filter framing).

    ``block_bytes`` 0 takes the filter's default (one block up to 1 GiB).
    As the HDF5 filter does, the header holds the block size actually used
    (at most the data size) and blocks that LZ4 cannot shrink are stored as is.
    """
    raw = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    bs = max(1, min(block_bytes or LZ4_DEFAULT_BLOCK_BYTES, len(raw)))
    parts = [_HEADER.pack(len(raw), bs)]
    for off in range(0, len(raw), bs):
        chunk = raw[off:off + bs]
        c = lz4.block.compress(chunk, store_size=False)
        if len(c) >= len(chunk):
            c = bytes(chunk)
        parts += [_U32.pack(len(c)), c]
    return b"".join(parts)


def warmup() -> None:
    """Load (or compile, once) the decode kernels for 8-, 16- and 32-bit pixels, outside the hot path."""
    for dt in (np.uint8, np.uint16, np.uint32):
        a = np.arange(1000, dtype=dt)
        decode_bslz4(encode_bslz4(a), dt, n_elem=a.size)


def decompress(algorithm: str, modifier, buf, dtype, *, n_elem: int | None = None) -> np.ndarray:
    """Decode the content of a DECTRIS compression tag (56500) as an array of ``dtype``.

    Raises
    ------
    CodecError
        Unknown algorithm, an element size that does not match ``dtype``,
        or malformed data.
    """
    dt = np.dtype(dtype)
    if algorithm == "bslz4":
        if modifier != dt.itemsize:
            raise CodecError(f"bslz4 element size {modifier!r} does not match the array type {dt} "
                             f"({dt.itemsize} bytes)")
        return decode_bslz4(buf, dt, n_elem=n_elem)
    if algorithm == "lz4":
        return decode_lz4(buf, dt, n_elem=n_elem)
    if algorithm == "lz4-block" and n_elem is not None:  # Stream V1 "lz4<": one bare LZ4 block
        size = n_elem * dt.itemsize
        _check_size(size, len(buf), "lz4 block")
        return np.frombuffer(bytearray(_lz4_block(buf, size, "lz4 block")), dtype=dt)
    raise CodecError(f"unknown compression algorithm {algorithm!r} (known: 'bslz4', 'lz4')")
