"""Kernel launches with less host time than Triton's ``kernel[grid](...)``.

A warm ``kernel[grid](*args)`` on Triton 3.6 costs about 72-77 us of host time on the H200's
host (``benchmarks/launch_probe.py``): binding the arguments and computing their specialisation
(about 20 us), the cache key (7), the launch metadata, the device and stream (6), the rest of
``JITFunction.run`` (about 20) and the C launcher (18). The top-k forward at 64k launches two
kernels while the GPU waits for them, so that host time is on its critical path.

:func:`fast` wraps a ``@triton.jit`` kernel so that ``fast(kernel)[grid](*args, **kw)`` launches
it like ``kernel[grid](*args, **kw)`` but, once that argument class has been launched, straight
through the compiled kernel's C launcher. The class of a call is what Triton specialises on:
each tensor's dtype and its address modulo 16, each integer's type (i32, i64,
u64), whether it is 1 and whether it is a multiple of 16, the types of the other arguments, the
constexpr and option keywords, and the device. The first call of each class goes through
Triton's own path (which compiles if needed) and the compiled kernel it returns is kept for the
class, so a call never runs a kernel Triton would not have chosen for it.

Triton's own path serves every call where this one cannot be sure to match it: under the
interpreter, with launch hooks or pre-run hooks installed, with Triton's debug mode on, with a
callable grid, with constexpr parameters passed positionally or leading runtime ones by
keyword, with Triton's instrumentation mode set, or with an argument of another
type than tensor, int, float, bool or None.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from . import interpreting

_I32_MIN, _I32_MAX, _U64_MIN = -(1 << 31), (1 << 31) - 1, 1 << 63


_PLAIN = (float, bool, type(None))  # Triton does not specialise on their values


def arg_classes(args, out: list | None = None) -> tuple:
    """What Triton's launch specialises on for the non-constexpr arguments ``args``, at least as
    finely: arguments of one class get one specialisation. An integer between -16 and 16 is its
    own class; a larger one's class says whether it is a multiple of 16 and whether it fits i32
    and i64 (Triton also specialises on ``== 1``, which only the small ones can be). A tensor's
    is its dtype and its address modulo 16. Raises ``TypeError`` for an argument of another type.

    ``out``: if given, each argument is appended to it as the C launcher takes it, a tensor as
    its address (the launcher then skips its own ``data_ptr`` call and pointer query); a tensor
    that is not on a CUDA device raises ``TypeError`` then."""
    classes: list = []
    app = classes.append
    for a in args:
        cls = a.__class__
        if cls is int:
            app(a if -16 <= a <= 16 else 32 + (a & 15 == 0) + 2 * (a < _I32_MIN or a > _I32_MAX) + 4 * (a >= _U64_MIN))
        elif isinstance(a, Tensor):
            ptr = a.data_ptr()
            app(a.dtype)
            app(ptr & 15)
            if out is not None:
                if not a.is_cuda:
                    raise TypeError("a tensor that is not on a CUDA device")
                out.append(ptr)
                continue
        elif cls in _PLAIN:
            app(cls)
        else:
            raise TypeError(f"no launch class for an argument of type {cls.__name__}")
        if out is not None:
            out.append(a)
    return tuple(classes)


_RUNTIME: tuple | None = None


def _triton_runtime() -> tuple:
    """``(triton.knobs, triton.runtime.driver.driver)``, imported once."""
    global _RUNTIME
    if _RUNTIME is None:
        from triton import knobs
        from triton.runtime.driver import driver

        _RUNTIME = (knobs, driver)
    return _RUNTIME


def hooks_installed() -> bool:
    """Whether Triton has launch hooks to call (a profiler's, say): Triton 3.6 keeps them in
    chains that are empty by default, earlier versions in attributes that are None by default."""
    rt = _triton_runtime()[0].runtime
    return any(getattr(h, "calls", h) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


class FastKernel:
    """A ``@triton.jit`` kernel launched through its compiled kernel once warm (:func:`fast`)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.cache: dict[tuple, Any] = {}
        self.slow_launches = 0  # calls served by Triton's own path (tests check the warm ones are not)
        self.last_slow = ""  # why the last of them did not take the fast path
        params = list(getattr(fn, "params", None) or [])
        # positional arguments: the leading non-constexpr parameters; keywords (or defaults): the rest
        self._lead = next((i for i, p in enumerate(params) if p.is_constexpr), len(params))
        self._tail = [(p.name, p.default, p.has_default, p.is_constexpr) for p in params[self._lead:]]
        self._tail_runtime = {p.name for p in params[self._lead:] if not p.is_constexpr}
        self._ok = bool(params)

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        """``fn[grid](*args, **kwargs)``, through the compiled kernel of the call's class when
        one is kept."""
        if not self._ok or interpreting() or len(args) != self._lead or callable(grid):
            self._slow(grid, args, kwargs, "interpreter, callable grid or positional constexprs")
            return
        knobs, driver = _triton_runtime()
        active = driver.active
        # Triton's instrumentation mode is part of its cache key, as debug mode is
        if hooks_installed() or knobs.runtime.debug or self.fn.pre_run_hooks or knobs.compilation.instrumentation_mode:
            self._slow(grid, args, kwargs, "launch hooks, pre-run hooks, debug or instrumentation mode")
            return
        values: list = []  # as the C launcher takes them, in parameter order
        try:
            classes = arg_classes(args, values)
            late: tuple = ()  # classes of the non-constexpr parameters after the first constexpr
            for name, default, has_default, constexpr in self._tail:
                if name in kwargs:
                    value = kwargs[name]
                elif has_default:
                    value = default
                else:  # Triton raises the error for a missing argument
                    raise KeyError(name)
                if constexpr:
                    values.append(value)
                else:
                    late += arg_classes((value,), values)
            options = kwargs.items()
            if self._tail_runtime:
                options = [(k, v) for k, v in options if k not in self._tail_runtime]
            key = (active.get_current_device(), classes, late,
                   tuple([(k, v.__class__, v) for k, v in options]))  # True, 1 and 1.0 are equal keys
            kernel = self.cache.get(key)
        except (TypeError, KeyError) as err:  # another type, a CPU tensor, an unhashable keyword, a missing one
            self._slow(grid, args, kwargs, f"{type(err).__name__}: {err}")
            return
        if kernel is None or not self._globals_unchanged():
            # Triton's own path: compiles if needed, checks the kernel's globals, launches
            self.cache[key] = self._slow(grid, args, kwargs, "a new class" if kernel is None else "changed globals")
            return
        n = len(grid)
        kernel.run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, active.get_current_stream(key[0]),
                   kernel.function, kernel.packed_metadata, None, None, None, *values)

    def _slow(self, grid, args: tuple, kwargs: dict, why: str) -> Any:
        """Triton's own launch; returns its compiled kernel."""
        self.slow_launches += 1
        self.last_slow = why
        return self.fn[grid](*args, **kwargs)

    def _globals_unchanged(self) -> bool:
        """Whether the globals the kernel read at compile time still hold their values (Triton
        raises otherwise; its own path then says so)."""
        missing = object()
        return all(g.get(name, missing) == val for (name, _), (val, g) in self.fn.used_global_vals.items())


_FAST: dict[int, FastKernel] = {}


def fast(fn: Any) -> FastKernel:
    """The :class:`FastKernel` of the ``@triton.jit`` kernel ``fn`` (one per kernel)."""
    wrapped = _FAST.get(id(fn))
    if wrapped is None or wrapped.fn is not fn:
        wrapped = _FAST[id(fn)] = FastKernel(fn)
    return wrapped


__all__ = ["FastKernel", "arg_classes", "fast", "hooks_installed"]
