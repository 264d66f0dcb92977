"""A stand-in for CUDA on CPU tensors that enforces the rules of streams and events (test-only).

`fake_cuda()` installs it: `profiler.runtime.cuda_api.CUDA` then forwards to `FakeCuda` (streams, events,
synchronize, generators ...) and a TorchFunctionMode, `DeviceEmulator`, pushed on the calling thread and on
every copy-worker thread the runtime starts, makes CPU tensors play device memory. Factories and `.to()`
asked for `cuda` allocate on the CPU and remember the storage as device memory, which then reports
`device == cuda:0` and `is_cuda`; `pin_memory=True` remembers pinned host memory (`is_pinned()`). Every op
runs at once, so values are exact, but it is *accounted* where a GPU would run it:

  executor   an op on device tensors runs on its thread's current stream, one on host tensors on the host;
             a host<->device copy runs on the current stream and returns to the host only once done, unless
             non_blocking=True and its host side is pinned (CUDA's rule; a pageable source is staged at once)
  clocks     each stream counts its ops and keeps a vector clock: how many ops of every stream are known
             finished before its next op (its own in order, others' through wait_event / wait_stream); the
             host keeps one too, raised only by Event.synchronize, Stream.synchronize, synchronize() and
             blocking copies. An event is complete for the host once the host clock covers its record.
  rules      elapsed_time of events not both recorded and complete raises as torch does ("Both events must
             be completed before calculating elapsed time."); an access to bytes another stream's op touched
             (one of the two a write) that the accessor's clock does not order after it raises CudaRaceError:
             a host write into pinned memory an in-flight H2D may still read, a host read of pinned memory a
             D2H may still write, a kernel reading device memory its copy may still write, a copy into a
             buffer a kernel may still read; device and host tensors in one op (other than copies, indexing
             and 0-d host scalars) raise as CUDA does, and so does a host generator for a device tensor;
             with `strict_blocking`, Event.synchronize of an event made without blocking=True raises (a
             spinning host wait takes a core from the thread that queues the kernels).

Host accesses are never recorded: the host runs them to completion before it queues anything later. One
host clock serves every host thread (a thread that learns of a completion through a Future is not told
apart). Byte ranges are exact for views and for the rows index_copy_ / index_select touch along dim 0.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from profiler.runtime import transfer
from profiler.runtime.cuda_api import CUDA

HOST = "host"
MAX_ROWS = 4096  # index_copy_ / index_select of more rows than this count as touching the whole tensor
DEVICE, PINNED = "device", "pinned"
FAKE_DEVICE = torch.device("cuda", 0)
READS_TO_HOST = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "__array__",
                 "equal", "allclose", "__repr__", "__format__", "__str__"}
NOT_DATA_INPLACE = {"requires_grad_", "share_memory_", "retain_grad", "record_stream", "resize_"}
INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}


class CudaRaceError(AssertionError):
    """An access CUDA would not order: the test that made it fails."""


@dataclass
class Access:
    executor: str
    seq: int
    lo: int
    hi: int
    write: bool


@dataclass
class Buffer:
    kind: str  # DEVICE or PINNED (pageable host memory has no entry)
    nbytes: int
    accesses: list[Access] = field(default_factory=list)


class FakeStream(torch.Stream):
    """A stream: its op count and what it knows of the others (a torch.Stream so record_stream accepts it)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> FakeStream:
        return super().__new__(cls, device="cpu")

    def __init__(self, cuda: FakeCuda, device: Any = None, priority: int = 0, name: str = "") -> None:
        self.cuda = cuda
        self.id = name or f"stream{len(cuda.streams)}"
        self.count = 0
        self.known: dict[str, int] = {}
        cuda.streams[self.id] = self

    def clock(self) -> dict[str, int]:
        return {**self.known, self.id: self.count}

    def next_seq(self) -> int:
        self.count += 1
        return self.count

    def wait_event(self, event: FakeEvent) -> None:
        with self.cuda.lock:
            if event.recorded is not None:
                _merge(self.known, event.recorded)

    def wait_stream(self, stream: FakeStream) -> None:
        with self.cuda.lock:
            _merge(self.known, stream.clock())

    def record_event(self, event: FakeEvent | None = None) -> FakeEvent:
        event = event or FakeEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        self.cuda.host_sync(self.clock(), "Stream.synchronize")

    def query(self) -> bool:
        return self.cuda.covered(self.clock())

    def __enter__(self) -> FakeStream:  # `with stream:` as torch allows
        self._ctx = self.cuda.stream(self)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    def __repr__(self) -> str:
        return f"<FakeStream {self.id}>"


class FakeEvent:
    """An event: the stream clock at its record, a host timestamp for elapsed_time."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False) -> None:
        self.enable_timing, self.blocking = enable_timing, blocking
        self.recorded: dict[str, int] | None = None
        self.stamp_s = 0.0

    def record(self, stream: FakeStream | None = None) -> None:
        cuda = _ACTIVE.cuda
        with cuda.lock:
            stream = stream or cuda.current_stream()
            self.recorded = stream.clock()
            self.stamp_s = time.perf_counter()

    def wait(self, stream: FakeStream | None = None) -> None:
        (stream or _ACTIVE.cuda.current_stream()).wait_event(self)

    def query(self) -> bool:
        return self.recorded is None or _ACTIVE.cuda.covered(self.recorded)

    def synchronize(self) -> None:
        cuda = _ACTIVE.cuda
        if cuda.strict_blocking and not self.blocking:
            cuda.fail("Event.synchronize() on an event made without blocking=True: the host thread spins on a "
                      "core instead of sleeping")
        if self.recorded is not None:
            cuda.host_sync(self.recorded, "Event.synchronize")

    def elapsed_time(self, end: FakeEvent) -> float:
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self.recorded is None or end.recorded is None:
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if not (self.query() and end.query()):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        return (end.stamp_s - self.stamp_s) * 1e3


def _merge(into: dict[str, int], other: dict[str, int]) -> None:
    for key, seq in other.items():
        if into.get(key, 0) < seq:
            into[key] = seq


class FakeCuda:
    """What `CUDA` forwards to while the stand-in is installed; owns the clocks and the buffer table."""

    def __init__(self, strict_blocking: bool = True) -> None:
        self.lock = threading.RLock()
        self.strict_blocking = strict_blocking
        self.streams: dict[str, FakeStream] = {}
        self.default = FakeStream(self, name="default")
        self.host: dict[str, int] = {}  # the host clock
        self.buffers: dict[int, Buffer] = {}  # storage data_ptr -> device or pinned memory
        self.generators: dict[int, torch.Generator] = {}  # id -> device generator (kept alive here)
        self.local = threading.local()
        self.host_syncs: list[tuple[str, str]] = []  # (thread, what) of every sync that waited for the device
        self.pinned_allocations: list[int] = []  # bytes of every pinned allocation, in order
        self.copies: list[tuple[str, int, torch.dtype]] = []  # (h2d | d2h | d2d, bytes, dtype) of every copy
        self.errors: list[str] = []
        self.Stream = lambda device=None, priority=0: FakeStream(self, device, priority)
        self.Event = FakeEvent

    # -- torch.cuda's surface -------------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def current_stream(self, device: Any = None) -> FakeStream:
        return getattr(self.local, "stream", None) or self.default

    def default_stream(self, device: Any = None) -> FakeStream:
        return self.default

    @contextlib.contextmanager
    def stream(self, stream: FakeStream | None) -> Iterator[None]:
        if stream is None:  # torch.cuda.stream(None) is a no-op
            yield
            return
        before = getattr(self.local, "stream", None)
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = before

    def synchronize(self, device: Any = None) -> None:
        with self.lock:
            every: dict[str, int] = {}
            for stream in self.streams.values():
                _merge(every, stream.clock())
        self.host_sync(every, "synchronize")

    def empty_cache(self) -> None:
        pass

    def empty_host_cache(self) -> None:
        pass

    def get_device_properties(self, device: Any = None) -> SimpleNamespace:
        return SimpleNamespace(name="CUDA stand-in (CPU)", total_memory=8 << 30, L2_cache_size=4 << 20,
                               multi_processor_count=1, major=9, minor=0, uuid="GPU-00000000-stand-in")

    def generator(self, device: torch.device, seed: int) -> torch.Generator:
        gen = torch.Generator().manual_seed(seed)
        self.generators[id(gen)] = gen
        return gen

    # -- clocks ---------------------------------------------------------------------------------
    def covered(self, clock: dict[str, int]) -> bool:
        with self.lock:
            return all(self.host.get(key, 0) >= seq for key, seq in clock.items())

    def host_sync(self, clock: dict[str, int], what: str) -> None:
        with self.lock:
            if not self.covered(clock):
                self.host_syncs.append((threading.current_thread().name, what))
            _merge(self.host, clock)

    def fail(self, message: str) -> None:
        self.errors.append(message)
        raise CudaRaceError(message)

    def clock_of(self, executor: str) -> dict[str, int]:
        return self.host if executor == HOST else self.streams[executor].clock()

    # -- memory ---------------------------------------------------------------------------------
    def kind(self, t: torch.Tensor) -> str | None:
        if t.device.type != "cpu" or t.numel() == 0:
            return None
        buf = self.buffers.get(t.untyped_storage().data_ptr())
        return buf.kind if buf else None

    def is_device(self, t: torch.Tensor) -> bool:
        return self.kind(t) == DEVICE

    def register(self, t: torch.Tensor, kind: str | None) -> None:
        """A fresh allocation: forget what its addresses held before."""
        if t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if kind is None:
            self.buffers.pop(ptr, None)
            return
        self.buffers[ptr] = Buffer(kind, storage.nbytes())
        if kind == PINNED:
            self.pinned_allocations.append(storage.nbytes())

    def access(self, executor: str, t: torch.Tensor, write: bool, ranges: list[tuple[int, int]] | None = None,
               what: str = "") -> None:
        """Check an access by `executor` to t's bytes against other executors' pending ones; record it."""
        if t.device.type != "cpu" or t.numel() == 0:
            return
        buf = self.buffers.get(t.untyped_storage().data_ptr())
        if buf is None:
            return  # pageable host memory: only the host touches it
        ranges = ranges or [extent(t)]
        clock = self.clock_of(executor)
        kept = []
        for acc in buf.accesses:
            if self.host.get(acc.executor, 0) >= acc.seq:
                continue  # finished for the host, so ordered before anything queued from now on
            kept.append(acc)
            if acc.executor == executor or not (write or acc.write):
                continue
            if clock.get(acc.executor, 0) < acc.seq and any(lo < acc.hi and acc.lo < hi for lo, hi in ranges):
                verb, theirs = ("writes" if write else "reads"), ("writes" if acc.write else "reads")
                self.fail(f"{what or 'an op'} on {executor} {verb} {buf.kind} memory that {acc.executor} still "
                          f"{theirs} (op {acc.seq} there; {executor} has waited for {clock.get(acc.executor, 0)})")
        buf.accesses = kept
        if executor != HOST:
            seq = self.streams[executor].count
            buf.accesses += [Access(executor, seq, lo, hi, write) for lo, hi in ranges]


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors in args / kwargs / results: nested tuples, lists and dict values."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_in(item)]
    return []


def extent(t: torch.Tensor) -> tuple[int, int]:
    """Absolute byte range [lo, hi) a (possibly strided) view spans."""
    es = t.element_size()
    base = t.untyped_storage().data_ptr() + t.storage_offset() * es
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return base, base + span * es


def row_ranges(t: torch.Tensor, rows: torch.Tensor) -> list[tuple[int, int]] | None:
    """Byte ranges of rows `rows` along dim 0 of t (None, the whole of t, for more than MAX_ROWS rows)."""
    if rows.numel() > MAX_ROWS:
        return None
    es = t.element_size()
    lo0, _ = extent(t[0:1])
    _, hi0 = extent(t[0:1])
    stride = t.stride(0) * es
    out: list[tuple[int, int]] = []
    for r in sorted(set(rows.reshape(-1).tolist())):
        lo, hi = lo0 + r * stride, hi0 + r * stride
        if out and out[-1][1] >= lo:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


_ACTIVE = SimpleNamespace(cuda=None)  # the installed FakeCuda: events reach it from any thread


class DeviceEmulator(TorchFunctionMode):
    """Every torch call while installed: CPU tensors playing device and pinned memory, each op accounted."""

    def __init__(self, cuda: FakeCuda) -> None:
        super().__init__()
        self.cuda = cuda

    def enter_thread(self) -> None:
        """ThreadPoolExecutor initializer: the mode is per thread, so push it on each worker too."""
        self.__enter__()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        with self.cuda.lock:
            return self.handle(func, args, kwargs)

    def handle(self, func, args, kwargs):
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        cuda = self.cuda
        if name == "__get__" and owner is torch.Tensor.device:
            return FAKE_DEVICE if cuda.is_device(args[0]) else func(*args)
        if name == "__get__" and owner is torch.Tensor.is_cuda:
            return cuda.is_device(args[0])
        if name in ("__get__", "__set__"):
            return func(*args, **kwargs)  # shape, dtype, .data (=): metadata
        if name == "is_pinned":
            return cuda.kind(args[0]) == PINNED
        if name == "record_stream":
            if not (isinstance(args[1], FakeStream) and cuda.is_device(args[0])):
                raise RuntimeError("record_stream: expected a device tensor and a stream")
            return None
        if name in ("to", "cuda", "cpu", "pin_memory"):
            return self.move(func, name, args, kwargs)
        if name == "copy_":
            return self.copy(func, args, kwargs)
        if "device" in kwargs or kwargs.get("pin_memory"):
            return self.factory(func, args, kwargs)
        return self.op(func, name, args, kwargs)

    # -- helpers ----------------------------------------------------------------------------------
    def stream_op(self) -> str:
        stream = self.cuda.current_stream()
        stream.next_seq()
        return stream.id

    def check_generator(self, gen: Any, on_device: bool) -> None:
        if gen is None:
            return
        is_device = id(gen) in self.cuda.generators
        if is_device != on_device:
            want, got = ("cuda", "cpu") if on_device else ("cpu", "cuda")
            raise RuntimeError(f"Expected a '{want}' device type for generator but found '{got}'")

    def fresh(self, result: Any, inputs: list[torch.Tensor], executor: str, kind: str | None) -> None:
        """Register the op's new tensors (those sharing no input's storage) and their writes."""
        ptrs = {t.untyped_storage().data_ptr() for t in inputs if t.device.type == "cpu"}
        for r in tensors_in(result):
            if not isinstance(r, torch.Tensor) or r.device.type != "cpu" or r.untyped_storage().data_ptr() in ptrs:
                continue
            self.cuda.register(r, kind)
            if executor != HOST:
                self.cuda.access(executor, r, True, what="a new tensor")

    def factory(self, func, args, kwargs):
        device = kwargs.get("device")
        on_device = device is not None and torch.device(device).type == "cuda"
        if on_device:
            kwargs["device"] = "cpu"
        pinned = bool(kwargs.pop("pin_memory", False))
        if pinned and on_device:
            raise RuntimeError("pin_memory=True is for host tensors")
        self.check_generator(kwargs.get("generator"), on_device)
        inputs = tensors_in(args)
        executor = self.stream_op() if on_device else HOST
        result = func(*args, **kwargs)
        self.fresh(result, inputs, executor, DEVICE if on_device else PINNED if pinned else None)
        return result

    def op(self, func, name, args, kwargs):
        cuda = self.cuda
        tensors = tensors_in((args, kwargs))
        result = func(*args, **kwargs)
        if name not in READS_TO_HOST and name != "__setitem__" and not any(
                isinstance(r, torch.Tensor) for r in tensors_in(result)):
            return result  # metadata: sizes, strides, data_ptr ...
        on_device = [t for t in tensors if cuda.is_device(t)]
        if name in READS_TO_HOST:
            self.read_to_host(tensors, name)
            return result
        if on_device and name not in INDEXING and any(
                not cuda.is_device(t) and t.dim() > 0 and t.device.type == "cpu" for t in tensors):
            raise RuntimeError("Expected all tensors to be on the same device, but found at least two devices, "
                               f"cuda:0 and cpu! (in {name})")
        self.check_generator(kwargs.get("generator"), bool(on_device))
        written = self.written(name, args, kwargs)
        ptrs = {t.untyped_storage().data_ptr() for t in tensors if t.device.type == "cpu"}
        if not written and all(r.untyped_storage().data_ptr() in ptrs for r in tensors_in(result)
                               if isinstance(r, torch.Tensor) and r.device.type == "cpu"):
            return result  # a view (slice, transpose, reshape ...): no data moves
        executor = self.stream_op() if on_device else HOST
        for t, ranges in written:
            cuda.access(executor, t, True, ranges, what=name)
        for t in tensors:
            if not any(t is w for w, _ in written):
                cuda.access(executor, t, False, self.read_ranges(name, t, args), what=name)
        self.fresh(result, tensors, executor, DEVICE if on_device else None)
        return result

    def written(self, name: str, args, kwargs) -> list[tuple[torch.Tensor, list | None]]:
        out = [(t, None) for t in tensors_in(kwargs.get("out"))]
        if name == "__setitem__":
            view = args[0][args[1]]
            shared = view.numel() and view.untyped_storage().data_ptr() == args[0].untyped_storage().data_ptr()
            out.append((args[0], [extent(view)] if shared else None))
        elif name == "index_copy_" and args[1] == 0:
            out.append((args[0], row_ranges(args[0], args[2])))  # the runtime's scattered row writes
        elif (name.endswith("_") and not name.startswith("_") and name not in NOT_DATA_INPLACE) or \
                name.startswith("__i"):
            first = tensors_in((args, kwargs))[0]
            out.append((first, None))  # the tensor written in place (torch.nn.init passes it by keyword)
        return out

    def read_ranges(self, name: str, t: torch.Tensor, args) -> list | None:
        if name == "index_select" and t is args[0] and args[1] == 0:
            return row_ranges(t, args[2])
        return None

    def read_to_host(self, tensors: list[torch.Tensor], name: str) -> None:
        """`item`, `float()`, `tolist()` ...: the host reads the values (a device one copies and waits)."""
        cuda = self.cuda
        for t in tensors:
            if cuda.is_device(t):
                executor = self.stream_op()
                cuda.access(executor, t, False, what=name)
                cuda.host_sync(cuda.clock_of(executor), f"{name} of a device tensor")
            else:
                cuda.access(HOST, t, False, what=name)

    # -- copies -----------------------------------------------------------------------------------
    def transfer(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool, what: str) -> None:
        """Account a copy src -> dst whose ends may be device or host memory (values copied by the caller)."""
        cuda = self.cuda
        d, s = cuda.is_device(dst), cuda.is_device(src)
        if not d and not s:
            cuda.access(HOST, src, False, what=what)
            cuda.access(HOST, dst, True, what=what)
            return
        executor = self.stream_op()
        cuda.copies.append(("d2d" if d and s else "h2d" if d else "d2h", dst.numel() * dst.element_size(), dst.dtype))
        host_side = None if d and s else (src if d else dst)
        async_host = host_side is None or (non_blocking and cuda.kind(host_side) == PINNED)
        if host_side is src and not async_host and non_blocking:  # pageable source: staged at once
            cuda.access(HOST, src, False, what=what)
        else:
            cuda.access(executor, src, False, what=what)
        cuda.access(executor, dst, True, what=what)
        if not async_host and not (host_side is src and non_blocking):
            cuda.host_sync(cuda.clock_of(executor), f"blocking {what}")

    def copy(self, func, args, kwargs):
        dst, src = args[0], args[1]
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        result = func(*args, **kwargs)
        self.transfer(dst, src, non_blocking, "copy_")
        return result

    def move(self, func, name, args, kwargs):
        """`.to()`, `.cuda()`, `.cpu()`, `.pin_memory()` of args[0]."""
        cuda, src = self.cuda, args[0]
        src_device = cuda.is_device(src)
        non_blocking = bool(kwargs.get("non_blocking", False))
        dtype, copy = None, bool(kwargs.get("copy", False))
        if name == "to":
            if len(args) > 1 and isinstance(args[1], torch.Tensor):
                to_device, dtype = cuda.is_device(args[1]), args[1].dtype
            else:
                device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
                to_device = src_device if device is None else device.type == "cuda"
        else:
            to_device = name == "cuda"
        if name == "pin_memory":
            result = src.clone()
            cuda.register(result, PINNED)
            self.transfer(result, src, False, name)
            return result
        dtype = dtype or src.dtype
        if to_device == src_device and not copy and dtype == src.dtype:
            return src
        result = src.to(dtype=dtype, copy=True)
        if to_device == src_device:
            self.fresh(result, [src], self.stream_op() if src_device else HOST, DEVICE if src_device else None)
            return result
        cuda.register(result, DEVICE if to_device else None)
        self.transfer(result, src, non_blocking, f".{name}()")
        return result


@contextlib.contextmanager
def fake_cuda(strict_blocking: bool = True) -> Iterator[FakeCuda]:
    """Install the stand-in: CUDA forwards to a FakeCuda, the emulator runs on this and every copy-worker thread."""
    cuda = FakeCuda(strict_blocking)
    mode = DeviceEmulator(cuda)
    before, executor = CUDA.backend, transfer.ThreadPoolExecutor
    CUDA.backend, _ACTIVE.cuda = cuda, cuda
    transfer.ThreadPoolExecutor = lambda *a, **kw: executor(*a, initializer=mode.enter_thread, **kw)
    try:
        with mode:
            yield cuda
    finally:
        transfer.ThreadPoolExecutor = executor
        CUDA.backend, _ACTIVE.cuda = before, None
