"""Pre-bound Triton launches (issue 22 part 2): every launcher in fastbert/triton calls

    launch(kernel, grid, *args, **kwargs)      # instead of kernel[grid](*args, **kwargs)

`kernel[grid](...)` goes through JITFunction.run on every call: it binds the arguments, builds
Triton's specialisation key, formats the options into a string, looks the compiled kernel up and
checks the kernel's globals (tens of host microseconds). Here the first call of a specialisation
bucket takes that ordinary path, which compiles (and autotunes) and returns the CompiledKernel;
later calls in the bucket launch that kernel directly, exactly as JITFunction.run's last line
does (triton 3.6 and 3.9 share it): `compiled.run(grid_x, grid_y, grid_z, stream,
compiled.function, compiled.packed_metadata, launch_metadata, launch_enter_hook,
launch_exit_hook, *every_argument_in_signature_order)`, so launch hooks (profilers) still fire.

The bucket key holds everything Triton specialises a compiled kernel on, plus what the autotuner
picks a config by: the current device; per tensor argument its dtype and whether its address is
16-byte aligned; per int argument whether it is 1, divisible by 16, and which of int32 / int64 /
uint64 it fits; float, bool and None arguments by kind; constexpr arguments, options (num_warps,
num_stages, ...) and the autotuner's key arguments by value. The key may split a bucket Triton
would not (that only costs one more ordinary call), never the reverse.

Besides the binding and the lookup, the direct launch skips JITFunction.run's check that the
globals a kernel read at compile time are unchanged (fastbert's kernels read module constants
only) and its pre-run hooks (a kernel with any keeps the ordinary launch).

The ordinary launch is kept, always, under TRITON_INTERPRET=1 (so the interpreter tier runs the
kernels through Triton), with FASTBERT_PREBOUND=0 in the environment at import or `enabled =
False`, for kernels with pre-run hooks or configs with pre-hooks, and for arguments of any other
type. If a direct launch raises before it has once succeeded for that kernel, the kernel goes
back to the ordinary path for good, with a warning.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Dict, Optional

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Triton before 3.9 (3.6 is what the GPU machines have) ships an older LLVM and ptxas whose
# register allocation spills some tiles 3.9 compiles spill-free: launchers pick others there.
TRITON_BEFORE_3_9 = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 9)
ENV_SWITCH = "FASTBERT_PREBOUND"
enabled = not INTERPRET and os.environ.get(ENV_SWITCH, "1") != "0"

_MISSING = object()
_INT32 = 2**31
_INT64 = 2**63


class _Unkeyed(Exception):
    """An argument whose specialisation the key does not model: take the ordinary launch."""


def _runtime_spec(value) -> Any:
    """What Triton specialises a non-constexpr argument on (more is harmless, less is not)."""
    cls = type(value)
    if cls is int:
        # divisible by 16, fits int32, fits int64 (else uint64), is 1 (Triton compiles a 1 in
        # as a constant): one small int, no tuple
        return ((value & 15 == 0) + 2 * (-_INT32 <= value < _INT32) + 4 * (value < _INT64)
                + 8 * (value == 1))
    if cls is torch.Tensor or cls is torch.nn.Parameter or isinstance(value, torch.Tensor):
        return value.dtype, not value.data_ptr() & 15
    if value is None or cls is bool or cls is float:
        return cls
    raise _Unkeyed(cls.__name__)


class _Binding:
    """One kernel's launch facts, gathered once: its JITFunction's parameter names in
    signature order and a binder that keys a call (constexprs and the autotuner's keys by
    value), the compiled kernels per bucket, and whether the direct launch has worked yet."""

    def __init__(self, kernel):
        self.kernel = kernel  # keeps id(kernel) from being reused while cached
        jit = kernel.fn if isinstance(kernel, Autotuner) else kernel
        self.ordinary = not isinstance(jit, JITFunction) or bool(getattr(jit, "pre_run_hooks", ()))
        if isinstance(kernel, Autotuner) and any(c.pre_hook for c in kernel.configs):
            self.ordinary = True
        params = list(jit.signature.parameters.values()) if isinstance(jit, JITFunction) else []
        self.names = [p.name for p in params]
        tuned = set(kernel.keys) if isinstance(kernel, Autotuner) else set()
        # arguments keyed by their value: constexprs and the autotuner's keys
        by_value = [kp.is_constexpr or kp.name in tuned for kp in jit.params] if params else []
        defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self.bind = _make_binder(self.names, by_value, defaults)
        self.compiled: Dict[tuple, tuple] = {}
        self.verified = False


def _make_binder(names, by_value, defaults):
    """bind(*args, **kwargs) -> (the arguments in signature order, the bucket key without the
    device): a function with the kernel's parameters, written once per kernel as Triton writes
    its own binder, so a launch runs no loop over parameter names. Parameters left out (an
    autotuner config supplies them) come back as _MISSING."""
    params = ", ".join(f"{n}=_default_{n}" if n in defaults else f"{n}=_MISSING" for n in names)
    # ints inline (most arguments are strides and sizes): _runtime_spec's codes, without a call
    int_code = ("(({n} & 15 == 0) + 2 * (-_INT32 <= {n} < _INT32) + 4 * ({n} < _INT64)"
                " + 8 * ({n} == 1))")
    keyed = "".join(f"{n}, " if value else
                    f"{int_code.format(n=n)} if {n}.__class__ is int else _runtime_spec({n}), "
                    for n, value in zip(names, by_value))
    source = (f"def bind({params}{', ' if names else ''}**options):\n"
              f"    return [{', '.join(names)}], ({keyed}*options.items())\n")
    namespace = {f"_default_{n}": v for n, v in defaults.items()}
    namespace.update(_MISSING=_MISSING, _runtime_spec=_runtime_spec, _INT32=_INT32, _INT64=_INT64)
    exec(source, namespace)
    return namespace["bind"]


_bindings: Dict[int, _Binding] = {}


_driver_calls: Optional[tuple] = None


def _current_device_and_stream():
    """The device and stream Triton itself would launch on (tests stand this in)."""
    global _driver_calls
    if _driver_calls is None:  # driver.active is a lazy proxy: look its methods up once
        active = triton.runtime.driver.active
        _driver_calls = (active.get_current_device, active.get_current_stream)
    device = _driver_calls[0]()
    return device, _driver_calls[1](device)


def _first_launch(binding: _Binding, grid, args, kwargs, values, key):
    """The ordinary launch; its compiled kernel (and the autotuner's tile constexprs) are kept
    for the bucket. -> what kernel[grid] returned."""
    kernel = binding.kernel
    compiled = kernel[grid](*args, **kwargs)
    if hasattr(compiled, "result"):  # triton 3.6's async compile may hand back a future
        compiled = compiled.result()
    if compiled is None:  # a jit cache hook skipped the launch
        return None
    config = kernel.best_config.kwargs if isinstance(kernel, Autotuner) else {}
    fill = tuple((i, config[name]) for i, (name, value) in enumerate(zip(binding.names, values))
                 if value is _MISSING and name in config)
    if len(fill) == sum(value is _MISSING for value in values):  # else it cannot be replayed
        binding.compiled[key] = (compiled, fill)
    return compiled


def _direct_launch(binding: _Binding, entry, grid, stream, values):
    compiled, fill = entry
    for index, value in fill:  # the autotuner's tile sizes chosen for this bucket
        values[index] = value
    if callable(grid):
        grid = grid(dict(zip(binding.names, values)))
    grid_x = grid[0]
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    knobs = triton.knobs.runtime
    compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata(grid, stream, *values), knobs.launch_enter_hook,
                 knobs.launch_exit_hook, *values)
    return compiled


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), launching the bucket's compiled kernel directly after the
    first call. -> the CompiledKernel (None under the interpreter)."""
    if not enabled:
        return kernel[grid](*args, **kwargs)
    binding = _bindings.get(id(kernel))
    if binding is None:
        binding = _bindings[id(kernel)] = _Binding(kernel)
    if binding.ordinary:
        return kernel[grid](*args, **kwargs)
    try:
        values, key = binding.bind(*args, **kwargs)
    except (_Unkeyed, TypeError):  # Triton's own launch takes it (or says what is wrong)
        return kernel[grid](*args, **kwargs)
    device, stream = _current_device_and_stream()
    key = (device, key)
    entry: Optional[tuple] = binding.compiled.get(key)
    if entry is None:
        return _first_launch(binding, grid, args, kwargs, values, key)
    try:
        compiled = _direct_launch(binding, entry, grid, stream, values)
    except Exception as error:
        if binding.verified:
            raise
        binding.ordinary = True
        binding.compiled.clear()
        warnings.warn(f"fastbert: the pre-bound launch of {getattr(kernel, '__name__', kernel)} "
                      f"failed ({type(error).__name__}: {error}); it takes Triton's ordinary "
                      f"launch from now on", RuntimeWarning, stacklevel=2)
        return kernel[grid](*args, **kwargs)
    binding.verified = True
    return compiled
