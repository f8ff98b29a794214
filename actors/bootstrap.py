"""The short-lived Ray driver that creates an agent's actors, then exits.

The supervisor (`punchthrough up --foreground`) never imports Ray: a driver that stayed attached would
cost ~80 MiB for the agent's whole life (shared/notes/ray-feasibility.md). The supervisor starts this
process before the Ray head, so that importing Ray and the agent (~0.7 s) overlaps the head's start;
it then writes the head's address and environment as one JSON line on our stdin (EOF: no head, no
work). Detached named actors outlive this process; it waits until every actor has been constructed,
so an actor that cannot even start is reported here, and leaves with `os._exit` (a `ray.shutdown()`
costs ~0.3 s and logs noise).

    python -m actors.bootstrap NAMESPACE STATE_DIR  < {"address": ..., "env": {...}}
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    namespace, state_dir = argv

    import ray

    from actors.agent_actors import start_actors
    from actors.ray_runtime import init_driver
    from agent import placement
    from agent.stack import enabled_components, load_runtime

    rt = load_runtime(Path(state_dir))
    where = placement.layout(enabled_components(rt), rt.cfg.ray.placement)
    print(f"agent {rt.identity.peer_id}: actors {placement.actors(where)}", flush=True)

    line = sys.stdin.readline()
    if not line:
        return 1
    head = json.loads(line)
    os.environ.update(head["env"])
    init_driver(head["address"], namespace=namespace)
    handles = start_actors(where, Path(state_dir), namespace)
    ray.get([h.pid.remote() for h in handles], timeout=120)
    return 0


if __name__ == "__main__":
    try:
        code = main(sys.argv[1:])
    except BaseException as exc:  # one line for the supervisor's log (Ctrl-C included)
        print(f"bootstrap: could not start the agent's actors: {exc!r}", file=sys.stderr, flush=True)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
