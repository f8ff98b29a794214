"""The short-lived Ray driver that creates an agent's actors, then exits.

The supervisor (`punchthrough up --foreground`) never imports Ray: a driver that stayed attached would
cost ~80 MiB for the agent's whole life (shared/notes/ray-feasibility.md). Detached named actors
outlive this process; it waits until every actor has been constructed, so an actor that cannot even
start is reported here, and leaves with `os._exit` (a `ray.shutdown()` costs ~0.3 s and logs noise).

    python -m actors.bootstrap ADDRESS NAMESPACE STATE_DIR PLACEMENT_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    address, namespace, state_dir, where_json = argv
    where: dict[str, str] = json.loads(where_json)

    import ray

    from actors.agent_actors import start_actors
    from actors.ray_runtime import init_driver

    init_driver(address, namespace=namespace)
    handles = start_actors(where, Path(state_dir), namespace)
    ray.get([h.pid.remote() for h in handles], timeout=120)
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    try:
        code = main(sys.argv[1:])
    except BaseException as exc:  # one line (Ctrl-C included) for the supervisor's log
        print(f"bootstrap: could not start the agent's actors: {exc!r}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
