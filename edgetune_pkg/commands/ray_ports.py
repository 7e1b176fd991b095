"""`--ray-node-manager-port` and its siblings: the options that fix a Ray node's ports, shared by
`edgetune coordinator` and `edgetune node` (added to the parser, read back into a RayPorts)."""
from __future__ import annotations

from dataclasses import fields

from edgetune.runtime.cluster.ray_process import RayPorts


def add_ray_ports(p) -> None:
    """`--ray-node-manager-port` etc.: fixed ports for this machine's Ray node, for firewalls.

    All default to 0: Ray binds free ports, so several nodes can share a host.
    """
    group = p.add_argument_group("Ray ports (0: a free one; fix them where a firewall needs it)")
    for f in fields(RayPorts):
        group.add_argument("--ray-" + f.name.replace("_", "-"), dest="ray_port_" + f.name, type=int, default=0,
                           metavar="PORT", help=f"Ray's {f.name.replace('_', ' ')}")


def ray_ports_from(args):
    return RayPorts(**{f.name: getattr(args, "ray_port_" + f.name) for f in fields(RayPorts)})
