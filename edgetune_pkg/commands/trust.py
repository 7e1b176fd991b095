"""`edgetune token create|list` and `edgetune revoke NAME`: the coordinator operator's trust commands,
and how the other commands find their credentials.

The operator's commands read and change the coordinator's state folder directly (whoever can
read it holds the CA): run them on the coordinator's host, as its user. The running coordinator
sees a revocation within a second.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("edgetune.trust")

INSECURE_WARNING = ("--insecure: plaintext gRPC with one shared token. Anyone who can see this traffic reads "
                    "activations, adapters and the token, and can join as anything. Loopback development only.")
OPERATOR_CERT_S = 600.0  # `edgetune status --state`: a coordinator-role certificate good for 10 minutes


def parse_duration(text: str) -> float:
    """Seconds in "90s", "30m", "1h", "7d" (or a bare number of seconds)."""
    from edgetune.runtime.errors import ConfigError

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise ConfigError(f"duration {text!r}: use a number with s, m, h or d (e.g. 1h)") from None
    if value <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return value


def _authority(args):
    from edgetune.runtime.security.authority import ClusterAuthority, default_state_dir

    folder = Path(args.state).expanduser() if args.state else default_state_dir()
    if not (folder / "ca.pem").exists():
        from edgetune.runtime.errors import ConfigError

        raise ConfigError(f"{folder} holds no cluster CA: start `edgetune coordinator` (with this --state) first")
    return ClusterAuthority(folder)


def run_token(args) -> int:
    authority = _authority(args)
    if args.action == "list":
        pending = authority.tokens.pending()
        for token_id, role, expires in pending:
            print(f"{token_id}  {role:5s}  expires in {(expires - time.time()) / 60:.0f} min")
        if not pending:
            print("no unused join tokens")
        return 0
    token = authority.create_token(args.role, parse_duration(args.ttl))
    if args.quiet:
        print(token)
        return 0
    print(f"join string ({args.role}, one use, expires in {args.ttl}):\n  {token}\n")
    command = "edgetune node --join" if args.role == "node" else "edgetune finetune ... --join"
    print(f"use it once, on the {args.role}: {command} '{token}'")
    print("it carries a secret: send it the way you would send a password")
    return 0


def run_revoke(args) -> int:
    authority = _authority(args)
    serials = authority.revoke(args.name)
    print(f"revoked {args.name!r}: {len(serials)} certificate(s); a running coordinator refuses them within a second, "
          "and ends their open sessions")
    return 0


def status_trust(args):
    """(Trust, coordinator address) for `edgetune status`: --insecure's token, the operator's state
    folder (a short-lived coordinator-role certificate), or an edge's or a node's credentials."""
    from edgetune.runtime.errors import ConfigError
    from edgetune.runtime.security.access import Trust
    from edgetune.runtime.wire import rpc

    if args.insecure:
        log.warning(INSECURE_WARNING)
        if not args.coordinator:
            raise ConfigError("--insecure needs --coordinator HOST:PORT")
        token = Path(args.token_file).expanduser() if args.token_file else rpc.default_token_path()
        return Trust.insecure(rpc.load_token(token)), args.coordinator
    if not args.credentials:  # on the coordinator's host, as its operator
        authority = _authority(args)
        cert, key = authority.ca.issue_keypair("operator", "coordinator", valid_s=OPERATOR_CERT_S)
        address = args.coordinator or authority.listening().get("address", "")
        if not address:
            raise ConfigError("pass --coordinator HOST:PORT (the state folder does not say where it listens)")
        return Trust.mutual(authority.ca.cert_pem, cert, key), address
    from edgetune.runtime.security.credentials import Credentials

    for role in ("edge", "node"):
        try:
            creds = Credentials.load(Path(args.credentials), role)
        except ConfigError:
            continue
        return creds.trust(), args.coordinator or creds.coordinator
    raise ConfigError(f"{args.credentials} holds neither an edge's nor a node's credentials")
