"""DECTRIS Stream V2 (CBOR over ZeroMQ): message codec, decompression and a detector-side sender.

:mod:`.codec`
    ``bslz4`` / ``lz4`` byte strings (HDF5 filter framings): decode and encode.
:mod:`.cbor`
    Stream V2 messages (``start`` / ``image`` / ``end``): decode with checks, encode.
:mod:`.legacy`
    Stream V1 (legacy multi-part JSON) messages mapped onto the V2 ones.
:mod:`.sender`
    ``edge serve``: replay any frame source as a Stream V2 PUSH server.

The receiving side is :class:`edge.sources.stream.StreamSource`
(``open_source("tcp://HOST:31001")``).
"""
