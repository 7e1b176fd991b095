"""edgetune's wire contract, version 1: the .proto sources and their generated stubs.

Regenerate the stubs with `python scripts/gen_proto.py` after editing a .proto file;
tests/test_proto_stubs.py fails while the committed stubs are stale. Only
`edgetune.runtime.wire.serde` touches the generated `*_pb2` message types.
"""
