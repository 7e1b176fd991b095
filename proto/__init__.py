"""The versioned wire contract: `v1/*.proto` and the stubs generated from them
(`scripts/gen_proto.py`; a test fails when the committed stubs are stale). Only
`edgetune.runtime.wire.serde` imports the `*_pb2` message modules."""
