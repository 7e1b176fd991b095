"""Side-by-side benchmarks (not tests)."""
