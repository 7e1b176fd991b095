"""`edgetune generate`: stream generated text to stdout.

Two engines: `--model ... [--adapter ...]` runs PyTorch (the runtime core);
`--onnx DIR [--onnx-adapter FILE]` runs an `edgetune export` folder with
onnxruntime and never imports torch, so it works on a device with only the
base install.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from edgetune.runtime.onnx.generate import encode_prompt

EMBEDDED_MODEL = "embedded"


class TextStreamer:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, out: TextIO | None = None) -> None:
        self.tokenizer, self.out = tokenizer, out or sys.stdout  # looked up now: tests swap sys.stdout
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens: Any) -> None:
        # PyTorch generation passes a (1,) tensor per step, the ONNX generator an int id
        self.ids.append(int(tokens) if isinstance(tokens, int) else int(tokens[0]))
        text = self.text()
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self._write(text)

    def finish(self) -> None:
        """Print what is still held back, then end the line."""
        self._write(self.text())
        self.out.write("\n")
        self.out.flush()

    def _write(self, text: str) -> None:
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def engine_conflict(args) -> str | None:
    """Why the flags mix the PyTorch and ONNX engines, or None when they don't."""
    if args.onnx is not None:
        torch_flags = [flag for flag, value in (("--model", args.model), ("--adapter", args.adapter)) if value is not None]
        if torch_flags:
            return (f"--onnx runs an exported model with onnxruntime; {' and '.join(torch_flags)} belong to PyTorch "
                    "generation. Give --onnx DIR [--onnx-adapter FILE], or --model [--adapter], not both")
    elif args.onnx_adapter is not None:
        return "--onnx-adapter needs --onnx DIR (the adapter-inputs export it plugs into)"
    return None


def run_generate(args) -> int:
    conflict = engine_conflict(args)
    if conflict:
        print(f"edgetune generate: error: {conflict}", file=sys.stderr)
        return 2
    greedy = args.greedy or args.temperature is None
    if args.onnx is not None:
        return _run_onnx(args, greedy)
    return _run_torch(args, greedy)


def _prompt_ids(tokenizer, args) -> list[int]:
    return encode_prompt(tokenizer, args.prompt, chat=args.chat, system=args.system,
                         special_tokens_in_text=args.special_tokens_in_text)


def _run_onnx(args, greedy: bool) -> int:
    from edgetune.runtime.onnx.generate import OnnxGenerator

    gen = OnnxGenerator(args.onnx, threads=args.threads)
    streamer = TextStreamer(gen.tokenizer)
    gen.generate(_prompt_ids(gen.tokenizer, args),
                 args.max_new_tokens, greedy=greedy, temperature=args.temperature or 1.0, top_p=args.top_p,
                 seed=args.seed, on_token=streamer, adapter=args.onnx_adapter)
    streamer.finish()
    return 0


def _run_torch(args, greedy: bool) -> int:
    import torch

    from edgetune.runtime.model.loader import load_model, resolve_model_folder
    from edgetune.runtime.peft.hf_format import load_adapter
    from edgetune.runtime.text.tokenizer import load_tokenizer
    from edgetune.runtime.train.loop import resolve_device

    folder = resolve_model_folder(args.model or EMBEDDED_MODEL)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, device=resolve_device(args.device))
    if args.adapter:
        load_adapter(model, args.adapter)
    ids = torch.tensor([_prompt_ids(tokenizer, args)], device=model.device)
    streamer = TextStreamer(tokenizer)
    model.generate(ids, max_new_tokens=args.max_new_tokens, greedy=greedy,
                   temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed,
                   eos_token_ids=tokenizer.eos_token_ids, on_token=streamer)
    streamer.finish()
    return 0
