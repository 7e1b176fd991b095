"""The bodies of the `edgetune` commands; `edgetune.cli` parses the arguments and dispatches here.

- `coordinator`, `node`: the long-running cluster processes; `ray_ports`: their Ray port options.
- `status`, `generate`, `report`, `demo`: the one-shot commands.
- `logs`: log setup (text or JSON lines) for every command.

Commands may print; the library (`edgetune.runtime`) never does. May import anything in edgetune.
"""
