"""Activation substitution on a graph: SiLU/GELU/GELU-tanh -> ReLU or FATReLU(t) at every FFN
site (ProSparse Sec. 3.1; FATReLU Sec. 3.3, Eq. 3), on the gate only for gated FFNs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from ..activations import get_activation
from ..capture import dialect_of
from ..ffn import REPLACEABLE, check_gates_covered, check_no_unknown, find_sites_in_graph
from ..relufy import thresholds_per_site


class SubstituteActivationPass(PassBase):
    """Replace each FFN site's activation region by one ReLU or ``prosparse::fatrelu`` node.

    Args:
        activation: a name in :data:`~prosparse_fx.activations.ACTIVATIONS`: ``"relu"`` or
            ``"fatrelu"``; the node inserted is its graph target for the graph's dialect.
        threshold: FATReLU t >= 0, one float or one per site (ignored for ``"relu"``).

    Raises (when called):
        FFNNotFoundError: never; a graph without FFN sites is returned unchanged.
        ValueError: a site with an activation that cannot be replaced (message lists the sites),
            a bad threshold, or an unknown ``activation``.
        UncoveredFFNError: a SiLU/GELU gates a multiply outside every site (a mixture-of-experts
            expert), which would silently keep its activation; nothing is changed.
    """

    def __init__(
        self,
        activation: Literal["relu", "fatrelu"] = "relu",
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
