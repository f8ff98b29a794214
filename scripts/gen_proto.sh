#!/usr/bin/env bash
# Regenerates agent/proto/*_pb2.py(i) from the .proto files (needs grpcio-tools).
# Compiled from the repository root so the generated classes live in `agent.proto.*`
# (their __module__ is importable, so messages pickle, e.g. across Ray actors).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. agent/proto/rendezvous.proto agent/proto/message.proto
