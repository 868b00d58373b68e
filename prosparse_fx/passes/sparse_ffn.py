"""Sparse-FFN rewrite on a graph: each ReLU/FATReLU/dReLU FFN site becomes one call of
``prosparse::sparse_gated_ffn`` (``up_relu=True`` for dReLU) or ``prosparse::sparse_plain_ffn``
(ProSparse App. D; TurboSparse Sec. 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .. import kernels  # noqa: F401  (registers the ops)
from ..capture import (
    dialect_of,
    insert_contiguous,
    narrow_target,
    node_shape,
    transpose_target,
)
from ..ffn import (
    FFNSite,
    back_through_views,
    find_sites_in_graph,
    forward_through_views,
    linear_operands,
)
from ..sparse_modules import UnsupportedFFNError, check_sparse_rewritable


def _attr_owner(gm: fx.GraphModule, target: str) -> tuple[nn.Module, str]:
    owner_path, _, name = target.rpartition(".")
    return (gm.get_submodule(owner_path) if owner_path else gm), name


def _transposed_weight(
    gm: fx.GraphModule,
    graph: fx.Graph,
    weight: fx.Node,
    want_t: bool,
    name: str,
    materialize: bool = False,
) -> tuple[fx.Node, str | None]:
    """A node holding ``weight`` as ``[in, out]`` when ``want_t`` else ``[out, in]``.

    A ``get_attr`` weight is replaced by a transposed copy made once (the original is dropped
    when nothing else reads it); a placeholder weight (Dynamo) gets a transpose node.
    Returns the node and the replaced attribute's target (or ``None``).
    """
    if weight.op == "get_attr":
        owner, attr = _attr_owner(gm, str(weight.target))
        tensor = getattr(owner, attr)
        new_name = f"_prosparse_{name}"
        setattr(gm, new_name, nn.Parameter(tensor.detach().T.contiguous(), requires_grad=False))
        return graph.get_attr(new_name), str(weight.target)
    node = graph.call_function(transpose_target(dialect_of(gm)), (weight,))
    if materialize:
        node = insert_contiguous(graph, node, dialect_of(gm))
    return node, None


def _weight_rows(
    gm: fx.GraphModule, graph: fx.Graph, weight: fx.Node, start: int, rows: int, name: str
) -> fx.Node:
    """A node holding rows ``start:start+rows`` of a ``[out, in]`` weight (one part of a fused
    gate_up weight): a parameter copied once for a ``get_attr`` weight, else a ``narrow``."""
    if weight.op == "get_attr":
        owner, attr = _attr_owner(gm, str(weight.target))
        part = getattr(owner, attr).detach()[start : start + rows].contiguous()
        setattr(gm, f"_prosparse_{name}", nn.Parameter(part, requires_grad=False))
        return graph.get_attr(f"_prosparse_{name}")
    return graph.call_function(narrow_target(dialect_of(gm)), (weight, 0, start, rows))


def _predictor_nodes(
    gm: fx.GraphModule, graph: fx.Graph, predictor: Any, i: int, site: FFNSite
) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """``get_attr`` nodes of a predictor's ``a``, ``b`` and bias (``None`` without one), held by
    ``gm`` on the device of the site's down weight."""
    weight = linear_operands(site.nodes.down)[1]
    if weight.op == "get_attr":
        owner, attr = _attr_owner(gm, str(weight.target))
        device = getattr(owner, attr).device
    else:
        value = weight.meta.get("val", weight.meta.get("example_value"))
        device = value.device if isinstance(value, torch.Tensor) else None
    nodes = []
    for name in ("a", "b", "bias"):
        t = getattr(predictor, name)
        if t is None:
            nodes.append(None)
            continue
        attr = f"_prosparse_pred_{name}_{i}"
        setattr(gm, attr, nn.Parameter(t.detach().to(device).contiguous(), requires_grad=False))
        sources = getattr(gm, "_param_name_to_source", None)
        if sources is not None:  # a Dynamo graph: AOTAutograd wants a source for each parameter
            from torch._dynamo.source import ConstantSource

            sources[attr] = ConstantSource(f"prosparse_predictor_{name}_{i}")
        nodes.append(graph.get_attr(attr))
    return nodes[0], nodes[1], nodes[2]


def _op_input(x: fx.Node, out: fx.Node, site: FFNSite) -> fx.Node:
    """The FFN input the op takes, ``[..., d]`` with the leading dimensions of the node it
    replaces: the linear's own input, or the tensor before the views that flattened it (GPT-2's
    ``Conv1D`` flattens to 2-D and views the result back; Qwen2-MoE's shared expert takes a
    flattened input and returns it flat).

    Raises:
        UnsupportedFFNError: no candidate has the replaced node's leading shape.
    """
    want = node_shape(out)
    candidates = [back_through_views(x), x]
    if want is None:
        return candidates[0]
    for node in candidates:
        shape = node_shape(node)
        if shape is not None and shape[:-1] == want[:-1]:
            return node
    raise UnsupportedFFNError(
        f"{site.path}: the FFN's output shape {list(want)} does not follow from its input's; "
        "the sparse rewrite would change it. Compile it with sparse_ffn=False"
    )


def _site_nodes(site: FFNSite) -> list[fx.Node]:
    """The nodes a site's rewrite may leave unused (erased only if nothing reads them)."""
    nodes = site.nodes
    assert nodes is not None
    out = forward_through_views(nodes.down)
    chain, node = [nodes.down], nodes.down
    while node is not out:
        (node,) = node.users
        chain.append(node)
    region = [n for n in reversed(nodes.region) if isinstance(n, fx.Node)]
    # a fused gate_up's parts and split feed x1 and the activation
    parts = [*nodes.x1.all_input_nodes, *nodes.act_input.all_input_nodes]
    # the up side from the multiply back to up_proj (views, dReLU's ReLU, a split)
    up_side, node = [], nodes.up_operand
    while isinstance(node, fx.Node) and node is not nodes.up and len(up_side) < 16:
        up_side.append(node)
        node = node.args[0] if node.args else None
    rest = [nodes.x1, nodes.act_output, *region, nodes.act_input, *parts, *up_side]
    rest += [nodes.up_relu, nodes.up, nodes.gate]
    weights = [linear_operands(n)[1] for n in (nodes.down, nodes.up, nodes.gate) if n is not None]
    return list(reversed(chain)) + [n for n in rest + weights if isinstance(n, fx.Node)]


def _erase_unused(graph: fx.Graph, nodes: list[fx.Node]) -> None:
    erased: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for node in nodes:
            kinds = ("call_function", "call_method", "get_attr")
            if node in erased or node.op not in kinds or node.users:
                continue
            graph.erase_node(node)
            erased.add(node)
            changed = True


class SparseFFNRewritePass(PassBase):
    """Replace each ReLU/FATReLU/dReLU FFN site by one sparse-FFN op node.

    Gated sites become ``sparse_gated_ffn(x, w_gate, w_up, w_down_t, t)`` (dReLU sites
    ``sparse_gated_ffn(x, w_gate, w_up, w_down_t, t, True)``); plain sites
    ``sparse_plain_ffn(x, w1, b1, w2_t, b2, t)``. ``w_down_t`` (``w2_t``) is the transpose of the
    down weight, made once; the original weight attribute is removed when nothing else reads it.
    A weight that is a graph input (Dynamo) is transposed in the graph; with
    ``materialize_transposes`` the transpose is also made contiguous, which a compiler that
    freezes weights folds into one constant (the sparse op reads rows of ``w_down_t``).
    Idempotent (a rewritten graph has no FFN sites left).

    A fused gate_up linear (:attr:`FFNSite.gate_up_split`) gives the op its two row blocks.

    With ``predictors`` (site path -> :class:`~prosparse_fx.predictors.Predictor`), a site that
    has one becomes ``predicted_gated_ffn`` / ``predicted_plain_ffn`` instead (approximate mode),
    its factors held by the graph module as parameters ``_prosparse_pred_{a,b,bias}_{i}`` (without
    gradient), on the device of the site's weights.

    Raises (when called):
        NotSparseError: a site's activation is SiLU/GELU: relufy and train first.
        UnsupportedFFNError: a gated site with biases (see
            :func:`prosparse_fx.sparse_modules.sparse_rewrite_refusal`); nothing is changed.
    """

    def __init__(
        self, materialize_transposes: bool = False, predictors: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.materialize_transposes = materialize_transposes
        self.predictors = dict(predictors or {})

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        sites = find_sites_in_graph(graph_module)
        check_sparse_rewritable(sites)
        for site in sites:  # before any change, so a refusal leaves the graph as it was
            if site.gate_up_split is not None and linear_operands(site.nodes.gate)[3]:
                raise UnsupportedFFNError(
                    f"{site.path}: a fused gate_up weight stored [in, out] (Conv1D) is not "
                    "supported by the sparse rewrite; compile it with sparse_ffn=False"
                )
        graph = graph_module.graph
        replaced: list[str] = []
        old_nodes: list[fx.Node] = []
        for i, site in enumerate(sites):
            old_nodes += _site_nodes(site)
            predictor = self.predictors.get(site.path)
            replaced += self._rewrite(
                graph_module, graph, site, i, self.materialize_transposes, predictor
            )
        if not sites:
            return PassResult(graph_module, False)
        # erase only the FFN nodes left without users: a graph-wide dead-code pass would also
        # drop in-place updates whose results nobody reads, such as a static KV cache's
        _erase_unused(graph, old_nodes)
        used = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
        for target in replaced:
            if target not in used:
                owner, attr = _attr_owner(graph_module, target)
                delattr(owner, attr)
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)

    @staticmethod
    def _rewrite(
        gm: fx.GraphModule,
        graph: fx.Graph,
        site: FFNSite,
        i: int,
        materialize: bool,
        predictor: Any = None,
    ) -> list[str]:
        nodes = site.nodes
        assert nodes is not None
        out = forward_through_views(nodes.down)
        x_lin, w_down, b_down, down_t = linear_operands(nodes.down)
        replaced = []
        with graph.inserting_before(nodes.down):
            w_down_t, old = (
                (w_down, None)
                if down_t
                else _transposed_weight(gm, graph, w_down, True, f"w_down_t_{i}", materialize)
            )
            if old:
                replaced.append(old)
            t = float(site.threshold or 0.0)
            if site.kind == "gated":
                assert nodes.gate is not None
                x, w_gate, _, gate_t = linear_operands(nodes.gate)
                _, w_up, _, up_t = linear_operands(nodes.up)
                if site.gate_up_split is not None:
                    g, u = site.gate_up_split
                    n = site.intermediate_size
                    w_gate = _weight_rows(gm, graph, w_gate, g, n, f"w_gate_{i}")
                    w_up = _weight_rows(gm, graph, w_up, u, n, f"w_up_{i}")
                    if w_up.op == "get_attr":
                        replaced.append(str(linear_operands(nodes.gate)[1].target))
                elif gate_t:
                    w_gate, _ = _transposed_weight(gm, graph, w_gate, False, f"w_gate_{i}")
                if up_t and site.gate_up_split is None:
                    w_up, _ = _transposed_weight(gm, graph, w_up, False, f"w_up_{i}")
                x = _op_input(x, out, site)
                if predictor is None:
                    args = (x, w_gate, w_up, w_down_t, t) + ((True,) if site.up_relu else ())
                    new = graph.call_function(torch.ops.prosparse.sparse_gated_ffn.default, args)
                else:
                    a, b, _ = _predictor_nodes(gm, graph, predictor, i, site)
                    args = (x, a, b, float(predictor.cut), w_gate, w_up, w_down_t, t)
                    args += (True,) if site.up_relu else ()
                    op = torch.ops.prosparse.predicted_gated_ffn.default
                    new = graph.call_function(op, args)
            else:
                x, w1, b1, fc1_t = linear_operands(nodes.up)
                if fc1_t:
                    w1, _ = _transposed_weight(gm, graph, w1, False, f"w1_{i}")
                x = _op_input(x, out, site)
                if predictor is None:
                    args = (x, w1, b1, w_down_t, b_down, t)
                    new = graph.call_function(torch.ops.prosparse.sparse_plain_ffn.default, args)
                else:
                    a, b, bias = _predictor_nodes(gm, graph, predictor, i, site)
                    args = (x, a, b, bias, float(predictor.cut), w1, b1, w_down_t, b_down, t)
                    op = torch.ops.prosparse.predicted_plain_ffn.default
                    new = graph.call_function(op, args)
        new.meta.update({k: v for k, v in out.meta.items() if k in ("val", "nn_module_stack")})
        out.replace_all_uses_with(new)
        return replaced
