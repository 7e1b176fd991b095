"""Session-wide test setup: GPU tests skip cleanly where CUDA is absent."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Callable[[str], Path]:
    """arch -> folder of a tiny random HF checkpoint (made once per session)."""
    from edgetune.tests.tiny import make_tiny_model

    made: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in made:
            made[arch] = tmp_path_factory.mktemp(f"tiny_{arch}")
            make_tiny_model(arch, made[arch])
        return made[arch]

    return get


@pytest.fixture(scope="session")
def tiny64(tmp_path_factory) -> Path:
    """A tiny random Llama of width 64 (2 blocks), shared by the distributed and node tests."""
    from edgetune.tests.tiny import make_tiny_folder

    folder = tmp_path_factory.mktemp("tiny64")
    make_tiny_folder("llama", folder, hidden_size=64, intermediate_size=128)
    return folder


@pytest.fixture(scope="session")
def data_file(tmp_path_factory) -> Path:
    """SAMPLE_TEXTS as a JSONL file of text records (a module may define its own `data_file`)."""
    import json

    from edgetune.tests.tiny import SAMPLE_TEXTS

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in SAMPLE_TEXTS))
    return path


# The integration cluster's model: 4 blocks of width 64. Each node may hold 2 of them
# (--memory-limit), so every route crosses both nodes.
CLUSTER_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4)


def cluster_node_options() -> list[dict]:
    from edgetune.nodes.profile import FIXED_BYTES
    from edgetune.runtime.cluster.node_labels import NodeOptions
    from edgetune.runtime.model.config import ModelConfig
    from edgetune.runtime.plan.cost import model_cost
    from edgetune.tests.tiny import tiny_hf_config

    cost = model_cost(ModelConfig.from_hf_dict(tiny_hf_config("llama", **CLUSTER_MODEL).to_dict()))
    limit = FIXED_BYTES + int(2.5 * cost.bytes_per_block(1))
    options = []
    for i in range(2):
        # node-1 reads no model file: the coordinator ships its blocks through Ray's object store
        node = NodeOptions(name=f"node-{i}", threads=1, memory_limit_bytes=limit, fetch_weights=i == 1)
        options.append({"name": node.name, "threads": 1, "labels": node.labels()})
    return options


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One Ray cluster (a head + 2 edgetune nodes, real `ray start` processes) for the session's
    integration tests; this process is its driver. Unit tests never ask for it."""
    import ray

    from edgetune.tests.ray_cluster import start_local_cluster

    cluster = start_local_cluster(2, tmp_path_factory.mktemp("ray"), cluster_node_options())
    try:
        yield cluster
    finally:
        try:
            ray.shutdown()  # the driver leaves first, then the nodes and the head stop
        finally:
            cluster.shutdown()
