"""Graph passes over exported ONNX models that ONNX Runtime and onnxslim leave undone.

`fold_affine_into_conv`: jax2onnx writes a convolution as Transpose(NHWC->NCHW) -> Conv -> Transpose(NCHW->NHWC)
and the BatchNorm after it (in inference) as elementwise arithmetic with per-channel constants on the NHWC side,
`Sub(mean') -> Mul(scale / sqrt(var + eps))` once onnxslim has folded the constants. ONNX Runtime fuses a
Conv with a following Mul or Add, but not with a Sub, and not across the transpose, so each BatchNorm stays
two extra passes over its activation map. The official exports fold BatchNorm into the convolution weights
before exporting (YOLOv5's `fuse()`, torch's Conv+BatchNormalization folding); this pass does the same on the
graph: a chain of Sub / Add / Mul / Div by per-output-channel constants after a Conv (directly, or after its
NCHW->NHWC transpose) becomes the Conv's weights and bias, `W' = a * W`, `b' = a * b + c` for the chain's
`y = a * x + c`. The graph's outputs are unchanged up to float rounding (tests/test_onnx_export.py).

`einsum_to_matmul`: jax2onnx writes batched and 3-D matrix products (dense layers on [B, N, C], attention) as
`Einsum`, which ONNX Runtime runs slower than the `MatMul` that torch.onnx writes for the same products; this pass
rewrites each two-operand Einsum that maps onto one MatMul (with Transposes / Unsqueeze / Squeeze around it).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

_NCHW_TO_NHWC = [0, 2, 3, 1]


def _channel_vector(arr: np.ndarray, channels: int, axis: int, rank: int) -> np.ndarray | None:
    """`arr` as a [channels] vector when it broadcasts along `axis` only of a rank-`rank` tensor, else None."""
    if arr.ndim > rank or arr.size not in (1, channels):
        return None
    shape = (1,) * (rank - arr.ndim) + tuple(arr.shape)
    if arr.size == channels and channels > 1 and shape[axis] != channels:
        return None
    return np.broadcast_to(arr.reshape(-1).astype(np.float64), (channels,)).copy()


def fold_affine_into_conv(model: onnx.ModelProto) -> int:
    """Folds per-output-channel Sub/Add/Mul/Div chains after each Conv into its weights, in place.

    Only float Conv nodes whose weight (and bias, if any) are initializers are touched, and only through nodes
    whose output has one consumer and is not a graph output (other readers would see the changed values).

    Returns:
      the number of elementwise nodes removed.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in g.output}
    removed: set[int] = set()
    new_inits: list[onnx.TensorProto] = []

    def only_consumer(name: str) -> onnx.NodeProto | None:
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in outputs else None

    for conv in list(g.node):
        if conv.op_type != "Conv" or len(conv.input) < 2 or conv.input[1] not in inits:
            continue
        if len(conv.input) > 2 and conv.input[2] and conv.input[2] not in inits:
            continue
        w = numpy_helper.to_array(inits[conv.input[1]])
        if w.dtype not in (np.float32, np.float64) or w.ndim != 4:
            continue
        channels = w.shape[0]
        nxt = only_consumer(conv.output[0])
        transpose = None
        axis = 1
        if nxt is not None and nxt.op_type == "Transpose":
            perm = next((list(a.ints) for a in nxt.attribute if a.name == "perm"), None)
            if perm == _NCHW_TO_NHWC:
                transpose, axis = nxt, 3
                nxt = only_consumer(nxt.output[0])
        scale, shift = np.ones(channels), np.zeros(channels)
        chain = []
        cur = nxt
        while cur is not None and cur.op_type in ("Sub", "Add", "Mul", "Div") and len(cur.input) == 2:
            prev_out = chain[-1].output[0] if chain else (transpose or conv).output[0]
            x_first = cur.input[0] == prev_out
            const_name = cur.input[1] if x_first else cur.input[0]
            if const_name not in inits or (cur.op_type in ("Sub", "Div") and not x_first):
                break
            vec = _channel_vector(numpy_helper.to_array(inits[const_name]), channels, axis, 4)
            if vec is None or (cur.op_type == "Div" and np.any(vec == 0)):
                break
            if cur.op_type == "Sub":
                shift = shift - vec
            elif cur.op_type == "Add":
                shift = shift + vec
            elif cur.op_type == "Mul":
                scale, shift = scale * vec, shift * vec
            else:
                scale, shift = scale / vec, shift / vec
            chain.append(cur)
            cur = only_consumer(cur.output[0])
        if not chain:
            continue
        bias = (numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64)
                if len(conv.input) > 2 and conv.input[2] else np.zeros(channels))
        w_new = (w.astype(np.float64) * scale[:, None, None, None]).astype(w.dtype)
        b_new = (bias * scale + shift).astype(w.dtype)
        w_name, b_name = conv.output[0] + "_folded_weight", conv.output[0] + "_folded_bias"
        new_inits += [numpy_helper.from_array(w_new, w_name), numpy_helper.from_array(b_new, b_name)]
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        last = (transpose or conv)
        last.output[0] = chain[-1].output[0]  # the chain's result is now produced directly
        if transpose is not None:
            conv_out = conv.output[0]
            transpose.input[0] = conv_out
        removed.update(id(n) for n in chain)
    if removed:
        keep = [n for n in g.node if id(n) not in removed]
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(new_inits)
        used = {name for n in g.node for name in n.input} | outputs
        kept_inits = [i for i in g.initializer if i.name in used]
        del g.initializer[:]
        g.initializer.extend(kept_inits)
    return len(removed)


def _einsum_plan(equation: str) -> dict | None:
    """How `Einsum(equation)` of two operands becomes Transposes + one MatMul, or None when it does not.

    Letters are classed as batch (both operands and the output), contracted (both operands, not the output),
    left-free and right-free (one operand and the output). MatMul takes `[batch..., M, K] @ [batch..., K, N]`, so
    the plan needs exactly one contracted letter and at most one free letter per side, except that the left side
    may keep several free letters when there are no batch letters (MatMul broadcasts a rank-2 right operand over
    them: `abc,cd->abd`, a dense layer on a 3-D input). No ellipsis, repeated letter or letter summed away.
    """
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    ins, out = eq.split("->")
    ops = ins.split(",")
    if len(ops) != 2:
        return None
    lhs, rhs = ops
    if any(len(set(s)) != len(s) for s in (lhs, rhs, out)) or set(out) - set(lhs) - set(rhs):
        return None
    batch = [c for c in lhs if c in rhs and c in out]  # the operands' own order where they agree: the output,
    if batch != [c for c in rhs if c in batch]:          # usually the smallest tensor, takes the transpose
        batch = [c for c in out if c in batch]
    contract = [c for c in lhs if c in rhs and c not in out]
    lfree = [c for c in out if c in lhs and c not in rhs]
    rfree = [c for c in out if c in rhs and c not in lhs]
    if len(contract) != 1 or len(rfree) > 1 or (len(lfree) > 1 and batch):
        return None
    if len(lhs) != len(batch) + len(contract) + len(lfree) or len(rhs) != len(batch) + len(contract) + len(rfree):
        return None  # a letter of one operand only that is summed away
    if not batch and not lfree:
        return None  # a vector on the left: leave it to Einsum
    lhs_order = batch + lfree + contract
    rhs_order = batch + contract + rfree
    result = batch + (lfree or ["1"]) + (rfree or ["1"])
    squeeze = [i for i, c in enumerate(result) if c == "1"]
    kept = [c for c in result if c != "1"]
    return {"lhs_perm": [lhs.index(c) for c in lhs_order], "rhs_perm": [rhs.index(c) for c in rhs_order],
            "lhs_unsqueeze": len(batch) if not lfree else None, "rhs_unsqueeze": not rfree,
            "squeeze": squeeze, "out_perm": [kept.index(c) for c in out]}


def einsum_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrites two-operand `Einsum` nodes as Transpose / Unsqueeze / MatMul / Squeeze / Transpose, in place.

    jax2onnx writes a `lax.dot_general` that is not a plain matrix product (a dense layer on a [B, N, C] input,
    multi-head attention scores and their weighted sums) as `Einsum`; ONNX Runtime runs its Einsum through a
    generic path that measured about 35 % slower than MatMul on RT-DETR's projections and attention, while the
    official exports (torch.onnx) write MatMul. Equations `_einsum_plan` cannot map are left as they are. Outputs
    are unchanged (the same products and sums; tests/test_onnx_export.py).

    Returns:
      the number of Einsum nodes rewritten.
    """
    g = model.graph
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    done = 0
    for node in g.node:
        eq = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
        plan = _einsum_plan(eq) if node.op_type == "Einsum" and len(node.input) == 2 else None
        if plan is None:
            new_nodes.append(node)
            continue
        base = (node.name or node.output[0]) + "_mm"
        steps: list[onnx.NodeProto] = []

        def transpose(name: str, perm: list[int], tag: str) -> str:
            if perm == sorted(perm):
                return name
            steps.append(onnx.helper.make_node("Transpose", [name], [f"{base}_{tag}"], perm=perm,
                                               name=f"{base}_{tag}"))
            return f"{base}_{tag}"

        def axes_op(op: str, name: str, axes: list[int], tag: str) -> str:
            const = f"{base}_{tag}_axes"
            new_inits.append(numpy_helper.from_array(np.asarray(axes, np.int64), const))
            steps.append(onnx.helper.make_node(op, [name, const], [f"{base}_{tag}"], name=f"{base}_{tag}"))
            return f"{base}_{tag}"

        a = transpose(node.input[0], plan["lhs_perm"], "lhs")
        b = transpose(node.input[1], plan["rhs_perm"], "rhs")
        if plan["lhs_unsqueeze"] is not None:
            a = axes_op("Unsqueeze", a, [plan["lhs_unsqueeze"]], "lhs1")
        if plan["rhs_unsqueeze"]:
            b = axes_op("Unsqueeze", b, [-1], "rhs1")
        y = f"{base}_y"
        steps.append(onnx.helper.make_node("MatMul", [a, b], [y], name=y))
        if plan["squeeze"]:
            y = axes_op("Squeeze", y, plan["squeeze"], "sq")
        if plan["out_perm"] != sorted(plan["out_perm"]):
            steps.append(onnx.helper.make_node("Transpose", [y], [node.output[0]], perm=plan["out_perm"],
                                               name=f"{base}_out"))
        else:  # rename the last step's output to the Einsum's
            steps[-1].output[0] = node.output[0]
        new_nodes.extend(steps)
        done += 1
    if done:
        del g.node[:]
        g.node.extend(new_nodes)
        g.initializer.extend(new_inits)
    return done
