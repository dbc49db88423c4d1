"""A simulated CUDA device for CPU-only machines: device discipline tested without a GPU.

:func:`simulated_cuda` patches ``torch.cuda``'s queries (one device, available, memory figures)
and enters :class:`SimulatedCudaMode`, a ``__torch_function__`` mode that tags every tensor with a
*logical* device while all arithmetic runs on the CPU with real data (so data-dependent ops such
as ``nonzero``, ``.item()`` or OpenCV on ``.cpu().numpy()`` run, unlike under ``FakeTensorMode``).
It raises :class:`DeviceMismatchError` where CUDA would raise:

- tensors of two logical devices meet in one op (a 0-dim CPU tensor with CUDA ones is allowed, as
  PyTorch allows it; index tensors may be on the CPU; ``copy_`` crosses devices);
- a CUDA tensor reaches numpy (``.numpy()``, ``np.asarray``);
- a CPU generator feeds a CUDA factory.

Tensors get their logical device from a ``device=`` argument, ``.to()``/``.cuda()``/``.cpu()``,
or their inputs; a deep copy (``copy.deepcopy``) from its source. Gradients (``.grad``,
``torch.autograd.grad``) take the device of what they are gradients of. The mode is per thread
(PyTorch's modes are), so it covers in-process stages (``compute.scheduler: local``) and
``DataLoader(num_workers=0)``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

_TAG = "_simulated_device"
CUDA0 = torch.device("cuda", 0)
_CPU = torch.device("cpu")


class DeviceMismatchError(RuntimeError):
    """Where a real CUDA run would stop: two devices in one op, or a CUDA tensor to numpy."""


def logical_device(t: torch.Tensor) -> torch.device:
    return getattr(t, _TAG, None) or _CPU


def _tag(t: Any, device: torch.device) -> Any:
    if isinstance(t, torch.Tensor):
        if device.type == "cpu":
            if hasattr(t, _TAG):
                delattr(t, _TAG)
        else:
            setattr(t, _TAG, device)
    return t


def _resolve(device: Any) -> torch.device | None:
    if device is None:
        return None
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda" and device.index is None:
        return CUDA0
    return device


def _name(func) -> str:
    name = getattr(func, "__name__", str(func))
    if name in ("__get__", "__set__"):
        return f"{name}:{func.__self__.__name__}"
    return name


# Ops whose tensor arguments may legitimately live on two devices.
_INDEXING = {"__getitem__", "__setitem__", "index_put_", "index_put"}
_CROSS_DEVICE = {"copy_", "__set__:data", "__set__:grad", "set_"}
_TO_NUMPY = {"numpy", "__array__"}
# Results on the host, whatever the input.
_HOST = {"tolist", "item", "__int__", "__float__", "__bool__", "__index__", "__len__",
         "__get__:shape", "__get__:dtype", "__get__:ndim", "dim", "size", "numel",
         "__get__:requires_grad", "__get__:is_leaf", "data_ptr", "__repr__", "__format__",
         "__get__:layout", "is_floating_point", "is_complex", "element_size", "stride",
         "__get__:names", "__get__:is_sparse", "__get__:is_quantized", "__get__:is_meta",
         "__get__:is_mps", "__get__:is_xla", "__get__:is_nested", "__reduce_ex__",
         "__hash__", "_has_compatible_shallow_copy_type", "is_contiguous", "is_same_size",
         "_is_view", "is_set_to", "storage_offset", "untyped_storage", "__get__:_base",
         "register_hook", "requires_grad_", "retain_grad", "__setstate__"}
# Getters that return tensors (every other ``Tensor`` property is host metadata).
_TENSOR_GETTERS = {"__get__:grad", "__get__:data", "__get__:T", "__get__:mT", "__get__:H",
                   "__get__:mH", "__get__:real", "__get__:imag"}


class PassThroughMode(TorchFunctionMode):
    """Changes nothing but what any mode changes: PyTorch turns off some fused fast paths (e.g.
    ``nn.MultiheadAttention``'s) while a torch-function mode is active, so a CPU reference run
    under this mode takes the same kernels as a run under :class:`SimulatedCudaMode`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class SimulatedCudaMode(TorchFunctionMode):
    """Tags tensors with a logical device and checks every op's devices (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.checked_ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "__get__:device":
            return logical_device(args[0])
        if name == "__get__:is_cuda":
            return logical_device(args[0]).type == "cuda"
        if name == "get_device":
            dev = logical_device(args[0])
            return dev.index if dev.type == "cuda" else -1
        if name in ("pin_memory", "is_pinned"):
            return args[0] if name == "pin_memory" else False
        if name in _TO_NUMPY:
            dev = logical_device(args[0])
            if dev.type != "cpu":
                raise DeviceMismatchError(
                    f"can't convert {dev} device type tensor to numpy. Use Tensor.cpu() to copy the "
                    "tensor to host memory first.")
            return func(*args, **kwargs)
        if name in _HOST or name.startswith("__get__:") and name not in _TENSOR_GETTERS:
            return func(*args, **kwargs)
        if name == "__deepcopy__":
            return self._deepcopy(func, args, kwargs)
        if name in ("to", "cuda", "cpu"):
            return self._move(func, name, args, kwargs)
        if name == "__get__:grad":
            grad = func(*args, **kwargs)
            if grad is not None and not hasattr(grad, _TAG):
                _tag(grad, logical_device(args[0]))
            return grad
        if name == "__set__:data":
            out = func(*args, **kwargs)
            _tag(args[0], logical_device(args[1]))
            return out
        if name == "grad" and getattr(func, "__module__", "").startswith("torch.autograd"):
            return self._autograd_grad(func, args, kwargs)

        self.checked_ops += 1
        device = self._common_device(name, args, kwargs)
        target = _resolve(kwargs.get("device"))
        if target is not None:
            kwargs = {**kwargs, "device": _CPU}
            gen = kwargs.get("generator")
            if gen is not None and target.type != gen.device.type:
                raise DeviceMismatchError(
                    f"{name}: expected a '{target.type}' device type for generator but found "
                    f"'{gen.device.type}'")
            device = target
        out = func(*args, **kwargs)
        if name in _CROSS_DEVICE or name.endswith("_") and name not in ("index_put_",):
            # in-place ops (and copy_) keep the destination's device
            if args and isinstance(args[0], torch.Tensor) and out is args[0]:
                return out
        return tree_map(lambda t: _tag(t, device) if isinstance(t, torch.Tensor) else t, out)

    def _common_device(self, name: str, args, kwargs) -> torch.device:
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if name in _INDEXING and tensors:
            self_dev = logical_device(tensors[0])
            # PyTorch moves CPU index tensors to the indexed tensor's device; a value assigned
            # may be a CPU scalar tensor.
            for t in tensors[1:]:
                dev = logical_device(t)
                if dev != self_dev and dev.type != "cpu":
                    raise DeviceMismatchError(
                        f"{name}: indices should be either on cpu or on the same device as the "
                        f"indexed tensor ({self_dev}), got {dev}")
            return self_dev
        if name in _CROSS_DEVICE:
            return logical_device(tensors[0]) if tensors else _CPU
        devices = {logical_device(t) for t in tensors
                   if not (logical_device(t).type == "cpu" and t.dim() == 0)}
        if len(devices) > 1:
            raise DeviceMismatchError(
                f"{name}: Expected all tensors to be on the same device, but found at least two "
                f"devices, {' and '.join(sorted(str(d) for d in devices))}!")
        if devices:
            return devices.pop()
        return _CPU

    def _move(self, func, name: str, args, kwargs):
        src = args[0]
        if name == "cpu":
            target = _CPU
            out = func(*args, **kwargs)
        else:
            if name == "cuda":
                dev = args[1] if len(args) > 1 else kwargs.get("device")
                target = _resolve(torch.device("cuda", dev) if isinstance(dev, int) else dev or "cuda")
                out = src.to(_CPU, non_blocking=kwargs.get("non_blocking", False))
            else:
                copy = kwargs.pop("copy", False)
                parsed, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
                other = next((a for a in list(args[1:]) + list(kwargs.values())
                              if isinstance(a, torch.Tensor)), None)
                if other is not None:
                    target = logical_device(other)
                else:
                    target = _resolve(parsed) if parsed is not None else logical_device(src)
                call = {}
                if dtype is not None:
                    call["dtype"] = dtype
                if memory_format is not None:
                    call["memory_format"] = memory_format
                out = src.to(_CPU, non_blocking=non_blocking, copy=copy, **call)
        if out is src and target != logical_device(src):
            out = src.clone()  # a real move makes a copy; the source keeps its device
        return _tag(out, target)

    def _deepcopy(self, func, args, kwargs):
        """A deep copy lives where its source does, and so does its gradient. (Torch's
        ``Tensor.__deepcopy__`` happens to copy ``__dict__``, the tag with it; the copy's device
        must not hang on that, nor on a gradient never read under this mode.)"""
        src = args[0]
        out = func(*args, **kwargs)
        _tag(out, logical_device(src))
        if isinstance(out, torch.Tensor) and out.grad is not None:
            _tag(out.grad, logical_device(src))
        return out

    def _autograd_grad(self, func, args, kwargs):
        inputs = kwargs.get("inputs", args[1] if len(args) > 1 else None)
        flat_inputs = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
        self._common_device("autograd.grad", args, kwargs)
        grads = func(*args, **kwargs)
        for g, x in zip(grads, flat_inputs):
            if g is not None:
                _tag(g, logical_device(x))
        return grads


class _NoCapture:
    """The simulated device's stream: never capturing a CUDA graph."""

    def is_capturing(self) -> bool:
        return False


@contextlib.contextmanager
def simulated_cuda(free_bytes: int = 40 * 2**30, total_bytes: int = 80 * 2**30,
                   device_count: int = 1) -> Iterator[SimulatedCudaMode]:
    """``torch.cuda`` reports ``device_count`` available devices and every op runs under
    :class:`SimulatedCudaMode` (yielded: ``checked_ops`` counts the ops it checked)."""
    import torch.utils.data._utils.pin_memory as pin_memory_module

    cuda = torch.cuda
    rng_state = torch.zeros(16, dtype=torch.uint8)  # CUDA's Philox state is 16 bytes
    parameter_new = torch.nn.Parameter.__new__

    def new_parameter(cls, data=None, requires_grad=True):
        # ``Parameter(x)`` makes a new tensor object outside torch functions: it keeps x's device
        # (a CUDA tensor's Parameter is on CUDA; ``copy.deepcopy`` of a module makes them too)
        out = parameter_new(cls, data, requires_grad)
        return _tag(out, logical_device(data)) if isinstance(data, torch.Tensor) else out

    patches = [
        mock.patch.object(torch.nn.Parameter, "__new__", staticmethod(new_parameter)),
        # optimizers (Adam, AdamW) ask the accelerator's current stream whether a graph is captured
        mock.patch.object(torch.accelerator, "current_stream", lambda device=None: _NoCapture()),
        mock.patch.object(cuda, "is_current_stream_capturing", lambda: False),
        # DataLoader(pin_memory=True): its pin thread (outside this thread's mode) sets the
        # device and pins each batch; the batches stay plain CPU tensors until ``.to(device)``
        mock.patch.object(torch.accelerator, "is_available", lambda *a, **k: True),
        mock.patch.object(torch.accelerator, "current_device_index", lambda: 0),
        mock.patch.object(torch.accelerator, "set_device_index", lambda device: None),
        mock.patch.object(pin_memory_module, "pin_memory", lambda data, device=None: data),
        mock.patch.object(cuda, "is_available", lambda: True),
        mock.patch.object(cuda, "device_count", lambda: device_count),
        mock.patch.object(cuda, "current_device", lambda: 0),
        mock.patch.object(cuda, "set_device", lambda device: None),
        mock.patch.object(cuda, "synchronize", lambda device=None: None),
        mock.patch.object(cuda, "empty_cache", lambda: None),
        mock.patch.object(cuda, "is_initialized", lambda: True),
        mock.patch.object(cuda, "mem_get_info", lambda device=None: (free_bytes, total_bytes)),
        mock.patch.object(cuda, "max_memory_allocated", lambda device=None: 0),
        mock.patch.object(cuda, "memory_allocated", lambda device=None: 0),
        mock.patch.object(cuda, "reset_peak_memory_stats", lambda device=None: None),
        mock.patch.object(cuda, "is_bf16_supported", lambda *a, **k: True),
        mock.patch.object(cuda, "get_device_name", lambda device=None: "simulated CUDA device"),
        mock.patch.object(cuda, "get_rng_state", lambda device="cuda": rng_state.clone()),
        mock.patch.object(cuda, "set_rng_state", lambda state, device="cuda": rng_state.copy_(state)),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        mode = SimulatedCudaMode()
        stack.enter_context(mode)
        yield mode
