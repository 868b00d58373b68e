"""Activation substitution on a graph: SiLU/GELU/GELU-tanh -> ReLU or FATReLU(t) at every FFN
site (ProSparse Sec. 3.1; FATReLU Sec. 3.3, Eq. 3), on the gate only for gated FFNs; or dReLU
(TurboSparse, Song et al. 2024, Sec. 3): FATReLU(t) on the gate and ReLU on up, gated FFNs only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..activations import get_activation
from ..capture import dialect_of, relu_target
from ..ffn import (
    REPLACEABLE,
    FFNSite,
    check_gates_covered,
    check_no_unknown,
    find_sites_in_graph,
)
from ..relufy import check_gated_for_up_relu, thresholds_per_site


class SubstituteActivationPass(PassBase):
    """Replace each FFN site's activation region by one ReLU or ``prosparse::fatrelu`` node.

    For ``"drelu"`` a ``relu`` node also follows each gated site's up projection (the multiply's
    up-side input); substituting ``"relu"``/``"fatrelu"`` into a dReLU site removes that ReLU
    (for a fused gate_up linear the ReLU may sit before the split: it is removed there, which
    the ReLU/FATReLU gate makes no difference to).

    Args:
        activation: a name in :data:`~prosparse_fx.activations.ACTIVATIONS`: ``"relu"``,
            ``"fatrelu"`` or ``"drelu"``; the gate node inserted is its graph target for the
            graph's dialect.
        threshold: FATReLU t >= 0 of the gate, one float or one per site (ignored for
            ``"relu"``).

    Raises (when called):
        FFNNotFoundError: never; a graph without FFN sites is returned unchanged.
        ValueError: a site with an activation that cannot be replaced (message lists the sites),
            a bad threshold, an unknown ``activation``, or ``"drelu"`` with a plain FFN site
            (named; use ``"relu"``); nothing is changed.
        UncoveredFFNError: a SiLU/GELU gates a multiply outside every site (a mixture-of-experts
            expert), which would silently keep its activation; nothing is changed.
    """

    def __init__(
        self,
        activation: Literal["relu", "fatrelu", "drelu"] = "relu",
        threshold: float | Sequence[float] = 0.0,
    ) -> None:
        super().__init__()
        self._act = get_activation(activation)
        self.activation = self._act.name
        self.threshold = threshold

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        sites = find_sites_in_graph(graph_module)
        check_no_unknown(sites, REPLACEABLE)
        check_gates_covered(graph_module, sites)
        act = self._act
        if act.up_relu:
            check_gated_for_up_relu(sites, act.name)
        if act.takes_threshold:
            ts = thresholds_per_site(self.threshold, len(sites))
        else:
            ts = [0.0] * len(sites)
        target = act.graph_target(dialect_of(graph_module))
        graph = graph_module.graph
        modified = False
        for site, t in zip(sites, ts):
            if site.activation == act.name and (site.threshold or 0.0) == t:
                continue
            nodes = site.nodes
            assert nodes is not None
            _set_up_relu(graph, site, act.up_relu, relu_target(dialect_of(graph_module)))
            if _gate_done(site, act.name, t):
                modified = True
                continue
            with graph.inserting_before(nodes.act_output):
                new = graph.call_function(target, act.graph_args(nodes.act_input, t))
            new.meta.update(
                {k: v for k, v in nodes.act_output.meta.items() if k != "source_fn_stack"}
            )
            nodes.act_output.replace_all_uses_with(new)
            for node in reversed(nodes.region):
                if not node.users:
                    graph.erase_node(node)
            modified = True
        if modified:
            graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, modified)


def _gate_done(site: FFNSite, name: str, t: float) -> bool:
    """The gate already has the activation asked for (only the up ReLU changed)."""
    gate_kind = "fatrelu" if site.activation == "drelu" else site.activation
    want = "fatrelu" if name == "drelu" else name
    return gate_kind == want and (site.threshold or 0.0) == t


def _set_up_relu(graph: fx.Graph, site: FFNSite, on: bool, relu: object) -> None:
    """Add a ReLU on the multiply's up-side input (``on``, gated sites without one) or remove the
    site's up ReLU."""
    nodes = site.nodes
    assert nodes is not None
    if site.kind != "gated" or nodes.up_operand is None:
        return
    if on and nodes.up_relu is None:
        with graph.inserting_before(nodes.x1):
            new = graph.call_function(relu, (nodes.up_operand,))
        keys = ("val", "example_value", "tensor_meta")
        new.meta.update({k: v for k, v in nodes.up_operand.meta.items() if k in keys})
        if "nn_module_stack" in nodes.up.meta:
            new.meta["nn_module_stack"] = nodes.up.meta["nn_module_stack"]
        nodes.x1.replace_input_with(nodes.up_operand, new)
    elif not on and nodes.up_relu is not None:
        nodes.up_relu.replace_all_uses_with(nodes.up_relu.args[0])
        graph.erase_node(nodes.up_relu)
