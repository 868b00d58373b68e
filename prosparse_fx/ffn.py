"""FFN-site discovery: one dataflow matcher for export (ATen) and Dynamo graphs.

A *gated* FFN (LLaMA, Mistral, Qwen2, Gemma) is ``down(act(gate(x)) * up(x))``; a *plain* FFN
(BERT, GPT-2, OPT) is ``fc2(act(fc1(x)))``. Sites are found by dataflow, never by module names:
linears (``linear``/``addmm``/``mm``/``matmul`` with a parameter weight, seen through reshapes),
an activation region between a linear's output and the multiply (or the second linear), and the
consumer linear whose input is ``x1``.

The activation is recognised as one op (``silu``, ``gelu``, ``gelu_tanh``, ``relu``,
``prosparse::fatrelu``) or as a decomposed formula (``sigmoid*x`` is SiLU; ``pow/tanh/mul/add``
is tanh-GELU as in GPT-2's ``NewGELUActivation``; ``erf/mul/add`` is exact GELU). A gated FFN
whose up projection is followed by a ReLU too, ``down(act(gate(x)) * relu(up(x)))`` with a
ReLU/FATReLU gate, is dReLU (TurboSparse, Song et al. 2024, Sec. 3); for a fused gate_up linear
the ReLU may come before the split.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from torch import fx, nn

from .capture import canonical_op, capture_export, module_path, module_stack, node_shape

ActivationKind = (
    str  # "silu" | "gelu" | "gelu_tanh" | "relu" | "fatrelu" | "drelu" | "unknown(...)"
)
RELU_FAMILY = ("relu", "fatrelu", "drelu")
REPLACEABLE = ("silu", "gelu", "gelu_tanh", "relu", "fatrelu", "drelu")

_LINEAR_OPS = {"linear", "addmm", "mm", "matmul"}
_ACTIVATION_OPS = {
    "silu",
    "gelu",
    "gelu_tanh",
    "relu",
    "fatrelu",
    "sigmoid",
    "tanh",
    "erf",
    "pow",
    "mul",
    "add",
    "div",
    "sub",
    "neg",
    "view",
}
_MAX_REGION = 32


class FFNNotFoundError(ValueError):
    """No FFN site could be found; the message lists what the graph does contain."""


class UncoveredFFNError(ValueError):
    """An activation that looks like an FFN's gate is in no FFN site a graph pass can change."""


@dataclass(frozen=True)
class SiteNodes:
    """Graph nodes of one FFN site (valid only for the graph they were found in)."""

    act_input: fx.Node  # output of the gate linear (fc1 for plain FFNs), seen through reshapes
    act_output: fx.Node  # last node of the activation region
    region: tuple[fx.Node, ...]  # the activation's nodes, topologically ordered
    x1: fx.Node  # input of down_proj (fc2)
    down: fx.Node  # the down_proj (fc2) op
    up: fx.Node  # the up_proj op (fc1 for plain FFNs)
    gate: fx.Node | None = None  # the gate_proj op (None for plain FFNs)
    up_operand: fx.Node | None = None  # the multiply's up-side input (gated FFNs)
    up_relu: fx.Node | None = None  # dReLU: the ReLU after up_proj (or the fused gate_up)


@dataclass(frozen=True)
class FFNSite:
    """One FFN of a model: a plain record shared by the eager, graph, compile and ONNX paths.

    Attributes:
        path: module path of the FFN, e.g. ``"model.layers.0.mlp"``.
        kind: ``"gated"`` (``down(act(gate(x)) * up(x))``) or ``"plain"`` (``fc2(act(fc1(x)))``).
        gate: module path of gate_proj (``None`` for plain FFNs).
        up: module path of up_proj (fc1 for plain FFNs).
        down: module path of down_proj (fc2 for plain FFNs); its input is x1.
        activation: ``"silu"``, ``"gelu"``, ``"gelu_tanh"``, ``"relu"``, ``"fatrelu"``,
            ``"drelu"`` (gated only: ReLU/FATReLU_t on the gate and ReLU on up, TurboSparse) or
            ``"unknown(<ops>)"``.
        activation_module: module path of the activation module, or ``None`` when the activation
            is a functional call inside the FFN's forward (then it cannot be swapped eagerly).
        threshold: FATReLU threshold t of the gate (``0.0`` for ReLU and dReLU without a
            shifted threshold, ``None`` otherwise).
        hidden_size: width d of the FFN input.
        intermediate_size: width d_ff of x1.
        bias: some linear of the site (gate, up or down) adds a bias.
        gate_up_split: for a gate and up computed by one fused linear whose output is split
            (Phi-3's ``gate_up_proj`` then ``chunk``): the first output row of the gate's and of
            the up's part, each ``intermediate_size`` rows; ``gate`` and ``up`` then name the
            same module. ``None`` for separate linears.
        expert: the expert index for an expert of a mixture-of-experts layer (``path`` is the
            experts module; see :mod:`prosparse_fx.moe`), else ``None``.
        nodes: graph nodes of the site (``None`` once detached from its graph).
    """

    path: str
    kind: Literal["gated", "plain"]
    gate: str | None
    up: str
    down: str
    activation: ActivationKind
    activation_module: str | None
    threshold: float | None
    hidden_size: int
    intermediate_size: int
    bias: bool = False
    gate_up_split: tuple[int, int] | None = None
    expert: int | None = None
    nodes: SiteNodes | None = field(default=None, repr=False, compare=False)

    @property
    def fc1(self) -> str:
        """Alias of :attr:`up` for plain FFNs."""
        return self.up

    @property
    def fc2(self) -> str:
        """Alias of :attr:`down` for plain FFNs."""
        return self.down

    @property
    def is_relu_family(self) -> bool:
        """True if x1 has exact zeros: the activation is ReLU, FATReLU or dReLU."""
        return self.activation in RELU_FAMILY

    @property
    def up_relu(self) -> bool:
        """True for dReLU: up_proj's output goes through a ReLU too."""
        return self.activation == "drelu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the record (without graph nodes)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "nodes"}


# --------------------------------------------------------------------------- graph helpers


def _is_param(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "get_attr":
        return True
    if node.op == "placeholder":
        name = node.name.lower()
        return "parameters" in name or "weight" in name
    return False


def linear_operands(node: fx.Node) -> tuple[Any, Any, Any, bool]:
    """``(x, weight, bias, transposed)`` of a linear-like node; ``transposed`` is True when the
    weight is stored ``[in, out]`` (``addmm``/``mm``/``matmul``, e.g. GPT-2's ``Conv1D``)."""
    op = canonical_op(node)
    args = node.args
    if op == "addmm":
        return args[1], args[2], args[0], True
    if op == "linear":
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        return args[0], args[1], bias, False
    return args[0], args[1], None, True


def _linear_input(node: fx.Node) -> fx.Node | None:
    """Data input of a linear-like node, or ``None`` if ``node`` is not a parameter linear."""
    op = canonical_op(node)
    if op not in _LINEAR_OPS:
        return None
    args = node.args
    if op == "addmm":
        x, w = args[1], args[2]
    else:
        x, w = args[0], args[1] if len(args) > 1 else None
    if not (_is_param(w) and isinstance(x, fx.Node)):
        return None
    return x


def back_through_views(node: Any) -> Any:
    """Follow ``node`` back through shape-only ops."""
    while isinstance(node, fx.Node) and canonical_op(node) == "view":
        node = node.args[0]
    return node


def forward_through_views(node: fx.Node) -> fx.Node:
    """Follow ``node`` forward through single-user shape-only ops."""
    while len(node.users) == 1:
        (user,) = node.users
        if canonical_op(user) != "view" or user.args[0] is not node:
            break
        node = user
    return node


def _part_rows(width: int, start: Any, stop: Any) -> tuple[int, int] | None:
    """``(first row, rows)`` of ``[start:stop]`` over ``width`` outputs, or ``None``."""
    start = 0 if start is None else start
    stop = width if stop is None else stop
    if not isinstance(start, int) or not isinstance(stop, int):
        return None
    start, stop = (v + width if v < 0 else v for v in (start, stop))
    stop = min(stop, width)
    return (start, stop - start) if 0 <= start < stop else None


def relu_input(node: Any) -> fx.Node | None:
    """The input of ``node`` seen through views when ``node`` is a ReLU, else ``None``."""
    if isinstance(node, fx.Node) and canonical_op(node) == "relu" and node.args:
        arg = back_through_views(node.args[0])
        return arg if isinstance(arg, fx.Node) else None
    return None


def _through_relu(node: Any, linears: dict[fx.Node, fx.Node]) -> Any:
    """``node`` seen through views, and through a ReLU of a linear's output (a dReLU fused
    gate_up linear is ReLU'd before the split)."""
    node = back_through_views(node)
    inner = relu_input(node)
    return inner if inner is not None and inner in linears else node


def _split_part(node: fx.Node, linears: dict[fx.Node, fx.Node]) -> tuple[fx.Node, int, int] | None:
    """``(linear, first row, rows)`` when ``node`` is one part of a linear's output split along
    its last dimension (``chunk``/``split`` then ``getitem``, as Phi-3's fused ``gate_up_proj``,
    or a slice ``h[..., a:b]``), else ``None``. The output may go through a ReLU before the
    split (dReLU)."""
    op = canonical_op(node)
    if op is None and node.op == "call_function" and "slice" in str(node.target):
        # ATen slice.Tensor(x, dim, start, end)
        src = _through_relu(node.args[0], linears)
        shape = node_shape(src)
        if src not in linears or not shape or shape[-1] < 0 or len(node.args) < 3:
            return None
        dim = node.args[1]
        if dim not in (-1, len(shape) - 1) or (len(node.args) > 4 and node.args[4] != 1):
            return None
        rows = _part_rows(shape[-1], node.args[2], node.args[3] if len(node.args) > 3 else None)
        return None if rows is None else (src, *rows)
    if op != "getitem" or len(node.args) != 2:
        return None
    src, index = node.args
    if isinstance(src, fx.Node) and _through_relu(src, linears) in linears:
        # Dynamo's h[..., a:b]: an Ellipsis, then one step-1 slice of the last dimension
        linear, shape = _through_relu(src, linears), node_shape(src)
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis):
            return None
        part = index[1]
        if not isinstance(part, slice) or part.step not in (None, 1) or not shape:
            return None
        rows = _part_rows(shape[-1], part.start, part.stop) if shape[-1] >= 0 else None
        return None if rows is None else (linear, *rows)
    if not isinstance(src, fx.Node) or canonical_op(src) not in ("chunk", "split"):
        return None
    if not isinstance(index, int) or len(src.args) < 2:
        return None
    linear = _through_relu(src.args[0], linears)
    if linear not in linears:
        return None
    shape = node_shape(linear)
    dim = src.args[2] if len(src.args) > 2 else src.kwargs.get("dim", 0)
    if not shape or not isinstance(dim, int) or dim not in (-1, len(shape) - 1):
        return None
    width = shape[-1]
    if width < 0:
        return None
    how = src.args[1]
    if canonical_op(src) == "chunk":
        if not isinstance(how, int) or how < 1:
            return None
        step = -(-width // how)
        sizes = [min(step, width - k) for k in range(0, width, step)]
    elif isinstance(how, int):
        sizes = [min(how, width - k) for k in range(0, width, how)]
    elif isinstance(how, (list, tuple)) and all(isinstance(v, int) for v in how):
        sizes = list(how)
    else:
        return None
    if not -len(sizes) <= index < len(sizes):
        return None
    index %= len(sizes)
    return linear, sum(sizes[:index]), sizes[index]


def _region(end: fx.Node, starts: dict[fx.Node, fx.Node]) -> tuple[fx.Node, list[fx.Node]] | None:
    """Activation region ending at ``end`` that starts at exactly one linear output.

    Returns ``(start, nodes)`` or ``None`` when ``end`` depends on anything else (another input,
    a parameter, an op that is not elementwise arithmetic) or the region is empty or too big.
    """
    if end in starts:
        return None
    seen: set[fx.Node] = set()
    found: set[fx.Node] = set()
    stack = [end]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if len(seen) > _MAX_REGION or canonical_op(node) not in _ACTIVATION_OPS:
            return None
        for arg in node.all_input_nodes:
            if arg in starts:
                found.add(arg)
            else:
                stack.append(arg)
    if len(found) != 1:
        return None
    # Interior nodes must not feed anything outside the region.
    for node in seen:
        if node is not end and any(u not in seen for u in node.users):
            return None
    order = {n: i for i, n in enumerate(end.graph.nodes)}
    return found.pop(), sorted(seen, key=order.__getitem__)


def _classify(start: fx.Node, region: list[fx.Node]) -> tuple[ActivationKind, float | None]:
    ops = Counter(canonical_op(n) for n in region if canonical_op(n) != "view")
    if len(ops) == 1 and sum(ops.values()) == 1:
        (op,) = ops
        if op == "fatrelu":
            node = next(n for n in region if canonical_op(n) == "fatrelu")
            t = node.args[1] if len(node.args) > 1 else node.kwargs.get("threshold", 0.0)
            return "fatrelu", float(t)
        if op == "relu":
            return "relu", 0.0
        if op in ("silu", "gelu", "gelu_tanh"):
            return op, None
    if ops == Counter({"sigmoid": 1, "mul": 1}):
        sig = next(n for n in region if canonical_op(n) == "sigmoid")
        if back_through_views(sig.args[0]) is start or sig.args[0] is start:
            return "silu", None
    keys = set(ops)
    if "tanh" in keys and "add" in keys and keys <= {"tanh", "pow", "mul", "add", "div"}:
        return "gelu_tanh", None
    if "erf" in keys and keys <= {"erf", "mul", "add", "div"}:
        return "gelu", None
    return "unknown(" + "+".join(sorted(ops)) + ")", None


def _common_path(paths: list[str | None]) -> str | None:
    parts = [p.split(".") for p in paths if p is not None]
    if not parts or len(parts) != len(paths):
        return None
    common: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _activation_module(region: list[fx.Node], ffn_path: str) -> str | None:
    paths = [module_path(n) for n in region if canonical_op(n) != "view"]
    common = _common_path(paths)
    if common is None or common == ffn_path or not common.startswith(ffn_path + "."):
        return None
    # the activation module must own every op of the region (all share one innermost module)
    return common if all(p == common for p in paths) else None


def _width(node: fx.Node) -> int:
    shape = node_shape(node)
    return int(shape[-1]) if shape else -1


def find_sites_in_graph(gm: fx.GraphModule) -> list[FFNSite]:
    """Find every FFN site in an export (ATen) or Dynamo GraphModule, in graph order.

    Args:
        gm: a GraphModule whose nodes carry ``nn_module_stack`` metadata.

    Returns:
        One :class:`FFNSite` per FFN, with :attr:`FFNSite.nodes` pointing into ``gm``.
        An empty list when there is none (see :func:`find_ffn_sites` for the raising variant).
    """
    linears: dict[fx.Node, fx.Node] = {}  # linear op -> data input
    out_to_linear: dict[fx.Node, fx.Node] = {}  # linear output (through views) -> linear op
    for node in gm.graph.nodes:
        x = _linear_input(node)
        if x is not None:
            linears[node] = x
            out_to_linear[forward_through_views(node)] = node
    parts: dict[fx.Node, tuple[int, int]] = {}  # part of a split linear output -> (row, rows)
    for node in gm.graph.nodes:
        part = _split_part(node, linears)
        if part is not None:
            out_to_linear[node] = part[0]
            parts[node] = part[1:]

    sites: list[FFNSite] = []
    used: set[fx.Node] = set()
    for down, x_in in linears.items():
        x1 = back_through_views(x_in)
        if not isinstance(x1, fx.Node) or x1 in used:
            continue
        site = _match_gated(down, x1, linears, out_to_linear, parts) or _match_plain(
            down, x1, out_to_linear
        )
        if site is not None:
            used.add(x1)
            sites.append(site)
    return sites


def _has_bias(*linears: fx.Node | None) -> bool:
    return any(n is not None and linear_operands(n)[2] is not None for n in linears)


def _relu_before_split(part: fx.Node) -> fx.Node | None:
    """The ReLU between a fused linear and its split, for a part of its output, or ``None``."""
    src = part.args[0] if part.args else None
    if isinstance(src, fx.Node) and canonical_op(src) in ("chunk", "split"):
        src = src.args[0]
    src = back_through_views(src)
    return src if isinstance(src, fx.Node) and canonical_op(src) == "relu" else None


def _match_gated(
    down: fx.Node,
    x1: fx.Node,
    linears: dict[fx.Node, fx.Node],
    out_to_linear: dict[fx.Node, fx.Node],
    parts: dict[fx.Node, tuple[int, int]],
) -> FFNSite | None:
    if canonical_op(x1) != "mul" or len(x1.all_input_nodes) != 2:
        return None
    a_in, b_in = x1.args[0], x1.args[1]
    found: list[FFNSite] = []
    for act_end, up_out in ((a_in, b_in), (b_in, a_in)):
        site = _gated_candidate(down, x1, act_end, up_out, linears, out_to_linear, parts)
        if site is not None:
            found.append(site)
    if len(found) > 1:
        # ReLU on both sides (dReLU): the multiply's order cannot tell gate from up; a gate
        # whose "activation" is the ReLU inside its own linear module (ReLULinear) is the up
        own = [s for s in found if s.activation_module != s.gate]
        found = own or found
    return found[0] if found else None


def _gated_candidate(
    down: fx.Node,
    x1: fx.Node,
    act_end: Any,
    up_out: Any,
    linears: dict[fx.Node, fx.Node],
    out_to_linear: dict[fx.Node, fx.Node],
    parts: dict[fx.Node, tuple[int, int]],
) -> FFNSite | None:
    """The gated site with ``act_end`` the end of the gate's activation and ``up_out`` the
    up side of the multiply, or ``None``."""
    if not isinstance(act_end, fx.Node) or not isinstance(up_out, fx.Node):
        return None
    up_src = back_through_views(up_out)
    up_relu = None
    inner = relu_input(up_src)
    if inner is not None and (inner in linears or inner in parts):
        up_relu, up_src = up_src, inner
    if up_src in linears:
        up, up_part = up_src, None
    elif up_src in parts:
        up, up_part = out_to_linear[up_src], parts[up_src]
        if up_relu is None:
            up_relu = _relu_before_split(up_src)
    else:
        return None
    found = _region(act_end, out_to_linear)
    if found is None:
        return None
    start, region = found
    gate, gate_part = out_to_linear[start], parts.get(start)
    if back_through_views(linears[gate]) is not back_through_views(linears[up]):
        return None
    split = None
    if gate is up:  # one fused linear: two distinct, equal parts of its output
        if gate_part is None or up_part is None or gate_part[0] == up_part[0]:
            return None
        if gate_part[1] != up_part[1] or gate_part[1] != _width(x1):
            return None
        split = (gate_part[0], up_part[0])
    elif gate_part is not None or up_part is not None:
        return None
    kind, threshold = _classify(start, region)
    if up_relu is not None:
        # dReLU (TurboSparse): ReLU/FATReLU_t on the gate and ReLU on up
        if kind in ("relu", "fatrelu"):
            kind = "drelu"
        else:
            kind, threshold = f"unknown({kind} gate, relu up)", None
    paths = [module_path(gate), module_path(up), module_path(down)]
    ffn_path = _common_path(paths) or ""
    return FFNSite(
        path=ffn_path,
        kind="gated",
        gate=paths[0],
        up=paths[1] or "",
        down=paths[2] or "",
        activation=kind,
        activation_module=_activation_module(region, ffn_path),
        threshold=threshold,
        hidden_size=_width(back_through_views(linears[gate])),
        intermediate_size=_width(x1),
        bias=_has_bias(gate, up, down),
        gate_up_split=split,
        nodes=SiteNodes(start, act_end, tuple(region), x1, down, up, gate, up_out, up_relu),
    )


def _match_plain(
    down: fx.Node, x1: fx.Node, out_to_linear: dict[fx.Node, fx.Node]
) -> FFNSite | None:
    found = _region(x1, out_to_linear)
    if found is None:
        return None
    start, region = found
    fc1 = out_to_linear[start]
    kind, threshold = _classify(start, region)
    if kind.startswith("unknown") and not any(
        canonical_op(n)
        in {"silu", "gelu", "gelu_tanh", "relu", "fatrelu", "sigmoid", "tanh", "erf"}
        for n in region
    ):
        return None  # pure arithmetic between two linears (a scale, a residual) is no FFN
    paths = [module_path(fc1), module_path(down)]
    ffn_path = _common_path(paths) or ""
    return FFNSite(
        path=ffn_path,
        kind="plain",
        gate=None,
        up=paths[0] or "",
        down=paths[1] or "",
        activation=kind,
        activation_module=_activation_module(region, ffn_path),
        threshold=threshold,
        hidden_size=_width(
            back_through_views(fc1.args[1] if canonical_op(fc1) == "addmm" else fc1.args[0])
        ),
        intermediate_size=_width(x1),
        bias=_has_bias(fc1, down),
        nodes=SiteNodes(start, x1, tuple(region), x1, down, fc1),
    )


def describe_graph(gm: fx.GraphModule) -> str:
    """One-line summary of the linears and activations in a graph, for error messages."""
    linear_paths = sorted({module_path(n) or n.name for n in gm.graph.nodes if _linear_input(n)})
    acts = Counter(
        canonical_op(n)
        for n in gm.graph.nodes
        if canonical_op(n) in {"silu", "gelu", "gelu_tanh", "relu", "fatrelu", "sigmoid", "tanh"}
    )
    shown = ", ".join(linear_paths[:8]) + (" ..." if len(linear_paths) > 8 else "")
    return (
        f"{len(linear_paths)} linear layer(s) [{shown or 'none'}] and activations "
        f"{dict(acts) or 'none'}"
    )


def find_ffn_sites(
    model: nn.Module | fx.GraphModule, example_inputs: Any = None, *, require: bool = True
) -> list[FFNSite]:
    """Find the FFNs of a model by dataflow (no per-architecture tables of module names).

    Args:
        model: an ``nn.Module`` (captured with ``torch.export``, non-strict) or a GraphModule
            from ``torch.export`` or Dynamo (matched as it is).
        example_inputs: positional tuple or keyword dict for the capture. ``None``: for a Hugging
            Face model, ``input_ids`` of shape ``[1, 8]`` built from its config.
        require: raise when no FFN is found (default) instead of returning ``[]``.

    Returns:
        One :class:`FFNSite` per FFN in module order; each expert of a mixture-of-experts layer
        is a site (:mod:`prosparse_fx.moe`).

    Raises:
        FFNNotFoundError: no FFN site was found (the message lists the linears and activations
            the graph does have).
        ValueError: no example inputs given and none can be built from the model's config, or
            the model is already sharded (FSDP2): find its sites before sharding.
    """
    if isinstance(model, fx.GraphModule) and _has_module_stack(model):
        sites = find_sites_in_graph(model)
        gm = model
    else:
        from .moe import find_expert_sites, traceable_experts

        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise ValueError(
                f"{type(model).__name__} is sharded (FSDP2/DTensor weights), which torch.export "
                "cannot capture: find the sites before sharding (sites = find_ffn_sites(model) "
                "before fully_shard) and pass them as sites=..."
            )
        with traceable_experts(model):
            gm = capture_export(model, example_inputs)
        sites = _in_module_order(model, find_sites_in_graph(gm) + find_expert_sites(model))
    if require and not sites:
        from .peers import peer_hooks  # peers imports this module

        if not isinstance(model, fx.GraphModule) and peer_hooks(model):
            raise FFNNotFoundError(
                f"no FFN found in {type(model).__name__}: it carries training-free peer hooks "
                "(prosparse_fx.peers), which change x1 inside the FFN, so the FFN pattern no "
                "longer matches; find the sites before apply_cats_/apply_teal_ and pass them "
                "as sites=..., or remove_peers_(model) first"
            )
        raise FFNNotFoundError(
            f"no FFN found in {type(model).__name__}: the graph has {describe_graph(gm)}. "
            "An FFN is two linears on the same input, an activation, a multiply and a third "
            "linear (gated), or a linear, an activation and a linear (plain)." + _own_linears(model)
        )
    return sites


def _own_linears(model: nn.Module) -> str:
    """A sentence naming the ``nn.Linear`` subclasses of ``model`` with a forward of their own
    (Falcon's ``FalconLinear`` computes ``x @ weight.T``), which the analysis does not read as
    linear layers; empty when there are none."""
    own = {
        path: type(m).__name__
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and type(m).forward is not nn.Linear.forward
    }
    if not own:
        return ""
    paths = list(own)
    kinds = sorted(set(own.values()))
    return (
        f" Its {len(paths)} {'/'.join(kinds)} module(s) ({', '.join(paths[:2])}"
        f"{' ...' if len(paths) > 2 else ''}) subclass nn.Linear with a forward of their own, "
        "which the FFN analysis does not read as linear layers: this architecture is not "
        "supported (the README's support table lists the families that are)."
    )


def _in_module_order(model: nn.Module, sites: list[FFNSite]) -> list[FFNSite]:
    """Sites sorted by where their FFN module comes in ``model.named_modules()`` (experts of one
    module by expert index), graph order kept for ties."""
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}

    def key(site: FFNSite) -> tuple[int, int]:
        path = site.path.rpartition(".")[0] if site.expert is not None else site.path
        return order.get(path, len(order)), site.expert or 0

    return sorted(sites, key=key)


def _has_module_stack(gm: fx.GraphModule) -> bool:
    return any(module_stack(n) for n in gm.graph.nodes)


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that names the site when it fails.

    Raises:
        LookupError: ``path`` is not a submodule of ``model``.
    """
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise LookupError(
            f"module {path!r} of an FFN site is not in {type(model).__name__}; were the sites "
            "found on a different model?"
        ) from exc


_GATE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def check_gates_covered(gm: fx.GraphModule, sites: list[FFNSite]) -> None:
    """Raise when a SiLU/GELU in ``gm`` gates a multiply, as in a gated FFN, but belongs to no
    site: a pass that changes the FFN activations would silently leave that FFN as it was.

    Such an FFN is an expert of a mixture-of-experts layer (its weights are slices of 3-D
    parameters picked by the router; see :mod:`prosparse_fx.moe`) or an FFN cut in two by a
    graph break.

    Raises:
        UncoveredFFNError: naming the activation's module and the way out.
    """
    matched = {n for s in sites if s.nodes is not None for n in s.nodes.region}
    for node in gm.graph.nodes:
        if canonical_op(node) not in _GATE_ACTIVATIONS or node in matched:
            continue
        if any(canonical_op(u) == "mul" for u in forward_through_views(node).users):
            raise UncoveredFFNError(
                f"the {canonical_op(node)} at {module_path(node) or node.name} gates a multiply "
                "like a gated FFN, but it is not part of an FFN site a graph pass can change (a "
                "mixture-of-experts expert, or an FFN split by a graph break), so it would keep "
                "its activation. Relufy the model eagerly first (prosparse_fx.relufy_, which "
                "handles experts) and capture or compile it without activation substitution; "
                "for a graph break, compile with fullgraph=True to find it"
            )


def check_no_unknown(sites: list[FFNSite], allowed: tuple[str, ...] = REPLACEABLE) -> None:
    """Raise if a site's activation is not one of ``allowed``, listing every site found.

    Raises:
        ValueError: some site has an activation we cannot replace.
    """
    bad = [s for s in sites if s.activation not in allowed]
    if bad:
        listing = "; ".join(f"{s.path}: {s.activation}" for s in sites)
        raise ValueError(
            f"{len(bad)} FFN site(s) have an activation that cannot be replaced "
            f"(supported: {', '.join(allowed)}). Sites found: {listing}"
        )
