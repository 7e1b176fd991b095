"""Worker nodes (shard actors serving blocks). Arrives with the distributed issue."""
