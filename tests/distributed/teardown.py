"""How the distributed test workers end: without finalizing the interpreter.

A rank sometimes died at exit with "terminate called without an active exception" (SIGABRT, in 2 of 5 fresh-clone CI
runs; reproduced here in 2 of 82 runs of the FSDP2 worker). A core dump of such a rank shows why:

- the main thread is in `Py_FinalizeEx`, the worker's Python code done and `destroy_process_group()` called;
- a gloo worker thread (`c10d::ProcessGroupGloo::runLoop`) is destroying a finished collective's work
  (`AsyncAllgatherCoalescedWork`): the caller's `wait()` returns when the work completes, and the thread drops its
  own reference afterwards. It held the last reference to a tensor with a Python object, whose release
  (`TensorImpl::decref_pyobject`) takes the GIL; in a finalizing interpreter CPython 3.11 ends such a thread with
  `pthread_exit`, whose forced unwind crosses the work's noexcept destructor: `std::terminate`.

`destroy_process_group()` does not prevent it when the groups outlive it: with FSDP2, tensor parallelism and
pipeline meshes, DTensor's sharding caches keep the device meshes, hence their gloo groups and worker threads, alive
until the interpreter exits (8 of 16 gloo worker threads of an FSDP2 run were still running after
`destroy_process_group()` and `gc.collect()`), and the 4-bit hook keeps its private groups until exit on purpose
(`deepseekv3.distributed.compression`).

So a worker, its results written and its process groups destroyed, ends with `exit_process`: stdout and stderr are
flushed and the process exits without finalizing the interpreter, so no gloo thread can meet a finalizing one. The
examples that build device meshes or the 4-bit hook (`examples/pipeline_parallel.py`,
`examples/accelerate/train.py`) end the same way.
"""

import os
import sys


def exit_process(status: int = 0) -> None:
    """Flushes stdout and stderr, then ends the process with `status` without finalizing the interpreter."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
