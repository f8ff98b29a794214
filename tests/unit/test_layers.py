"""The layering rules (DESIGN.md "Layers"; the README's Layout table) checked on the code's own imports.

Every import counts, also one inside a function: a late import is still a dependency. The rules:
- no import cycle between the project's modules;
- `agent.wire` (the protocol) imports only `agent.proto`; `agent.common` only the protocol;
  `agent.servers` only the protocol and `agent.common`, never the agent;
- the sans-IO cores import no sockets, no event loop, no clocks, no threads and no Ray;
- Ray is imported only by `actors/` and the runner; `actors/` only by the runner and the CLI.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("agent", "actors", "ops")

CORES = {
    "agent.wire.frames",
    "agent.wire.addr",
    "agent.wire.messages",
    "agent.wire.signing",
    "agent.wire.keys",
    "agent.wire.peer_ids",
    "agent.wire.nat_behavior",
    "agent.wire.handshake",
    "agent.wire.secure_channel",
    "agent.common.stats",
    "agent.common.ip_caps",
    "agent.servers.rendezvous_core",
    "agent.servers.relay_core",
    "agent.nat.probe_core",
    "agent.nat.watch_core",
    "agent.kcp.core",
    "agent.rendezvous.registrar_core",
    "agent.control.plan",
    "agent.session.view",
    "agent.session.guess_limiter",
    "agent.link.mux_core",
    "agent.link.stream_open",
    "agent.link.resend_core",
    "agent.strategies.birthday_core",
}
"""The pure cores: decisions and codecs that tests drive with plain values (time passed in)."""
NOT_IN_A_CORE = {"asyncio", "socket", "selectors", "ssl", "time", "threading", "subprocess", "ray"}
"""What makes code I/O: sockets, an event loop, a clock, threads, processes, Ray."""

ALLOWED: dict[str, tuple[str, ...]] = {
    "agent.proto": ("agent.proto",),
    "agent.wire": ("agent.proto", "agent.wire"),
    "agent.common": ("agent.proto", "agent.wire", "agent.common"),
    "agent.servers": ("agent.proto", "agent.wire", "agent.common", "agent.servers"),
}
"""Layer -> the project packages it may import (a prefix of the importing module's name)."""


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith("_pb2.py"):
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = modules()


def imports(name: str) -> Iterator[tuple[str, int]]:
    """(imported module, line): `from a.b import c` names the module a.b.c when c is one, else a.b."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub if sub in MODULES else node.module), node.lineno


def project_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        for target, _line in imports(name):
            if target in MODULES and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(name: str) -> str | None:
    return next((layer for layer in ALLOWED if name == layer or name.startswith(layer + ".")), None)


def test_there_is_no_import_cycle() -> None:
    assert cycles(project_graph()) == []


def test_the_cycle_check_finds_one() -> None:
    """The check above can fail: a made-up graph with a cycle through three modules."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer_of(n)))
def test_each_layer_imports_only_what_is_below_it(name: str) -> None:
    allowed = ALLOWED[layer_of(name) or ""]
    wrong = [
        f"line {line}: {target}"
        for target, line in imports(name)
        if target.split(".")[0] in PACKAGES and not any(target == a or target.startswith(a + ".") for a in allowed)
    ]
    assert wrong == [], f"{name} may import only {', '.join(allowed)}"


@pytest.mark.parametrize("name", sorted(CORES))
def test_cores_do_no_io(name: str) -> None:
    assert name in MODULES, f"{name} is listed as a core but does not exist"
    wrong = [f"line {line}: {target}" for target, line in imports(name) if target.split(".")[0] in NOT_IN_A_CORE]
    assert wrong == [], f"{name} is a sans-IO core"


def test_only_the_runner_and_the_cli_reach_the_ray_layer() -> None:
    users = {
        name: target
        for name in MODULES
        for target, _line in imports(name)
        if not name.startswith("actors")
        and (target.split(".")[0] == "ray" or target.startswith("actors"))
        and name not in ("agent.runner", "agent.cli")
    }
    assert users == {}


def test_every_remote_call_exists_on_its_component_with_the_same_arguments() -> None:
    """A strategy's Remote is what the coordinator types against; the component is what runs. Ray calls
    the component's method of the same name with the same arguments: they must agree."""
    import inspect

    from agent.strategies import registry
    from agent.strategies.base import Remote

    components = {
        "relay": "agent.strategies.relay.RelayStrategy",
        "lan": "agent.strategies.tcp_direct.TcpDirectStrategy",
        "tcp_punch": "agent.strategies.tcp_direct.TcpDirectStrategy",
        "udp_punch": "agent.strategies.udp_punch.UdpPunchStrategy",
        "ipv6": "agent.strategies.ipv6.Ipv6Strategy",
        "direct": "agent.strategies.direct.DirectServer",
    }
    assert set(components) == set(registry.names())
    for entry in registry.entries():
        module, _, cls_name = components[entry.name].rpartition(".")
        component = getattr(__import__(module, fromlist=[cls_name]), cls_name)
        for name, method in inspect.getmembers(entry.remote, inspect.isfunction):
            if name.startswith("_"):
                continue
            assert hasattr(component, name), f"{entry.name}: {cls_name} has no {name}()"
            want = [(p.name, p.annotation) for p in inspect.signature(method).parameters.values()]
            have = [(p.name, p.annotation) for p in inspect.signature(getattr(component, name)).parameters.values()]
            assert have == want, f"{entry.name}.{name}: remote {want} vs component {have}"
            assert (name in vars(Remote)) or inspect.iscoroutinefunction(method)
