"""Closed-form down_proj reconstruction for the ReLU substitution (prosparse_fx.reconstruct):
the solution against a float64 ridge solve written here, the errors it reports against the
FFN outputs measured after the swap, the families' layouts (separate, fused and plain FFNs,
GPT-2's Conv1D, biases, dReLU), refusals, and the main job's option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
)

from prosparse_fx import find_ffn_sites, relufy_
from prosparse_fx.config import SparsifyConfig
from prosparse_fx.errors import InputError
from prosparse_fx.reconstruct import fit_down_proj

VOCAB = 64


def _llama(mlp_bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        mlp_bias=mlp_bias,
    )
    return LlamaForCausalLM(cfg).eval()


def _phi3() -> Phi3ForCausalLM:
    torch.manual_seed(0)
    cfg = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return Phi3ForCausalLM(cfg).eval()


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = 0
    return GPT2LMHeadModel(cfg).eval()


def _mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    return MixtralForCausalLM(cfg).eval()


def _windows(n: int = 6, t: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(1))


def _ffn_inputs(model, windows) -> list[torch.Tensor]:
    """Each FFN's input x over ``windows``, ``[tokens, d]`` float64, by hooks written here."""
    mlps = [m for n, m in model.named_modules() if n.endswith("mlp")]
    seen: list[list[torch.Tensor]] = [[] for _ in mlps]
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, i=i: seen[i].append(a[0].detach()))
        for i, m in enumerate(mlps)
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    return [torch.cat(s).reshape(-1, s[0].shape[-1]).double() for s in seen]


@torch.no_grad()
def _llama_x1(mlp, x, activation):
    """(old x1, new x1, W_down [d, d_ff]) of a LLaMA-style MLP, float64."""
    g = F.linear(x, mlp.gate_proj.weight.double(), _b(mlp.gate_proj))
    u = F.linear(x, mlp.up_proj.weight.double(), _b(mlp.up_proj))
    new_u = torch.relu(u) if activation == "drelu" else u
    return F.silu(g) * u, torch.relu(g) * new_u, mlp.down_proj.weight.double()


def _b(linear):
    return None if linear.bias is None else linear.bias.double()


@torch.no_grad()
def _ridge(new, y, w0, ridge):
    """The ridge solution written out: (A + lam I)^-1 (B + lam W0^T), A and B token means."""
    a = new.T @ new / new.shape[0]
    b = new.T @ y / new.shape[0]
    lam = ridge * a.diagonal().mean()
    eye = torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a + lam * eye, b + lam * w0.T).T


@torch.no_grad()
def _rel_err(new, w, y) -> float:
    return float((new @ w.T - y).pow(2).sum() / y.pow(2).sum())


@pytest.mark.parametrize("activation", ["relu", "drelu"])
@pytest.mark.parametrize("mlp_bias", [False, True])
def test_llama_solution_and_errors_match_a_ridge_solve_written_here(activation, mlp_bias) -> None:
    model = _llama(mlp_bias)
    windows = _windows()
    refit = fit_down_proj(model, find_ffn_sites(model), windows, activation=activation, ridge=1e-3)
    assert refit.tokens == windows.numel()
    for mlp, x, site in zip(
        (layer.mlp for layer in model.model.layers), _ffn_inputs(model, windows), refit.sites
    ):
        old, new, w0 = _llama_x1(mlp, x, activation)
        y = old @ w0.T  # the original output without down's bias
        w = _ridge(new, y, w0, 1e-3)
        torch.testing.assert_close(site.weight.double(), w, rtol=1e-4, atol=1e-5)
        assert site.error_before == pytest.approx(_rel_err(new, w0, y), rel=1e-4)
        assert site.error_after == pytest.approx(_rel_err(new, w, y), rel=1e-3, abs=1e-6)
        assert site.error_after < site.error_before


def test_after_the_swap_each_ffn_output_moves_as_little_as_reported() -> None:
    """relufy_, then apply_: each FFN's output on the calibration inputs is the original's
    within the reported error, and the model's other weights are untouched."""
    model = _llama(mlp_bias=True)
    windows = _windows()
    xs = _ffn_inputs(model, windows)
    with torch.no_grad():
        before = [layer.mlp(x.float()).double() for layer, x in zip(model.model.layers, xs)]
    others = {k: v.clone() for k, v in model.state_dict().items() if "down_proj.weight" not in k}
    sites = find_ffn_sites(model)
    refit = fit_down_proj(model, sites, windows)
    new_sites = relufy_(model, "relu", sites=sites)
    refit.apply_(model, new_sites)
    for layer, x, y, site in zip(model.model.layers, xs, before, refit.sites):
        with torch.no_grad():
            out = layer.mlp(x.float()).double()
        bias = layer.mlp.down_proj.bias.double()
        err = float((out - y).pow(2).sum() / (y - bias).pow(2).sum())
        assert err == pytest.approx(site.error_after, rel=1e-3, abs=1e-6)
    for k, v in model.state_dict().items():
        if k in others:
            assert torch.equal(v, others[k]), k


@pytest.mark.parametrize("activation", ["relu", "drelu"])
def test_the_threshold_shift_of_a_relu_model_is_reconstructed_too(activation) -> None:
    """Before the FATReLU shift: today's x1 is ReLU(gate) * up (dReLU: * ReLU(up), which the
    up linear applies itself), the new one FATReLU_t(gate) * up, per-site t."""
    model = _llama()
    windows = _windows()
    sites = relufy_(model, activation, sites=find_ffn_sites(model))
    ts = [0.05, 0.2]
    refit = fit_down_proj(model, sites, windows, activation=activation, threshold=ts)
    for layer, x, site, t in zip(model.model.layers, _ffn_inputs(model, windows), refit.sites, ts):
        mlp = layer.mlp
        with torch.no_grad():
            g = F.linear(x, mlp.gate_proj.weight.double())
            u = F.linear(x, mlp.up_proj.weight.double())
        u = torch.relu(u) if activation == "drelu" else u
        w0 = mlp.down_proj.weight.detach().double()
        y = (torch.relu(g) * u) @ w0.T
        new = torch.where(g >= t, g, 0.0) * u
        torch.testing.assert_close(
            site.weight.double(), _ridge(new, y, w0, 1e-2), rtol=1e-4, atol=1e-5
        )
        assert site.error_after < site.error_before


def test_a_fused_gate_up_linear_is_split_as_the_site_says() -> None:
    model = _phi3()
    windows = _windows()
    refit = fit_down_proj(model, find_ffn_sites(model), windows, ridge=1e-2)
    for layer, x, site in zip(model.model.layers, _ffn_inputs(model, windows), refit.sites):
        gu = F.linear(x, layer.mlp.gate_up_proj.weight.double())
        g, u = gu.chunk(2, dim=-1)
        w0 = layer.mlp.down_proj.weight.double()
        y = (F.silu(g) * u) @ w0.T
        torch.testing.assert_close(
            site.weight.double(), _ridge(torch.relu(g) * u, y, w0, 1e-2), rtol=1e-4, atol=1e-5
        )


def test_gpt2_plain_ffn_with_conv1d_weights_and_biases() -> None:
    """fc1 (Conv1D, [in, out] weight, bias), GELU-tanh; the solution is written back in the
    Conv1D layout."""
    model = _gpt2()
    windows = _windows()
    sites = find_ffn_sites(model)
    refit = fit_down_proj(model, sites, windows, ridge=1e-2)
    xs = _ffn_inputs(model, windows)
    for block, x, site in zip(model.transformer.h, xs, refit.sites):
        h = x @ block.mlp.c_fc.weight.double() + block.mlp.c_fc.bias.double()
        w0 = block.mlp.c_proj.weight.double().T  # [d, d_ff]
        y = F.gelu(h, approximate="tanh") @ w0.T
        torch.testing.assert_close(
            site.weight.double(), _ridge(torch.relu(h), y, w0, 1e-2), rtol=1e-4, atol=1e-5
        )
    refit.apply_(model, relufy_(model, "relu", sites=sites))
    for block, site in zip(model.transformer.h, refit.sites):
        assert torch.equal(block.mlp.c_proj.weight.T, site.weight)


def test_a_huge_ridge_keeps_the_weights_and_passes_are_equal_to_one() -> None:
    model = _llama()
    windows = _windows()
    sites = find_ffn_sites(model)
    kept = fit_down_proj(model, sites, windows, ridge=1e9)
    for layer, site in zip(model.model.layers, kept.sites):
        torch.testing.assert_close(site.weight, layer.mlp.down_proj.weight, rtol=0, atol=1e-6)
    one = fit_down_proj(model, sites, windows)
    two = fit_down_proj(model, sites, windows, memory_bytes=1)  # one pass per site
    for a, b in zip(one.sites, two.sites):
        assert torch.equal(a.weight, b.weight)


def test_refusals_name_the_problem() -> None:
    model = _llama()
    sites = find_ffn_sites(model)
    windows = _windows()
    for ridge in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
            fit_down_proj(model, sites, windows, ridge=ridge)
    with pytest.raises(ValueError, match="windows must be a non-empty"):
        fit_down_proj(model, sites, windows[:0])
    with pytest.raises(ValueError, match="'relu' or 'drelu'"):
        fit_down_proj(model, sites, windows, activation="gelu")
    gpt2 = _gpt2()
    with pytest.raises(ValueError, match="plain FFNs have none"):
        fit_down_proj(gpt2, find_ffn_sites(gpt2), windows, activation="drelu")
    refit = fit_down_proj(model, sites, windows)
    with pytest.raises(ValueError, match="apply it to the model it was fitted on"):
        refit.apply_(gpt2, find_ffn_sites(gpt2))
    relu_sites = relufy_(model, "relu", sites=sites)
    with pytest.raises(ValueError, match="computes relu at t = 0 already.*refit_windows = 0"):
        fit_down_proj(model, relu_sites, windows)
    with pytest.raises(ValueError, match="FATReLU threshold must be a finite number >= 0"):
        fit_down_proj(model, relu_sites, windows, threshold=-0.1)
    with pytest.raises(ValueError, match="got 3 per-layer thresholds for 2 FFN sites"):
        fit_down_proj(model, relu_sites, windows, threshold=[0.1, 0.2, 0.3])
    drelu = _llama()
    drelu_sites = relufy_(drelu, "drelu", sites=find_ffn_sites(drelu))
    with pytest.raises(ValueError, match="it is dReLU; refit it with activation 'drelu'"):
        fit_down_proj(drelu, drelu_sites, windows, threshold=0.2)
    moe = _mixtral()
    with pytest.raises(ValueError, match="mixture-of-experts expert"):
        fit_down_proj(moe, find_ffn_sites(moe), windows)


def test_config_refuses_refit_with_the_smooth_substitution_and_a_bad_ridge() -> None:
    SparsifyConfig(refit_windows=64).validate()
    with pytest.raises(InputError, match="refit_windows = 0 or substitution = 0"):
        SparsifyConfig(refit_windows=64, substitution=0.5).validate()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="refit_ridge"):
            SparsifyConfig(refit_ridge=bad).validate()
    with pytest.raises(InputError, match="refit_windows must be a whole number"):
        SparsifyConfig(refit_windows=2.0).validate()


def test_the_main_job_reconstructs_after_the_swap_and_reports_it(
    tmp_path, tiny_model_dir, text_file
) -> None:
    from prosparse_fx.pipeline import run_sparsify

    config = SparsifyConfig(
        max_steps=4,
        refit_windows=4,
        eval_windows=2,
        calib_windows=2,
        sweep_thresholds=[0.0],
        seq_len=32,
        batch_size=2,
    )
    report = run_sparsify(
        tmp_path / "run",
        config,
        model_path=tiny_model_dir,
        data_path=text_file,
        show_progress=False,
    )
    refit = report["refit"]
    assert refit["tokens"] == 4 * 32 and refit["ridge"] == 0.01
    assert len(refit["per_layer"]) == 2
    assert all(r["error_after"] < r["error_before"] for r in refit["per_layer"])
    assert refit["evaluation"]["perplexity"] > 0
    # the ReLU model without the refit is measured too, and differs
    assert refit["evaluation"]["perplexity"] != report["relu_no_training"]["perplexity"]


def test_the_main_job_refuses_a_model_it_cannot_reconstruct_before_any_work() -> None:
    """sparsify checks the sites when it finds them (before the baseline evaluation): a model
    that is ReLU already, or one with mixture-of-experts experts, exits 2 naming the way out;
    a resumed run (ReLU by construction, reconstructed already) is not checked again."""
    from prosparse_fx.pipeline import _ffn_sites

    config = SparsifyConfig(refit_windows=8)
    assert len(_ffn_sites(_llama(), config, resumed=False)) == 2
    relu = _llama()
    relufy_(relu, "relu", sites=find_ffn_sites(relu))
    with pytest.raises(InputError, match="computes relu at t = 0 already.*refit_windows = 0"):
        _ffn_sites(relu, config, resumed=False)
    assert len(_ffn_sites(relu, config, resumed=True)) == 2
    moe = _mixtral()
    with pytest.raises(InputError, match="mixture-of-experts expert.*refit_windows = 0"):
        _ffn_sites(moe, config, resumed=False)


def test_apply_refuses_a_model_that_does_not_compute_what_was_fitted() -> None:
    """Found by review: a fit for FATReLU t or dReLU applied after relufy_ to ReLU, or to the
    model before the swap, was written silently."""
    windows = _windows()
    for kwargs, swap in (
        ({"threshold": 0.2}, ("relu", 0.0)),
        ({"activation": "drelu"}, ("relu", 0.0)),
        ({}, None),  # not swapped at all: the sites still compute SiLU
    ):
        model = _llama()
        sites = find_ffn_sites(model)
        refit = fit_down_proj(model, sites, windows, **kwargs)
        new_sites = sites if swap is None else relufy_(model, swap[0], swap[1], sites=sites)
        with pytest.raises(ValueError, match="apply it after relufy_ with the activation"):
            refit.apply_(model, new_sites)
    model = _llama()
    sites = find_ffn_sites(model)
    refit = fit_down_proj(model, sites, windows, threshold=0.2)
    refit.apply_(model, relufy_(model, "fatrelu", 0.2, sites=sites))  # the matching one


def test_bad_windows_sites_and_modes_are_named() -> None:
    model = _llama()
    sites = find_ffn_sites(model)
    windows = _windows()
    for bad in (windows[0], windows[None], windows.float(), windows + VOCAB, [[1, 2]]):
        with pytest.raises(ValueError, match="windows"):
            fit_down_proj(model, sites, bad)
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        fit_down_proj(model, sites, windows, batch_size=0)
    with pytest.raises(ValueError, match="ridge must be a finite number > 0"):
        fit_down_proj(model, sites, windows, ridge=True)
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=40,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match="different model"):
        fit_down_proj(model, find_ffn_sites(wide), windows)
    # each module's own train/eval mode comes back as it was
    model.train()
    model.model.layers[0].eval()
    fit_down_proj(model, sites, windows)
    assert model.training and not model.model.layers[0].training
    assert model.model.layers[1].training
