"""The ``prosparse`` torch.compile backend: ProSparse's graph passes on the Dynamo graph, then
Inductor.

``torch.compile(model, backend="prosparse", options={...})`` runs, on the FX graph Dynamo
captures (before AOTAutograd derives the backward, so gradients are those of the rewritten
forward):

1. activation substitution (:class:`~prosparse_fx.passes.SubstituteActivationPass`), only when
   ``"activation"`` asks for it: the backend never changes what a model computes on its own;
2. regularization taps (:class:`~prosparse_fx.passes.InsertActivationTapsPass`) feeding an
   :class:`~prosparse_fx.ActivationRegularizer` created with ``taps="graph"``;
3. the sparse-FFN rewrite (:class:`~prosparse_fx.passes.SparseFFNRewritePass`) of
   ReLU/FATReLU/dReLU sites into ``prosparse::sparse_*_ffn`` ops, by default only in inference
   (no autograd);

then hands the graph to Inductor. The backend is registered under the name ``prosparse`` when
``prosparse_fx`` is imported, and as a ``torch_dynamo_backends`` entry point, so it resolves
without the import.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from .activations import ACTIVATIONS
from .capture import (
    canonical_op,
    module_path,
    nested_graph_modules,
    specialize_symbolic_thresholds,
)
from .eager_fallback import watch_compiled_model
from .ffn import (
    FFNSite,
    UncoveredFFNError,
    check_gates_covered,
    find_sites_in_graph,
    linear_operands,
)
from .passes import InsertActivationTapsPass, SparseFFNRewritePass, SubstituteActivationPass
from .passes.activation_taps import TAPS_META_KEY
from .sparse_modules import check_sparse_rewritable, sparse_rewrite_refusal
from .taps import sink_for

log = logging.getLogger(__name__)

BACKEND_NAME = "prosparse"

_VALID: dict[str, str] = {
    "activation": "None (leave the activations alone) or a name in prosparse_fx.activations."
    "ACTIVATIONS: " + ", ".join(repr(name) for name in ACTIVATIONS),
    "threshold": "FATReLU t >= 0 of the gate, one float or one per FFN site (with "
    "activation='fatrelu' or 'drelu')",
    "regularize": "True or False: feed the ActivationRegularizer(model, ..., taps='graph')",
    "sparse_ffn": "'auto' (in inference, when every site is ReLU/FATReLU), True or False",
    "compiler": "'inductor' or 'eager' (run the rewritten FX graph as is, for debugging)",
    "freeze": "True or False: with the sparse-FFN rewrite, Inductor freezes the weights",
    "predictors": "None, or the model's Predictor records (a list, or a mapping from site "
    "path; prosparse_fx.predictors.load_predictors gives them): approximate mode, inference only",
}


@dataclass(frozen=True)
class BackendOptions:
    """The ``options`` of ``torch.compile(..., backend="prosparse", options=...)``.

    Attributes:
        activation: ``None`` (default: activations stay as they are), ``"relu"``,
            ``"fatrelu"`` (ProSparse Sec. 3.1; FATReLU Sec. 3.3, Eq. 3) or ``"drelu"``
            (TurboSparse Sec. 3: ReLU/FATReLU_t on the gate and ReLU on up; gated FFNs only, a
            plain FFN is refused by name).
        threshold: FATReLU t (>= 0) of the gate, one float or one per FFN site; only with
            ``"fatrelu"`` or ``"drelu"``.
        regularize: add L1(x1) taps for an ``ActivationRegularizer(model, ..., taps="graph")``
            (default ``False``).
        sparse_ffn: rewrite ReLU/FATReLU/dReLU FFN sites into the sparse-FFN ops: ``"auto"``
            (default: when compiled under ``torch.no_grad()``/inference mode, without
            ``regularize``, and every site is ReLU-family), ``True`` (always; the ops have no
            backward, so only for inference) or ``False``.
        compiler: ``"inductor"`` (default) or ``"eager"``.
        freeze: when the sparse-FFN rewrite runs (inference), compile with Inductor's
            ``freezing`` (default ``True``): weights become constants, so each row-major
            transposed down_proj weight the sparse op reads is made once, not per call. Like
            any frozen compile, it does not see later in-place changes to the weights.
        predictors: ``None`` (default), or :class:`~prosparse_fx.predictors.Predictor` s keyed
            by the model's site paths (approximate mode, Deja Vu; ProSparse Sec. 4): each
            FFN site with one becomes ``predicted_gated_ffn`` / ``predicted_plain_ffn``.
            Inference only (under ``torch.no_grad()``), and the model itself must be compiled
            (the paths are the model's); a graph that Dynamo reuses for another module's
            weights is refused when called. A site whose predictor measured slower than the
            exact op (``speedup`` below 1) stays exact, as in ``sparsify_ffn_``.
    """

    activation: str | None = None
    threshold: float | tuple[float, ...] = 0.0
    regularize: bool = False
    sparse_ffn: bool | str = "auto"
    compiler: str = "inductor"
    freeze: bool = True
    predictors: Any = None

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> BackendOptions:
        """Validate a torch.compile ``options`` dict.

        Raises:
            ValueError: an unknown option name or a bad value; the message lists the valid ones.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(_VALID))
        if unknown:
            raise ValueError(f"unknown prosparse backend option(s) {unknown}; {_valid_text()}")
        opts = cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items()})
        opts._check()
        return opts

    def _check(self) -> None:
        def bad(name: str, value: Any) -> ValueError:
            return ValueError(
                f"bad value {value!r} for prosparse backend option {name!r}; valid: "
                f"{_VALID[name]}. {_valid_text()}"
            )

        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise bad("activation", self.activation)
        ts = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,)
        if not ts or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0
            for t in ts
        ):
            raise bad("threshold", self.threshold)
        if self.threshold != 0.0 and not (
            self.activation is not None and ACTIVATIONS[self.activation].takes_threshold
        ):
            raise bad("threshold", f"{self.threshold} without activation='fatrelu' or 'drelu'")
        if not isinstance(self.regularize, bool):
            raise bad("regularize", self.regularize)
        if not (isinstance(self.sparse_ffn, bool) or self.sparse_ffn == "auto"):
            raise bad("sparse_ffn", self.sparse_ffn)
        if self.compiler not in ("inductor", "eager"):
            raise bad("compiler", self.compiler)
        if not isinstance(self.freeze, bool):
            raise bad("freeze", self.freeze)
        if self.predictors is not None:
            from .sparse_modules import predictors_for_sites

            try:
                predictors_for_sites(self.predictors, [], partial=True)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"prosparse backend option 'predictors': {exc}") from exc
            if self.sparse_ffn is False or self.regularize:
                raise ValueError(
                    "prosparse backend option 'predictors' runs approximate mode through the "
                    "sparse-FFN rewrite, for inference: it cannot go with sparse_ffn=False or "
                    "regularize=True; drop one or the other"
                )


def _valid_text() -> str:
    return "valid options: " + "; ".join(f"{k}: {v}" for k, v in _VALID.items())


_said_no_sites = False


def _say_no_sites_once() -> None:
    global _said_no_sites
    if not _said_no_sites:
        _said_no_sites = True
        log.warning("prosparse backend: a graph has no FFN site; compiling it unchanged")


_said_unwatched = False


def _say_unwatched_once() -> None:
    global _said_unwatched
    if not _said_unwatched:
        _said_unwatched = True
        log.warning(
            "prosparse backend: the compiled callable holds no nn.Module the backend can find, "
            "so FFNs that Dynamo runs eagerly (outside its graphs) cannot be refused; compile "
            "the model itself (torch.compile(model, ...)) to have them refused"
        )


def prosparse_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """The ``prosparse`` torch.compile backend (see the module docstring and
    :class:`BackendOptions`).

    Args:
        gm: the Dynamo FX graph (torch-level ops, parameters as placeholders or attributes).
        example_inputs: the graph's real inputs of the first call.
        options: the ``options`` dict given to ``torch.compile``.
        mode: the ``mode`` given to ``torch.compile``, passed on to Inductor.

    Returns:
        The compiled callable.

    Raises:
        ValueError: bad options (listing the valid ones); ``regularize`` with no
            ``ActivationRegularizer(model, ..., taps="graph")`` for the model; a site whose
            activation cannot be replaced.
        NotSparseError: ``sparse_ffn=True`` on a site that is not ReLU-family.
        EagerFallbackError: (later, from a call of the compiled model) with ``activation`` or
            ``regularize``, an activation module of the model ran eagerly, outside the graphs
            (:mod:`prosparse_fx.eager_fallback`).
    """
    opts = BackendOptions.parse(options)
    specialize_symbolic_thresholds(gm)
    # FFNs inside activation-checkpointed regions live in higher-order-op bodies
    graphs = [gm, *nested_graph_modules(gm)]
    per_graph = [find_sites_in_graph(g) for g in graphs]
    if opts.activation is not None or opts.regularize:
        _refuse_under_ddp_optimizer(opts)
        if not watch_compiled_model(opts.activation, opts.regularize, opts.threshold):
            _say_unwatched_once()
    if not any(per_graph):
        if opts.activation is not None:
            for g in graphs:
                check_gates_covered(g, [])
                _refuse_activation_without_sites(g)
        _say_no_sites_once()
        return _compile(gm, example_inputs, opts, mode)
    if opts.activation is not None:
        thresholds = _thresholds_per_graph(opts, [len(s) for s in per_graph])
        for g, t in zip(graphs, thresholds):
            SubstituteActivationPass(opts.activation, t)(g)
        per_graph = [find_sites_in_graph(g) for g in graphs]
    sites = per_graph[0]
    all_sites = [s for found in per_graph for s in found]
    sinks = None
    if opts.regularize:
        nested = [s.path for found in per_graph[1:] for s in found]
        if nested:
            raise ValueError(
                f"options regularize=True: {len(nested)} FFN site(s) ({', '.join(nested[:3])}"
                f"{' ...' if len(nested) > 3 else ''}) are inside an activation-checkpointed "
                "region, where graph taps cannot reach. Train without gradient checkpointing "
                "under torch.compile, or train eagerly with hook taps "
                "(ActivationRegularizer(model, schedule), which supports checkpointing)"
            )
        sinks = _sinks(gm, example_inputs, sites)
        InsertActivationTapsPass(norm=sinks[0][0].norm, zeros=True)(gm)
    inference = not torch.is_grad_enabled()
    predicted = _predictors_here(opts, gm, example_inputs, sites, inference, all_sites)
    rewritten = False
    if opts.sparse_ffn is True:
        check_sparse_rewritable(all_sites)
        if not inference:
            raise ValueError(
                "options sparse_ffn=True: the sparse-FFN ops have no backward; compile under "
                "torch.no_grad() / torch.inference_mode() for inference, or use "
                "sparse_ffn='auto' (dense FFNs while training)"
            )
    guard = _PredictorGuard.plan(gm, example_inputs, per_graph[0], predicted)
    if (
        predicted
        or opts.sparse_ffn is True
        or (
            opts.sparse_ffn == "auto"
            and inference
            and not opts.regularize
            and _rewritable(all_sites)
        )
    ):
        # frozen: the row-major transposed down weights are constants, folded once by Inductor
        for k, g in enumerate(graphs):
            here = predicted if k == 0 else None
            SparseFFNRewritePass(materialize_transposes=opts.freeze, predictors=here)(g)
        rewritten = True
    compiled = _compile(gm, example_inputs, opts, mode, freeze=rewritten and opts.freeze)
    if guard:
        return _PredictorGuard(compiled, guard)
    if sinks is None:
        return compiled
    return _TapDelivery(compiled, gm.meta[TAPS_META_KEY]["n_outputs"], sinks)


def _predictors_here(
    opts: BackendOptions,
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    sites: Sequence[FFNSite],
    inference: bool,
    all_sites: Sequence[FFNSite],
) -> dict[str, Any]:
    """The ``predictors`` option's predictors for ``sites``, the top-level sites of ``gm``,
    by path.

    Raises:
        ValueError: not in inference; no site of the graph has a predictor (the compiled module
            is not the model the predictors are keyed by); a predictor that does not fit its
            site (widths, a bias on a gated site) or was built for another gate weight (the
            graph's weights are fingerprinted, :func:`~prosparse_fx.predictors.check_gate`).
        NotSparseError / UnsupportedFFNError: a site the sparse ops cannot compute.
    """
    if opts.predictors is None:
        return {}
    from .predictors.speed import predictors_that_pay
    from .sparse_modules import predictors_for_sites

    if not inference:
        raise ValueError(
            "options predictors=...: approximate mode is for inference (the predicted ops have "
            "no backward); compile and call the model under torch.no_grad() or "
            "torch.inference_mode()"
        )
    check_sparse_rewritable(all_sites)
    found = predictors_for_sites(
        opts.predictors, sites, partial=True, gates=lambda s: _graph_gate(gm, example_inputs, s)
    )
    kept = {p.site for p in predictors_that_pay(list(found.values()))}
    if not found:
        given = opts.predictors
        keyed = [p.site for p in (given.values() if isinstance(given, Mapping) else given)]
        raise ValueError(
            f"options predictors=...: no FFN site of this graph ({[s.path for s in sites][:3]}"
            f" ...) has a predictor (they are for {keyed[:3]} ...). Compile the model the "
            "predictors were built for itself, torch.compile(model, ...), so that the site "
            "paths are the model's; or run approximate mode eagerly (sparsify_ffn_(model, "
            "predictors=...))"
        )
    found = {path: p for path, p in found.items() if path in kept}
    rest = [s.path for s in all_sites if s.path not in found]
    if rest:
        log.warning(
            "prosparse backend: %d FFN site(s) without a predictor, or whose predictor measured "
            "slower than exact mode, stay exact: %s",
            len(rest),
            ", ".join(rest[:3]) + (" ..." if len(rest) > 3 else ""),
        )
    return found


def _graph_gate(
    gm: fx.GraphModule, example_inputs: Sequence[Any], site: FFNSite
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate of ``site`` in ``gm`` as :func:`~prosparse_fx.predictors.gate_weight` reads it
    from a model: ``(weight [d_ff, d], bias [d_ff] or None)``, from the graph's inputs or
    attributes."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))

    def value(node: Any) -> torch.Tensor | None:
        if node is None:
            return None
        if node.op == "placeholder":
            return example_inputs[placeholders.index(node)]
        if node.op == "get_attr":
            return operator.attrgetter(node.target)(gm)
        raise ValueError(
            f"options predictors=...: cannot read the gate weight of {site.path} from the graph "
            f"(it is computed by {node.op} {node.target}), so the predictor cannot be checked "
            "against it; run approximate mode eagerly (sparsify_ffn_(model, predictors=...))"
        )

    _, w, b, transposed = linear_operands(
        site.nodes.gate if site.kind == "gated" else site.nodes.up
    )
    weight, bias = value(w), value(b)
    if transposed:
        weight = weight.T
    if site.gate_up_split is not None:
        rows = slice(site.gate_up_split[0], site.gate_up_split[0] + site.intermediate_size)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    return weight.detach(), None if bias is None else bias.detach()


class _PredictorGuard:
    """Calls the compiled graph after checking that the gate weights of its predicted sites are
    the ones the predictors were bound to at compile time.

    Dynamo may reuse a graph for another instance of a module class, passing that instance's
    weights as graph inputs; the predictors baked into the graph would then be another layer's,
    which must not run silently."""

    def __init__(self, compiled: Callable[..., Any], checks: list[tuple[int, int, str]]) -> None:
        self.compiled = compiled
        self.checks = checks
        self._boxed_call = getattr(compiled, "_boxed_call", False)

    @staticmethod
    def plan(
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        sites: Sequence[FFNSite],
        predicted: Mapping[str, Any],
    ) -> list[tuple[int, int, str]]:
        """(graph input position, data pointer, site path) of each predicted site's gate weight
        that arrives as a graph input (a weight the graph holds cannot change)."""
        placeholders = list(gm.graph.find_nodes(op="placeholder"))
        checks = []
        for site in sites:
            if site.path not in predicted:
                continue
            gate = site.nodes.gate if site.kind == "gated" else site.nodes.up
            weight = linear_operands(gate)[1]
            if weight.op == "placeholder":
                position = placeholders.index(weight)
                checks.append((position, example_inputs[position].data_ptr(), site.path))
        return checks

    def __call__(self, *args: Any) -> Any:
        boxed = len(args) == 1 and isinstance(args[0], list)  # one list of all the inputs
        given = args[0] if boxed else args
        for position, pointer, path in self.checks:
            if given[position].data_ptr() != pointer:
                raise RuntimeError(
                    f"prosparse backend, options predictors=...: this compiled graph holds the "
                    f"predictor of {path}, but is now called with other gate weights than it "
                    "was compiled with: another module's (Dynamo reuses one graph for modules "
                    "of one class) or replaced parameters. Compile the whole model once "
                    "(torch.compile(model, ...)) after its weights are final, or run "
                    "approximate mode eagerly (sparsify_ffn_(model, predictors=...))"
                )
        return self.compiled(*args)


def _rewritable(sites: Sequence[FFNSite]) -> bool:
    """``sparse_ffn='auto'``: every site is ReLU-family and the ops compute it exactly; when
    some site is not (a gated FFN with biases), the log says why and the FFNs stay dense."""
    if not all(s.is_relu_family for s in sites):
        return False
    refused = [(s.path, r) for s in sites if (r := sparse_rewrite_refusal(s)) is not None]
    if refused:
        log.warning(
            "prosparse backend: FFNs kept dense (sparse_ffn='auto'): %s",
            "; ".join(f"{p}: {r}" for p, r in refused[:3]),
        )
        return False
    return True


def _thresholds_per_graph(opts: BackendOptions, counts: list[int]) -> list[Any]:
    """The ``threshold`` option split over the graph and its nested bodies, in site order."""
    if not isinstance(opts.threshold, tuple):
        return [opts.threshold] * len(counts)
    total = sum(counts)
    if len(opts.threshold) != total:
        raise ValueError(
            f"options threshold: got {len(opts.threshold)} per-site thresholds for {total} FFN "
            "site(s) in this graph; pass one per site or a single float (a graph break splits "
            "the FFNs over several graphs: compile with fullgraph=True to find it)"
        )
    out, k = [], 0
    for n in counts:
        out.append(list(opts.threshold[k : k + n]))
        k += n
    return out


_ACTIVATION_OPS = ("silu", "gelu", "gelu_tanh", "sigmoid", "tanh", "erf")


def _refuse_activation_without_sites(gm: fx.GraphModule) -> None:
    """With ``activation`` asked for, a graph with no FFN site but with an activation op may hold
    an FFN the matcher does not know (Falcon's ``x @ weight.T`` linears, GPT-OSS's clamped
    SwiGLU experts): leaving it unchanged would be silent, so refuse, naming the op."""
    for node in gm.graph.nodes:
        op = canonical_op(node)
        if op in _ACTIVATION_OPS:
            raise UncoveredFFNError(
                f"options activation=...: this graph has no FFN site the backend can rewrite, "
                f"but it computes {op} at {module_path(node) or node.name}, which may belong to an "
                "FFN written in a form the matcher does not know; it would keep its activation. "
                "Relufy the model eagerly (prosparse_fx.relufy_) if find_ffn_sites finds its "
                "FFNs, or compile without the activation option"
            )


def _refuse_under_ddp_optimizer(opts: BackendOptions) -> None:
    """Raise when Dynamo's DDP optimizer calls the backend on pieces of a graph split at
    DDP's bucket boundaries: an FFN cut by a boundary would keep its activation, and graph taps
    see fake weights. The way out is to give the backend the whole graph."""
    try:
        from torch._dynamo.utils import get_optimize_ddp_mode
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch without these internals
        return
    if get_optimize_ddp_mode() != "ddp_optimizer":
        return
    if DistributedDataParallel._get_active_ddp_module() is None:
        return
    asked = "activation" if opts.activation is not None else "regularize"
    raise ValueError(
        f"options {asked}=...: the model is a DistributedDataParallel module and Dynamo's DDP "
        "optimizer splits its graph at gradient-bucket boundaries, which can cut an FFN in two "
        "(its activation would silently stay). Set torch._dynamo.config.optimize_ddp = False "
        "before compiling (the backend then sees the whole graph; DDP still all-reduces the "
        "gradients), or wrap after compiling: DDP(torch.compile(model, backend='prosparse', ...))"
    )


def _sinks(
    gm: fx.GraphModule, example_inputs: Sequence[Any], sites: Sequence[Any]
) -> list[tuple[Any, int, int | None]]:
    """The regularizer and site index for each graph site, found by its down_proj weight, and
    the graph input that weight arrives through (``None`` for a weight held by the graph)."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    found = []
    for site in sites:
        _, weight_node, _, _ = linear_operands(site.nodes.down)
        weight, position = None, None
        if weight_node.op == "placeholder":
            position = placeholders.index(weight_node)
            weight = example_inputs[position]
        elif weight_node.op == "get_attr":
            weight = gm.get_parameter(str(weight_node.target))
        sink = sink_for(weight) if isinstance(weight, torch.Tensor) else None
        if sink is None:
            raise ValueError(_no_sink(site.path))
        found.append((*sink, position))
    return found


def _no_sink(where: str) -> str:
    return (
        f"options regularize=True, but no ActivationRegularizer receives graph taps for "
        f"FFN site {where}: create ActivationRegularizer(model, schedule, "
        f"taps='graph') before the first call of the compiled model. Under FSDP2 "
        "(fully_shard) the compiled graph sees unsharded copies of the weights, which "
        "graph taps cannot match: use hook taps, ActivationRegularizer(model, schedule, "
        "sites=...), with options={'activation': ...} and without regularize"
    )


class _TapDelivery:
    """Calls the compiled graph, hands its tap outputs to the regularizers and returns the
    original outputs."""

    def __init__(self, compiled: Callable[..., Any], n_outputs: int, sinks: list) -> None:
        self.compiled = compiled
        self.n_outputs = n_outputs
        self.sinks = sinks
        self._boxed_call = getattr(compiled, "_boxed_call", False)

    def __call__(self, *args: Any) -> Any:
        # Dynamo reuses one compiled graph for every instance of a module class, each call
        # passing that instance's weights: the sink is the one of the down_proj weight passed
        # now, never the one of the instance first compiled (looked up before the call, which
        # may free boxed arguments)
        sinks = [self._sink(args, entry) for entry in self.sinks]
        out = self.compiled(*args)
        k = len(sinks)
        taps = out[self.n_outputs :]
        for j, (sink, i) in enumerate(sinks):
            sink.receive(i, taps[j], taps[k + j])
        return out[: self.n_outputs]

    @staticmethod
    def _sink(args: Sequence[Any], entry: tuple[Any, int, int | None]) -> tuple[Any, int]:
        sink, i, position = entry
        if position is None:
            return sink, i
        found = sink_for(args[position])
        if found is None:
            raise RuntimeError(_no_sink(f"(down_proj weight of graph input {position})"))
        return found


def _compile(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    opts: BackendOptions,
    mode: str | None,
    freeze: bool = False,
) -> Callable[..., Any]:
    if opts.compiler == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    if freeze:
        patches["freezing"] = True
    return compile_fx(gm, list(example_inputs), config_patches=patches or None)


def register() -> None:
    """Register the backend as ``prosparse`` (idempotent; the entry point may have done it)."""
    from torch._dynamo.backends import registry

    # an entry point discovered but not yet loaded is registered by torch itself on lookup;
    # registering it here too would make that lookup fail as a duplicate
    if BACKEND_NAME in registry._COMPILER_FNS or registry._BACKENDS.get(BACKEND_NAME):
        return
    registry.register_backend(prosparse_backend, name=BACKEND_NAME)


__all__ = ["BACKEND_NAME", "BackendOptions", "prosparse_backend", "register"]
