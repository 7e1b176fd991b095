"""`edgetune export`: the ONNX graph against edgetune's PyTorch model (the reference is the
model the adapter was trained on), onnxruntime-genai loading the folder, adapter switching,
quantization, and refusals before any long work."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgetune.runtime.errors import AdapterError, ConfigError
from edgetune.runtime.model.loader import load_model
from edgetune.runtime.onnx.export import ExportOptions, export
from edgetune.runtime.peft import (
    AdaLoraConfig,
    IA3Config,
    LNTuningConfig,
    LoKrConfig,
    LoraConfig,
    ParallelAdapterConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    SerialAdapterConfig,
    ShiraConfig,
    SparseConfig,
    VeraConfig,
    attach_adapter,
)
from edgetune.runtime.peft.bitfit import BitFitConfig
from edgetune.runtime.peft.hf_format import load_adapter, save_adapter
from edgetune.tests.tiny import make_tiny_folder, randomize

# GroupQueryAttention needs head_dim % 16 == 0: width 64 with 4 heads
TINY = dict(hidden_size=64, intermediate_size=128)
CTX = 128


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"onnx_{arch}")
            make_tiny_folder(arch, made[arch], **TINY)
        return made[arch]

    return get


def _adapter(folder, methods, out, seed=1):
    model = load_model(folder)
    adapter = attach_adapter(model, methods, seed=seed)
    randomize(adapter, seed=seed, scale=0.3)
    save_adapter(adapter, out)
    return out


def _session(folder):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])


def _empty_past(model, batch):
    c = model.config
    return {f"past_key_values.{i}.{k}": np.zeros((batch, c.num_kv_heads, 0, c.head_dim), np.float32)
            for i in range(c.num_layers) for k in ("key", "value")}


def _compare_with_cache(sess, model, ids, steps, run_options=None):
    """Max |logit difference| over the prompt pass and `steps` cached greedy steps."""
    from edgetune.runtime.model.transformer import KVCache

    B, T = ids.shape
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((B, T), np.int64),
             "position_ids": np.tile(np.arange(T), (B, 1)), **_empty_past(model, B)}
    names = [o.name for o in sess.get_outputs()]
    cache = KVCache()
    worst = 0.0
    with torch.no_grad():
        ref = model(ids, cache=cache)
        for _ in range(steps + 1):
            out = dict(zip(names, sess.run(None, feeds, run_options)))
            ref = ref[:, -out["logits"].shape[1]:]  # prompt tuning: PyTorch also returns its virtual tokens' logits
            worst = max(worst, float(np.abs(out["logits"] - ref.numpy()).max()))
            tok = torch.from_numpy(out["logits"][:, -1].argmax(-1))[:, None]
            T += 1
            feeds = {"input_ids": tok.numpy(), "attention_mask": np.ones((B, T), np.int64),
                     "position_ids": np.full((B, 1), T - 1),
                     **{k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}}
            ref = model(tok, attention_mask=torch.ones(B, T, dtype=torch.long), cache=cache)
    return worst


def _reference(folder, adapter_dir=None):
    model = load_model(folder)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))

MERGEABLE = {
    "lora": [LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"))],
    "dora": [LoraConfig(r=4, alpha=8, target_modules=("q_proj", "up_proj"), use_dora=True)],
    "ia3": [IA3Config()],
    "ln_tuning": [LNTuningConfig()],
    "bitfit": [BitFitConfig()],
    "adalora": [AdaLoraConfig(init_r=4, target_r=2, target_modules=("q_proj", "down_proj"))],
    "vera": [VeraConfig(r=8, target_modules=("q_proj", "v_proj", "up_proj"), projection_prng_key=3)],
    "lokr": [LoKrConfig(r=2, alpha=4, target_modules=("k_proj", "o_proj", "gate_proj"))],
    "shira": [ShiraConfig(r=1, mask="random", target_modules=("q_proj", "down_proj"))],
    "sparse + lora": [SparseConfig(density=0.2, mask="random", target_modules=("v_proj",)), LoraConfig(r=2, alpha=4)],
}


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "llama3_scaled", "mistral", "qwen2"])
def test_base_export_matches_pytorch_with_kv_cache(arch, tiny, tmp_path):
    folder = tiny(arch)
    out = export(ExportOptions(model=str(folder), out=str(tmp_path / "x"), context_length=CTX))
    assert _compare_with_cache(_session(out), _reference(folder), IDS, steps=8) <= 1e-4


@pytest.mark.parametrize("name", list(MERGEABLE))
def test_merged_export_matches_pytorch_with_the_adapter(name, tiny, tmp_path):
    folder = tiny("llama")
    adapter = _adapter(folder, MERGEABLE[name], tmp_path / "adapter")
    out = export(ExportOptions(model=str(folder), adapter=str(adapter), out=str(tmp_path / "x"), context_length=CTX))
    reference = _reference(folder, adapter)
    assert _compare_with_cache(_session(out), reference, IDS, steps=8) <= 1e-4
    # ... and the adapter mattered: the base model's logits are far from these
    assert _compare_with_cache(_session(out), _reference(folder), IDS, steps=0) > 1e-2


UNMERGEABLE = {
    "serial_adapter": [SerialAdapterConfig(bottleneck_size=8)],
    "parallel_adapter": [ParallelAdapterConfig(bottleneck_size=8, activation="silu")],
    "prefix": [PrefixTuningConfig(num_virtual_tokens=3)],
    "prefix_projection": [PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True)],
    "prompt": [PromptTuningConfig(num_virtual_tokens=3)],
    "mam (prefix + parallel)": [PrefixTuningConfig(num_virtual_tokens=2), ParallelAdapterConfig(bottleneck_size=8)],
    "lora + serial": [LoraConfig(r=4, alpha=8), SerialAdapterConfig(bottleneck_size=8)],
}


@pytest.mark.parametrize("name", list(UNMERGEABLE))
def test_methods_that_cannot_merge_export_as_graph_nodes(name, tiny, tmp_path):
    """Bottleneck adapters become nodes, prefix/prompt tuning constant keys/values ahead of the KV
    cache; mergeable methods of the same stack are still folded in. Batch 1: onnxruntime's
    GroupQueryAttention takes a multi-token step with past context (the prefix) one row at a time."""
    folder = tiny("llama")
    adapter = _adapter(folder, UNMERGEABLE[name], tmp_path / "adapter")
    out = export(ExportOptions(model=str(folder), adapter=str(adapter), out=str(tmp_path / "x"), context_length=CTX))
    reference = _reference(folder, adapter)
    assert _compare_with_cache(_session(out), reference, IDS[:1], steps=6) <= 1e-4
    assert _compare_with_cache(_session(out), _reference(folder), IDS[:1], steps=0) > 1e-2
    # onnxruntime-genai runs it as it is (its cache holds the real tokens only)
    _assert_genai_greedy_equals(reference, out, IDS[0, :6].tolist(), 8)
    assert _genai_logits_error(out, reference, IDS[0, :6].tolist(), steps=4) <= 1e-4
    if "prefix" in name or "prompt" in name:  # the graph cannot take a batch's prompts behind the prefix at once
        from edgetune.runtime.onnx.generate import OnnxGenerator

        with pytest.raises(ConfigError, match="one sequence at a time"):
            OnnxGenerator(out).logits(IDS.numpy())


def _genai_logits_error(out, reference, prompt, steps):
    """Max |logit difference| of genai vs PyTorch over the prompt and `steps` steps fed PyTorch's greedy tokens."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    ids, worst = list(prompt), 0.0
    for _ in range(steps + 1):
        with torch.no_grad():
            want = reference(torch.tensor([ids]))[0, -1].numpy()
        got = np.asarray(gen.get_output("logits")).reshape(-1, want.shape[-1])[-1]
        worst = max(worst, float(np.abs(got - want).max()))
        ids.append(int(want.argmax()))
        gen.append_tokens(np.array([ids[-1:]], dtype=np.int32))
    return worst


def _assert_genai_greedy_equals(reference, out, prompt, n, adapter_file=None):
    """genai's greedy tokens are edgetune's PyTorch ones, up to the end or an end-of-sequence token."""
    with torch.no_grad():
        want = reference.generate(torch.tensor([prompt]), max_new_tokens=n)[0, len(prompt):].tolist()
    got = _genai_greedy(out, prompt, n, adapter_file, stop_at_eos=True)
    eos = json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]
    assert got == want[:len(got)] and (len(got) == n or got[-1] in np.atleast_1d(eos)), (got, want)


def _genai_greedy(out, prompt, n, adapter_file=None, stop_at_eos=False):
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, min_length=len(prompt) + (1 if stop_at_eos else n),
                              do_sample=False)
    gen = og.Generator(model, params)
    if adapter_file is not None:
        adapters = og.Adapters(model)
        adapters.load(str(adapter_file), "trained")
        gen.set_active_adapter(adapters, "trained")
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return got


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_two_onnx_adapters_switch_in_one_session_and_match_their_merged_exports(dora, tiny, tmp_path):
    import onnxruntime as ort

    folder = tiny("llama")
    lora = [LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"), use_dora=dora)]
    base_out = None
    sess = None
    for i, seed in enumerate((1, 2)):
        adapter = _adapter(folder, lora, tmp_path / f"adapter{i}", seed=seed)
        out = export(ExportOptions(model=str(folder), adapter=str(adapter), out=str(tmp_path / f"inputs{i}"),
                                   mode="adapter-inputs", context_length=CTX))
        base_out = base_out or out
        sess = sess or _session(base_out)  # one session, full graph optimisation
        options = ort.RunOptions()
        lora_adapter = ort.LoraAdapter()
        lora_adapter.Load(str(out / "adapter.onnx_adapter"))
        options.add_active_adapter(lora_adapter)
        assert _compare_with_cache(sess, _reference(folder, adapter), IDS, steps=4, run_options=options) <= 1e-4
    # no adapter active: the zero-rank defaults make it the base model
    assert _compare_with_cache(sess, _reference(folder), IDS, steps=4) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
def test_fp16_and_quantized_exports_stay_close(arch, tiny, tmp_path):
    folder = tiny(arch)
    reference = _reference(folder)
    with torch.no_grad():
        ref = reference(IDS).numpy()
    for kind, opts in {"fp16": dict(dtype="fp16"), "int8": dict(quantize="int8"), "int4": dict(quantize="int4")}.items():
        out = export(ExportOptions(model=str(folder), out=str(tmp_path / kind), context_length=CTX, **opts))
        sess = _session(out)
        import onnx

        ops = {n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node}
        if kind != "fp16":
            assert "MatMulNBits" in ops
        feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones(IDS.shape, np.int64),
                 "position_ids": np.tile(np.arange(IDS.shape[1]), (IDS.shape[0], 1)), **_empty_past(reference, 2)}
        if kind == "fp16":
            feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
        logits = sess.run(["logits"], feeds)[0].astype(np.float32)
        err = np.abs(logits - ref).max() / np.abs(ref).max()
        assert err < {"fp16": 5e-3, "int8": 5e-2, "int4": 0.3}[kind], (kind, err)


def test_onnxruntime_genai_greedy_equals_edgetune_greedy(tiny, tmp_path):
    folder = tiny("llama")
    lora = [LoraConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj"))]
    adapter = _adapter(folder, lora, tmp_path / "adapter")
    reference = _reference(folder, adapter)
    for mode in ("merged", "adapter-inputs"):
        out = export(ExportOptions(model=str(folder), adapter=str(adapter), out=str(tmp_path / mode), mode=mode,
                                   context_length=CTX))
        adapter_file = out / "adapter.onnx_adapter" if mode == "adapter-inputs" else None
        _assert_genai_greedy_equals(reference, out, [5, 17, 33, 2 + 40, 61], 12, adapter_file)


# -- refusals, before any long work -----------------------------------------------------
def test_bad_inputs_are_refused_before_writing_a_model(tiny, tmp_path):
    folder = tiny("llama")
    with pytest.raises(AdapterError, match="not an adapter folder"):
        export(ExportOptions(model=str(folder), adapter=str(tmp_path / "missing"), out=str(tmp_path / "a")))
    other = tmp_path / "other_base"
    make_tiny_folder("llama", other, hidden_size=128, intermediate_size=128)
    foreign = _adapter(other, MERGEABLE["lora"], tmp_path / "foreign")
    with pytest.raises(AdapterError):
        export(ExportOptions(model=str(folder), adapter=str(foreign), out=str(tmp_path / "b")))
    ia3 = _adapter(folder, MERGEABLE["ia3"], tmp_path / "ia3")
    with pytest.raises(AdapterError, match="adapter-inputs takes a LoRA or DoRA adapter"):
        export(ExportOptions(model=str(folder), adapter=str(ia3), out=str(tmp_path / "c"), mode="adapter-inputs"))
    both = _adapter(folder, [PrefixTuningConfig(num_virtual_tokens=3), PromptTuningConfig(num_virtual_tokens=2)],
                    tmp_path / "both")
    with pytest.raises(AdapterError, match="more than one virtual-token method"):
        export(ExportOptions(model=str(folder), adapter=str(both), out=str(tmp_path / "d")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write"):
        export(ExportOptions(model=str(folder), out=str(blocker / "sub")))
    with pytest.raises(ConfigError, match="needs --adapter"):
        ExportOptions(model=str(folder), out=str(tmp_path / "e"), mode="adapter-inputs")
    assert not any(p.name == "model.onnx" for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("arch", ["llama", "llama_tied"])
@pytest.mark.parametrize("quantize", ["int4", "int8"])
def test_quantized_exports_look_up_quantized_embeddings(arch, quantize, tiny, tmp_path):
    """The embedding table is stored as blocks too (a tied one shares the LM head's); onnxruntime's
    GatherBlockQuantized on the stored tensors gives every row of the float table within half a
    quantization step (edgetune's rounding) or one (onnxruntime's quantizer, for the tied head)."""
    import onnx
    from onnx import helper, numpy_helper

    folder = tiny(arch)
    out = export(ExportOptions(model=str(folder), out=str(tmp_path / "q"), context_length=CTX, quantize=quantize))
    proto = onnx.load(str(out / "model.onnx"))
    graph = proto.graph
    table = _reference(folder).embed_tokens.weight.detach().numpy()  # (V, D)
    floats = [t.name for t in graph.initializer if list(t.dims) == list(table.shape)]
    assert not floats, f"float copies of the table left: {floats}"
    [gbq] = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    [reshape] = [n for n in graph.node if gbq.input[0] in n.output]
    inits = {t.name: t for t in graph.initializer}
    lookup = helper.make_graph(
        [reshape, gbq], "lookup", [helper.make_tensor_value_info(gbq.input[1], onnx.TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info(gbq.output[0], onnx.TensorProto.FLOAT, ["n", table.shape[1]])],
        [inits[n] for n in (*reshape.input, gbq.input[2])])
    rows = _run_alone(lookup, {gbq.input[1]: np.arange(table.shape[0])})  # (V, D)
    step = np.abs(numpy_helper.to_array(inits[gbq.input[2]])).repeat(32, axis=1)  # each value's quantization step
    assert np.abs(rows - table).max() > 0  # really quantized
    if arch == "llama":  # quantized by edgetune: round to nearest
        assert np.all(np.abs(rows - table) <= step / 2 + 1e-6)
        return
    # tied: one copy serves the lookup and the LM head, and both kernels read it alike
    [head] = [n for n in graph.node if n.output[0] == "logits"]
    assert head.op_type == "MatMulNBits" and reshape.input[0] == head.input[1] and gbq.input[2] == head.input[2]
    D = table.shape[1]
    matmul = helper.make_graph(  # identity @ W^T: the head's weights as MatMulNBits decodes them
        [head], "head", [helper.make_tensor_value_info(head.input[0], onnx.TensorProto.FLOAT, [D, D])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [D, table.shape[0]])],
        [inits[n] for n in head.input[1:]])
    decoded = _run_alone(matmul, {head.input[0]: np.eye(D, dtype=np.float32)}).T  # (V, D)
    assert np.abs(rows - decoded).max() <= 1e-5
    assert np.all(np.abs(rows - table) <= step + 1e-6)  # onnxruntime's quantizer: within one step


def _run_alone(graph, feeds):
    import onnxruntime as ort
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
