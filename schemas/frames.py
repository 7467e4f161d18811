"""How messages sit in ZeroMQ frames, and the codecs for them (built once, reused).

Every message starts with the version frame ``VERSION_FRAME`` (``b"TH" + version byte``).
A peer whose first frame differs is answered with a ``protocol_version`` error, never
silently misread.

=====================  ===========================================================
direction              frames (after the ROUTER's identity frame where there is one)
=====================  ===========================================================
client -> broker       ``[VERSION, ClientMsg]``
broker -> client       ``[VERSION, BrokerToClientMsg]``
worker -> broker       ``[VERSION, route, body]``: ``route == b""`` -> body is a WorkerMsg;
                       ``route == ROUTE_CHUNK + key`` -> body is a Chunk;
                       ``route == ROUTE_END + key`` -> body is a Final or Error (terminal);
                       ``route == ROUTE_PACK + key + key ...`` -> body is a Pack of those
                       requests' chunks (all of one client), keys in the pack's order
broker -> worker       ``[VERSION, BrokerToWorkerMsg]``
=====================  ===========================================================

The route frame is what makes chunk forwarding cheap: the broker looks the key up in a
dict and forwards ``body`` to the client byte for byte, without decoding it.
"""

from __future__ import annotations

import msgspec

from tokenhive.schemas.messages import (
    BrokerToClientMsg,
    BrokerToWorkerMsg,
    ClientMsg,
    StreamMsg,
    WorkerMsg,
)

PROTOCOL_VERSION = 1
VERSION_FRAME = b"TH" + bytes([PROTOCOL_VERSION])
MAGIC = b"TH"

ROUTE_CONTROL = b""
ROUTE_CHUNK = b"c"
ROUTE_END = b"e"
ROUTE_PACK = b"p"


def version_of(frame: bytes) -> int | None:
    """The protocol version a version frame announces, or None if it is not one."""
    if len(frame) == 3 and frame[:2] == MAGIC:
        return frame[2]
    return None


encoder = msgspec.msgpack.Encoder()
encode = encoder.encode

client_msg_decoder = msgspec.msgpack.Decoder(ClientMsg)
broker_to_client_decoder = msgspec.msgpack.Decoder(BrokerToClientMsg)
worker_msg_decoder = msgspec.msgpack.Decoder(WorkerMsg)
broker_to_worker_decoder = msgspec.msgpack.Decoder(BrokerToWorkerMsg)
stream_decoder = msgspec.msgpack.Decoder(StreamMsg)
