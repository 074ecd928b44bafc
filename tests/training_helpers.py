"""Tiny models and pair datasets built at test time for trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from comfyui_safetydpo.models import DiffusionBundle
from comfyui_safetydpo.pairs import PreferencePair, PreferencePairs, ReplayItem, save_image_tensor

VOCAB = ["<pad>", "a", "red", "blue", "green", "square", "circle", "on", "white", "black", "background", "the"]


class WordTokenizer:
    """A minimal word-level tokenizer with the HF call signature the bundle uses."""

    model_max_length = 8

    def __init__(self, vocabulary=VOCAB):
        self.vocabulary = list(vocabulary)

    def __call__(self, prompts, padding=None, max_length=None, truncation=None, return_tensors=None):
        length = max_length or self.model_max_length
        rows = []
        for prompt in prompts:
            ids = [self.vocabulary.index(w) if w in self.vocabulary else 0 for w in prompt.lower().split()][:length]
            rows.append(ids + [0] * (length - len(ids)))

        class Output:
            input_ids = torch.tensor(rows)

        return Output()


def tiny_bundle(seed: int = 0, cross_attention_dim: int = 32, prediction_type: str = "epsilon", size: int = 8,
                vocabulary=VOCAB):
    """A tiny random UNet + one-layer CLIP text encoder with a word-level tokenizer over ``vocabulary``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocabulary), hidden_size=cross_attention_dim,
                                        intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                        max_position_embeddings=8, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    return DiffusionBundle(unet=unet, text_encoders=[text], tokenizers=[WordTokenizer(vocabulary)],
                           noise_scheduler=scheduler, vae=None, architecture="demo", prediction_type=prediction_type,
                           resolution=size, name="tiny")


def square_image(colour, size=8, background=(1.0, 1.0, 1.0), noise_seed=None):
    image = torch.tensor(background).reshape(3, 1, 1).repeat(1, size, size)
    image[:, 2:6, 2:6] = torch.tensor(colour).reshape(3, 1, 1)
    if noise_seed is not None:
        image += 0.05 * torch.randn(image.shape, generator=torch.Generator().manual_seed(noise_seed))
    return image.clamp(0, 1) * 2 - 1


RED, BLUE, GREEN = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)


def colour_pairs(root: Path, count: int = 12, seed_offset: int = 0, replay: int = 0) -> PreferencePairs:
    """Preferred = blue square, rejected = red square, prompt 'a red square'."""
    root = Path(root)
    pairs = []
    for i in range(count):
        seed = seed_offset + i
        save_image_tensor(square_image(BLUE, noise_seed=seed), root / "images" / f"s_{i}.png")
        save_image_tensor(square_image(RED, noise_seed=seed + 1000), root / "images" / f"u_{i}.png")
        pairs.append(PreferencePair(f"p{i}", "a red square", "a blue square", ("Violence",),
                                    f"images/s_{i}.png", f"images/u_{i}.png", seed, "red"))
    items = []
    for i in range(replay):
        save_image_tensor(square_image(GREEN, noise_seed=i + 5000), root / "images" / f"r_{i}.png")
        items.append(ReplayItem(f"r{i}", "a green square", f"images/r_{i}.png", i))
    return PreferencePairs(root=root, pairs=pairs, replay=items)


# -- tiny SD1.5 / SD2.1 / SDXL-shaped models: diffusers folders and single-file checkpoints ---------

def write_tiny_clip_tokenizer(folder: Path) -> Path:
    """CLIP BPE tokenizer files with a byte-level vocabulary (no merges): 514 tokens, offline."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


TINY_VOCAB = 514


def _bytes_to_unicode():
    """GPT-2/CLIP's byte → printable character table (the 256 base symbols of the BPE vocabulary)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def tiny_sd_components(architecture: str, seed: int = 0):
    """(unet, text_encoders, vae, prediction_type) of a width-reduced SD1.5 / SD2.1 / SDXL."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)

    def clip(hidden, act, projection=False, layers=2):
        config = CLIPTextConfig(vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers,
                                num_attention_heads=max(1, hidden // 64) if hidden % 64 == 0 else 8,
                                max_position_embeddings=16, hidden_act=act, projection_dim=hidden,
                                bos_token_id=TINY_VOCAB - 2, eos_token_id=TINY_VOCAB - 1, pad_token_id=1)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    common = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8)
    if architecture == "sd15":
        unet = UNet2DConditionModel(block_out_channels=(16, 32),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, **common)
        encoders, prediction = [clip(32, "quick_gelu")], "epsilon"
    elif architecture == "sd21":
        unet = UNet2DConditionModel(block_out_channels=(64, 128),
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                    attention_head_dim=[1, 2], use_linear_projection=True, **common)
        encoders, prediction = [clip(64, "gelu")], "v_prediction"
    else:
        unet = UNet2DConditionModel(block_out_channels=(64, 128),
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=96,
                                    attention_head_dim=[1, 2], use_linear_projection=True,
                                    transformer_layers_per_block=[1, 2], addition_embed_type="text_time",
                                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8,
                                    **common)
        encoders, prediction = [clip(32, "quick_gelu"), clip(64, "gelu", projection=True)], "epsilon"
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=32, sample_size=16)
    return unet, encoders, vae, prediction


def save_tiny_diffusers_folder(architecture: str, folder: Path, seed: int = 0) -> Path:
    """A diffusers model folder of a tiny SD-shaped model (model_index.json + components)."""
    import json

    from comfyui_safetydpo.model_loading import SD_SCHEDULER

    unet, encoders, vae, prediction = tiny_sd_components(architecture, seed)
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    names = ["text_encoder", "text_encoder_2"]
    for name, encoder in zip(names, encoders):
        encoder.save_pretrained(folder / name)
        write_tiny_clip_tokenizer(folder / name.replace("text_encoder", "tokenizer"))
        from transformers import CLIPTokenizer

        tokenizer_folder = folder / name.replace("text_encoder", "tokenizer")
        # OpenCLIP towers (SD2.x, SDXL's second encoder) pad with "!" as their released tokenizers do
        pad = {"pad_token": "!"} if encoder.config.hidden_act == "gelu" else {}
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_folder, local_files_only=True, model_max_length=16, **pad)
        tokenizer.save_pretrained(tokenizer_folder)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", **SD_SCHEDULER, "prediction_type": prediction}))
    pipeline = "StableDiffusionXLPipeline" if architecture == "sdxl" else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return folder


def _vae_to_ldm(state, levels: int):
    import re

    out = {}
    for key, value in state.items():
        k = key
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k)
        k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.{m.group(2)}.", k)
        k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                   lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        attention = "mid_block.attentions.0." in k
        k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
        for a, b in ((".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
                     (".to_out.0.", ".proj_out.")):
            if attention:
                k = k.replace(a, b)
        k = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if attention and value.dim() == 2:
            value = value[:, :, None, None]
        out[k] = value
    return out


def _open_clip_to_ldm(state, prefix: str, hidden: int):
    out = {}
    layer = {}
    for key, value in state.items():
        key = key if key.startswith("text_model.") or key == "text_projection.weight" else "text_model." + key
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key == "text_model.embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out[prefix + "ln_final." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("text_model.encoder.layers."):
            rest = key[len("text_model.encoder.layers."):]
            index, rest = rest.split(".", 1)
            base = f"{prefix}transformer.resblocks.{index}."
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layer.setdefault((base, rest.rsplit(".", 1)[1]), {})[rest.split(".")[1]] = value
                continue
            rest = (rest.replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2").replace("mlp.fc1", "mlp.c_fc")
                    .replace("mlp.fc2", "mlp.c_proj").replace("self_attn.out_proj", "attn.out_proj"))
            out[base + rest] = value
    for (base, kind), parts in layer.items():
        out[f"{base}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def save_tiny_single_file(architecture: str, path: Path, seed: int = 0, extra_layer_for_sd2: bool = True) -> Path:
    """The same tiny model as one LDM-layout .safetensors file, as ComfyUI's models/checkpoints/ holds."""
    from safetensors.torch import save_file

    from comfyui_safetydpo.unet_keys import diffusers_to_ldm, infer_layout_from_diffusers_config

    unet, encoders, vae, prediction = tiny_sd_components(architecture, seed)
    layout = infer_layout_from_diffusers_config(unet.config)
    state = {f"model.diffusion_model.{diffusers_to_ldm(k, layout)}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in
                  _vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels)).items()})

    def hf_clip(encoder, prefix):
        for k, v in encoder.state_dict().items():
            if not k.endswith("position_ids"):
                state[prefix + (k if k.startswith("text_model.") else "text_model." + k)] = v

    if architecture == "sd15":
        hf_clip(encoders[0], "cond_stage_model.transformer.")
    elif architecture == "sd21":
        text = _open_clip_to_ldm(encoders[0].state_dict(), "cond_stage_model.model.", 64)
        # SD2 files hold one more (unused) layer and a projection; the loader drops both.
        layers = encoders[0].config.num_hidden_layers
        for k, v in list(text.items()):
            if f"resblocks.{layers - 1}." in k:
                text[k.replace(f"resblocks.{layers - 1}.", f"resblocks.{layers}.")] = torch.randn_like(v)
        text["cond_stage_model.model.text_projection"] = torch.randn(64, 64)
        state.update(text)
        state["v_pred"] = torch.tensor([])
    else:
        hf_clip(encoders[0], "conditioner.embedders.0.transformer.")
        state.update(_open_clip_to_ldm(encoders[1].state_dict(), "conditioner.embedders.1.model.", 64))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
