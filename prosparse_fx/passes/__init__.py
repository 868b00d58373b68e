"""Graph passes over FFN sites, each a ``torch.fx`` ``PassBase``: call it on a GraphModule from
``torch.export`` or Dynamo, get a ``PassResult(graph_module, modified)``. Passes are idempotent
and lint and recompile the graph after changing it."""

from .activation_taps import InsertActivationTapsPass
from .sparse_ffn import SparseFFNRewritePass
from .substitute_activation import SubstituteActivationPass

__all__ = ["InsertActivationTapsPass", "SparseFFNRewritePass", "SubstituteActivationPass"]
