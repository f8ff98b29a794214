#!/usr/bin/env bash
# Installs everything (scripts/install.sh) and runs lint, types and the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not natlab"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
ruff check .
mypy
set +e
python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
