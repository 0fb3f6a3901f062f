"""DECTRIS Stream V2 messages: CBOR decode (with checks) and encode.

One ZeroMQ message = one CBOR data item: the self-described CBOR tag
(55799, bytes ``d9 d9 f7``) around a map of text keys whose first key is
``type`` (``"start"`` | ``"image"`` | ``"end"``). Arrays are RFC 8746
multi-dimensional arrays, tag 40 ``[dims, typed array]`` in row-major order
(``dims = [rows, columns] = [image_size_y, image_size_x]``), over an RFC 8746
typed array: tag 64..87 (e.g. 64 uint8, 69 uint16 LE, 70 uint32 LE) around a
byte string, or around a DECTRIS compression tag 56500
``[algorithm, modifier, compressed bytes]`` that stands for that byte string
(:mod:`.codec`). Rationals (``real_time``, ``start_time``, ``stop_time``) are
plain ``[numerator, denominator]`` arrays. Unknown keys and tags are kept as
they are.

Decoding is lazy for pixel data: :func:`decode_message` returns
:class:`MultiDimArray` objects that know their dims, type and (compressed)
bytes, so a receiver can check them against the series and drop frames
without decompressing them; :meth:`MultiDimArray.decode` does the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import cbor2
import numpy as np

from . import codec

__all__ = ["MessageError", "MultiDimArray", "decode_message", "encode_message", "multidim",
           "MAGIC", "TYPED_ARRAY_TAGS", "MESSAGE_TYPES"]

#: Self-described CBOR (RFC 8949 section 3.4.6): every Stream V2 message starts with it.
MAGIC = b"\xd9\xd9\xf7"
MESSAGE_TYPES = ("start", "image", "end")
TAG_MULTIDIM_ROW_MAJOR = 40
TAG_DECTRIS_COMPRESSION = 56500


def _typed_array_tags() -> dict[int, np.dtype]:
    # RFC 8746 section 2.1: tag = 0b010_f_s_e_ll (float, signed, little-endian, log2 of the size)
    out = {}
    for tag in range(64, 88):
        f, s, e, ll = (tag >> 4) & 1, (tag >> 3) & 1, (tag >> 2) & 1, tag & 3
        if tag == 76 or (f and ll == 3):
            continue  # 76 reserved; binary128 has no NumPy type
        size = (2 << ll) if f else (1 << ll)
        kind = "f" if f else ("i" if s else "u")
        # one-byte tags: 64 uint8, 68 uint8 (clamped), 72 sint8; e carries no byte order there
        out[tag] = np.dtype(f"{kind}1") if size == 1 else np.dtype(f"{'<' if e else '>'}{kind}{size}")
    return out


#: RFC 8746 typed-array tag -> NumPy dtype (byte order as the tag says).
TYPED_ARRAY_TAGS: dict[int, np.dtype] = _typed_array_tags()
_TAG_FOR_DTYPE = {np.dtype("u1"): 64, np.dtype("<u2"): 69, np.dtype("<u4"): 70, np.dtype("<u8"): 71,
                  np.dtype("i1"): 72, np.dtype("<i2"): 77, np.dtype("<i4"): 78, np.dtype("<i8"): 79,
                  np.dtype("<f2"): 84, np.dtype("<f4"): 85, np.dtype("<f8"): 86}


class MessageError(ValueError):
    """A Stream V2 message that cannot be used.

    Attributes
    ----------
    kind : str
        Short machine-readable reason, counted per series by the receiver:
        ``"cbor"`` (truncated or malformed CBOR), ``"not_a_map"``,
        ``"unknown_type"``, ``"field"`` (missing or mistyped field),
        ``"array"`` (malformed array or tag), ``"size"`` (absurd size),
        ``"dims"`` (dims differ from the series), ``"decode"`` (corrupt
        compressed data), ``"series"`` (series_id mismatch), ``"no_start"``.
    """

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class MultiDimArray:
    """A tag-40 array whose pixels are not decoded yet.

    Attributes
    ----------
    dims : tuple of int
        Row-major dimensions, e.g. ``(rows, columns)``.
    dtype : numpy.dtype
        Element type from the typed-array tag.
    data : bytes
        The byte string, or the compressed bytes when ``compression`` is set.
    compression : (str, Any) or None
        ``(algorithm, modifier)`` of a DECTRIS compression tag.
    """

    dims: tuple[int, ...]
    dtype: np.dtype
    data: bytes
    compression: tuple[str, Any] | None = None

    @property
    def size(self) -> int:
        return int(np.prod(self.dims, dtype=object))

    def decode(self) -> np.ndarray:
        """Decompress and reshape; returns a native-endian array of ``dims``.

        Raises
        ------
        MessageError
            ``kind="decode"`` for corrupt or wrongly sized data.
        """
        n = self.size
        try:
            if self.compression is None:
                if len(self.data) != n * self.dtype.itemsize:
                    raise codec.CodecError(f"byte string of {len(self.data)} bytes for {n} elements of "
                                           f"{self.dtype}")
                flat = np.frombuffer(self.data, dtype=self.dtype)
            else:
                alg, mod = self.compression
                flat = codec.decompress(alg, mod, self.data, self.dtype.newbyteorder("<")
                                        if self.dtype.byteorder == ">" else self.dtype, n_elem=n)
                if self.dtype.byteorder == ">":
                    flat = flat.view(self.dtype)
        except codec.CodecError as exc:
            raise MessageError(f"cannot decode {'x'.join(map(str, self.dims))} {self.dtype} array: {exc}",
                               "decode") from None
        if not flat.dtype.isnative:
            flat = flat.astype(flat.dtype.newbyteorder("="))
        return flat.reshape(self.dims)


def _unwrap(v: Any) -> Any:
    # values may carry tags the data model does not need (the DECTRIS C example skips them too)
    while isinstance(v, cbor2.CBORTag) and v.tag not in (TAG_MULTIDIM_ROW_MAJOR, TAG_DECTRIS_COMPRESSION) \
            and v.tag not in TYPED_ARRAY_TAGS:
        v = v.value
    return v


def _multidim(item: Any, where: str) -> MultiDimArray:
    if not (isinstance(item, cbor2.CBORTag) and item.tag == TAG_MULTIDIM_ROW_MAJOR):
        tag = f"tag {item.tag}" if isinstance(item, cbor2.CBORTag) else type(item).__name__
        raise MessageError(f"{where}: expected a tag-40 multi-dimensional array, got {tag}", "array")
    v = item.value
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise MessageError(f"{where}: tag 40 content must be [dims, typed array]", "array")
    dims, typed = v
    if not isinstance(dims, (list, tuple)) or not dims or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise MessageError(f"{where}: dims must be a non-empty array of unsigned integers, got {dims!r:.80}",
                           "array")
    if not isinstance(typed, cbor2.CBORTag) or typed.tag not in TYPED_ARRAY_TAGS:
        tag = f"tag {typed.tag}" if isinstance(typed, cbor2.CBORTag) else type(typed).__name__
        raise MessageError(f"{where}: expected an RFC 8746 typed array (tags 64-87), got {tag}", "array")
    dtype = TYPED_ARRAY_TAGS[typed.tag]
    payload = typed.value
    compression = None
    if isinstance(payload, cbor2.CBORTag) and payload.tag == TAG_DECTRIS_COMPRESSION:
        c = payload.value
        if not isinstance(c, (list, tuple)) or len(c) != 3 or not isinstance(c[0], str) \
                or not isinstance(c[2], (bytes, bytearray)):
            raise MessageError(f"{where}: tag 56500 content must be [algorithm, modifier, bytes]", "array")
        compression = (c[0], c[1])
        payload = c[2]
    if not isinstance(payload, (bytes, bytearray)):
        raise MessageError(f"{where}: typed array tag {typed.tag} must hold a byte string or tag 56500, got "
                           f"{type(payload).__name__}", "array")
    arr = MultiDimArray(tuple(int(d) for d in dims), dtype, bytes(payload), compression)
    if compression is None and len(payload) != arr.size * dtype.itemsize:
        raise MessageError(f"{where}: dims {list(dims)} need {arr.size * dtype.itemsize} bytes of {dtype}, the "
                           f"byte string has {len(payload)}", "array")
    return arr


def _array_map(msg: dict, key: str) -> None:
    m = msg.get(key)
    if m is None:
        return
    if not isinstance(m, Mapping):
        raise MessageError(f"{msg['type']} message: {key!r} must be a map of channel -> array", "field")
    msg[key] = {str(ch): _multidim(v, f"{msg['type']} message {key}[{ch!r}]") for ch, v in m.items()}


def decode_message(buf) -> dict:
    """Decode one Stream V2 message.

    Parameters
    ----------
    buf : bytes-like
        One ZeroMQ message.

    Returns
    -------
    dict
        The message map; ``data`` (image) and ``pixel_mask``
        (start) map channel names to :class:`MultiDimArray`. Other values are
        as cbor2 decodes them (tags it does not know stay ``CBORTag``).

    Raises
    ------
    MessageError
        Truncated or malformed CBOR, not a map, unknown ``type`` or a
        malformed array (see :attr:`MessageError.kind`).
    """
    try:
        msg = cbor2.loads(buf)
    except (cbor2.CBORDecodeError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        kind = "truncated" if isinstance(exc, cbor2.CBORDecodeEOF) else "malformed"
        raise MessageError(f"{kind} CBOR ({len(buf)} bytes): {exc}", "cbor") from None
    msg = _unwrap(msg)
    if not isinstance(msg, Mapping):
        raise MessageError(f"message is a CBOR {type(msg).__name__}, not a map", "not_a_map")
    msg = dict(msg)
    mtype = msg.get("type")
    if mtype not in MESSAGE_TYPES:
        raise MessageError(f"unknown message type {mtype!r:.40} (expected 'start', 'image' or 'end')",
                           "unknown_type")
    for k in list(msg):
        if k not in ("data", "pixel_mask", "user_data"):
            msg[k] = _unwrap(msg[k])
    if mtype == "image":
        if "data" not in msg:
            raise MessageError("image message without 'data'", "field")
        _array_map(msg, "data")
    elif mtype == "start":
        _array_map(msg, "pixel_mask")  # flatfield and count-rate tables are not used: left as decoded
    return msg


# --------------------------------------------------------------------------- encode
def multidim(arr: np.ndarray, compression: str | None = "bslz4", *,
             block_bytes: int = codec.DEFAULT_BLOCK_BYTES) -> cbor2.CBORTag:
    """Tag-40 multi-dimensional array of ``arr`` (row-major), optionally compressed.

    Parameters
    ----------
    arr : ndarray
        Integer or float array; written little-endian.
    compression : {"bslz4", "lz4", None}
        Wrap the byte string in a DECTRIS compression tag (56500).
    block_bytes : int
        bslz4 block size in bytes.
    """
    a = np.ascontiguousarray(arr)
    dt = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype
    a = a.astype(dt, copy=False)
    try:
        tag = _TAG_FOR_DTYPE[dt]
    except KeyError:
        raise ValueError(f"no RFC 8746 typed array for dtype {a.dtype}") from None
    if compression is None:
        payload: Any = a.tobytes()
    elif compression == "bslz4":
        payload = cbor2.CBORTag(TAG_DECTRIS_COMPRESSION,
                                ["bslz4", a.itemsize, codec.encode_bslz4(a, block_bytes=block_bytes)])
    elif compression == "lz4":
        payload = cbor2.CBORTag(TAG_DECTRIS_COMPRESSION, ["lz4", 0, codec.encode_lz4(a)])
    else:
        raise ValueError(f"compression must be 'bslz4', 'lz4' or None, got {compression!r}")
    return cbor2.CBORTag(TAG_MULTIDIM_ROW_MAJOR, [[int(d) for d in a.shape], cbor2.CBORTag(tag, payload)])


def encode_message(msg: Mapping[str, Any]) -> bytes:
    """Serialise a message map: self-described CBOR tag, ``type`` as the first key.

    Values may be Python scalars, strings, lists, dicts, bytes, ``CBORTag``
    (e.g. from :func:`multidim`) and NumPy scalars.
    """
    if msg.get("type") not in MESSAGE_TYPES:
        raise ValueError(f"message type must be one of {MESSAGE_TYPES}, got {msg.get('type')!r}")
    ordered = {"type": msg["type"]}
    ordered.update((k, v) for k, v in msg.items() if k != "type")
    return MAGIC + cbor2.dumps(ordered, default=_encode_numpy)


def _encode_numpy(encoder, value) -> None:
    if isinstance(value, np.generic):
        encoder.encode(value.item())
    elif isinstance(value, np.ndarray):
        encoder.encode(multidim(value, None))
    else:
        raise cbor2.CBOREncodeTypeError(f"cannot serialise {type(value).__name__}")
