"""Calibration statistics from a real (tiny) diffusers UNet: exact restore, correct activations."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from comfyui_safetydpo import calibration, merging
from comfyui_safetydpo.expert import LoraModule, SafetyExpert


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    )


def attention_expert(unet, name, seed):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for module_name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.endswith(("to_q", "to_v")):
            modules[f"unet.{module_name}"] = LoraModule(
                torch.randn(2, module.in_features, generator=g) * 0.3,
                torch.randn(module.out_features, 2, generator=g) * 0.3, 2.0)
    return SafetyExpert(name, modules, architecture="unknown")


def test_statistics_match_a_direct_computation_and_weights_are_restored():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    experts = [attention_expert(unet, "a", 1), attention_expert(unet, "b", 2)]
    hidden = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3))
    stats = calibration.calibrate_diffusers_unet(
        unet, experts, [hidden], timesteps=[100, 800], latents_shape=(4, 8, 8), noise_scheduler=DDPMScheduler(), seed=0)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # Direct computation for one layer of expert "a": hook the input with the expert applied by hand.
    target = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    module = unet.get_submodule(target[len("unet."):])
    inputs = []
    handle = module.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    generator = torch.Generator().manual_seed(0)
    scheduler = DDPMScheduler()
    with calibration.expert_applied(experts[0], calibration.diffusers_module_lookup(unet)), torch.no_grad():
        for t in (100, 800):
            x0 = torch.randn((2, 4, 8, 8), generator=generator)
            noise = torch.randn(x0.shape, generator=generator)
            tt = torch.full((2,), t)
            unet(scheduler.add_noise(x0, noise, tt), tt, encoder_hidden_states=hidden)
    handle.remove()
    x = torch.cat([i.reshape(-1, i.shape[-1]) for i in inputs])
    y = x @ experts[0].delta_weight(target).t()
    assert torch.allclose(stats.experts["a"][target].row_activation, y.abs().mean(0), rtol=1e-4, atol=1e-6)
    assert torch.allclose(stats.experts["a"][target].input_sq_mean, x.pow(2).mean(0), rtol=1e-4, atol=1e-6)
    assert all(torch.equal(before[k], unet.state_dict()[k]) for k in before)

    merged = merging.co_merge(experts, [1.0, 1.0], stats)
    assert set(merged.modules) == set(experts[0].modules)


def test_weights_are_restored_when_the_model_run_fails():
    unet = tiny_unet()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    expert = attention_expert(unet, "a", 1)

    def failing_run():
        raise RuntimeError("out of memory in the middle")

    try:
        calibration.collect_statistics(failing_run, [expert], calibration.diffusers_module_lookup(unet))
    except RuntimeError:
        pass
    assert all(torch.equal(before[k], unet.state_dict()[k]) for k in before)


def test_convolution_statistics_match_a_direct_computation():
    unet = tiny_unet()
    target = "unet.down_blocks.0.resnets.0.conv1"  # 3x3 conv, 16 -> 16 channels
    conv = unet.get_submodule(target[len("unet."):])
    g = torch.Generator().manual_seed(4)
    expert = SafetyExpert("conv", {target: LoraModule(torch.randn(2, 16, 3, 3, generator=g) * 0.1,
                                                     torch.randn(16, 2, 1, 1, generator=g) * 0.1, 1.0)})
    inputs = []
    lookup = calibration.diffusers_module_lookup(unet)
    hidden = torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(3))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def run_model():
        unet(latents, torch.tensor([500]), encoder_hidden_states=hidden)

    stats = calibration.collect_statistics(run_model, [expert], lookup)
    handle = conv.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
    with calibration.expert_applied(expert, lookup), torch.no_grad():
        run_model()
    handle.remove()
    x = inputs[0]
    y = torch.nn.functional.conv2d(x, expert.delta_weight(target), None, conv.stride, conv.padding)
    assert torch.allclose(stats.experts["conv"][target].row_activation, y.abs().mean(dim=(0, 2, 3)),
                          rtol=1e-4, atol=1e-7)
    assert torch.allclose(stats.experts["conv"][target].input_sq_mean, x.pow(2).mean(dim=(0, 2, 3)), rtol=1e-4)


def test_sdxl_added_conditioning_is_passed_to_the_unet():
    from comfyui_safetydpo.models import PromptEmbeddings

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12 + 6 * 4)
    expert = attention_expert(unet, "a", 1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 24, generator=g)
    added = {"text_embeds": torch.randn(2, 12, generator=g), "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * 2)}
    common = dict(timesteps=[300], latents_shape=(4, 8, 8), noise_scheduler=DDPMScheduler(), seed=0)
    from_embeddings = calibration.calibrate_diffusers_unet(unet, [expert], [PromptEmbeddings(hidden, added)], **common)
    from_kwargs = calibration.calibrate_diffusers_unet(unet, [expert], [hidden], added_cond_kwargs_list=[added],
                                                       **common)
    other_time = {**added, "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)}
    shifted = calibration.calibrate_diffusers_unet(unet, [expert], [hidden], added_cond_kwargs_list=[other_time],
                                                   **common)
    name = next(iter(expert.modules))
    assert torch.equal(from_embeddings.experts["a"][name].row_activation, from_kwargs.experts["a"][name].row_activation)
    assert not torch.equal(from_kwargs.experts["a"][name].row_activation, shifted.experts["a"][name].row_activation)
