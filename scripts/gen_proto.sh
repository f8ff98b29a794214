#!/usr/bin/env bash
# Regenerates agent/proto/*_pb2.py(i) from the .proto files (needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/../agent/proto"
python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. rendezvous.proto message.proto
