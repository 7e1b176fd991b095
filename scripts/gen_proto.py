#!/usr/bin/env python
"""Generate the Python stubs of edgetune's wire contract from proto/v1/*.proto.

This is the one way the committed stubs in proto/v1/ are made. For every
`x.proto` it writes `x_pb2.py` (messages), `x_pb2.pyi` (type hints) and
`x_pb2_grpc.py` (service stubs and servicers):

    python scripts/gen_proto.py            # regenerate proto/v1/*_pb2*.py[i]
    python scripts/gen_proto.py --check    # exit 1, naming the stale stubs, if they differ
    python scripts/gen_proto.py --out DIR  # write the stubs into DIR instead

Why a temporary tree: the .proto files import each other as
"edgetune/proto/v1/x.proto", and protoc derives the generated Python imports from
those paths. Copying the sources to <tmp>/edgetune/proto/v1/ and compiling from
<tmp> makes the stubs import `from edgetune.proto.v1 import tensor_pb2`, which is
where they live once installed -- never a top-level `proto` package (that name
collides with Google's proto-plus, which Ray pulls in).

protoc runs in-process from grpcio-tools (pinned exactly in constraints.txt,
because the generator version is written into the stubs and --check compares
bytes). Its bundled include folder supplies Google's well-known types.
"""
from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO / "proto" / "v1"
PACKAGE_PATH = Path("edgetune", "proto", "v1")  # the import path the stubs must use
STUB_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


class GenerationError(RuntimeError):
    """protoc rejected the .proto sources (its own messages went to stderr)."""


def stub_names(proto_dir: Path) -> list[str]:
    """The file names of every stub generated from the .proto files in `proto_dir`."""
    stems = sorted(p.stem for p in proto_dir.glob("*.proto"))
    return [stem + suffix for stem in stems for suffix in STUB_SUFFIXES]


def generate(proto_dir: Path, out_dir: Path) -> list[Path]:
    """Compile every .proto in `proto_dir`; write its stubs into `out_dir`; return their paths."""
    from grpc_tools import protoc  # test/dev-only dependency: import it only when generating

    protos = sorted(proto_dir.glob("*.proto"))
    if not protos:
        raise GenerationError(f"no .proto files in {proto_dir}")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto
    with tempfile.TemporaryDirectory(prefix="edgetune-proto-") as tmp:
        src, gen = Path(tmp, "src"), Path(tmp, "gen")
        (src / PACKAGE_PATH).mkdir(parents=True)
        gen.mkdir()
        for proto in protos:
            shutil.copyfile(proto, src / PACKAGE_PATH / proto.name)
        args = [
            "grpc_tools.protoc",  # argv[0], ignored by protoc
            f"-I{src}",
            f"-I{include}",
            f"--python_out={gen}",
            f"--pyi_out={gen}",
            f"--grpc_python_out={gen}",
            *(str(PACKAGE_PATH / proto.name) for proto in protos),
        ]
        # protoc resolves the relative source paths against the -I roots, not the cwd.
        if protoc.main(args) != 0:
            raise GenerationError(f"protoc failed on {', '.join(p.name for p in protos)} (see its messages above)")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in stub_names(proto_dir):
            made = gen / PACKAGE_PATH / name
            if not made.is_file():
                raise GenerationError(f"protoc did not write {name}")
            shutil.copyfile(made, out_dir / name)
            written.append(out_dir / name)
    return written


def stale_stubs(proto_dir: Path, stub_dir: Path) -> list[str]:
    """Names of the stubs in `stub_dir` that differ from what `proto_dir` generates.

    A stub that is missing counts as stale; so does a committed stub whose .proto is gone.
    """
    with tempfile.TemporaryDirectory(prefix="edgetune-proto-check-") as tmp:
        fresh = Path(tmp)
        generate(proto_dir, fresh)
        expected = stub_names(proto_dir)
        stale = [n for n in expected if not (stub_dir / n).is_file() or not filecmp.cmp(fresh / n, stub_dir / n, shallow=False)]
    orphans = sorted(
        p.name for p in stub_dir.iterdir() if p.name.endswith(STUB_SUFFIXES) and p.name not in expected
    )
    return stale + orphans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the committed stubs are stale")
    parser.add_argument("--out", type=Path, default=PROTO_DIR, help=f"where to write the stubs (default {PROTO_DIR})")
    parser.add_argument("--proto-dir", type=Path, default=PROTO_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.check:
            stale = stale_stubs(args.proto_dir, args.out)
            if stale:
                print(f"stale protobuf stubs in {args.out}: {', '.join(stale)}", file=sys.stderr)
                print("regenerate them with: python scripts/gen_proto.py", file=sys.stderr)
                return 1
            print(f"protobuf stubs in {args.out} are up to date")
            return 0
        for path in generate(args.proto_dir, args.out):
            print(f"wrote {path}")
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
