"""Versioned protobuf wire contract. Arrives with the distributed issue."""
