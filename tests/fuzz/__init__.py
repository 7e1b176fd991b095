"""Coverage-guided fuzzing of everything a node, the edge and the coordinator parse from the wire.

atheris (libFuzzer for Python) drives edgetune's own code with inputs that a structure-aware
mutator (`mutator.py`) builds from real frames: it decodes an input's protobuf frames, changes
fields, tensor headers and frame order, and re-encodes them, so most inputs get past the parser.

    corpus.py   seed inputs: the frames of representative wire messages, and the input format
    model.py    the tiny model the node-side target serves (written without transformers)
    targets.py  what one input runs: down frames -> Assembler -> a node's session; up frames;
                the unary decoders. Only EdgetuneError may come out; anything else is a finding
    run.py      the CLI: `python -m edgetune.tests.fuzz.run --target down --runs N --seed S
                --corpus DIR` fuzzes in a subprocess (atheris may abort it) and prints JSON
    live.py     a real node server (gRPC, --insecure) fed fuzzed sessions: it must keep serving

Imports torch, grpc and the protobuf modules; atheris only in run.py's worker.
"""
