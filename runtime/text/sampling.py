"""How to pick each generated token: greedy, or seeded temperature + top-p sampling.

Torch-free, so the PyTorch generator (generation.py) and the onnxruntime one
(runtime/onnx/generate.py) validate the same options the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

from edgetune.runtime.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            problems.append(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if problems:
            raise ConfigError("generation: " + "; ".join(problems))
