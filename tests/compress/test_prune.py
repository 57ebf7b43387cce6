"""Pruning: masks (and SparseGPT's updated weights) checked against numpy references, sparsity
kept through SDFT training, a save/load round trip and a LoRA merge."""

import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_sdft.compress import DEGRADATIONS, get_degradation
from hf_sdft.compress.prune import (
    PruneDegradation,
    SparsityCallback,
    apply_masks,
    masks_from_zeros,
    merge_lora,
    prune,
    resolve_masks,
    sparsegpt_layer,
    sparsity_report,
)
from tests.helpers import make_model, make_texts, perturb
from tests.trainer.test_trainer import lm_dataset, sdft_trainer

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def decoder_weights(model) -> dict[str, np.ndarray]:
    """Copies of the decoder's projection weights, found by name (not by the module under test)."""
    return {n: m.weight.detach().numpy().copy() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in PROJ}


def other_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.rsplit(".", 2)[-2] not in PROJ}


def assert_same_masks(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name


def calibration(tokenizer, n=16, width=64, batch_size=4) -> list[dict]:
    ds = lm_dataset(tokenizer, make_texts(n, seed=7), width)  # width ≫ text length: much padding
    return [
        {"input_ids": torch.tensor(ds[i : i + batch_size]["input_ids"]),
         "attention_mask": torch.tensor(ds[i : i + batch_size]["attention_mask"])}
        for i in range(0, n, batch_size)
    ]


def uneven_model(seed=0) -> LlamaForCausalLM:
    """Norm gains spread over 100× (shuffled): the projections' input channels have very uneven norms."""
    model = make_model(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.copy_(torch.logspace(-1, 1, p.numel())[torch.randperm(p.numel(), generator=g)])
    return model


def reference_norms(model, batches, names, drop_padding=True) -> dict[str, np.ndarray]:
    """‖X_j‖₂ of each layer's input, from forward hooks and numpy in float64."""
    return {n: np.sqrt((x**2).sum(0)) for n, x in layer_inputs(model, batches, names, drop_padding).items()}


def reference_masks(scores: dict[str, np.ndarray], n_keep_of: tuple[int, int] | None, row_sparsity=None):
    """Keep the top N of every M along the input dim, or drop the lowest fraction of every row."""
    out = {}
    for name, s in scores.items():
        if n_keep_of:
            n, m = n_keep_of
            groups = s.reshape(s.shape[0], -1, m)
            ranks = np.argsort(np.argsort(-groups, axis=-1, kind="stable"), axis=-1)  # 0 = largest
            out[name] = (ranks < n).reshape(s.shape)
        else:
            k = round(row_sparsity * s.shape[1])
            keep = np.ones(s.shape, bool)
            np.put_along_axis(keep, np.argsort(s, axis=1, kind="stable")[:, :k], False, axis=1)
            out[name] = keep
    return out


def test_unstructured_magnitude_zeros_the_smallest_exact_count():
    model = make_model()
    before, untouched = decoder_weights(model), other_weights(model)
    masks = prune(model, sparsity=0.3)
    after = decoder_weights(model)
    assert set(masks) == set(before) and len(masks) == 14
    for name, w in before.items():
        k = round(0.3 * w.size)
        zeros = after[name] == 0
        assert zeros.sum() == k == (~masks[name].numpy()).sum()
        smallest = np.zeros(w.size, bool)
        smallest[np.argsort(np.abs(w).ravel(), kind="stable")[:k]] = True
        np.testing.assert_array_equal(zeros.ravel(), smallest)
        np.testing.assert_array_equal(after[name][~zeros], w[~zeros])  # kept weights unchanged
    for name, p in other_weights(model).items():  # embeddings, lm_head, norms
        assert torch.equal(p, untouched[name]), name
    assert sparsity_report(model)["layers"]["model.layers.1.mlp.down_proj"] == pytest.approx(0.3, abs=1e-3)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_keeps_the_largest_n_of_every_m(pattern, n, m):
    model = make_model()
    before = decoder_weights(model)
    masks = prune(model, sparsity=0.9, pattern=pattern)  # sparsity is ignored for N:M
    for name, w in before.items():
        after = dict(model.named_modules())[name].weight.detach().numpy()
        groups, mask_groups = np.abs(w).reshape(w.shape[0], -1, m), masks[name].numpy().reshape(w.shape[0], -1, m)
        assert ((after == 0).reshape(mask_groups.shape).sum(-1) >= m - n).all()
        assert (mask_groups.sum(-1) == n).all()
        kept_min = np.where(mask_groups, groups, np.inf).min(-1)
        pruned_max = np.where(mask_groups, -np.inf, groups).max(-1)
        assert (kept_min > pruned_max).all()
    assert sparsity_report(model)["total"] == pytest.approx(1 - n / m)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_wanda_matches_reference_from_input_norms(tokenizer, pattern):
    model = uneven_model()
    batches = calibration(tokenizer)
    weights = decoder_weights(model)
    norms = reference_norms(model, batches, list(weights))
    with_padding = reference_norms(model, batches, list(weights), drop_padding=False)
    nm = (2, 4) if pattern == "2:4" else None
    expected = reference_masks({n: np.abs(w) * norms[n] for n, w in weights.items()}, nm, row_sparsity=0.5)
    padded = reference_masks({n: np.abs(w) * with_padding[n] for n, w in weights.items()}, nm, row_sparsity=0.5)
    assert any((expected[n] != padded[n]).any() for n in expected)  # padding would change the masks

    magnitude = prune(copy.deepcopy(model), sparsity=0.5, pattern=pattern)
    masks = prune(model, sparsity=0.5, pattern=pattern, method="wanda", calibration=batches)
    assert_same_masks(masks, expected)
    for name, mask in masks.items():
        assert (dict(model.named_modules())[name].weight[~mask] == 0).all()
    # uneven channel norms: Wanda keeps other weights than magnitude would
    q = "model.layers.0.self_attn.q_proj"
    assert (masks[q] != magnitude[q]).float().mean() > 0.1


def test_sparsity_kept_through_sdft_training_only_with_callback(tmp_path, tokenizer, texts):
    results = {}
    for with_callback in (True, False):
        teacher = make_model()
        student = perturb(copy.deepcopy(teacher))
        masks = prune(student, sparsity=0.5)
        before = {n: m.weight.detach().clone() for n, m in student.named_modules() if n in masks}
        callbacks = [SparsityCallback(masks)] if with_callback else []
        trainer = sdft_trainer(tmp_path, student, teacher, tokenizer, texts, callbacks, max_steps=3, learning_rate=1e-2)
        trainer.train()
        modules = dict(student.named_modules())
        for name, mask in masks.items():
            assert not torch.allclose(modules[name].weight[mask], before[name][mask])  # the kept weights trained
        results[with_callback] = torch.cat([modules[n].weight.detach()[~m] for n, m in masks.items()])
    assert (results[True] == 0).all()
    assert (results[False] != 0).float().mean() > 0.9  # control: without the callback, zeros are lost


def test_save_load_round_trip_keeps_exact_masks(tmp_path):
    model = make_model()
    masks = prune(model, sparsity=0.6)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert_same_masks(masks_from_zeros(reloaded), masks)
    assert sparsity_report(reloaded)["total"] == sparsity_report(model)["total"]


def test_lora_merge_keeps_sparsity_plain_merge_loses_it():
    model = make_model()
    masks = prune(model, sparsity=0.4)
    before = sparsity_report(model)["total"]
    dense_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    # r = hidden size: some adapter matrices have their base layer's shape, and must not be masked
    lora = LoraConfig(r=32, target_modules=["q_proj", "v_proj", "up_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    resolved = resolve_masks(peft_model, masks)
    assert len(resolved) == len(masks)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in resolved

    plain = copy.deepcopy(peft_model).merge_and_unload()
    assert sparsity_report(plain)["total"] < before - 0.05
    merged = merge_lora(peft_model, masks)
    assert isinstance(merged, LlamaForCausalLM)
    assert sparsity_report(merged)["total"] == before
    assert_same_masks(masks_from_zeros(merged), masks)
    q_mask = masks["model.layers.0.self_attn.q_proj"]
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight[q_mask], dense_q[q_mask])  # delta merged


def test_masks_resolve_on_ddp_style_wrapper():
    model = make_model()
    masks = prune(copy.deepcopy(model), sparsity=0.5)

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    wrapped = apply_masks(Wrapper(model), masks)
    assert set(resolve_masks(wrapped, masks)) == {f"module.{n}" for n in masks}
    assert_same_masks(masks_from_zeros(model), masks)
    mismatch = r"no layer of LlamaForCausalLM matches the mask of '.*q_proj' \(shape \(32, 32\)\)"
    with pytest.raises(ValueError, match=mismatch):
        resolve_masks(make_model(hidden=16), masks)


def test_include_prunes_only_the_named_layers():
    model = make_model()
    decoder = decoder_weights(model)
    masks = prune(model, sparsity=0.5, include=["lm_head", "model.embed_tokens"])
    assert set(masks) == {"lm_head", "model.embed_tokens"}
    for name, w in decoder_weights(model).items():
        np.testing.assert_array_equal(w, decoder[name])
    assert sparsity_report(model, include=["lm_head", "model.embed_tokens"])["total"] == pytest.approx(0.5)


def test_registered_degradation(tokenizer):
    assert DEGRADATIONS["prune"] is PruneDegradation
    deg = get_degradation("prune", pattern="2:4", method="wanda")
    model = make_model()
    assert deg.apply(model, calibration(tokenizer)) is model
    assert deg.describe() == {"kind": "prune", "sparsity": 0.5, "pattern": "2:4", "method": "wanda",
                              "measured_sparsity": 0.5}
    assert deg.tags() == ["pruned", "2:4", "wanda"]
    (cb,) = deg.callbacks(model)
    assert isinstance(cb, SparsityCallback) and cb.masks is deg.masks
    assert_same_masks(masks_from_zeros(model), deg.masks)


@pytest.mark.parametrize("kwargs,match", [
    (dict(pattern="block"), r"unsupported pattern 'block': choose 'unstructured' or 'N:M'.*'2:4'"),
    (dict(pattern="4:2"), r"unsupported pattern '4:2'"),
    (dict(method="obs"), r"unsupported method 'obs': choose one of magnitude, wanda, sparsegpt"),
    (dict(pattern="2:3"), r"needs input sizes divisible by 3, but model.layers.0.self_attn.q_proj has 32 inputs"),
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(method="wanda"), r"method='wanda' needs calibration="),
    (dict(method="sparsegpt"), r"method='sparsegpt' needs calibration="),
    (dict(include=["nothing.*"]), r"no linear layer to prune matching include=\['nothing.\*'\]"),
    (dict(method="wanda", calibration=[{"input_ids": torch.ones(1, 4, dtype=torch.long)}], include=["*embed*"]),
     r"prune the embeddings \['model.embed_tokens'\] with method='magnitude'"),
])
def test_errors(kwargs, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        prune(model, **kwargs)
    assert sparsity_report(model)["total"] == 0  # failed early: nothing pruned


def test_errors_without_layers_and_before_apply():
    with pytest.raises(ValueError, match="no linear layer to prune outside the embeddings and lm_head in Sequential"):
        prune(nn.Sequential(nn.Embedding(10, 4)))
    with pytest.raises(ValueError, match="unsupported pattern '2-4'"):
        PruneDegradation(pattern="2-4")
    with pytest.raises(ValueError, match=r"call apply\(model\) before callbacks"):
        PruneDegradation().callbacks(make_model())


# --- SparseGPT ------------------------------------------------------------------------------


def reference_sparsegpt(w, h, sparsity, nm, blocksize, damp=0.01):
    """SparseGPT the slow way, float64: column by column, each pruned weight removed by the OBS
    update δw_F = −(w_j/[H_F⁻¹]_jj)·[H_F⁻¹]_j,: with the explicit inverse of H restricted to the
    columns F not yet processed (no Cholesky, no blocks, no lazy updates). The mask rule is
    SparseGPT's: saliency w²/[H_F⁻¹]_jj, unstructured chosen for ``blocksize`` columns at once
    (all rows together, round(s·rows·i2) pruned in columns [0, i2)), N:M at each group's first column."""
    w, h = w.astype(np.float64).copy(), h.astype(np.float64).copy()
    rows, cols = w.shape
    h += damp * np.diag(h).mean() * np.eye(cols)
    inverse_from = [np.linalg.inv(h[j:, j:]) for j in range(cols)]  # H_F⁻¹ for F = j..cols−1
    saliency = lambda j: w[:, j] ** 2 / inverse_from[j][0, 0]  # noqa: E731
    keep = np.ones_like(w, bool)
    for j in range(cols):
        if nm is None and j % blocksize == 0:
            end = min(j + blocksize, cols)
            k = round(sparsity * rows * end) - round(sparsity * rows * j)
            scores = np.stack([saliency(c) for c in range(j, end)], 1)
            block_keep = np.ones(scores.size, bool)
            block_keep[np.argsort(scores.ravel(), kind="stable")[:k]] = False
            keep[:, j:end] = block_keep.reshape(scores.shape)
        if nm is not None and j % nm[1] == 0:
            scores = np.stack([saliency(c) for c in range(j, j + nm[1])], 1)
            ranks = np.argsort(np.argsort(scores, axis=1, kind="stable"), axis=1)  # 0 = lowest
            keep[:, j : j + nm[1]] = ranks >= nm[1] - nm[0]
        removed = np.where(keep[:, j], 0.0, w[:, j])
        hinv = inverse_from[j]
        w[:, j:] -= np.outer(removed / hinv[0, 0], hinv[0])
        w[~keep[:, j], j] = 0.0
    return w, keep


def correlated_inputs(n=512, d=32, rank=8, seed=0) -> np.ndarray:
    """Calibration inputs like a transformer's: strongly correlated features (rank-``rank`` signal
    plus noise) of uneven scales."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + 0.3 * rng.normal(size=(n, d))
    return x * np.logspace(-0.5, 0.5, d)[rng.permutation(d)]


def output_error(x, w, pruned) -> float:
    """‖X Wᵀ − X Ŵᵀ‖ on the calibration inputs."""
    x = np.asarray(x, np.float64)
    return float(np.linalg.norm(x @ np.asarray(w, np.float64).T - x @ np.asarray(pruned, np.float64).T))


@pytest.mark.parametrize("pattern,sparsity,blocksize", [
    ("unstructured", 0.5, 8), ("unstructured", 0.3, 12), ("unstructured", 0.6, 128), ("2:4", 0.5, 8), ("4:8", 0.5, 16),
])
def test_sparsegpt_layer_matches_slow_obs_reference(pattern, sparsity, blocksize):
    rng = np.random.default_rng(1)
    x = correlated_inputs()
    w = rng.normal(size=(12, 32))
    h = 2 * x.T @ x / len(x)
    nm = None if pattern == "unstructured" else tuple(map(int, pattern.split(":")))
    expected, expected_keep = reference_sparsegpt(w, h, sparsity, nm, blocksize)
    pruned, keep = sparsegpt_layer(torch.tensor(w, dtype=torch.float32), torch.tensor(h, dtype=torch.float32),
                                   sparsity, nm, blocksize=blocksize)
    assert pruned.dtype == torch.float32
    np.testing.assert_array_equal(keep.numpy(), expected_keep)
    np.testing.assert_allclose(pruned.numpy(), expected, rtol=1e-3, atol=1e-4)
    assert (pruned.numpy()[~expected_keep] == 0).all() and (pruned.numpy()[expected_keep] != 0).all()
    assert not np.allclose(expected[expected_keep], w[expected_keep], atol=1e-2)  # the kept weights were updated


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_layer_reconstructs_better_than_magnitude_and_wanda(pattern):
    rng = np.random.default_rng(2)
    x = correlated_inputs(seed=3)
    w = rng.normal(size=(24, 32))
    nm = None if pattern == "unstructured" else (2, 4)
    h = torch.tensor(2 * x.T @ x / len(x), dtype=torch.float32)
    pruned, keep = sparsegpt_layer(torch.tensor(w, dtype=torch.float32), h, 0.5, nm)
    masks = reference_masks({"magnitude": np.abs(w), "wanda": np.abs(w) * np.linalg.norm(x, axis=0)}, nm, 0.5)
    errors = {name: output_error(x, w, w * mask) for name, mask in masks.items()}
    errors["sparsegpt"] = output_error(x, w, pruned.numpy())
    errors["sparsegpt mask, no update"] = output_error(x, w, w * keep.numpy())
    assert errors["sparsegpt"] < 0.8 * min(errors["magnitude"], errors["wanda"]), errors
    assert errors["sparsegpt"] < 0.8 * errors["sparsegpt mask, no update"], errors
    assert keep.float().mean() == 0.5


def layer_inputs(model, batches, names, drop_padding=True) -> dict[str, np.ndarray]:
    """Each layer's input tokens ``(tokens, in)`` over ``batches`` (padding dropped), float64."""
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0].numpy().astype(np.float64)))
        for n in names
    ]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    keep = [b["attention_mask"].numpy().astype(bool) if drop_padding else np.ones(b["input_ids"].shape, bool)
            for b in batches]
    return {n: np.concatenate([x[k] for x, k in zip(seen[n], keep)]) for n in names}


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_prunes_block_after_block_like_the_reference(tokenizer, pattern):
    """The model's layers match the slow reference run block by block, each block's inputs taken
    from the model whose earlier blocks are already pruned (and differ from dense-input pruning)."""
    model = uneven_model()
    batches = calibration(tokenizer)
    nm = None if pattern == "unstructured" else (2, 4)
    expected, dense_inputs = copy.deepcopy(model), layer_inputs(model, batches, list(decoder_weights(model)))
    modules = dict(expected.named_modules())
    for block in range(len(expected.model.layers)):
        names = [n for n in decoder_weights(expected) if n.startswith(f"model.layers.{block}.")]
        inputs = layer_inputs(expected, batches, names)
        for name in names:
            weight = modules[name].weight
            h = 2 * inputs[name].T @ inputs[name] / len(inputs[name])
            new, _ = reference_sparsegpt(weight.detach().numpy(), h, 0.5, nm, blocksize=128)
            with torch.no_grad():
                weight.copy_(torch.tensor(new))
    masks = prune(model, sparsity=0.5, pattern=pattern, method="sparsegpt", calibration=batches)
    got, want = decoder_weights(model), decoder_weights(expected)
    for name in got:
        np.testing.assert_array_equal(got[name] != 0, want[name] != 0, err_msg=name)
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4, err_msg=name)
        np.testing.assert_array_equal(masks[name].numpy(), got[name] != 0, err_msg=name)
    # block 1 saw block 0 pruned: its Hessian differs from the dense model's
    name = "model.layers.1.self_attn.q_proj"
    dense_h = 2 * dense_inputs[name].T @ dense_inputs[name] / len(dense_inputs[name])
    original = decoder_weights(uneven_model())
    from_dense, _ = reference_sparsegpt(original[name], dense_h, 0.5, nm, blocksize=128)
    assert not np.allclose(from_dense, want[name], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_magnitude_and_wanda_on_the_calibration_outputs(tokenizer, pattern):
    """On the first block (whose inputs no pruning changes), every layer's output error
    ‖XWᵀ − XŴᵀ‖ on the calibration tokens is lower with SparseGPT than with magnitude or Wanda."""
    model = uneven_model()
    batches = calibration(tokenizer)
    names = [n for n in decoder_weights(model) if n.startswith("model.layers.0.")]
    inputs, dense = layer_inputs(model, batches, names), decoder_weights(model)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        pruned = copy.deepcopy(model)
        prune(pruned, sparsity=0.5, pattern=pattern, method=method, calibration=batches)
        weights = decoder_weights(pruned)
        errors[method] = {n: output_error(inputs[n], dense[n], weights[n]) for n in names}
    for name in names:
        assert errors["sparsegpt"][name] < min(errors["magnitude"][name], errors["wanda"][name]), (name, errors)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.37), ("2:4", 0.5), ("4:8", 0.5)])
def test_sparsegpt_exact_sparsity_and_pattern(tokenizer, pattern, sparsity):
    model = make_model()
    untouched = other_weights(model)
    masks = prune(model, sparsity=sparsity, pattern=pattern, method="sparsegpt", calibration=calibration(tokenizer))
    weights = decoder_weights(model)
    assert set(masks) == set(weights) and len(masks) == 14
    for name, w in weights.items():
        mask = masks[name].numpy()
        np.testing.assert_array_equal(w != 0, mask, err_msg=name)  # the zeros are exactly the mask's
        if pattern == "unstructured":
            assert (~mask).sum() == round(sparsity * w.size), name
        else:
            n, m = map(int, pattern.split(":"))
            assert (mask.reshape(w.shape[0], -1, m).sum(-1) == n).all(), name
    for name, p in other_weights(model).items():
        assert torch.equal(p, untouched[name]), name
    assert_same_masks(masks_from_zeros(model), masks)


def test_sparsegpt_degradation(tokenizer):
    deg = get_degradation("prune", pattern="2:4", method="sparsegpt")
    model = make_model()
    deg.apply(model, calibration(tokenizer))
    assert deg.describe()["method"] == "sparsegpt" and deg.describe()["measured_sparsity"] == 0.5
    assert deg.tags() == ["pruned", "2:4", "sparsegpt"]
    assert_same_masks(masks_from_zeros(model), deg.masks)


def test_sparsegpt_dead_inputs_and_bfloat16(tokenizer):
    """An input never active (zero Hessian row) neither breaks the factorization nor the exact
    sparsity; a bfloat16 model keeps exactly the mask's zeros."""
    x = correlated_inputs()
    x[:, 5] = 0
    w = torch.randn(12, 32)
    pruned, keep = sparsegpt_layer(w, torch.tensor(2 * x.T @ x / len(x), dtype=torch.float32), 0.5)
    assert torch.isfinite(pruned).all() and (~keep).sum() == 12 * 16
    assert torch.equal(pruned != 0, keep)

    model = make_model().to(torch.bfloat16)
    masks = prune(model, sparsity=0.5, pattern="2:4", method="sparsegpt", calibration=calibration(tokenizer))
    assert model.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16
    assert_same_masks(masks_from_zeros(model), masks)
    assert sparsity_report(model)["total"] == 0.5
