"""A Prometheus endpoint on the event loop that owns the numbers (GET /metrics, text format 0.0.4).

The servers and the agent already keep their counters for `stats()` and `status`; at each scrape
`collect()` turns those into metric families (prometheus_client's types and text encoder), so a
scrape never touches a packet path and needs no thread: the answer is built on the loop, between
two callbacks, from the same dictionaries ops reads. Off unless configured, and a bare port binds
127.0.0.1 only: the numbers name no peer, but an operator decides who may read them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MAX_REQUEST = 8192
READ_TIMEOUT = 5.0
Collect = Callable[[], Awaitable[list[Metric]] | list[Metric]]


def parse_listen(text: str) -> tuple[str, int]:
    """"PORT" (on 127.0.0.1) or "HOST:PORT" / "[V6]:PORT"; ValueError with one line otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"metrics address must be PORT or HOST:PORT, got {text!r}") from None
    if not 1 <= port <= 0xFFFF:
        raise ValueError(f"metrics port must be within 1-65535, got {port}")
    return host, port


def _family(
    kind: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    values: Mapping[str, int | float] | int | float,
    label: str,
) -> Metric:
    family = kind(name, doc, labels=[label] if label else None)
    if isinstance(values, Mapping):
        for key, value in sorted(values.items()):
            family.add_metric([str(key)], float(value))
    else:
        family.add_metric([], float(values))
    return family


def counter(name: str, doc: str, values: Mapping[str, int | float] | int | float, label: str = "") -> Metric:
    """A counter family: one unlabelled value, or one sample per key of `values` under `label`."""
    return _family(CounterMetricFamily, name, doc, values, label)


def gauge(name: str, doc: str, values: Mapping[str, int | float] | int | float, label: str = "") -> Metric:
    return _family(GaugeMetricFamily, name, doc, values, label)


Rows = Iterable[tuple[tuple[str, ...], float]]


def _labelled(kind: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str, doc: str, labels: list[str],
              rows: Rows) -> Metric:
    family = kind(name, doc, labels=labels)
    for key, value in sorted(rows):
        family.add_metric(list(key), float(value))
    return family


def labelled_counter(name: str, doc: str, labels: list[str], rows: Rows) -> Metric:
    """A counter with several labels: one sample per (label values, value) row."""
    return _labelled(CounterMetricFamily, name, doc, labels, rows)


def labelled_gauge(name: str, doc: str, labels: list[str], rows: Rows) -> Metric:
    return _labelled(GaugeMetricFamily, name, doc, labels, rows)


class _Snapshot(Collector):
    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class MetricsServer:
    """`await start()` listens; each GET gets the families `collect()` returns at that moment."""

    def __init__(self, listen: tuple[str, int], collect: Collect) -> None:
        self.listen = listen
        self.collect = collect
        self.scrapes = 0
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> MetricsServer:
        host, port = self.listen
        self._server = await asyncio.start_server(self._serve, host, port)
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def render(self) -> bytes:
        got = self.collect()
        families = await got if isinstance(got, Awaitable) else got
        snapshot = _Snapshot()
        snapshot.families = list(families)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(snapshot)
        return generate_latest(registry)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.0-style: one request, one answer, close. Anything but GET /metrics is a 404/405."""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(line) < 2 or line[0] not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", b"GET /metrics\n"
            elif line[1].split("?", 1)[0] != "/metrics":
                status, body = "404 Not Found", b"GET /metrics\n"
            else:
                self.scrapes += 1
                status, body = "200 OK", await self.render()
            ctype = "text/plain; version=0.0.4; charset=utf-8"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode() + (body if line[:1] != ["HEAD"] else b"")
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        except Exception:  # a collector bug must not take the server down: the scrape fails, logged
            log.exception("metrics: collecting failed")
            with contextlib.suppress(Exception):
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        finally:
            writer.close()
