"""MixedPrecisionAdamW: bf16-stored Linear weights with fp32 master weights give the bf16-autocast training of fp32
weights (same forward, same gradients, AdamW's update), save and resume in fp32, and clip in fp32."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from transformers import AutoModelForImageTextToText

from modeling_openflamingo import MixedPrecisionAdamW, autocast_linear_parameters
from modeling_openflamingo.modeling_openflamingo import image_indices_from_input_ids

from .conftest import MEDIA, sample_inputs

DEVICE = torch.device(os.environ.get("OPENFLAMINGO_TEST_DEVICE", "cpu"))


def recipe_model(converted, family: str = "tiny-mpt") -> nn.Module:
    model = AutoModelForImageTextToText.from_pretrained(converted(family)).to(DEVICE)
    model.freeze_for_training()
    return model.train()


def batch(seed: int) -> dict[str, torch.Tensor]:
    inputs = sample_inputs(seed)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["input_ids"] == MEDIA, -100)
    # as the data collator gives them: the forward then makes no host sync (a CUDA graph can capture the step)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    inputs["image_indices"] = image_indices_from_input_ids(inputs["input_ids"], MEDIA, inputs["pixel_values"].shape[1])
    return {name: tensor.to(DEVICE) for name, tensor in inputs.items()}


def loss_and_backward(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = model(**inputs).loss
    loss.backward()
    return loss.detach()


def pair(converted, family: str = "tiny-mpt"):
    """(fp32 model, torch's fused AdamW) and (its copy with bf16 Linear weights, MixedPrecisionAdamW)."""
    reference = recipe_model(converted, family)
    ours = copy.deepcopy(reference)
    reference_opt = torch.optim.AdamW(reference.training_parameter_groups(0.1), lr=1e-2, fused=True)
    low = autocast_linear_parameters(ours)
    ours_opt = MixedPrecisionAdamW(ours.training_parameter_groups(0.1), lr=1e-2, low_precision_params=low)
    return reference, reference_opt, ours, ours_opt


def test_autocast_linear_parameters_are_the_trainable_linear_weights_only():
    embedding = nn.Embedding(10, 4)
    model = nn.ModuleDict(
        {"emb": embedding, "head": nn.Linear(4, 10, bias=False), "proj": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}
    )
    model["head"].weight = embedding.weight  # tied: the lookup would see the stored dtype
    frozen = nn.Linear(4, 4).requires_grad_(False)
    model["frozen"] = frozen
    assert autocast_linear_parameters(model) == [model["proj"].weight, model["proj"].bias]


@pytest.mark.parametrize("family", ["tiny-mpt", "tiny-mpt-1b-redpajama-200b", "tiny-neox", "tiny-llama"])
def test_bf16_linear_weights_give_the_autocast_forward_gradients_and_update(converted, family):
    reference, reference_opt, ours, ours_opt = pair(converted, family)
    stored = {name: p.dtype for name, p in ours.named_parameters() if p.requires_grad}
    assert torch.bfloat16 in stored.values() and torch.float32 in stored.values()  # LayerNorms, latents, gates, rows
    inputs = batch(0)
    # the same forward and the same gradients: autocast's bf16 copies are what is stored
    assert torch.equal(loss_and_backward(reference, inputs), loss_and_backward(ours, inputs))
    for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True):
        if p.requires_grad:
            assert q.grad.dtype == q.dtype and torch.equal(p.grad, q.grad.float()), name
    reference_opt.step()
    ours_opt.step()
    with ours_opt.master_weights():
        for (name, p), q in zip(reference.named_parameters(), ours.parameters(), strict=True):
            assert q.dtype == torch.float32, name
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6, msg=name)
    for p in ours.parameters():  # the stored copies are the masters rounded
        if "master" in ours_opt.state[p]:
            assert p.dtype == torch.bfloat16 and torch.equal(p, ours_opt.state[p]["master"].to(torch.bfloat16))
    # later steps stay on the reference's path (a master one rounding apart may round to another bf16 copy)
    for seed in (1, 2):
        reference_opt.zero_grad()
        ours_opt.zero_grad()
        inputs = batch(seed)
        torch.testing.assert_close(
            loss_and_backward(ours, inputs), loss_and_backward(reference, inputs), rtol=1e-3, atol=1e-3
        )
        reference_opt.step()
        ours_opt.step()


def test_clipping_in_fp32_matches_torchs_clipping_of_fp32_gradients(converted):
    reference, reference_opt, ours, ours_opt = pair(converted)
    inputs = batch(0)
    loss_and_backward(reference, inputs)
    loss_and_backward(ours, inputs)
    params = [p for p in reference.parameters() if p.requires_grad]
    expected = torch.nn.utils.clip_grad_norm_(params, 0.05)
    norm = ours_opt.clip_grad_norm_(0.05)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    assert norm > 0.05  # the clipping acts
    reference_opt.step()
    ours_opt.step()
    with ours_opt.master_weights():
        for p, q in zip(reference.parameters(), ours.parameters(), strict=True):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


def test_state_dict_keeps_the_masters_fp32_and_resumes_exactly(converted, tmp_path):
    """The saved state loads back bit for bit (masters and moments fp32), and the next step continues the run: bit for
    bit where the update is not compiled (the CPU); on CUDA each optimizer compiles its update anew, and inductor's
    pointwise autotuning may pick kernels that round differently (an H100, runs 105-109: masters one fp32 rounding
    apart after a step from equal states and gradients; bit for bit with one compiled update, or with
    `triton.autotune_pointwise` off)."""
    _, _, ours, ours_opt = pair(converted)
    for seed in (0, 1):
        loss_and_backward(ours, batch(seed))
        ours_opt.step()
        ours_opt.zero_grad()
    torch.save(ours_opt.state_dict(), tmp_path / "optimizer.pt")
    with ours_opt.master_weights():
        model_state = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    resumed = recipe_model(converted)
    resumed.load_state_dict(model_state)
    resumed_opt = MixedPrecisionAdamW(
        resumed.training_parameter_groups(0.1), lr=1e-2, low_precision_params=autocast_linear_parameters(resumed)
    )
    resumed_opt.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    for p, q in zip(ours.parameters(), resumed.parameters(), strict=True):
        assert p.dtype == q.dtype and torch.equal(p, q)
        for name, value in ours_opt.state[p].items():
            assert resumed_opt.state[q][name].dtype == torch.float32 and torch.equal(resumed_opt.state[q][name], value)
    for model, opt in ((ours, ours_opt), (resumed, resumed_opt)):
        loss_and_backward(model, batch(2))
        opt.step()
    compiled = DEVICE.type == "cuda"  # (the update compiles by default where the parameters are on CUDA)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if compiled else {"rtol": 0, "atol": 0}
    with ours_opt.master_weights(), resumed_opt.master_weights():
        for p, q in zip(ours.parameters(), resumed.parameters(), strict=True):
            torch.testing.assert_close(q, p, **tolerance)


def test_master_weights_are_what_save_pretrained_writes(converted, tmp_path):
    _, _, ours, ours_opt = pair(converted)
    loss_and_backward(ours, batch(0))
    ours_opt.step()
    name, parameter = next((n, p) for n, p in ours.named_parameters() if p.dtype == torch.bfloat16 and p.requires_grad)
    with ours_opt.master_weights():
        ours.save_pretrained(tmp_path)
    assert parameter.dtype == torch.bfloat16  # the stored copy is back
    saved = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert torch.equal(saved.state_dict()[name], ours_opt.state[parameter]["master"].cpu())


def test_tensor_learning_rate_and_compiled_update(converted):
    """A 0-d learning rate tensor is read at each step (a captured graph sees its new value); the compiled update
    (here through dynamo with the eager backend: no graph break) equals the eager one."""
    eager = recipe_model(converted)
    compiled = copy.deepcopy(eager)
    lr = torch.tensor(1e-2, device=DEVICE)
    eager_opt, compiled_opt = (
        MixedPrecisionAdamW(
            model.training_parameter_groups(0.1),
            lr=rate,
            low_precision_params=autocast_linear_parameters(model),
            compile=backend,
        )
        for model, rate, backend in ((eager, 1e-2, False), (compiled, lr, "eager"))
    )
    for seed, rate in ((0, 1e-2), (1, 0.0)):
        lr.fill_(rate)
        eager_opt.param_groups[0]["lr"] = eager_opt.param_groups[1]["lr"] = rate
        before = [p.detach().clone() for p in compiled.parameters()]
        for model, opt in ((eager, eager_opt), (compiled, compiled_opt)):
            loss_and_backward(model, batch(seed))
            opt.step()
            opt.zero_grad()
        for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
            assert torch.equal(p, q)
        moved = any(not torch.equal(p, b) for p, b in zip(compiled.parameters(), before, strict=True))
        assert moved == (rate > 0)


@torch._dynamo.config.patch(recompile_limit=1)
def test_each_optimizer_compiles_for_its_own_parameters():
    """torch.compile counts recompilations per code object: optimizers of models of other shapes (and parameter
    counts) in one process must not add up to its limit (with fullgraph=True, an error)."""
    for layers in (1, 2, 3):
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)]).to(DEVICE)
        optimizer = MixedPrecisionAdamW(model.parameters(), lr=0.1, compile="eager")
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(2, 4, device=DEVICE)).sum().backward()
        optimizer.step()
        assert all(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_a_group_added_later_with_a_bf16_parameter_gets_an_fp32_master():
    """`add_param_group` (e.g. unfreezing a part later) treats a bf16 parameter as the constructor does."""
    torch.manual_seed(0)
    first, second = nn.Linear(4, 8).to(DEVICE), nn.Linear(8, 3).to(DEVICE)
    x = torch.randn(5, 4, device=DEVICE)
    models = [nn.Sequential(copy.deepcopy(first), copy.deepcopy(second).to(torch.bfloat16)) for _ in range(2)]
    added = MixedPrecisionAdamW(models[0][0].parameters(), lr=0.1, compile=False)
    added.add_param_group({"params": list(models[0][1].parameters())})
    given = MixedPrecisionAdamW(
        [{"params": list(models[1][0].parameters())}, {"params": list(models[1][1].parameters())}],
        lr=0.1,
        compile=False,
    )
    for model, optimizer in zip(models, (added, given), strict=True):
        model[1](model[0](x).bfloat16()).float().pow(2).mean().backward()
        optimizer.step()
        assert optimizer.state[model[1].weight]["master"].dtype == torch.float32
        assert optimizer.state[model[1].weight]["exp_avg"].dtype == torch.float32
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_skipped_step_drops_its_clipping_factor():
    """Clip, find the norm not finite, skip the step (`zero_grad`): the next step is not scaled by that factor."""
    torch.manual_seed(0)
    x = torch.randn(5, 4, device=DEVICE)
    models = [nn.Linear(4, 2).to(DEVICE) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [MixedPrecisionAdamW(m.parameters(), lr=0.1, compile=False) for m in models]
    (models[0](x).sum() * float("inf")).backward()
    assert not torch.isfinite(optimizers[0].clip_grad_norm_(1.0))
    optimizers[0].zero_grad()
    for model, optimizer in zip(models, optimizers, strict=True):
        model(x).pow(2).mean().backward()
        optimizer.step()
    for p, q in zip(*(m.parameters() for m in models), strict=True):
        assert torch.isfinite(p).all() and torch.equal(p, q)


def test_a_tensor_learning_rate_stays_the_callers_after_loading_a_state():
    model = nn.Linear(4, 2).to(DEVICE)
    lr = torch.tensor(1e-2, device=DEVICE)
    optimizer = MixedPrecisionAdamW(model.parameters(), lr=lr, compile=False)
    model(torch.randn(3, 4, device=DEVICE)).sum().backward()
    optimizer.step()
    state = copy.deepcopy(optimizer.state_dict())
    lr.fill_(0.5)
    optimizer.load_state_dict(state)
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(1e-2)  # the saved value
    lr.fill_(0.0)  # in place, as between CUDA-graph replays: the step sees it
    before = model.weight.detach().clone()
    optimizer.step()
    assert torch.equal(model.weight, before)


def test_errors():
    model = nn.Linear(4, 4).to(DEVICE)
    other = nn.Linear(4, 4).to(DEVICE)
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        MixedPrecisionAdamW(model.parameters(), low_precision_params=other.parameters())
    with pytest.raises(ValueError, match="must be fp32"):
        MixedPrecisionAdamW(other.to(torch.bfloat16).parameters(), low_precision_params=other.parameters())
    with pytest.raises(ValueError, match="one element"):
        MixedPrecisionAdamW(model.parameters(), lr=torch.ones(2))
    with pytest.raises(ValueError, match="Invalid AdamW hyperparameters"):
        MixedPrecisionAdamW(model.parameters(), betas=(0.9, 1.0))
    for lr in (-1.0, float("nan")):  # as torch.optim.AdamW: a negative rate would ascend the loss
        with pytest.raises(ValueError, match="Invalid learning rate"):
            MixedPrecisionAdamW(model.parameters(), lr=lr)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs: run with OPENFLAMINGO_TEST_DEVICE=cuda on a GPU")
def test_inductor_update_captured_in_a_cuda_graph_follows_the_eager_one(converted):
    """The default on CUDA (each parameter's update one inductor kernel), in a training step captured as one CUDA
    graph and replayed, against the eager update: the same path to rounding."""
    from modeling_openflamingo.fast_decoding import _capture_cuda_graph

    eager = recipe_model(converted)
    graphed = copy.deepcopy(eager)
    eager_opt, graphed_opt = (
        MixedPrecisionAdamW(
            model.training_parameter_groups(0.1), lr=1e-3, low_precision_params=autocast_linear_parameters(model)
        )
        for model in (eager, graphed)
    )
    eager_opt._update = torch.compile(eager_opt._update, backend="eager", fullgraph=True)  # eager kernels
    static = batch(0)
    weights = copy.deepcopy(graphed.state_dict())

    losses: dict[str, torch.Tensor] = {}

    def step() -> None:
        losses["graphed"] = loss_and_backward(graphed, static)  # after the capture: the graph's output tensor
        graphed_opt.clip_grad_norm_(1.0)
        graphed_opt.step()

    replay = _capture_cuda_graph(step, lambda: graphed_opt.zero_grad(set_to_none=True), warm_up_runs=2).replay
    # the warm-up steps and the capture's step undone, in place (the graph keeps the addresses it captured)
    graphed.load_state_dict(weights)
    for p, q in zip(graphed.parameters(), eager.parameters(), strict=True):
        state = graphed_opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq", "step"):
            if name in state:
                state[name].zero_()
        if "master" in state:
            state["master"].copy_(eager_opt.state[q]["master"])  # the eager model's, not stepped yet
    for seed in (1, 2, 3):
        for name, tensor in batch(seed).items():
            static[name].copy_(tensor)
        replay()
        loss = loss_and_backward(eager, static)
        eager_opt.clip_grad_norm_(1.0)
        eager_opt.step()
        eager_opt.zero_grad()
        if seed == 1:  # the same weights before the step: the same loss, and the updates equal to rounding
            torch.testing.assert_close(losses["graphed"], loss, rtol=1e-6, atol=0)
            with eager_opt.master_weights(), graphed_opt.master_weights():
                for p, q in zip(eager.parameters(), graphed.parameters(), strict=True):
                    torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        else:  # a master one rounding apart may round to another bf16 copy: the paths stay close
            torch.testing.assert_close(losses["graphed"], loss, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="inductor's combo kernels: run with OPENFLAMINGO_TEST_DEVICE=cuda")
def test_compiled_update_with_combo_kernels_runs_many_parameters_in_few_kernels_with_the_same_numbers():
    """The default compiled update (inductor, combo kernels) updates 48 parameters of mixed sizes and dtypes in fewer
    kernels than parameters, with the numbers of the same update compiled one kernel per parameter up to the last
    bit of fp32 (the two compilations may contract other products into fused multiply-adds: on an H200, 7 of
    2048 elements of one master weight one rounding apart after three steps), and bf16 copies that are their
    masters rounded."""
    from modeling_openflamingo import optimization

    generator = torch.Generator().manual_seed(0)
    sizes = [(1,), (2048,), (512, 2048), (64,)] * 12

    def parameters() -> list[nn.Parameter]:
        generator.manual_seed(0)
        return [nn.Parameter(torch.randn(size, generator=generator).to(DEVICE)) for size in sizes]

    combo, plain = parameters(), parameters()
    optimizers = [
        MixedPrecisionAdamW(params, lr=1e-3, weight_decay=0.1, low_precision_params=params[2::4])
        for params in (combo, plain)
    ]
    optimizers[1]._update = torch.compile(optimization._adamw, fullgraph=True)  # inductor, no combo kernels
    for step in range(3):
        generator.manual_seed(step)
        grads = [torch.randn(size, generator=generator).to(DEVICE) for size in sizes]
        for params, optimizer in zip((combo, plain), optimizers, strict=True):
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad.to(param.dtype)
            optimizer.step()
    with optimizers[0].master_weights(), optimizers[1].master_weights():
        masters = [[p.detach().clone() for p in params] for params in (combo, plain)]
    for p, q in zip(*masters, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    for params, params_masters in zip((combo, plain), masters, strict=True):
        for p, master in zip(params, params_masters, strict=True):
            assert torch.equal(p, master.to(p.dtype))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        optimizers[0].step()
        torch.cuda.synchronize()
    kernels = [event for event in profile.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{len(kernels)} kernels for {len(sizes)} parameters")
    assert 0 < len(kernels) < len(sizes), [event.name for event in kernels]
