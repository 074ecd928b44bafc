"""Property-based tests (hypothesis) of the LoRA reader and the module-name conversions.

- The reader (``lora_files.expert_from_state_dict`` / ``load_expert``) never fails with anything but our
  own error types (``SafetyDPOError`` subclasses), whatever the key names, shapes, dtypes, values,
  metadata or bytes; what it accepts gives finite ΔW of the right shape and writes back unchanged.
- ``unet_keys``: diffusers ↔ LDM (and canonical ↔ native, canonical ↔ kohya flat) round-trip for every
  valid module name of the SD1.5/SD2.1/SDXL presets and of random SD-family layouts.

Examples are derandomized (the same in every CI run) and kept modest; set
``SAFETYDPO_HYPOTHESIS_EXAMPLES`` (e.g. 2000) for a longer search.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from comfyui_safetydpo import lora_files, unet_keys
from comfyui_safetydpo.errors import SafetyDPOError
from comfyui_safetydpo.expert import SafetyExpert

SCALE = int(os.environ.get("SAFETYDPO_HYPOTHESIS_EXAMPLES", "0")) or None


def examples(n: int, shrink: bool = True):
    phases = [Phase.explicit, Phase.reuse, Phase.generate] + ([Phase.target, Phase.shrink] if shrink else [])
    return settings(max_examples=SCALE or n, deadline=None, derandomize=SCALE is None, database=None, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- module names -------------------------------------------------------------------------------

ATTENTION_LEAVES = ["proj_in", "proj_out", "norm"] + [
    f"transformer_blocks.{{j}}.{leaf}" for leaf in
    ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
     "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1", "norm2", "norm3")]
RESNET_LEAVES = ["conv1", "conv2", "norm1", "norm2", "time_emb_proj", "conv_shortcut"]


def diffusers_module_names(layout: unet_keys.UNetLayout):
    """Every diffusers module path (weights that LoRA can target) of a UNet with this layout."""
    names = ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "conv_norm_out", "conv_out",
             "add_embedding.linear_1", "add_embedding.linear_2"]

    def attention(prefix, depth):
        return [f"{prefix}.{leaf.format(j=j)}" for j in range(depth) for leaf in ATTENTION_LEAVES if "{j}" in leaf] + \
               [f"{prefix}.{leaf}" for leaf in ATTENTION_LEAVES if "{j}" not in leaf]

    for level in range(layout.levels):
        for i in range(layout.res_blocks[level]):
            names += [f"down_blocks.{level}.resnets.{i}.{leaf}" for leaf in RESNET_LEAVES]
            if layout.down_depth[level]:
                names += attention(f"down_blocks.{level}.attentions.{i}", layout.down_depth[level])
        if level < layout.levels - 1:
            names.append(f"down_blocks.{level}.downsamplers.0.conv")
    for up in range(layout.levels):
        for i in range(layout.up_res_blocks(up)):
            names += [f"up_blocks.{up}.resnets.{i}.{leaf}" for leaf in RESNET_LEAVES]
            if layout.up_depth[up]:
                names += attention(f"up_blocks.{up}.attentions.{i}", layout.up_depth[up])
        if up < layout.levels - 1:
            names.append(f"up_blocks.{up}.upsamplers.0.conv")
    names += [f"mid_block.resnets.{i}.{leaf}" for i in (0, 1) for leaf in RESNET_LEAVES]
    if layout.mid_attention:
        names += attention("mid_block.attentions.0", layout.mid_depth)
    return names


layouts = st.one_of(
    st.sampled_from(sorted(unet_keys.LAYOUTS.items())).map(lambda item: item[1]),
    st.integers(1, 4).flatmap(lambda levels: st.builds(
        unet_keys.UNetLayout.build,
        st.lists(st.integers(1, 3), min_size=levels, max_size=levels),
        st.lists(st.integers(0, 3), min_size=levels, max_size=levels),
        st.lists(st.integers(0, 3), min_size=levels, max_size=levels),
        st.integers(0, 2))),
)


@st.composite
def layout_and_names(draw, count=12):
    layout = draw(layouts)
    names = diffusers_module_names(layout)
    return layout, draw(st.lists(st.sampled_from(names), min_size=1, max_size=count, unique=True))


@examples(150)
@given(layout_and_names())
def test_diffusers_ldm_native_round_trip(case):
    layout, names = case
    ldm_names = set()
    for name in names:
        ldm = unet_keys.diffusers_to_ldm(name, layout)
        assert unet_keys.is_ldm_path(ldm), (name, ldm)
        assert unet_keys.ldm_to_diffusers(ldm, layout) == name
        assert unet_keys.ldm_to_diffusers("diffusion_model." + ldm, layout) == name
        native = unet_keys.canonical_to_native("unet." + name, layout)
        assert native == "diffusion_model." + ldm
        assert unet_keys.native_to_canonical(native, layout) == "unet." + name
        ldm_names.add(ldm)
    assert len(ldm_names) == len(names), "two diffusers modules map to one LDM module"


@examples(100)
@given(layout_and_names())
def test_every_module_of_a_layout_maps_to_a_distinct_ldm_name(case):
    layout, _ = case
    names = diffusers_module_names(layout)
    ldm = [unet_keys.diffusers_to_ldm(n, layout) for n in names]
    assert len(set(ldm)) == len(names)


TEXT_LEAVES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
               "mlp.fc2", "layer_norm1", "layer_norm2"]


@st.composite
def canonical_names(draw):
    part = draw(st.sampled_from(["unet", "text_encoder", "text_encoder_2"]))
    if part == "unet":
        layout = draw(layouts)
        return part, layout, "unet." + draw(st.sampled_from(diffusers_module_names(layout)))
    layer = draw(st.integers(0, 31))
    leaf = draw(st.sampled_from(TEXT_LEAVES))
    spelled = draw(st.sampled_from(["text_model.encoder", "encoder"]))  # transformers 4 and 5 spellings
    return part, None, f"{part}.{spelled}.layers.{layer}.{leaf}"


@examples(200)
@given(canonical_names(), st.sampled_from(["sd15", "sd21", "sdxl"]))
def test_kohya_flat_names_round_trip(case, architecture):
    part, layout, name = case
    if part == "text_encoder_2" and architecture != "sdxl":
        architecture = "sdxl"
    flat = unet_keys.canonical_to_kohya(name, architecture)
    assert "." not in flat and flat.startswith("lora_")
    expected = name if part == "unet" else f"{part}.{unet_keys.normalize_text_encoder_path(name.split('.', 1)[1])}"
    assert unet_keys.kohya_to_canonical(flat, layout) == expected
    # the LDM-flavoured kohya spelling (lora_unet_input_blocks_…) that ComfyUI also accepts
    if part == "unet":
        ldm = unet_keys.diffusers_to_ldm(name[len("unet."):], layout)
        assert unet_keys.kohya_to_canonical("lora_unet_" + ldm.replace(".", "_"), layout) == name


@examples(150)
@given(st.text(min_size=0, max_size=80), layouts)
def test_name_conversions_refuse_junk_with_our_error(text, layout):
    for convert in (lambda: unet_keys.ldm_to_diffusers(text, layout), lambda: unet_keys.diffusers_to_ldm(text, layout),
                    lambda: unet_keys.kohya_to_canonical(text, layout),
                    lambda: unet_keys.native_to_canonical(text, layout),
                    lambda: unet_keys.canonical_to_kohya(text), lambda: unet_keys.layout_from_json(text)):
        try:
            convert()
        except SafetyDPOError:
            pass


# -- the LoRA reader ----------------------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.uint8,
          torch.bool]
SUFFIXES = [".lora_down.weight", ".lora_up.weight", ".alpha", ".diff", ".lora_A.weight", ".lora_B.weight",
            ".lora_A.default.weight", ".lora.down.weight", ".processor.to_q_lora.up.weight", ".weight",
            ".dora_scale", ""]
MODULES = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
           "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", "lora_unet_mid_block_attentions_0_proj_in",
           "lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
           "lora_te2_text_model_encoder_layers_3_self_attn_out_proj", "lora_unet_conv_in",
           "diffusion_model.input_blocks.4.1.proj_in", "diffusion_model.output_blocks.99.0.in_layers.2",
           "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
           "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
           "text_encoder.text_model.encoder.layers.0.self_attn.v_proj", "text_encoder_2.encoder.layers.1.mlp.fc2",
           "up_blocks.1.resnets.0.conv1", "middle_block.1.proj_out", "something.else", "lora_unet_", ""]

@st.composite
def tensors(draw, min_size=1):
    shape = draw(st.lists(st.integers(min_size, 6), min_size=0, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    count = 1
    for size in shape:
        count *= size
    kind = draw(st.sampled_from(["normal", "special", "zeros"]))
    values = torch.randn(count, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    if kind == "special" and count:
        values[draw(st.integers(0, count - 1))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e38]))
    if kind == "zeros":
        values.zero_()
    if dtype.is_floating_point:
        return values.reshape(shape).to(dtype)
    return (values * 3).clamp(-100, 100).reshape(shape).to(dtype)


@st.composite
def lora_state(draw, min_rank=1):
    """A plausible-looking LoRA state dict: real module names with matching (or not) shapes, plus junk."""
    state = {}
    for _ in range(draw(st.integers(0, 4))):
        module = draw(st.sampled_from(MODULES))
        rank, width, out = draw(st.integers(min_rank, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
        dtype = draw(st.sampled_from(DTYPES[:4]))
        if draw(st.booleans()):
            state[f"{module}.lora_down.weight"] = torch.randn(rank, width).to(dtype)
            state[f"{module}.lora_up.weight"] = torch.randn(out, draw(st.sampled_from([rank, rank + 1]))).to(dtype)
            if draw(st.booleans()):
                state[f"{module}.alpha"] = torch.tensor(float(draw(st.sampled_from([rank, 1, 0, float("nan")]))))
        else:
            state[f"{module}.lora_A.weight"] = torch.randn(rank, width).to(dtype)
            state[f"{module}.lora_B.weight"] = torch.randn(out, rank).to(dtype)
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(MODULES)) + draw(st.sampled_from(SUFFIXES))
        if draw(st.booleans()):
            key = draw(st.text(max_size=30)) + key
        state[key] = draw(tensors(min_size=min_rank))
    return state


# peft LoraConfig fields with the types peft writes ...
well_formed_configs = st.fixed_dictionaries({}, optional={
    "r": st.integers(1, 8), "lora_alpha": st.one_of(st.integers(1, 16), st.floats(0.5, 64)),
    "alpha_pattern": st.dictionaries(st.sampled_from(["to_q", "attn1.to_k", "q_proj", "x"]), st.floats(0.5, 8),
                                     max_size=2),
    "rank_pattern": st.dictionaries(st.sampled_from(["to_q", "attn1.to_k", "q_proj", "x"]), st.integers(1, 4),
                                    max_size=2),
    "use_rslora": st.booleans()})
# ... and the damaged values a hand-edited adapter_config.json or foreign metadata may hold
malformed_configs = st.one_of(
    st.dictionaries(st.sampled_from(["r", "lora_alpha", "alpha_pattern", "rank_pattern", "use_rslora"]),
                    st.one_of(st.integers(-2, 8), st.floats(allow_nan=True), st.text(max_size=5), st.booleans(),
                              st.lists(st.integers(0, 3), max_size=2),
                              st.dictionaries(st.text(max_size=8), st.integers(0, 4), max_size=2)), max_size=4),
    st.lists(st.integers(0, 3), max_size=2), st.integers(), st.none())


def packed_metadata(configs):
    """diffusers' ``lora_adapter_metadata``: a config per part (``unet.r`` …) or one unprefixed config."""
    return st.one_of(
        configs.map(lambda c: json.dumps(c)),
        configs.map(lambda c: json.dumps({f"unet.{k}": v for k, v in c.items()} if isinstance(c, dict) else c)),
        st.text(max_size=20).filter(lambda t: not _is_json(t)))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def metadata(configs):
    return st.dictionaries(
        st.sampled_from(["safetydpo_architecture", "ss_base_model_version", "safetydpo_unet_layout",
                         "lora_adapter_metadata", "safetydpo_categories", "safetydpo_name", "other"]),
        st.one_of(st.text(max_size=30), st.sampled_from([
            "sd15", "sd21", "sdxl", "demo", "unknown", "sd_v1", "sdxl_base_v1-0", "[]", "{}", "null",
            '["Hate", 3]', '{"res_blocks": [1]}',
            json.dumps({"res_blocks": [1], "down_depth": [1], "up_depth": [1], "mid_depth": 1}),
            json.dumps({"res_blocks": [0], "down_depth": [-1], "up_depth": [], "mid_depth": "x"})])),
        max_size=4).flatmap(lambda meta: st.builds(
            lambda packed: {**meta, **({"lora_adapter_metadata": packed} if packed is not None else {})},
            st.one_of(st.none(), packed_metadata(configs))))


def check_accepted(expert: SafetyExpert):
    """What the reader accepts is usable: finite ΔW of the module's shape, writable, reads back equal."""
    assert isinstance(expert, SafetyExpert)
    for name in expert.module_names:
        delta = expert.delta_weight(name)
        assert torch.isfinite(delta).all(), name
    if expert.architecture in unet_keys.LAYOUTS or not any(n.startswith("unet.") for n in expert.modules):
        tensors_, meta = lora_files.expert_to_state_dict(expert)
        again = lora_files.expert_from_state_dict(tensors_, meta, name=expert.name)
        assert again.module_names == expert.module_names
        for name in expert.module_names:
            assert torch.allclose(again.delta_weight(name), expert.delta_weight(name))


def read_or_our_error(function):
    try:
        result = function()
    except SafetyDPOError:
        return None
    return result


@examples(150)
@given(lora_state(), metadata(well_formed_configs), st.sampled_from([None, "sd15", "sdxl", "unknown"]),
       st.one_of(st.none(), well_formed_configs))
def test_reader_raises_only_our_errors_on_random_state_dicts(state, meta, architecture, adapter_config):
    expert = read_or_our_error(lambda: lora_files.expert_from_state_dict(
        state, meta, architecture=architecture, adapter_config=adapter_config))
    if expert is not None:
        read_or_our_error(lambda: check_accepted(expert))


@examples(60)
@given(lora_state(min_rank=0), metadata(malformed_configs), st.sampled_from([None, "sd15"]),
       st.one_of(st.none(), malformed_configs.filter(lambda c: isinstance(c, dict))))
def test_reader_raises_only_our_errors_on_damaged_peft_configs(state, meta, architecture, adapter_config):
    expert = read_or_our_error(lambda: lora_files.expert_from_state_dict(
        state, meta, architecture=architecture, adapter_config=adapter_config))
    if expert is not None:
        read_or_our_error(lambda: check_accepted(expert))


@examples(60)
@given(st.binary(max_size=300))
def test_reader_raises_only_our_errors_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("bytes") / "random.safetensors"
    path.write_bytes(data)
    read_or_our_error(lambda: lora_files.load_expert(path))


def _valid_file_bytes() -> bytes:
    generator = torch.Generator().manual_seed(0)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    return safetensors_bytes({f"{name}.lora_down.weight": torch.randn(2, 8, generator=generator),
                              f"{name}.lora_up.weight": torch.randn(8, 2, generator=generator),
                              f"{name}.alpha": torch.tensor(2.0)}, metadata={"ss_base_model_version": "sd_v1"})


VALID = _valid_file_bytes()


@examples(120)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.one_of(st.none(), st.integers(0, len(VALID))))
def test_reader_raises_only_our_errors_on_damaged_files(tmp_path_factory, flips, cut):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path_factory.mktemp("damaged") / "damaged.safetensors"
    path.write_bytes(bytes(data))
    expert = read_or_our_error(lambda: lora_files.load_expert(path))
    if expert is not None:
        read_or_our_error(lambda: check_accepted(expert))


def test_valid_file_is_read():
    """The seed of the damaged-file property is itself a valid expert (so the property tests damage)."""
    expert = lora_files.expert_from_state_dict(*_state_and_metadata(VALID))
    assert expert.architecture == "sd15" and expert.rank == 2


def _state_and_metadata(data: bytes):
    from safetensors.torch import load as safetensors_load

    header_length = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_length]).get("__metadata__", {})
    return safetensors_load(data), meta


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
