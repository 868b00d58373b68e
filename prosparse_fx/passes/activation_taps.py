"""Activation taps on a graph: per-site L1 of x1 as extra graph outputs, for the regularizer
(ProSparse Sec. 3.2). The eager form is :mod:`prosparse_fx.taps`; both use
:func:`prosparse_fx.taps.activation_l1`."""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..capture import append_graph_outputs
from ..ffn import find_sites_in_graph
from ..taps import L1Norm, activation_l1, zero_fraction

TAPS_META_KEY = "prosparse_taps"


class InsertActivationTapsPass(PassBase):
    """Append one 0-dim L1(x1) output per FFN site to the graph's outputs.

    A Dynamo graph's flat output tuple gains the L1 values at its end; an export graph returns
    ``(original_output, (l1_0, ..., l1_{n-1}))``. ``graph_module.meta["prosparse_taps"]`` records
    ``{"sites": [path, ...], "n_outputs": k, "zeros": bool}`` (k = number of outputs before the
    taps). Applying the pass twice is a no-op.

    With ``zeros=True`` it also appends, after the L1 values, one fraction of exact zeros of x1
    per site (:func:`prosparse_fx.taps.zero_fraction`), for the regularizer's running sparsity.

    Args:
        norm: L1 normalisation of :func:`prosparse_fx.taps.activation_l1`.
        zeros: also append the per-site fractions of zeros.
    """

    def __init__(self, norm: L1Norm = "mean", zeros: bool = False) -> None:
        super().__init__()
        self.norm = norm
        self.zeros = zeros

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        if TAPS_META_KEY in graph_module.meta:
            return PassResult(graph_module, False)
        sites = find_sites_in_graph(graph_module)
        if not sites:
            return PassResult(graph_module, False)
        graph = graph_module.graph
        output = next(iter(graph.find_nodes(op="output")))
        taps = []
        with graph.inserting_before(output):
            for site in sites:
                assert site.nodes is not None
                taps.append(
                    graph.call_function(activation_l1, (site.nodes.x1,), {"norm": self.norm})
                )
            if self.zeros:
                for site in sites:
                    assert site.nodes is not None
                    taps.append(graph.call_function(zero_fraction, (site.nodes.x1,)))
        n_before = append_graph_outputs(graph_module, taps)
        graph_module.meta[TAPS_META_KEY] = {
            "sites": [s.path for s in sites],
            "n_outputs": n_before,
            "zeros": self.zeros,
        }
        graph.lint()
        graph_module.recompile()
        return PassResult(graph_module, True)
