"""Ray coordinator (profiling, partitioning, routes). Arrives with the distributed issue."""
