"""Register a fused (Triton-backed) loss as a pair of ``torch.library`` custom ops with autograd.

torch.compile cannot see inside a Triton launch, so each fused loss is exposed as two opaque custom
ops with fake (meta) implementations: the graph keeps them as single nodes and compiles the rest
around them (``torch.compile(fullgraph=True)`` works). The pattern, shared by every fused loss:

    forward op   ``fastkd::<name>_fwd(*inputs) -> (loss, *residuals)``
                 the residuals are what the backward needs that the inputs do not give (e.g. an
                 activation, or dL/dY computed in the forward's epilogue).
    backward op  ``fastkd::<name>_bwd(grad_loss, *saved, *extras, needs_grad) -> [grad per grad input]``
                 ``saved`` (tensors, or None for an absent optional tensor) and ``extras`` (non-tensor
                 arguments such as a seed or alpha, in the order of the backward's parameters) are
                 chosen by ``save(inputs, outputs)``; ``needs_grad[i]`` says whether the i-th entry of
                 ``grad_inputs`` wants a gradient. An unwanted gradient may be returned as an empty
                 tensor: it is replaced by None.

Both ``forward`` and ``backward`` must be fully type-annotated (the op schema is inferred from the
annotations) and must not mutate their inputs. Example (see ``ct_triton.py``)::

    ct_op = fused_loss_op("ct_loss", forward=_fwd, forward_fake=_fwd_fake, backward=_bwd,
                          backward_fake=_bwd_fake, grad_inputs=("student", "w1", "b1", "w2", "b2"),
                          save=lambda inp, out: ((inp["student"], inp["w1"], inp["w2"], out[1], out[2]),
                                                 {"alpha": inp["alpha"], "reduction": inp["reduction"]}))
    loss = ct_op(student, teacher, w1, b1, w2, b2, alpha, reduction, needs_grad)
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Sequence, Tuple

import torch

NAMESPACE = "fastkd"


def _needs_grad_flags(ctx, positions: Sequence[int]) -> list:
    return [bool(ctx.needs_input_grad[p]) for p in positions]


def fused_loss_op(name: str, *, forward: Callable, forward_fake: Callable, backward: Callable,
                  backward_fake: Callable, grad_inputs: Sequence[str],
                  save: Callable[[dict, tuple], Tuple[tuple, Dict[str, object]]]) -> Callable:
    """Register ``fastkd::<name>_fwd`` / ``fastkd::<name>_bwd`` and return ``op(*inputs) -> loss``.

    forward(*inputs) -> (loss, *residuals)        forward_fake: same signature, allocates only.
    backward(grad_loss, *saved, *extras, needs_grad) -> list of tensors, one per ``grad_inputs`` entry.
    save(inputs: {arg name: value}, outputs: (loss, *residuals)) -> (tensors to save, {name: non-tensor
    argument of the backward}); a plain tuple of tensors means no extras.
    """
    params = list(inspect.signature(forward).parameters)
    missing = [g for g in grad_inputs if g not in params]
    if missing:
        raise ValueError(f"grad_inputs {missing} are not arguments of {forward.__name__}{tuple(params)}")
    grad_pos = [params.index(g) for g in grad_inputs]

    fwd_op = torch.library.custom_op(f"{NAMESPACE}::{name}_fwd", mutates_args=())(forward)
    fwd_op.register_fake(forward_fake)
    bwd_op = torch.library.custom_op(f"{NAMESPACE}::{name}_bwd", mutates_args=())(backward)
    bwd_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        saved = save(dict(zip(params, inputs)), tuple(output))
        tensors, extras = saved if len(saved) == 2 and isinstance(saved[1], dict) else (saved, {})
        ctx.save_for_backward(*tensors)
        ctx.extras = tuple(extras.values())
        ctx.grad_flags = _needs_grad_flags(ctx, grad_pos)

    def backward_rule(ctx, grad_loss, *unused_residual_grads):
        grads = [None] * len(params)
        if not any(ctx.grad_flags):
            return tuple(grads)
        computed = bwd_op(grad_loss, *ctx.saved_tensors, *ctx.extras, ctx.grad_flags)
        for pos, flag, g in zip(grad_pos, ctx.grad_flags, computed):
            grads[pos] = g if flag else None
        return tuple(grads)

    fwd_op.register_autograd(backward_rule, setup_context=setup_context)

    def op(*inputs):
        return fwd_op(*inputs)[0]

    op.forward_op, op.backward_op = fwd_op, bwd_op
    op.__name__ = name
    op.__doc__ = f"The fused {name} (custom ops {NAMESPACE}::{name}_fwd / _bwd); returns the loss."
    return op
