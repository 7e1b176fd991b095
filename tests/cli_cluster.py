"""The multi-process tests' cluster: `edgetune coordinator` + `edgetune node` processes on this
machine (runtime/cluster/local_cluster.py, which `edgetune demo` uses too).

    with CliCluster.start(nodes=[["--threads", "1"], ["--threads", "1"]]) as c:
        c.edgetune("finetune", "--coordinator", c.address, "--token-file", str(c.token_file), ...)
        c.kill_node(1)                      # SIGKILL the node and everything it started
"""
from edgetune.runtime.cluster.local_cluster import LocalCluster as CliCluster

__all__ = ["CliCluster"]
