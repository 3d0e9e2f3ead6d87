"""The Triton backend's whole host path on a machine without a GPU: Triton's launch path for a Hopper GPU,
with launches that do nothing.

Inside ``null_gpu()``, the ``triton`` and ``triton_split`` ops run their launchers on CPU tensors (outside
Triton's interpreter), and Triton compiles each kernel for ``sm_90`` with its own binder, specialization and
caches, as it would for a CUDA tensor, through a stand-in driver whose launcher does nothing (or records
what it was handed). The GEMMs and other ATen calls run on the CPU; on a tiny layer they take a microsecond
or two. What is left is what the host does for a call on a GPU, less the CUDA driver's own launch work
(a few microseconds a kernel), so ``benchmarks.host_time --null-gpu`` times it, and the tests check with it
that a kept kernel is launched with exactly the arguments Triton's own path gives it.

No output is computed: the tensors the kernels would write keep whatever they held.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, List, NamedTuple, Optional

import torch

from .gpu_model.launches import _StandInDriver

MULTIPROCESSORS = 132  # the H200's, as benchmarks.gpu_model sizes the persistent grids


class Function:
    """A loaded kernel's handle: compared by identity, named for reading."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"<kernel {self.name} at {id(self):#x}>"


class Launch(NamedTuple):
    """What a launcher was handed: the grid, the kernel's function handle, and the kernel's arguments."""

    grid: tuple
    function: Function
    args: tuple
    hooks: tuple            # the launch-enter and launch-exit hooks it was handed, and the launch metadata


class _Utils:
    def __init__(self, capability: int):
        self.capability = capability

    def load_binary(self, name, kernel, shared, device):
        # (module, function, registers, spills, max threads a block): a handle of its own per loaded kernel.
        return object(), Function(name), 0, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448 if self.capability >= 90 else 166912,
                "multiprocessor_count": MULTIPROCESSORS, "max_num_regs": 65536, "warpSize": 32}

    def unload_module(self, module):
        pass


class NullDriver(_StandInDriver):
    """A CUDA target whose kernels load and launch without a device: each launch is appended to
    ``launches`` when it is a list, and the autotuner's timing runs all report the same time."""

    def __init__(self, capability: int = 90, launches: Optional[List[Launch]] = None):
        super().__init__(capability)
        self.utils = _Utils(capability)
        self.launches = launches

    def launcher_cls(self, src, metadata):
        record = self.launches

        def launch(grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
                   exit_hook, *args):
            if record is not None:
                record.append(Launch((grid_0, grid_1, grid_2), function, args,
                                     (enter_hook, exit_hook, launch_metadata)))

        return launch

    def get_benchmarker(self):
        def bench(fn, quantiles=None, **_):
            fn()
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench


@contextlib.contextmanager
def null_gpu(capability: int = 90, launches: Optional[List[Launch]] = None) -> Iterator[NullDriver]:
    """Within the block the Triton backend runs its launchers on CPU tensors, compiled for ``sm_<capability>``
    and launched through ``NullDriver``. Needs TRITON_INTERPRET unset when ``kernels.triton`` is imported."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: null_gpu compiles the kernels for a GPU")
    import kernels
    from kernels import dispatch, ops
    from kernels.ops import namespace
    from kernels.triton import common, forward, registration
    from triton.runtime.driver import driver

    kernels.available_backends()  # loads the triton backend (registers its ops) before they are overridden
    previous = driver._active
    stand_ins = (common.STAND_IN_CUDA, forward.STAND_IN_MULTIPROCESSORS, dispatch.BACKENDS["triton"].supports)
    null = NullDriver(capability, launches)
    driver.set_active(null)
    common.STAND_IN_CUDA, forward.STAND_IN_MULTIPROCESSORS = True, MULTIPROCESSORS
    dispatch.BACKENDS["triton"].supports = lambda device, dtype: None
    dispatch._resolved.clear()
    libraries = []
    direct = {}
    try:
        for implementation, launchers in registration.LAUNCHERS.items():
            library = torch.library.Library(namespace(implementation), "IMPL")
            for name, launcher in launchers.items():
                library.impl(name, launcher, "CPU", allow_override=True)
                op = getattr(getattr(torch.ops, namespace(implementation)), name).default
                direct[op] = ops.DIRECT[op]["cpu"]
                ops.DIRECT[op]["cpu"] = launcher
            libraries.append(library)
        yield null
    finally:
        for library in libraries:
            library._destroy()
        for op, function in direct.items():
            ops.DIRECT[op]["cpu"] = function
        common.STAND_IN_CUDA, forward.STAND_IN_MULTIPROCESSORS, dispatch.BACKENDS["triton"].supports = stand_ins
        dispatch._resolved.clear()
        driver._active = previous
