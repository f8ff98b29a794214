#!/usr/bin/env bash
# Installs everything (scripts/install.sh) and runs lint, types and the test suite.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not natlab"`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
# promtool (Prometheus' own checker) for the metrics tests: the binary alone, out of Debian's
# prometheus package (no service installed, nothing started); ~19 MB, fetched once into .venv/bin.
if ! command -v promtool >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 || { apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } \
      && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool); then
    mv "$tmp/usr/bin/promtool" .venv/bin/promtool
  else
    echo "test.sh: could not fetch promtool (apt-get download prometheus); its checks will be skipped" >&2
  fi
  rm -rf "$tmp"
fi
ruff check .
mypy
set +e
python -m pytest --durations=30 "$@"  # the slowest 30: where the run's time goes
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "test.sh: pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
