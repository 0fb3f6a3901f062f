"""Stream V2 decode: bslz4 frames vs bare LZ4 block decompression of the same bytes.

Run: ``python -m pytest benchmarks/test_bench_stream.py --benchmark-only``

Each group is one layout (1M, 4M) of simulated uint32 frames as a detector
sends them (gaps at the dtype maximum), bslz4-compressed with 8 KiB blocks.
``lz4_blocks`` is the floor: only the LZ4 block decompression (the ``lz4``
package) of the frame's blocks, no bit transpose and no assembly; ``bslz4``
is the full :func:`edge.stream.codec.decode_bslz4` (LZ4 + Numba bit
untranspose + assembly); ``message`` adds the CBOR parse of a whole Stream V2
image message (:func:`edge.stream.cbor.decode_message`). Read ratios within
one run; frames/s of the 4M decode = 1 / mean of ``bslz4[4m]``.
"""

from __future__ import annotations


import numpy as np
import pytest

from edge.sim import simulate
from edge.stream import codec
from edge.stream.cbor import decode_message, encode_message, multidim
from edge.stream.sender import image_message, to_detector_dtype


@pytest.fixture(scope="module", params=["1m", "4m"])
def encoded(request):
    frame = to_detector_dtype(simulate(layout=request.param, seed=1).frame, "uint32")
    buf = codec.encode_bslz4(frame)
    assert np.array_equal(codec.decode_bslz4(buf, np.uint32, n_elem=frame.size), frame.ravel())  # compiled
    msg = encode_message(image_message(multidim(frame, "bslz4"), series_id=1, series_unique_id="b", image_id=0,
                                       start_s=0.0, exposure_s=0.01))
    return request.param, frame, buf, msg


def _lz4_only(buf: bytes, n: int) -> None:
    # the floor: decompress every framed block, nothing else
    be = 8192 // 4
    sizes = [8192] * (n // be) + ([(n % be) // 8 * 8 * 4] if n % be >= 8 else [])
    for _ in codec._lz4_blocks(memoryview(buf), 12, sizes, "bench", stored_ok=False):
        pass


def test_lz4_blocks(benchmark, encoded):
    layout, frame, buf, _ = encoded
    benchmark.group = f"decode {layout}"
    benchmark.extra_info.update(layout=layout, compressed_bytes=len(buf), raw_bytes=frame.nbytes)
    benchmark(_lz4_only, buf, frame.size)


def test_bslz4(benchmark, encoded):
    layout, frame, buf, _ = encoded
    benchmark.group = f"decode {layout}"
    benchmark.extra_info.update(layout=layout, compression_ratio=round(frame.nbytes / len(buf), 2))
    out = benchmark(codec.decode_bslz4, buf, np.uint32, n_elem=frame.size)
    assert np.array_equal(out, frame.ravel())


def test_message(benchmark, encoded):
    layout, frame, _, msg = encoded
    benchmark.group = f"decode {layout}"
    out = benchmark(lambda: decode_message(msg)["data"]["threshold_1"].decode())
    assert np.array_equal(out, frame)
