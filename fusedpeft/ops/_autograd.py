"""One factory for the autograd entry points of every op.

An op computes y (M, N) from x (M, K), the frozen weight (N, K), an optional bias (N,) and its
adapter tensors, under parameters that take no gradient (scalars, flags, a seed). Its file gives
the factory three functions on 2-D x:

    forward(x, weight, bias, *adapters, *params, needs, index=-1) -> (y, saved, index)
    backward(grad_y, x, weight, bias, *adapters, saved, index, *params, needs, grad_dtypes) -> a grad per tensor
    select(x, weight, bias, *adapters, *params, needs, index=-1, record=True) -> (index, impl)

``forward`` picks the backend (``select``) and runs it. ``index`` is that backend's registration
index (fusedpeft.backends): the backward runs the backend at that index, so it always runs the
forward's backend (and regenerates the same dropout mask), even when a ``use_backend`` block has
been left by then. ``saved`` is the one activation the forward keeps for the backward, or None;
``needs`` says which tensor inputs want a gradient (None where the answer is no). A forward whose
``saved`` is the pair (y itself, other) keeps its output (DoRA reads z back from it): the Function
holds an alias of y, not a saved tensor, saves ``other``, and hands the backward (y, other), or
(None, other) where the caller has edited y in place since (its version moved), so that the op
forms what it needs again rather than autograd raising; the alias is dropped by the backward.

From these the factory builds (``AutogradOp``):

- ``function``: a plain torch.autograd.Function, the eager path, with the least host time per
  call. It casts the adapter tensors to x's dtype inside and their gradients back to their own
  (float32 masters beside a bf16 base), so the casts add no autograd node.
- ``forward_op`` / ``backward_op``: the torch custom ops ``fusedpeft::<name>_fwd`` / ``_bwd``, with
  fake implementations and tied by register_autograd, so that torch.compile(fullgraph=True) sees
  one opaque node per call and never traces a launcher. The backend travels as an int argument:
  ``backends.forced_index``, read while tracing, or -1 for "chosen per call by the shape key", in
  which case the backward selects again, finds the choice the forward made for that key, and so
  runs the same backend. The gradients wanted are unknown inside a custom op, so its shape keys
  are selected as for training: every tensor but the frozen weight.
- ``apply(backend_op, x, weight, bias, *adapters, *params)``: the entry on 2-D x, inputs checked.
  Under torch.compile it calls the custom ops; without autograd (grad mode off, or nothing
  requires grad: serving, evaluation) the forward alone, with no node and nothing saved; else the
  Function.
- ``call(backend_op, ...)``: the op's public entry, x of any leading shape, under autocast too. The
  first call of a signature (devices, dtypes, shapes, gradient flags, parameters, settings) runs
  the op's checks and makes the choice ``apply`` would make; every later call runs that plan.

An op built with ``composable=True`` chooses its backend before the Function (and hands it the
index): where the chosen implementation has ``autograd_forward(x, weight, bias, *adapters,
*params)``, a composition of differentiable torch ops, its ``composes(*the same args)`` accepts
the call, and x is on a device in ``COMPOSED_DEVICES``, the composition runs instead and
autograd's C++ engine runs its backward. At the small, host-bound shapes where the tuner picks
such a composition the Function's Python costs more than the arithmetic: an IA3 layer's training
step took 86 us through the Function and 48 us as the same torch ops (CPU machine, 16 x 64).
``composes`` declines where the composition would keep more for the backward than the Function
does, or cannot run the call (the Function then runs). An implementation marked
``composed_only`` exists for its composition alone (its forward and backward repeat another
backend's): it is a tuning candidate only where it composes, and never for the custom ops. Such
an op's tuner times each candidate as this entry runs it (``entry_step``: the composition or the
Function, and autograd's backward), not its bare forward and backward: at host-bound shapes the
candidates' GPU times are within noise of each other and what differs is the host work around
them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch

from .. import backends, tuning
from ..settings import settings
from . import _common

_BASE_SCHEMA = "Tensor x, Tensor weight, Tensor? bias"
# Where a composable op runs a backend's autograd_forward. Not on CPU: there the torch backend is
# the reference the Function's own tests examine (tests widen this to reach the path on CPU).
COMPOSED_DEVICES = {"cuda"}
# Whether autocast is on for any device (one cheap call; torch.is_autocast_enabled asks per device).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


@dataclasses.dataclass(frozen=True)
class AutogradOp:
    """The entry points ``autograd_op`` builds (see the module docstring)."""

    name: str
    function: type
    forward_op: Any
    backward_op: Any
    apply: Callable[..., torch.Tensor]
    call: Callable[..., torch.Tensor]
    # composable ops: entry_step(backend_op, args, needs) -> through(impl) -> step (the tuner's
    # measure of a candidate as the entry runs it); None otherwise
    entry_step: Optional[Callable] = None


def _fields(schema: str) -> list[str]:
    return [part.strip() for part in schema.split(",") if part.strip()]


def _saved_or_none(saved: torch.Tensor):
    # The custom ops return an empty 1-D tensor where the forward kept nothing.
    return None if saved.dim() == 1 and saved.numel() == 0 else saved


def composes(impl, args) -> bool:
    """Whether ``impl`` runs this call (the op's arguments) as its autograd composition."""
    return getattr(impl, "autograd_forward", None) is not None and impl.composes(*args)


def autograd_op(
    name: str,
    *,
    adapters: str,
    params: str,
    forward: Callable,
    backward: Callable,
    select: Callable,
    saved_shape: Callable[..., tuple],
    composable: bool = False,
    kept_dtype: tuple[str, ...] = (),
    check: Optional[Callable] = None,
) -> AutogradOp:
    """Build the eager autograd Function and the custom-op pair of one op.

    name: the custom ops are ``fusedpeft::<name>_fwd`` and ``fusedpeft::<name>_bwd``.
    adapters: schema of the adapter tensors after x, weight and bias, e.g.
        ``"Tensor lora_A, Tensor lora_B"``; each takes a gradient, cast to x's dtype unless named
        in ``kept_dtype``.
    kept_dtype: adapter tensors the backends take in their own dtype (DoRA's magnitude: a float32
        master of about 1 whose training steps of 1e-4 a cast to bf16, spaced 2^-7 there, erases).
    params: schema of the arguments after them that take no gradient, e.g.
        ``"float scaling, float dropout_p, Tensor? seed"``.
    forward, backward, select: the op's implementation, as the module docstring writes them.
    saved_shape(x, weight, bias, *adapters, *params): the shape of the forward's saved tensor
        (``(0,)`` where it saves none), for the fake implementation.
    The eager backward passes ``grad_dtypes`` (the adapter tensors' own dtypes, from before their
    cast to x's) to ``backward``, which may write the adapter gradients in them directly (float32
    masters beside a bf16 layer): the cast back after it is then a no-op, one launch less each.
    composable: choose the backend before the Function, and run its ``autograd_forward`` where it
        has one that ``composes`` the call (see the module docstring); ``select`` then also takes
        ``through``, a zero-argument callable returning entry_step's through(impl) -> step (None:
        no candidate here), for its shape key's bench.
    check(x, weight, bias, *adapters, *params): raises on bad input, naming the problem; ``call``
        runs it on the first call of each signature (see ``call``), so it must read nothing of a
        call but what the signature holds.
    """
    n = 3 + len(_fields(adapters))  # the tensor inputs, each with a gradient slot
    param_types = [field.rsplit(None, 1)[0] for field in _fields(params)]
    tensor_params = tuple(i for i, kind in enumerate(param_types) if kind.startswith("Tensor"))
    no_grads = (None,) * (len(param_types) + 1)  # the params and the backend index
    inputs_schema = f"{_BASE_SCHEMA}, {adapters}"

    adapter_names = [field.rsplit(None, 1)[1] for field in _fields(adapters)]
    unknown = sorted(set(kept_dtype) - set(adapter_names))
    if unknown:
        raise ValueError(f"{name}: kept_dtype names {unknown}, not among the adapters {adapter_names}")
    cast_to_x = [a not in kept_dtype for a in adapter_names]

    def cast_adapters(args):
        dtype = args[0].dtype
        return (*args[:3], *[_common.cast(a, dtype) if cast else a for a, cast in zip(args[3:n], cast_to_x)], *args[n:])

    def train_needs(inputs):
        return (True, False, inputs[2] is not None, *[a is not None for a in inputs[3:]])

    # ------------------------------------------------------------------ eager
    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            *args, index = args  # the backend's index, or -1: chosen here by the shape key
            ctx.adapter_dtypes = [None if a is None else a.dtype for a in args[3:n]]
            args = cast_adapters(args)
            y, saved, ctx.index = forward(*args, needs=ctx.needs_input_grad[:n], index=index)
            ctx.keeps_output = isinstance(saved, tuple)
            if ctx.keeps_output:  # an alias: the same storage and version counter, no reference to this node
                ctx.output, ctx.output_version, saved = y.detach(), y._version, saved[1]
            ctx.save_for_backward(*args[:n], saved)
            ctx.params = args[n:]
            return y

        @staticmethod
        def backward(ctx, grad_y):
            *inputs, saved = ctx.saved_tensors
            if ctx.keeps_output:  # y as the forward left it, or None (edited in place, or a second backward)
                output, ctx.output = ctx.output, None
                saved = (output if output is not None and output._version == ctx.output_version else None, saved)
            grads = backward(grad_y, *inputs, saved, ctx.index, *ctx.params, needs=ctx.needs_input_grad[:n],
                             grad_dtypes=ctx.adapter_dtypes)
            return (*grads[:3], *map(_common.cast, grads[3:], ctx.adapter_dtypes), *no_grads)

    Function.__name__ = Function.__qualname__ = "".join(w.title() for w in name.split("_")) + "Function"

    # ------------------------------------------------------------------ torch.compile
    def fwd(*args):
        y, saved, _ = forward(*args[:-1], needs=train_needs(args[:n]), index=args[-1])
        return y, (saved if saved is not None else args[0].new_empty(0))

    forward_op = torch.library.custom_op(
        f"fusedpeft::{name}_fwd", fwd, mutates_args=(),
        schema=f"({inputs_schema}, {params}, int backend) -> (Tensor, Tensor)")

    @forward_op.register_fake
    def _(*args):
        x, weight = args[0], args[1]
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(saved_shape(*args[:-1]))

    def bwd(grad_y, *args):
        inputs, saved, backend, op_params, needs = args[:n], args[n], args[n + 1], args[n + 2:-1], args[-1]
        if backend < 0:  # the forward's choice, looked up by the same shape key
            backend, _ = select(*inputs, *op_params, needs=train_needs(inputs), record=False)
        grads = backward(grad_y, *inputs, _saved_or_none(saved), backend, *op_params, needs=needs)
        return _common.grads_to_tensors(grads, inputs[0])

    backward_op = torch.library.custom_op(
        f"fusedpeft::{name}_bwd", bwd, mutates_args=(),
        schema=f"(Tensor grad_y, {inputs_schema}, Tensor saved, int backend, {params}, bool[] needs) -> "
               f"({', '.join(['Tensor'] * n)})")

    @backward_op.register_fake
    def _(grad_y, *args):
        inputs, needs = args[:n], args[-1]
        return _common.fake_grads(inputs[0], [(0,) if t is None else t.shape for t in inputs], needs)

    def setup_context(ctx, inputs, output):
        op_params = inputs[n:-1]
        # Tensors go through save_for_backward, the tensor params (a seed) among them.
        ctx.save_for_backward(*inputs[:n], output[1], *[op_params[i] for i in tensor_params])
        ctx.params = [None if i in tensor_params else p for i, p in enumerate(op_params)]
        ctx.backend = inputs[-1]
        ctx.mark_non_differentiable(output[1])

    def op_backward(ctx, grad_y, grad_saved):
        tensors = ctx.saved_tensors
        op_params = list(ctx.params)
        for i, t in zip(tensor_params, tensors[n + 1:]):
            op_params[i] = t
        needs = list(ctx.needs_input_grad[:n])
        grads = backward_op(grad_y, *tensors[:n + 1], ctx.backend, *op_params, needs)
        return (*_common.grads_from_tensors(grads, needs), *no_grads, None)

    forward_op.register_autograd(op_backward, setup_context=setup_context)

    # ------------------------------------------------------------------ entry point
    function_apply = Function.apply

    def apply(backend_op: str, *args):
        """The entry on 2-D x with the inputs checked, choosing on this call (no plan kept): under
        torch.compile the custom ops, else what ``call`` would plan for it."""
        if torch.compiler.is_compiling():
            args = cast_adapters(args)
            return forward_op(*args, backends.forced_index(backend_op, args[0], args[1]))[0]
        return make_plan(backend_op, args)(args)

    def run_entry(impl, index, args):
        """(y, whether the Function ran) of one call through this entry with the backend ``impl``
        (registration ``index``)."""
        if composes(impl, args):
            return impl.autograd_forward(*args), False
        return function_apply(*args, index), True

    def entry_step(backend_op, args, needs):
        """through(impl) -> step: one training step of a candidate as the planned call runs it,
        on fresh leaves of the call's tensors (the gradients returned, never accumulated), with a
        random upstream gradient; the Function's own count of the call left out. Built only when a
        shape key is measured."""
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in zip(args[:n], needs)]
        call_args = (*leaves, *args[n:])
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grad = tuning.random_like_output((args[0].shape[0], args[1].shape[0]), args[0].dtype, args[0].device)

        def through(impl):
            """The candidate's step, or None where it is no candidate (composed_only and declining)."""
            if getattr(impl, "composed_only", False) and not composes(impl, call_args):
                return None
            index = backends.index_of(backend_op, impl)

            def step():
                with torch.enable_grad(), backends.uncounted():
                    torch.autograd.grad(run_entry(impl, index, call_args)[0], wanted, grad)

            return step

        return through

    def choose(backend_op, args, needs):
        """(index, impl, whether impl composes the call) for a training call, measured where the
        shape key is new."""
        index, impl = select(*args, needs=needs, record=False, through=lambda: entry_step(backend_op, args, needs))
        return index, impl, composes(impl, args)

    # ------------------------------------------------------------------ the op's public entry
    # A plan per call signature: the checks passed and the backend chosen, so that a repeated call
    # (every call of a layer after its first) builds one key and runs its backend. At the small,
    # host-bound layers the checks, the shape key and the tuner's look-up cost more host time than
    # the composition they choose (CPU machine, 16 x 64 -> 48: 12 us over a 20 us forward).
    plans = tuning.ChoiceMemo()

    def in_rows(run, record=None):
        """run(x, ...) on 2-D x -> the same on x of any leading shape (rows flattened, then restored),
        after ``record()`` where given."""
        def plan(args):
            if record is not None:
                record()
            x = args[0]
            if x.dim() == 2:
                return run(*args)
            y = run(_common.flatten_rows(x), *args[1:])
            return y.reshape(*x.shape[:-1], y.shape[1])
        return plan

    def make_plan(backend_op, args):
        """The plan of a checked call: plan(args) -> y."""
        flat = (_common.flatten_rows(args[0]), *args[1:])
        if torch.is_grad_enabled():
            needs = tuple([t is not None and t.requires_grad for t in args[:n]])
            if True in needs:
                if not (composable and args[0].device.type in COMPOSED_DEVICES):
                    return in_rows(lambda *args: function_apply(*args, -1))
                index, impl, composed = choose(backend_op, flat, needs)
                if not composed:
                    return in_rows(lambda *args: function_apply(*args, index))
                # (the Function's forward counts its own calls; the composition is counted here)
                return in_rows(impl.autograd_forward, backends.recorder(backend_op, index))
        index, _ = select(*cast_adapters(flat), needs=(False,) * n, record=False)
        return in_rows(lambda *args: forward(*cast_adapters(args), index=index)[0])

    def call(backend_op: str, *args):
        """The op's public entry: x of any leading shape; ``check(*args)`` (raising on bad input)
        runs on the first call of each signature, and the plan it leaves runs every later one."""
        x = args[0]
        compiling = torch.compiler.is_compiling()
        if compiling or (_any_autocast() and torch.is_autocast_enabled(x.device.type)):
            if check is not None:
                check(*args)
            # Compiling: the custom ops. Under autocast: x, weight and bias in autocast's dtype, then
            # the planned call with autocast off (the adapters cast by the Function or the
            # composition, as always).
            entry = apply if compiling else call
            return _common.apply_linear(lambda *a: entry(backend_op, *a), *args)
        # The signature: everything the checks and the choice read (inlined: it is most of a hit's
        # cost): the settings in force (interned, so their id), grad mode, each tensor input's
        # device, dtype, shape and gradient flag (x's and weight's strides too), the parameters
        # (tensor parameters by presence).
        weight = args[1]
        key = (backend_op, id(settings.values()), torch.is_grad_enabled(),
               x.device, x.dtype, x.shape, x.stride(), x.requires_grad,
               weight.device, weight.dtype, weight.shape, weight.stride(), weight.requires_grad,
               *[None if t is None else (t.device, t.dtype, t.shape, t.requires_grad) for t in args[2:n]],
               *[args[n + i] is None if i in tensor_params else args[n + i] for i in range(len(param_types))])
        plan = plans.get(key)
        if plan is None:
            if check is not None:
                check(*args)
            plan = make_plan(backend_op, args)
            plans.put(key, plan)
        return plan(args)

    return AutogradOp(name=name, function=Function, forward_op=forward_op, backward_op=backward_op, apply=apply,
                      call=call, entry_step=entry_step if composable else None)
