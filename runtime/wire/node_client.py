"""The client side of a node's `Session` stream, shared by the edge (first hop of a route) and by
each node that relays to the next hop: both open the same bidirectional stream of frames."""
from __future__ import annotations

from collections.abc import Iterator

import grpc

from edgetune.proto.v1 import node_pb2_grpc


def open_session(channel: grpc.Channel, frames: Iterator, timeout_s: float):
    """Start a node's Session stream on `channel`, sending `frames` (serde's protobuf frames).

    Returns the call: iterate it for the node's replies, `cancel()` it to end the stream early.
    `timeout_s` bounds the whole stream (seconds).
    """
    return node_pb2_grpc.NodeStub(channel).Session(frames, timeout=timeout_s)
