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

# One pytest run; a run that collects nothing is a failure too. --durations: where the time goes.
run_pytest() {
  local rc=0
  python -m pytest "$@" || rc=$?
  if [ "$rc" = 5 ]; then
    echo "test.sh: pytest collected no tests: that is a failure" >&2
    rc=1
  fi
  return "$rc"
}

if [ $# -gt 0 ]; then  # a chosen selection: as given, in one process
  run_pytest --durations=30 "$@"
  exit $?
fi
# The default run, in two parts. The core (no Ray, no NAT lab) keeps about one core busy (150 CPU-s
# in 195 s, the rest waits on loopback timers): two workers (pytest-xdist) take it to ~115 s on two
# cores (four: ~110 s). Ray and the NAT lab start real agents, CPU-bound: one test at a time, after
# the core, so their races run on a machine no busier than before.
rc=0
run_pytest -n 2 -m "not natlab and not ray and not slow" --durations=10 || rc=1
run_pytest -m "(natlab or ray) and not slow" --durations=30 || rc=1
exit "$rc"
