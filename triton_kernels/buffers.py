"""Device buffers that outlive a launch (descriptor scratch, ticket counters), kept out of CUDA
graphs' memory pools."""
from __future__ import annotations

import threading

import torch
import triton

_SCRATCH: dict = {}
_SIDE_STREAMS: dict = {}
_COUNTERS: dict = {}


def persistent_buffer(make, device):
    """A device buffer that outlives the call that makes it (scratch, ticket counters), made so
    that CUDA graphs never own it. Inside a capture nothing persistent may be allocated: the
    caller gets ``None`` and makes a buffer for that launch alone (the graph keeps it). Outside,
    the buffer is made by a short-lived thread on a side stream: torch's cudagraph trees route
    every allocation of the warming-up thread to their pool, whatever its stream, and refuse a
    pool tensor that outlives the graph's outputs; another thread's allocations stay out of it."""
    if device.type != "cuda":
        return make()
    if torch.cuda.is_current_stream_capturing():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    side = _SIDE_STREAMS.get(index)
    if side is None:
        side = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    caller = torch.cuda.current_stream(index)
    made = {}

    def work():
        try:
            with torch.cuda.device(index):
                side.wait_stream(caller)  # a reused block is written only after the caller's work so far
                with torch.cuda.stream(side):
                    made["buf"] = make()
                side.synchronize()  # once per buffer: its contents are ready before any launch reads them
        except BaseException as exc:  # raised again in the caller's thread
            made["error"] = exc

    worker = threading.Thread(target=work, name="fusedpeft-buffer")
    worker.start()
    worker.join()
    if "error" in made:
        raise made["error"]
    return made["buf"]


def cached_buffer(cache: dict, key, numel: int, make, device):
    """cache[key] when it holds at least ``numel`` elements, else a new persistent_buffer from
    ``make`` kept there; inside a CUDA-graph capture, ``make()`` for that launch alone, not kept."""
    buf = cache.get(key)
    if buf is not None and buf.numel() >= numel:
        return buf
    buf = persistent_buffer(make, device)
    if buf is None:
        return make()
    cache[key] = buf
    return buf


def _alloc(size: int, alignment: int, stream):
    # Device-side tensor descriptors need a small global scratch buffer per launch (the kernel
    # writes its descriptors there and reads them back). Launches on one stream run in order, so
    # one buffer per stream serves them all: no allocation per launch.
    return cached_buffer(_SCRATCH, stream, size,
                         lambda: torch.empty(max(size, 1 << 16), dtype=torch.int8, device="cuda"), torch.device("cuda"))


_allocator_threads = threading.local()


def ensure_allocator():
    # Triton keeps the allocator per thread, and autograd runs CUDA backward passes on its own
    # worker thread: set it once in every thread that launches.
    if not getattr(_allocator_threads, "set", False):
        triton.set_allocator(_alloc)
        _allocator_threads.set = True



def ticket_counters(n: int, device) -> torch.Tensor:
    """At least n int32 zeros for the ticket counters of the single-launch split reductions
    (lowrank_weight_grad_kernel). The kernel's last program per block resets its counter to zero,
    so one buffer per (device, stream) serves every launch on that stream, in stream order."""
    stream = None if device.type != "cuda" else current_stream(device.index if device.index is not None else torch.cuda.current_device())
    return cached_buffer(_COUNTERS, (device, stream), n,
                         lambda: torch.zeros(max(n, 1024), dtype=torch.int32, device=device), device)


_current_stream = None


def current_stream(device: int):
    """Triton's handle of the device's current stream (what its launches run on)."""
    global _current_stream
    if _current_stream is None:
        _current_stream = triton.runtime.driver.active.get_current_stream
    return _current_stream(device)
