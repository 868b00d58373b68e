"""What every conformance cell must do: ``exact`` unless listed here as refused, with the words
its error must contain and the reason the README's support table gives. The cells' tests check
both directions (an exact cell that starts refusing fails too), and the README's table is
rendered from this file by :func:`render_table`, so the table cannot drift from the code."""

from __future__ import annotations

from tests.conformance.families import FAMILIES, GATED, MOE

PATHS = (
    "relufy_relu",
    "relufy_fatrelu",
    "graph_export",
    "compile_inference",
    "compile_train",
    "sparsify_ffn",
    "onnx",
    "eager_train",
)
SETUP_CELLS = tuple(
    f"{path}:{setup}"
    for path in ("eager_train", "compile_train")
    for setup in ("checkpointing", "checkpointing_hook", "ddp", "bf16")
)
# dReLU (TurboSparse Sec. 3): the paths again, with FATReLU t on the gate and ReLU on up
DRELU_PATHS = tuple(
    f"drelu_{path}"
    for path in (
        "relufy",
        "graph_export",
        "compile_inference",
        "compile_train",
        "sparsify_ffn",
        "onnx",
        "eager_train",
        "eager_train:bf16",
        "compile_train:bf16",
    )
)

# reason key -> (words the error message must contain, the README's explanation)
REASONS = {
    "bias": (
        "gated FFN with biases",
        "gated FFN with MLP biases: the gated sparse op has no bias inputs (run it dense)",
    ),
    "moe-graph": (
        "is not part of an FFN site",
        "mixture-of-experts experts are not graph sites: relufy_ eagerly, then compile/export "
        "without activation substitution",
    ),
    "moe-sparse": (
        "an expert of a mixture-of-experts layer",
        "the sparse-FFN ops compute one dense FFN, not routed experts (run experts dense)",
    ),
    "moe-onnx": (
        "mixture-of-experts layers",
        "routed experts do not export to ONNX with dynamic shapes (dense or sparse): run them in "
        "torch",
    ),
    "moe-taps": (
        "cannot reach the experts",
        "graph taps cannot reach experts: train with hook taps (eager)",
    ),
    "gc-taps": (
        "activation-checkpointed region",
        "graph taps cannot reach FFNs inside checkpointed regions: hook taps (eager) support "
        "checkpointing",
    ),
    "eager-fallback": (
        "ran eagerly inside a call",
        "a graph break inside an activation-checkpointed layer makes Dynamo run the whole layer "
        "eagerly, outside the backend's graphs: relufy_ eagerly before compiling",
    ),
    "ddp": (
        "optimize_ddp",
        "Dynamo's DDP optimizer splits the graph: set torch._dynamo.config.optimize_ddp = False "
        "or compile before wrapping in DDP",
    ),
    "drelu-plain": (
        "needs a gated FFN",
        "dReLU puts a ReLU on the up projection, which a plain FFN does not have: use relu",
    ),
}


def _expected() -> dict[tuple[str, str], str]:
    refused: dict[tuple[str, str], str] = {}
    for path in ("graph_export", "sparsify_ffn", "onnx"):
        refused[("llama-mlp-bias", path)] = "bias"
    for family in MOE:
        refused[(family, "graph_export")] = "moe-graph"
        refused[(family, "compile_inference")] = "moe-graph"
        refused[(family, "sparsify_ffn")] = "moe-sparse"
        refused[(family, "compile_train")] = "moe-taps"
        for setup in ("checkpointing", "checkpointing_hook", "ddp", "bf16"):
            refused[(family, f"compile_train:{setup}")] = "moe-taps"
        refused[(family, "onnx")] = "moe-onnx"
    for family in FAMILIES:
        if family not in MOE:
            refused[(family, "compile_train:checkpointing_hook")] = "eager-fallback"
            refused[(family, "compile_train:checkpointing")] = "gc-taps"
            refused[(family, "compile_train:ddp")] = "ddp"
    # dReLU: the same refusals where the FFN is gated; plain FFNs refuse every dReLU cell
    for (family, cell), reason in list(refused.items()):
        if f"drelu_{cell}" in DRELU_PATHS:
            refused[(family, f"drelu_{cell}")] = reason
    for family in FAMILIES:
        if family not in GATED:
            for cell in DRELU_PATHS:
                refused[(family, cell)] = "drelu-plain"
    return refused


REFUSED = _expected()


def expected(family: str, cell: str) -> str | None:
    """The reason key of a refused cell, or ``None`` for an exact one."""
    return REFUSED.get((family, cell))


def _table(cells: tuple[str, ...], first: str, strip: str = "") -> list[str]:
    keys = list(REASONS)
    head = f"| {first} | " + " | ".join(c.removeprefix(strip).replace(":", " ") for c in cells)
    rows = [head + " |", "|---|" + "---|" * len(cells)]
    for family in FAMILIES:
        marks = []
        for cell in cells:
            reason = expected(family, cell)
            marks.append("exact" if reason is None else f"refused ({keys.index(reason) + 1})")
        rows.append(f"| {family} | " + " | ".join(marks) + " |")
    return rows


def render_table() -> str:
    """The README's support tables (markdown): families x paths and training setups, then the
    dReLU paths (TurboSparse: FATReLU t = 0.05 on the gate and ReLU on up in inference cells,
    t = 0 in training cells), then the reasons of the refusals."""
    keys = list(REASONS)
    main = _table(PATHS + SETUP_CELLS, "family")
    drelu = _table(DRELU_PATHS, "dReLU", "drelu_")
    notes = [f"({i + 1}) {REASONS[k][1]}" for i, k in enumerate(keys)]
    return "\n".join([*main, "", *drelu, "", *(f"{n}  " if n != notes[-1] else n for n in notes)])
