"""Torch thread counts: every edgetune process sets its own (--threads).

The default divides the machine's cores among the edgetune processes that
compute on this host (nodes and edges), so an edge and two nodes trying edgetune
out on one laptop do not each start one OpenMP thread per core and thrash.
"""
from __future__ import annotations

import os

COMPUTING = ("node", "finetune", "demo")  # subcommands whose process runs torch work


def edgetune_processes() -> int:
    """edgetune processes on this host that compute (this one included), at least 1."""
    import psutil

    me = os.getpid()
    count = 1
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
        except (psutil.Error, OSError):
            continue
        if proc.info["pid"] == me or not cmd:
            continue
        words = [os.path.basename(w) for w in cmd[:4]]
        if any(w == "edgetune" or w.endswith("edgetune") for w in words) and any(c in cmd for c in COMPUTING):
            count += 1
    return count


def default_threads() -> int:
    return max(1, (os.cpu_count() or 1) // edgetune_processes())


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = default_threads()); returns the number used."""
    import torch

    n = threads if threads > 0 else default_threads()
    torch.set_num_threads(n)
    return n
