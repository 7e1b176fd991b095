"""`edgetune generate --model ... [--adapter ...]`: PyTorch generation that streams to stdout."""
from __future__ import annotations

import sys
from typing import TextIO

import torch


class TextStreamer:
    """Prints decoded text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer, out: TextIO = sys.stdout) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        self.out.write(text[len(self.printed):])
        self.out.flush()
        self.printed = text

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


def build_prompt(tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    if not chat:
        return tokenizer.encode(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def run_generate(args) -> int:
    from edgetune.runtime.model_io import load_model, resolve_model_folder
    from edgetune.runtime.peft.hf_format import load_adapter
    from edgetune.runtime.tokenizer import load_tokenizer
    from edgetune.runtime.train import resolve_device

    folder = resolve_model_folder(args.model)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, device=resolve_device(args.device))
    if args.adapter:
        load_adapter(model, args.adapter)
    ids = torch.tensor([build_prompt(tokenizer, args.prompt, args.chat, args.system)], device=model.device)
    greedy = args.greedy or args.temperature is None
    streamer = TextStreamer(tokenizer)
    model.generate(ids, max_new_tokens=args.max_new_tokens, greedy=greedy,
                   temperature=args.temperature or 1.0, top_p=args.top_p, seed=args.seed,
                   eos_token_ids=tokenizer.eos_token_ids, on_token=streamer)
    sys.stdout.write("\n")
    return 0
