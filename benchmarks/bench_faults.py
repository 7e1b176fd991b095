"""A soak: training on a 4-node local cluster while a random node of the route is killed every N seconds
and started again, in one run; prints the faults injected and survived, and how far the adapter
ended from an undisturbed (--local) run's.

    python -m edgetune.benchmarks.bench_faults --steps 60 --every-s 20

The cluster is `LocalCluster` (an `edgetune coordinator` and 4 `edgetune node` processes, mutual TLS),
each node with room for half of the tiny model's blocks, so every route crosses at least two nodes
and any two can hold the model. A killer thread picks a node of the edge's current route, SIGKILLs it
and everything it started, waits until Ray declares it dead, and starts it again with its stored
credentials; the edge replays the step it was in on a new route. fp32 activations and raw adapter
traffic, so the adapter must equal the undisturbed run's within 1e-5.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import time
from pathlib import Path

MODULE = "edgetune.benchmarks.bench_faults"


def _memory_limit(model_kwargs: dict, blocks: float) -> str:
    from edgetune.nodes.profile import FIXED_BYTES
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.plan.cost import model_cost
    from edgetune.tests.tiny import tiny_hf_config

    cost = model_cost(ModelConfig.from_hf_dict(tiny_hf_config("llama", **model_kwargs).to_dict()))
    return str(FIXED_BYTES + int(blocks * cost.bytes_per_block(1)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every-s", type=float, default=20.0, help="seconds between kills")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="which node dies when")
    args = p.parse_args(argv)

    from safetensors.torch import load_file

    from edgetune.runtime.cluster.local_cluster import LocalCluster
    from edgetune.runtime.train import remote
    from edgetune.runtime.train.loop import TrainConfig, finetune
    from edgetune.tests.tiny import SAMPLE_TEXTS, make_tiny_folder

    model_kwargs = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8)
    options = dict(method="lora", rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"), lr=2e-2,
                   steps=args.steps, batch_size=4, micro_batches=2, warmup_steps=2, max_seq_len=32,
                   eval_fraction=0.0, save_every=0, seed=3, progress=False, codec="fp32", adapter_codec="raw")
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_faults-") as tmp:
        model, data = Path(tmp) / "tiny", Path(tmp) / "data.jsonl"
        make_tiny_folder("llama", model, **model_kwargs)
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
        local = finetune(TrainConfig(model=str(model), data=str(data), out=str(Path(tmp) / "local"), **options))
        node = ["--threads", "1", "--memory-limit", _memory_limit(model_kwargs, model_kwargs["num_hidden_layers"] / 2 + 0.5)]
        faults: list[dict] = []
        replays = []
        original_new_route = remote.RemoteTrainer.new_route

        def counted_new_route(self, failed):
            started = time.monotonic()
            route = original_new_route(self, failed)
            replays.append(time.monotonic() - started)
            return route

        remote.RemoteTrainer.new_route = counted_new_route
        with LocalCluster.start([node] * args.nodes) as cluster:
            engine_route: list = []
            original_open = remote.RemoteEngine._open

            def tracked_open(self):
                engine_route[:] = [h.name for h in self.trainer.route.hops]
                return original_open(self)

            remote.RemoteEngine._open = tracked_open
            done = threading.Event()

            def killer():
                while not done.wait(args.every_s):
                    if not engine_route:
                        continue
                    victim = rng.choice(engine_route)
                    i = cluster.node_names.index(victim)
                    at = time.monotonic()
                    cluster.kill_node(i)
                    cluster.wait_for(lambda s, v=victim: not any(n.alive and n.name == v for n in s.nodes),
                                     f"Ray to declare {victim} dead", timeout_s=60)
                    cluster.restart_node(i)
                    faults.append({"node": victim, "back_after_s": time.monotonic() - at})
                    print(f"[soak] killed {victim}, back after {faults[-1]['back_after_s']:.1f} s", flush=True)

            thread = threading.Thread(target=killer, daemon=True)
            started = time.monotonic()
            thread.start()
            try:
                result = finetune(TrainConfig(model=str(model), data=str(data), out=str(Path(tmp) / "soak"),
                                              **cluster.edge_options("edge"), **options))
            finally:
                done.set()
                thread.join(120)
            wall_s = time.monotonic() - started
        ours, ref = load_file(str(result.out / "adapter" / "adapter_model.safetensors")), \
            load_file(str(local.out / "adapter" / "adapter_model.safetensors"))
        diff = max((ours[k] - ref[k]).abs().max().item() for k in ref)
        steps = [json.loads(line)["step"] for line in (result.out / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
    print(f"\nsoak: {args.steps} steps on {args.nodes} nodes in {wall_s:.0f} s, a node killed every {args.every_s:.0f} s")
    print(f"faults injected {len(faults)}, survived {len(faults) if result.steps == args.steps else 0} "
          f"(nodes: {', '.join(f['node'] for f in faults) or 'none'})")
    print(f"new routes asked for {len(replays)}, median wait {sorted(replays)[len(replays) // 2] if replays else 0:.1f} s")
    print(f"steps recorded once each: {steps == list(range(1, args.steps + 1))}; "
          f"adapter max |diff| vs undisturbed: {diff:.2e} (limit 1e-5: {'PASS' if diff <= 1e-5 else 'MISS'})")


if __name__ == "__main__":
    main()
