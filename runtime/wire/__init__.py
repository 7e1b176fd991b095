"""What travels between edge, coordinator and nodes, and how.

- `messages`: the wire's messages as plain dataclasses (no protobuf).
- `serde`: the one module that converts messages <-> protobuf (`edgetune.proto.v1.*_pb2`),
  chunking and compressing tensors.
- `rpc`: gRPC plumbing: servers, channels, the cluster token, status codes for edgetune's
  exceptions, health checks.
- `coordinator_client`: the coordinator's gRPC client (join, route, status, edge part).
- `ports`: free-port helpers.

May import: `edgetune.runtime` helpers and `edgetune.proto`. Only `serde` imports the `*_pb2`
message modules; `*_pb2_grpc` stubs are for service and client modules.
"""
