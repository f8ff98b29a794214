#!/usr/bin/env bash
# Installs punchthrough and everything its tests need on a fresh Debian machine:
# system tools (as root, via apt) and a virtualenv in .venv with the package in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
for tool in ip:iproute2 iptables:iptables nft:nftables sshd:openssh-server ssh:openssh-client \
            iperf3:iperf3 socat:socat curl:curl systemd-analyze:systemd; do
  bin=${tool%%:*}; pkg=${tool#*:}
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "install.sh: not root, skipping apt packages: ${need_apt[*]}" >&2
  fi
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
echo "install.sh: done; punchthrough and punchthrough-ops are in $PWD/.venv/bin (export PATH=\"$PWD/.venv/bin:\$PATH\")" >&2
