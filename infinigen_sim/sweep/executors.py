"""Executors: run a picklable function over chunks of items, in this process, a local process pool, or Ray.

One small interface (`Executor.map_chunks`) so the sweep does not care where its points run. Each
chunk is one task (one pickle out, one list of results back), so the per-task cost of a pool or of
Ray is paid once per chunk, not once per item. Results come back as chunks finish, in any order,
tagged with the chunk's index; callers that need an order sort by it. At most `2 * workers` chunks
are in flight, so a million-point sweep is not pickled up front.

Ray is optional (the `dist` extra) and imported only when asked for. Every Ray task checks that the
worker runs the same infinigen_sim code as the driver (`code_fingerprint`), since a node with
another version would return other numbers without any error.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import signal
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

LOCAL_RAY = "local"  # --ray with no address: start a Ray instance on this machine
INSTALL_HINT = "pip install 'infinigen-sim[dist]'"

Chunk = Sequence[Any]
ChunkResult = tuple[int, list[Any]]  # (chunk index, fn applied to each item of the chunk)


class BackendError(RuntimeError):
    """A backend that cannot start, or whose workers run other code; the message is one line."""


class Executor(Protocol):
    """Runs fn over each chunk's items on `workers` workers; yields (chunk index, results) as chunks finish."""

    workers: int
    name: str

    def map_chunks(self, fn: Callable[[Any], Any], chunks: Iterable[Chunk]) -> Iterator[ChunkResult]: ...

    def close(self) -> None: ...

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...


def apply_chunk(fn: Callable[[Any], Any], chunk: Chunk) -> list[Any]:
    """fn over one chunk, in a worker."""
    return [fn(item) for item in chunk]


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def chunk_size(n_items: int, workers: int, largest: int) -> int:
    """About four chunks per worker (so a slow chunk does not leave the others idle), at most `largest`."""
    return max(1, min(largest, math.ceil(n_items / (4 * max(1, workers)))))


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def in_flight(chunks: Iterable[Chunk], limit: int, submit: Callable[[Chunk], Any],
              wait_any: Callable[[Iterable[Any]], Iterable[Any]], result: Callable[[Any], list[Any]],
              running: dict[Any, int]) -> Iterator[ChunkResult]:
    """(chunk index, results) as chunks finish, with at most `limit` submitted and unfinished; `running`
    (handle -> index) is the caller's, so it can cancel what is still in flight when it stops early."""
    todo = enumerate(chunks)
    while True:
        for index, chunk in todo:
            running[submit(chunk)] = index
            if len(running) >= limit:
                break
        if not running:
            return
        for handle in wait_any(running):
            yield running.pop(handle), result(handle)


class _Closing:
    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass


class InlineExecutor(_Closing):
    """Everything in this process, one chunk after another (--jobs 1)."""

    workers = 1
    name = "in-process"

    def map_chunks(self, fn: Callable[[Any], Any], chunks: Iterable[Chunk]) -> Iterator[ChunkResult]:
        for index, chunk in enumerate(chunks):
            yield index, apply_chunk(fn, chunk)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; workers just stop


class PoolExecutor(_Closing):
    """A local process pool of `jobs` workers (--jobs N)."""

    def __init__(self, jobs: int) -> None:
        self.workers = jobs
        self.name = f"local pool, {jobs} processes"
        self._pool = ProcessPoolExecutor(max_workers=jobs, initializer=_ignore_sigint)

    def map_chunks(self, fn: Callable[[Any], Any], chunks: Iterable[Chunk]) -> Iterator[ChunkResult]:
        yield from in_flight(chunks, 2 * self.workers, lambda chunk: self._pool.submit(apply_chunk, fn, chunk),
                             lambda running: wait(running, return_when=FIRST_COMPLETED)[0], Future.result, {})

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """infinigen-sim's version and a hash of its sources: equal on two machines that compute the same numbers."""
    try:
        package_version = version("infinigen-sim")
    except PackageNotFoundError:
        package_version = "unknown"
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]  # every source of infinigen_sim decides the numbers
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{package_version}+{digest.hexdigest()[:12]}"


class CodeMismatchError(RuntimeError):
    """A Ray worker whose infinigen_sim differs from the driver's."""


def _checked_apply(fn: Callable[[Any], Any], chunk: Chunk, driver_code: str) -> list[Any]:
    """apply_chunk on a Ray worker, after checking it runs the driver's code."""
    worker_code = code_fingerprint()
    if worker_code != driver_code:
        raise CodeMismatchError(f"--ray: a worker on {socket.gethostname()} runs infinigen-sim {worker_code}, "
                                f"this machine {driver_code}; install the same version on every node")
    return apply_chunk(fn, chunk)


class RayExecutor(_Closing):
    """Ray tasks, one per chunk: a new local instance (address LOCAL_RAY) or the cluster at `address`."""

    def __init__(self, address: str = LOCAL_RAY, num_cpus: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise BackendError(f"--ray: ray is not installed; {INSTALL_HINT}") from None
        self._ray = ray
        self._owns = not ray.is_initialized()  # a caller's own ray.init() is left running
        if self._owns:
            self._connect(address, num_cpus)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        where = "local Ray" if address == LOCAL_RAY else f"Ray at {address}"
        self.name = f"{where}, {self.workers} CPUs"
        self._task = ray.remote(num_cpus=1, max_retries=2)(_checked_apply)

    def _connect(self, address: str, num_cpus: int | None) -> None:
        quiet: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        _check_reachable(address)
        try:
            if address == LOCAL_RAY:
                self._ray.init(address="local", num_cpus=num_cpus or available_cpus(), include_dashboard=False,
                               **quiet)
            else:
                self._ray.init(address=address, **quiet)
        except Exception as exc:  # Ray raises ConnectionError, ValueError, RuntimeError, ... for a bad address
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BackendError(f"--ray {address}: cannot start or reach Ray ({first})") from None

    def map_chunks(self, fn: Callable[[Any], Any], chunks: Iterable[Chunk]) -> Iterator[ChunkResult]:
        ray, driver_code = self._ray, code_fingerprint()
        running: dict[Any, int] = {}
        try:
            yield from in_flight(chunks, 2 * self.workers, lambda chunk: self._task.remote(fn, chunk, driver_code),
                                 lambda refs: ray.wait(list(refs), num_returns=1)[0], self._get, running)
        finally:
            if running and ray.is_initialized():  # stopped early (Ctrl-C, an error): free the cluster
                for ref in running:
                    ray.cancel(ref)

    def _get(self, ref: Any) -> list[Any]:
        try:
            return self._ray.get(ref)
        except self._ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, CodeMismatchError):
                raise BackendError(str(cause)) from None
            if isinstance(cause, ModuleNotFoundError) and (cause.name or "").startswith("infinigen_sim"):
                raise BackendError(f"--ray: a worker cannot import {cause.name}; install infinigen-sim "
                                   f"{code_fingerprint().partition('+')[0]} on every node") from None
            raise

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT or ray://HOST:PORT nobody listens on (Ray itself retries for ever)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # 'auto', 'local' and the like: Ray resolves and reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise BackendError(f"--ray {address}: cannot reach {host}:{port} ({exc.strerror or exc}); "
                           f"is 'ray start --head' running there?") from None


def make_executor(jobs: int = 1, ray_address: str | None = None) -> Executor:
    """Ray when an address (or LOCAL_RAY) is given, with --jobs capping a local instance's CPUs;
    otherwise a process pool of `jobs`, or this process alone for jobs=1."""
    if ray_address is not None:
        return RayExecutor(ray_address, num_cpus=jobs if jobs > 1 else None)
    return PoolExecutor(jobs) if jobs > 1 else InlineExecutor()
