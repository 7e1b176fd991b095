"""Text in and out, without torch: shared by training and on-device generation.

- `tokenizer`: a `tokenizers.Tokenizer` plus the model's chat template (sandboxed jinja).
- `sampling`: `SamplingConfig` and the checks on temperature / top-p.

May import: `edgetune.runtime` helpers only. Never torch.
"""
