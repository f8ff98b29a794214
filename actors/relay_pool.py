"""Relay replicas as Ray actors sharing one port (DESIGN.md rule 5).

Each replica is an async actor (num_cpus=0, max_restarts=-1) that runs an ordinary
RelayServer bound with SO_REUSEPORT, plus a Handoff (agent/servers/relay_handoff.py): the
kernel spreads accepted connections over the replicas of a host, and a replica that
reads a uuid owned by a co-located sibling passes the socket to it, so both halves
of a pair meet in one process. Bytes never travel through Ray; Ray only places,
supervises and reports.

Placement: replica i goes to alive node i mod (number of nodes), pinned with a hard
NodeAffinitySchedulingStrategy. That spreads like SPREAD does, but deterministically:
every replica knows at construction which siblings share its host (the fd-passing
group), and a restarted replica (Ray re-runs `__init__` with the same arguments)
comes back on the same host with the same group and socket name. Ray's SPREAD
strategy is best effort and would leave the groups unknown until after placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import secrets
import signal
import socket
import threading
import types
from collections import Counter, defaultdict
from typing import Any

from agent.servers.relay_handoff import Handoff
from agent.servers.relay_server import RelayConfig, RelayServer, bind_listeners

log = logging.getLogger("punchthrough.relay.pool")


class RelayReplica:
    """One replica as a plain asyncio object (what the Ray actor wraps; tests run it without Ray)."""

    def __init__(self, cfg: RelayConfig, names: list[str], index: int) -> None:
        self.cfg = cfg
        self.handoff = Handoff(names, index)
        self.server = RelayServer(cfg, router=self.handoff if len(names) > 1 else None)

    async def start(self) -> dict[str, Any]:
        # Server first, so a socket handed over from a sibling always finds it running
        # (a sibling that finds our handoff socket not bound yet retries for a moment).
        socks = bind_listeners(self.cfg.binds, self.cfg.port, reuse_port=True, backlog=self.cfg.backlog)
        await self.server.start(socks)
        await self.handoff.start(self.server.admit)
        return {"pid": os.getpid(), "port": self.server.port, "index": self.handoff.index}

    def stats(self) -> dict[str, Any]:
        st = self.server.stats()
        st["handoff"] = self.handoff.stats()
        st["pid"] = os.getpid()
        return st

    async def close(self) -> None:
        await self.server.close()
        await self.handoff.close()


class _RelayActor:
    """Ray wraps this class at one spot (relay_actor_class); servers start in __init__ so restarts serve."""

    def __init__(self, cfg: dict[str, Any], names: list[str], index: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        import ray

        node_ip: Any = ray.util.get_node_ip_address
        self._node = str(node_ip())
        cfg = {**cfg, "binds": node_binds(cfg["binds"], self._node)}
        self._replica = RelayReplica(RelayConfig(**cfg), names, index)
        self._boot = asyncio.get_running_loop().create_task(self._replica.start())

    async def ready(self) -> dict[str, Any]:
        info = await asyncio.shield(self._boot)
        import ray

        info["node_id"] = ray.get_runtime_context().get_node_id()
        info["node"] = self._node
        info["binds"] = self._replica.cfg.binds
        return info

    async def stats(self) -> dict[str, Any]:
        await asyncio.shield(self._boot)
        return self._replica.stats()

    async def close(self) -> None:
        await self._replica.close()


_actor_cls: Any = None


def relay_actor_class() -> Any:
    global _actor_cls
    if _actor_cls is None:
        import ray

        _actor_cls = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(_RelayActor)
    return _actor_cls


NODE = "node"
"""A bind address that means: the address of the Ray node this replica runs on (a machine of a
cluster has several; the rendezvous server hands out the one Ray knows it by)."""


def node_binds(binds: list[str], node_ip: str) -> list[str]:
    return [node_ip if b == NODE else b for b in binds]


def plan_placement(node_ids: list[str], replicas: int) -> list[str]:
    """Node for each replica: round robin over the (sorted) alive nodes."""
    if not node_ids:
        raise ValueError("no alive Ray node")
    nodes = sorted(node_ids)
    return [nodes[i % len(nodes)] for i in range(replicas)]


def group_by_node(placement: list[str]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(placement):
        groups[node].append(i)
    return dict(groups)


def reserve_port(binds: list[str]) -> tuple[int, list[socket.socket]]:
    """Pick a port free on every bind address and hold it with bound, non-listening
    SO_REUSEPORT sockets, so replicas can bind it while nobody else can take it."""
    for _ in range(20):
        held: list[socket.socket] = []
        port = 0
        try:
            for host in binds:
                fam = socket.AF_INET6 if ":" in host else socket.AF_INET
                try:
                    s = socket.socket(fam, socket.SOCK_STREAM)
                except OSError:
                    if host == "::":
                        continue
                    raise
                held.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    s.bind((host, port))
                except OSError as exc:
                    if host == "::" and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                        held.pop().close()
                        continue
                    raise
                port = s.getsockname()[1]
            return port, held
        except OSError as exc:
            for s in held:
                s.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "could not reserve a common port")


class RelayPool:
    """Driver side: place, start, query and kill the replicas (Ray must be initialised)."""

    def __init__(self, cfg: RelayConfig) -> None:
        if cfg.replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.cfg = cfg
        self.token = secrets.token_hex(4)
        self.actors: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.port = cfg.port

    def start(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        held: list[socket.socket] = []
        if self.cfg.port == 0:  # "node" is known only on the node: hold the port on every address here
            self.port, held = reserve_port(sorted(set(node_binds(self.cfg.binds, "0.0.0.0"))))
        cfg = dataclasses.replace(self.cfg, port=self.port)
        try:
            list_nodes: Any = ray.nodes
            nodes = [n["NodeID"] for n in list_nodes() if n.get("Alive")]
            placement = plan_placement(nodes, cfg.replicas)
            cls = relay_actor_class()
            actors: list[Any] = [None] * cfg.replicas
            for node, idxs in group_by_node(placement).items():
                names = [f"pt-relay-{self.token}-{i}" for i in idxs]
                for pos, i in enumerate(idxs):
                    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
                    actors[i] = cls.options(scheduling_strategy=strategy).remote(dataclasses.asdict(cfg), names, pos)
            self.actors = actors
            try:
                self.infos = list(ray.get([a.ready.remote() for a in actors], timeout=timeout))
            except Exception as exc:
                # A replica that cannot bind fails its boot task; Ray wraps the OSError with a
                # remote traceback. Hand the caller the plain OSError (the CLI prints one line).
                cause = getattr(exc, "cause", None)
                if isinstance(cause, OSError):
                    raise OSError(cause.errno, cause.strerror or str(cause)) from None
                raise
        finally:
            for s in held:
                s.close()
        return self.infos

    def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        """Sum of the replicas' counters, plus each replica's own numbers."""
        import ray

        per = list(ray.get([a.stats.remote() for a in self.actors], timeout=timeout))
        total: dict[str, Any] = {"replicas": per}
        for key in ("pairs_active", "pairs_total", "waiting", "handshaking", "bytes_relayed", "handed_off"):
            total[key] = sum(int(p[key]) for p in per)
        drops: Counter[str] = Counter()
        for p in per:
            drops.update(p["drops"])
        total["drops"] = dict(drops)
        total["pump"] = per[0]["pump"] if per else None
        total["limits"] = {
            "stream_limit_bps": self.cfg.stream_limit_bps,
            "total_limit_bps_per_replica": self.cfg.total_limit_bps,
        }
        return total

    def replica_stats(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        """Each replica's numbers with its node's address, or `up: False` for one that did not answer
        within `timeout` (its node died: a replica pinned there cannot come back elsewhere)."""
        import ray

        refs = [a.stats.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        done = set(ready)
        rows: list[dict[str, Any]] = []
        for i, (ref, info) in enumerate(zip(refs, self.infos, strict=True)):
            row: dict[str, Any] = {"replica": i, "node": info.get("node", "?"), "up": False}
            if ref in done:
                with contextlib.suppress(Exception):
                    row.update(ray.get(ref, timeout=0), up=True)
            rows.append(row)
        return rows

    def stop(self) -> None:
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)
        self.actors = []


def run_pool(cfg: RelayConfig) -> int:
    """`punchthrough relay --replicas N` / `--ray-address`: block until SIGINT/SIGTERM, then clean up.

    Only a head we started is stopped (by its pids); an existing cluster is left alone.
    """
    from actors.ray_runtime import RayHandle, init_driver, start_private_head

    stop = threading.Event()

    def on_signal(signum: int, frame: types.FrameType | None) -> None:
        stop.set()

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    handle: RayHandle | None = None
    pool: RelayPool | None = None
    exporter: threading.Thread | None = None
    try:
        if cfg.ray_address:
            init_driver(cfg.ray_address)
        else:
            handle = start_private_head()
            handle.init_driver()
        # ray.init installs its own SIGTERM handler (sys.exit(15)); ours stops cleanly with 0.
        for sig in old:
            signal.signal(sig, on_signal)
        if not stop.is_set():
            pool = RelayPool(cfg)
            infos = pool.start()
            log.info(
                "relay: %d replica(s) listening on port %d (nodes %s; binds %s; pids %s)",
                len(infos),
                pool.port,
                ", ".join(str(i.get("node", "?")) for i in infos),
                "; ".join(",".join(i.get("binds", [])) for i in infos),
                ", ".join(str(i["pid"]) for i in infos),
            )
            if cfg.metrics:
                exporter = _serve_metrics(pool, cfg.metrics, stop)
        while not stop.wait(1.0):
            pass
        if exporter is not None:
            exporter.join(timeout=5)
        if pool is not None:
            with contextlib.suppress(Exception):
                st = pool.stats()
                st.pop("replicas", None)
                log.info("relay: stopping (%s)", st)
    finally:
        if pool is not None:
            pool.stop()
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()
        if handle is not None:
            handle.stop()
        for sig, h in old.items():
            signal.signal(sig, h)
    return 0


def _serve_metrics(pool: RelayPool, listen: str, stop: threading.Event) -> threading.Thread:
    """The pool's Prometheus endpoint (per replica and node) on a thread of its own: the driver's main
    thread only waits for a signal, and a scrape asks the replicas through Ray off the loop."""
    from agent.common.metrics import MetricsServer, parse_listen
    from agent.servers.server_metrics import pool_families

    address = parse_listen(listen)
    bound = threading.Event()
    failure: list[BaseException] = []

    async def serve() -> None:
        loop = asyncio.get_running_loop()

        async def collect() -> list[Any]:
            rows: list[dict[str, Any]] = await loop.run_in_executor(None, pool.replica_stats)
            return pool_families(rows)

        try:
            server = await MetricsServer(address, collect).start()
        except OSError as exc:
            failure.append(exc)
            bound.set()
            return
        bound.set()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.2)
        finally:
            await server.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="relay-metrics", daemon=True)
    thread.start()
    bound.wait(10)
    if failure:
        raise failure[0]
    return thread
