"""Test helper run as a separate process: a plain ZeroMQ PUSH socket that sends prepared messages.

Usage: python stream_push.py PORT FILE [DELAY_S]. FILE holds the messages one
after another, each a big-endian u32 part count, then per part a big-endian u32
length and the bytes. Waits up to 30 s for a client.
"""

import struct
import sys
import time

import zmq

port, path = int(sys.argv[1]), sys.argv[2]
delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
data = open(path, "rb").read()
msgs, pos = [], 0
while pos < len(data):
    (nparts,) = struct.unpack_from(">I", data, pos)
    pos += 4
    parts = []
    for _ in range(nparts):
        (n,) = struct.unpack_from(">I", data, pos)
        parts.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    msgs.append(parts)
ctx = zmq.Context()
sock = ctx.socket(zmq.PUSH)
sock.setsockopt(zmq.SNDTIMEO, 30_000)
sock.setsockopt(zmq.LINGER, 10_000)
sock.bind(f"tcp://127.0.0.1:{port}")
for m in msgs:
    sock.send_multipart(m)
    if delay:
        time.sleep(delay)
sock.close()
ctx.term()
print(len(msgs))
