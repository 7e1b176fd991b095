"""A minimal chat app for an `edgetune export` folder: onnxruntime, tokenizers and numpy only.

    python app.py EXPORT_DIR [--adapter FILE.onnx_adapter] [--prompt TEXT] [--temperature T --top-p P --seed S]

Chat commands: `/adapter FILE.onnx_adapter` or `/adapter none` (switch adapters on one base,
starting a new conversation), `/reset`, `/quit`. The chat template is rendered with jinja2
when it is installed; without it only ChatML templates are (see README.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import AddedToken, Tokenizer

FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class Model:
    """The decoder of an export folder: a session plus what genai_config.json says about its I/O."""

    def __init__(self, folder: Path, threads: int = 0) -> None:
        config = json.loads((folder / "genai_config.json").read_text())["model"]
        decoder = config["decoder"]
        self.layers, self.context = decoder["num_hidden_layers"], config["context_length"]
        eos = config["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [eos])
        names = {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                 "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
                 "logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
        names.update(decoder.get("inputs", {}), **decoder.get("outputs", {}))
        self.names = names
        self.past = [(names["past_key_names"] % i, names["past_value_names"] % i) for i in range(self.layers)]
        self.outputs = [names["logits"]] + [names[k] % i for i in range(self.layers)
                                            for k in ("present_key_names", "present_value_names")]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(folder / decoder["filename"]), options,
                                            providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in [*self.session.get_inputs(), *self.session.get_overridable_initializers()]}
        self.kv_dtype = FLOATS[inputs[self.past[0][0]].type]
        # (1, kv_heads, 0, head_dim): the empty cache of the first pass
        self.empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), self.kv_dtype)
        self.takes_positions = names["position_ids"] in inputs
        known = {names["input_ids"], names["attention_mask"], names["position_ids"], *(n for kv in self.past for n in kv)}
        # LoRA inputs of an adapter-inputs export: lora_A (in, rank) and lora_B (rank, out) with a
        # dynamic rank. With no adapter they are fed with rank 0, which makes the graph the base model.
        self.no_adapter = {n: np.zeros([d if isinstance(d, int) else 0 for d in i.shape], FLOATS[i.type])
                           for n, i in inputs.items()
                           if n not in known and i.type in FLOATS and any(not isinstance(d, int) for d in i.shape)}
        self.adapter: tuple[ort.LoraAdapter, dict[str, np.ndarray]] | None = None

    def set_adapter(self, path: str | None) -> None:
        """Activate an .onnx_adapter file, or the base model with None."""
        if path is None:
            self.adapter = None
            return
        if not self.no_adapter:
            raise ValueError("this export has no adapter inputs; re-export with `edgetune export --mode adapter-inputs`")
        if not Path(path).is_file():
            raise ValueError(f"{path}: adapter file not found")
        try:
            lora = ort.LoraAdapter()
            lora.Load(str(path))
            params = {n: v.numpy() for n, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}
        except RuntimeError as e:  # onnxruntime's errors for an unreadable file
            raise ValueError(f"{path}: not an onnxruntime adapter file ({e})") from None
        unknown = sorted(set(params) - set(self.no_adapter))
        if unknown:
            raise ValueError(f"{path}: {unknown[0]} is not an adapter input of this export (another base model?)")
        self.adapter = (lora, params)

    def forward(self, ids: list[int], past: list | None) -> tuple[np.ndarray, list]:
        """New token ids after `past` (per layer (key, value), each (1, kv_heads, seen, head_dim))
        -> the last position's logits (V,) and the grown cache."""
        past = past or [(self.empty, self.empty)] * self.layers
        seen = past[0][0].shape[2]
        feeds = {self.names["input_ids"]: np.array([ids], np.int64),
                 self.names["attention_mask"]: np.ones((1, seen + len(ids)), np.int64), **self.no_adapter}
        if self.takes_positions:
            feeds[self.names["position_ids"]] = np.arange(seen, seen + len(ids), dtype=np.int64)[None]
        for names, kv in zip(self.past, past):
            feeds.update(zip(names, kv))
        run_options = None
        if self.adapter is not None:
            lora, params = self.adapter
            run_options = ort.RunOptions()
            run_options.add_active_adapter(lora)
            # Python's run() wants every input fed, and the active adapter's tensors are appended after the
            # feeds: feeding the adapter's own tensors makes both copies the same.
            feeds.update(params)
        logits, *presents = self.session.run(self.outputs, feeds, run_options)
        return logits[0, -1], list(zip(presents[0::2], presents[1::2]))

    def generate(self, prompt: list[int], max_new_tokens: int, pick, on_token) -> list[int]:
        """Greedy or sampled continuation of `prompt`; stops at eos, max_new_tokens or the context length."""
        logits, past = self.forward(prompt, None)
        new: list[int] = []
        budget = min(max_new_tokens, self.context - len(prompt))
        while len(new) < budget:
            new.append(pick(logits))
            on_token(new)
            if new[-1] in self.eos or len(new) == budget:
                break
            logits, past = self.forward(new[-1:], past)
        return new


def sampler(temperature: float, top_p: float, seed: int):
    """logits (V,) -> token id: argmax without a temperature, else seeded temperature + top-p sampling."""
    if not temperature:
        return lambda logits: int(np.argmax(logits))
    rng = np.random.default_rng(seed)

    def pick(logits: np.ndarray) -> int:
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1.0:  # keep the smallest set of top tokens whose mass reaches top_p (at least one)
            order = np.argsort(-p, kind="stable")
            p[order[np.cumsum(p[order]) - p[order] >= top_p]] = 0.0
        return int(rng.choice(p.size, p=p / p.sum()))

    return pick


class Chat:
    """The export's tokenizer and chat template."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.specials = {k: v.get("content") if isinstance(v, dict) else v for k, v in config.items()
                         if k.endswith("_token") and isinstance(v, (str, dict))}
        # named special tokens are matched whole in text, as transformers does
        added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values()}
        self.tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                           for t in self.specials.values() if t and t not in added])
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"  # transformers 5 writes it; it wins over the config's
        self.template = jinja_file.read_text() if jinja_file.exists() else template
        if not self.template:
            raise ValueError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json)")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the conversation, ending with the header of the assistant's reply."""
        try:
            import jinja2.sandbox
        except ImportError:
            text = chatml(self.template, messages)
        else:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            text = env.from_string(self.template).render(messages=messages, add_generation_prompt=True, **self.specials)
        return self.tokenizer.encode(text, add_special_tokens=False).ids  # the template wrote the special tokens

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def chatml(template: str, messages: list[dict]) -> str:
    """A ChatML template's rendering without jinja2, including a default system message the
    template writes when the conversation has none (SmolLM2's "You are a helpful AI assistant...")."""
    if "<|im_start|>" not in template or "<|im_end|>" not in template:
        raise ValueError("the chat template is not ChatML and jinja2 is not installed: `pip install jinja2`")
    # a default system turn must be plain text in the template: '<|im_start|>system\nYou are ...<|im_end|>'
    defaults = re.findall(r"<\|im_start\|>system(?:\n|\\n)([^{}'\"+\\]*?)<\|im_end\|>", template)
    if len(defaults) != template.count("<|im_start|>system"):
        raise ValueError("the chat template builds its system message in code; `pip install jinja2` to render it")
    if defaults and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": defaults[0]}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def answer(model: Model, chat: Chat, history: list[dict], pick, args) -> None:
    """Stream the reply to the conversation in `history` (ending with a user turn) and append it."""
    prompt = chat.prompt_ids(history)
    if len(prompt) >= model.context:
        history.pop()
        print(f"[the conversation is longer than the context ({model.context} tokens); /reset]")
        return
    shown = ""

    def stream(new: list[int]) -> None:  # decode all new ids: a character may span several tokens
        nonlocal shown
        text = chat.decode(new)
        if not text.endswith("\ufffd"):
            print(text[len(shown):], end="", flush=True)
            shown = text

    new = model.generate(prompt, args.max_new_tokens, pick, stream)
    reply = chat.decode(new)
    print(reply[len(shown):])
    if args.print_ids:
        print("ids:", *new)
    history.append({"role": "assistant", "content": reply})


def chat_loop(model: Model, chat: Chat, pick, args) -> None:
    """One user turn per line of stdin; /adapter FILE|none, /reset and /quit are commands."""
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            return
        if line in ("/quit", "/exit"):
            return
        if line.startswith("/adapter"):
            path = line[len("/adapter"):].strip()
            try:
                model.set_adapter(None if path in ("", "none") else path)
            except ValueError as e:
                print(f"[error: {e}; adapter unchanged]")
                continue
            history[:] = start  # the earlier answers came from another model
            print(f"[adapter: {path or 'none'}; new conversation]")
        elif line == "/reset":
            history[:] = start
        elif line:
            history.append({"role": "user", "content": line})
            answer(model, chat, history, pick, args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Chat with an `edgetune export` folder (onnxruntime only).")
    p.add_argument("export", type=Path, help="the --out folder of `edgetune export`")
    p.add_argument("--adapter", help="an .onnx_adapter file to activate (adapter-inputs exports)")
    p.add_argument("--prompt", help="answer this one message and exit (default: chat on stdin)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: nucleus mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="with --temperature: sampling seed")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: its default)")
    p.add_argument("--print-ids", action="store_true", help="after each answer, a line `ids: ...` of its token ids")
    args = p.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    try:
        model, chat = Model(args.export, args.threads), Chat(args.export)
        chat.prompt_ids([{"role": "user", "content": "hi"}])  # a template we cannot render fails here, not mid-chat
        model.set_adapter(args.adapter)
    except Exception as e:  # a missing file, a malformed config, onnxruntime's own error types
        print(f"error: cannot load {args.export}: {e}", file=sys.stderr)
        return 2
    pick = sampler(args.temperature, args.top_p, args.seed)
    if args.prompt is None:
        chat_loop(model, chat, pick, args)
    else:
        history = [{"role": "system", "content": args.system}] if args.system else []
        answer(model, chat, [*history, {"role": "user", "content": args.prompt}], pick, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
