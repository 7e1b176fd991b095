"""Trust: the cluster's certificate authority, join tokens, credentials on disk, and who may do what.

- `ca`: keys, certificates and CSRs (the `cryptography` package), the CA that signs them.
- `tokens`: one-time join strings (a secret + the CA's fingerprint) and the coordinator's store of them.
- `identity`: what a peer certificate says (name, role, serial) and the revocation list.
- `credentials`: a node's or edge's key, certificate and CA on disk, enrolment and renewal.
- `channels`: gRPC server and channel credentials built from those files.

Imports only `edgetune.runtime` and third-party libraries; never torch.
"""
