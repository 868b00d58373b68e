"""Graph capture and the one place that knows the graph dialects.

Two dialects reach the passes:

* ``"aten"``: graphs from ``torch.export.export(..., strict=False)`` (``ExportedProgram.module()``),
  whose ``call_function`` targets are ``torch._ops.OpOverload`` objects such as
  ``aten.linear.default``;
* ``"torch"``: graphs a ``torch.compile`` backend receives from Dynamo, whose targets are torch
  functions (``F.linear``, ``torch.tanh``, ``operator.mul``) and ``call_method`` names.

Everything dialect-specific lives here: :func:`canonical_op` maps a node to one canonical op name,
:func:`module_path` turns ``nn_module_stack`` metadata into a dotted module path, and
:func:`relu_target` / :func:`fatrelu_target` say what to insert in each dialect.
"""

from __future__ import annotations

import inspect
import operator
import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import fx

from .errors import InputError

Dialect = Literal["aten", "torch"]

# Canonical op names for the ATen dialect, keyed by the overload packet name.
_ATEN_OPS: dict[str, str] = {
    "linear": "linear",
    "addmm": "addmm",
    "mm": "mm",
    "matmul": "matmul",
    "silu": "silu",
    "gelu": "gelu",
    "relu": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "erf": "erf",
    "pow": "pow",
    "mul": "mul",
    "add": "add",
    "div": "div",
    "sub": "sub",
    "neg": "neg",
    "view": "view",
    "_unsafe_view": "view",
    "reshape": "view",
    "contiguous": "view",
    "clone": "view",
    "alias": "view",
    "dropout": "dropout",
    "fatrelu": "fatrelu",
    "chunk": "chunk",
    "split": "split",
    "split_with_sizes": "split",
}

# Canonical op names for the Dynamo dialect: torch callables and Tensor method names.
_TORCH_FUNCTIONS: dict[Any, str] = {
    F.linear: "linear",
    torch.addmm: "addmm",
    torch.mm: "mm",
    torch.matmul: "matmul",
    operator.matmul: "matmul",
    F.silu: "silu",
    F.gelu: "gelu",
    F.relu: "relu",
    torch.relu: "relu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
    torch.erf: "erf",
    torch.pow: "pow",
    operator.pow: "pow",
    torch.mul: "mul",
    operator.mul: "mul",
    torch.add: "add",
    operator.add: "add",
    torch.div: "div",
    operator.truediv: "div",
    torch.sub: "sub",
    operator.sub: "sub",
    torch.neg: "neg",
    operator.neg: "neg",
    torch.reshape: "view",
    F.dropout: "dropout",
    torch.chunk: "chunk",
    torch.split: "split",
    operator.getitem: "getitem",
}
_TENSOR_METHODS: dict[str, str] = {
    "view": "view",
    "reshape": "view",
    "contiguous": "view",
    "silu": "silu",
    "relu": "relu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "erf": "erf",
    "pow": "pow",
    "mul": "mul",
    "add": "add",
    "div": "div",
    "sub": "sub",
    "neg": "neg",
    "chunk": "chunk",
    "split": "split",
}


def canonical_op(node: fx.Node) -> str | None:
    """Canonical name of the op a node computes, the same in both dialects.

    Args:
        node: a ``call_function`` or ``call_method`` node of an export or Dynamo graph.

    Returns:
        One of ``"linear"``, ``"addmm"``, ``"mm"``, ``"matmul"``, ``"silu"``, ``"gelu"``,
        ``"gelu_tanh"``, ``"relu"``, ``"fatrelu"``, ``"sigmoid"``, ``"tanh"``, ``"erf"``,
        ``"pow"``, ``"mul"``, ``"add"``, ``"div"``, ``"sub"``, ``"neg"``, ``"view"`` (any
        shape-only op), ``"dropout"``, ``"chunk"``, ``"split"``, ``"getitem"``, or ``None`` for
        anything else.
    """
    name: str | None = None
    if node.op == "call_method":
        name = _TENSOR_METHODS.get(str(node.target))
    elif node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            name = _ATEN_OPS.get(target.overloadpacket.__name__)
        elif isinstance(target, torch._ops.OpOverloadPacket):
            name = _ATEN_OPS.get(target.__name__)
        else:
            try:
                name = _TORCH_FUNCTIONS.get(target)
            except TypeError:  # unhashable target
                name = None
    if name == "gelu" and _gelu_approximation(node) == "tanh":
        return "gelu_tanh"
    return name


def _gelu_approximation(node: fx.Node) -> str:
    if "approximate" in node.kwargs:
        return str(node.kwargs["approximate"])
    if len(node.args) > 1 and isinstance(node.args[1], str):
        return node.args[1]
    return "none"


def dialect_of(gm: fx.GraphModule) -> Dialect:
    """``"aten"`` if the ops are ATen overloads (torch.export), else ``"torch"`` (Dynamo)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return "aten"
    return "torch"


def relu_target(dialect: Dialect) -> Any:
    """The callable to insert for ReLU in a graph of the given dialect."""
    return torch.ops.aten.relu.default if dialect == "aten" else torch.relu


def fatrelu_target(dialect: Dialect) -> Any:
    """The callable to insert for FATReLU (``prosparse::fatrelu(x, threshold)``)."""
    from . import activations  # noqa: F401  (registers the op)

    return torch.ops.prosparse.fatrelu.default


_DYNAMO_ROOT = re.compile(r"^L\[['\"][^'\"]+['\"]\](\[\d+\])?\.?")
_MODULES_KEY = re.compile(r"_modules\[['\"]([^'\"]+)['\"]\]")
_INDEX = re.compile(r"\[(\d+)\]")


def normalize_module_path(raw: str) -> str:
    """Dotted module path from an ``nn_module_stack`` entry of either dialect.

    ``"L['self'].model.layers[0].mlp"`` (Dynamo) and ``"model.layers.0.mlp"`` (export) both give
    ``"model.layers.0.mlp"``.
    """
    path = _DYNAMO_ROOT.sub("", raw)
    path = _MODULES_KEY.sub(r"\1", path)
    path = _INDEX.sub(r".\1", path)
    return path.replace("..", ".").strip(".")


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(module path, module class name), ...]`` from the outermost module to the innermost."""
    stack: Mapping[str, Any] | None = node.meta.get("nn_module_stack")
    if not stack:
        return []
    out = []
    for value in stack.values():
        raw, cls = value
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        out.append((normalize_module_path(str(raw)), cls_name.rsplit(".", 1)[-1]))
    return out


def module_path(node: fx.Node) -> str | None:
    """Dotted path of the innermost module that called the op of ``node``, or ``None``."""
    stack = module_stack(node)
    return stack[-1][0] if stack else None


def node_shape(node: Any) -> tuple[int, ...] | None:
    """Shape of a node's value from its ``meta["val"]`` / ``example_value``, if known; a symbolic
    (dynamic) dimension is -1. SymInts are never converted to int: that would add a guard and
    specialise a dynamic-shape graph."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return tuple(s if isinstance(s, int) else -1 for s in val.shape)
    return None


def example_inputs_for(model: torch.nn.Module, seq_len: int = 8, batch: int = 1) -> dict[str, Any]:
    """Keyword inputs to capture a Hugging Face model with: ``input_ids`` ``[batch, seq_len]``
    int64.

    Built from ``model.config.vocab_size``; ``use_cache=False`` is added when the forward takes it,
    by name or through ``**kwargs`` of a model whose config has ``use_cache`` (a KV cache object
    is not a graph output).

    Raises:
        InputError: the model has no ``config.vocab_size``; pass ``example_inputs`` yourself.
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int):
        raise InputError(
            f"cannot build example inputs for {type(model).__name__}: it has no config.vocab_size. "
            "Pass example_inputs=(tensor, ...) or a dict of keyword tensors."
        )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(vocab, 1000), (batch, seq_len), generator=gen)
    kwargs: dict[str, Any] = {"input_ids": ids}
    params = inspect.signature(model.forward).parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (takes_kwargs and hasattr(config, "use_cache")):
        kwargs["use_cache"] = False
    return kwargs


def split_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` from a tuple, a dict of keyword inputs, or a single tensor."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def capture_export(
    model: torch.nn.Module, example_inputs: Any = None, dynamic_shapes: Any = None
) -> fx.GraphModule:
    """Capture ``model`` with ``torch.export.export(strict=False)`` as an ATen GraphModule.

    Args:
        model: any ``nn.Module``; Hugging Face models get example inputs from their config.
        example_inputs: a tuple of positional inputs, a dict of keyword inputs, or ``None``.
        dynamic_shapes: ``torch.export`` dynamic shapes for the inputs (``None``: every shape is
            specialised to the example's).

    Returns:
        ``ExportedProgram.module()``: a GraphModule whose nodes carry ``nn_module_stack``.

    Raises:
        ValueError: no example inputs given and none can be built from the model's config.
    """
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    args, kwargs = split_inputs(example_inputs)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(
                model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False
            )
    finally:
        model.train(was_training)
    return exported.module()


def capture_dynamo(model: torch.nn.Module, example_inputs: Any = None) -> fx.GraphModule:
    """The FX graph that a ``torch.compile`` backend receives for ``model`` (one graph, fullgraph).

    Args:
        model: any ``nn.Module``.
        example_inputs: as for :func:`capture_export`.

    Returns:
        The Dynamo GraphModule (``call_function`` targets are torch functions).
    """
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    args, kwargs = split_inputs(example_inputs)
    graphs: list[fx.GraphModule] = []

    def backend(gm: fx.GraphModule, _inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return graphs[0]


def append_graph_outputs(gm: fx.GraphModule, extra: list[fx.Node]) -> int:
    """Append ``extra`` to the outputs of ``gm``; return how many outputs there were before.

    A Dynamo graph returns a flat tuple and gains the nodes at its end. An export graph
    (``ExportedProgram.module()``) returns a pytree; it then returns ``(original, tuple(extra))``.
    """
    output = next(iter(gm.graph.find_nodes(op="output")))
    codegen = gm.graph._codegen
    pytree_info = getattr(codegen, "pytree_info", None)
    flat = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    n_before = len(flat)
    output.args = (tuple(flat + list(extra)),)
    if pytree_info is not None and pytree_info.out_spec is not None:
        import torch.utils._pytree as pytree

        original = pytree.tree_unflatten(list(range(n_before)), pytree_info.out_spec)
        new_spec = pytree.tree_structure((original, tuple(range(len(extra)))))
        codegen.pytree_info = pytree_info._replace(out_spec=new_spec)
    gm.recompile()
    return n_before


def insert_contiguous(graph: fx.Graph, node: fx.Node, dialect: Dialect) -> fx.Node:
    """Insert a row-major (contiguous) copy of ``node`` in a graph of the given dialect."""
    if dialect == "aten":
        kwargs = {"memory_format": torch.contiguous_format}
        return graph.call_function(torch.ops.aten.clone.default, (node,), kwargs)
    return graph.call_method("contiguous", (node,))


def narrow_target(dialect: Dialect) -> Any:
    """The callable to insert for ``narrow(tensor, dim, start, length)`` in a graph."""
    return torch.ops.aten.narrow.default if dialect == "aten" else torch.narrow


def nested_graph_modules(gm: fx.GraphModule) -> list[fx.GraphModule]:
    """The GraphModules that higher-order ops of ``gm`` call, recursively, in graph order.

    Dynamo puts the body of a ``torch.utils.checkpoint`` region (activation checkpointing,
    ``tag_activation_checkpoint``) and of other higher-order ops such as ``wrap`` in a submodule
    called by the higher-order-op node; an FFN inside such a region is only in that body.

    Returns:
        The bodies (not ``gm`` itself); empty for a graph without higher-order ops.
    """
    found: list[fx.GraphModule] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(
            node.target, torch._ops.HigherOrderOperator
        ):
            continue
        for arg in node.all_input_nodes:
            if arg.op != "get_attr":
                continue
            sub = getattr(gm, str(arg.target), None)
            if isinstance(sub, fx.GraphModule) and sub not in found:
                found.append(sub)
                found += [g for g in nested_graph_modules(sub) if g not in found]
    return found


def transpose_target(dialect: Dialect) -> Any:
    """The callable to insert for a 2-D transpose in a graph of the given dialect."""
    return torch.ops.aten.t.default if dialect == "aten" else torch.t


def specialize_symbolic_thresholds(gm: fx.GraphModule) -> None:
    """Make Dynamo re-trace with constant FATReLU thresholds if this graph has symbolic ones.

    Under ``torch.compile(dynamic=True)`` Dynamo turns float module attributes, such as a
    FATReLU threshold, into symbolic inputs; the FFN analysis and the sparse ops need the
    threshold as a constant. This asks Dynamo to specialise those floats and restart its
    analysis (the mechanism Inductor itself uses for floats it cannot keep symbolic), so the
    graph the passes see has constants, guarded on their values.

    Raises:
        torch._dynamo.exc.TensorifyScalarRestartAnalysis: when something was asked to be
            specialised (caught by Dynamo, which traces again).
    """
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis
    from torch._dynamo.symbolic_convert import TensorifyState

    names = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or canonical_op(node) != "fatrelu" or len(node.args) < 2:
            continue
        t = node.args[1]
        # a float attribute becomes a 0-dim tensor input read by ``.item()``; Dynamo names the
        # symbol of that read, and specialises the inputs whose symbol names it is given
        if isinstance(t, fx.Node) and t.op == "call_method" and t.target == "item":
            source = t.args[0]
            fake = source.meta.get("example_value") if isinstance(source, fx.Node) else None
            memo = getattr(fake, "item_memo", None)
            name = getattr(getattr(memo, "node", None), "_expr", None)
            if name is not None and hasattr(name, "name"):
                names.append(name.name)
    names = [n for n in names if not TensorifyState.should_specialize(n)]
    if names:
        for name in names:
            TensorifyState.specialize(name)
        raise TensorifyScalarRestartAnalysis
