"""Loading SD1.5 / SD2.1 / SDXL models for training, fully offline.

``load_bundle(path)`` accepts a diffusers folder (``model_index.json``) or a single-file checkpoint
(``.safetensors``) as found in ComfyUI's ``models/checkpoints/``. Nothing is downloaded: for a single
file every component's config is derived from the tensor shapes in the file, the weights are converted
with diffusers' own LDM → diffusers converters (UNet names through ``unet_keys``), and the CLIP BPE
tokenizer files are taken from a local folder (``tokenizer_dir``, ComfyUI's ``comfy/sd1_tokenizer``
when the pack is installed in ComfyUI or ``COMFYUI_PATH`` is set, or a diffusers folder of the same
model). Architecture detection works on structure, not on widths, so reduced test models load too:

- SDXL: two text encoders, UNet with ``addition_embed_type = "text_time"`` (``label_emb``);
- SD2.x: one OpenCLIP text encoder (GELU; ``cond_stage_model.model.`` in a single file);
- SD1.x: one CLIP text encoder (quick GELU; ``cond_stage_model.transformer.``).

Prediction type: the scheduler config of a diffusers folder; in a single file a ``v_pred`` key means
v-prediction, SD2.x without it defaults to v-prediction (SD2.1-768, the common one) with a warning,
and ``prediction_type=`` overrides either way.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .errors import ArchitectureMismatchError, MissingWeightsError
from .models import PREDICTION_TYPES, DiffusionBundle

log = logging.getLogger(__name__)

SUPPORTED = ("sd15", "sd21", "sdxl")
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1}
VAE_SCALING = {"sd15": 0.18215, "sd21": 0.18215, "sdxl": 0.13025}
RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024}
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIXES = {
    "sd15": ["cond_stage_model.transformer."],
    "sd21": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("DIFFUSERS_OFFLINE", "1")


def load_bundle(path, architecture: Optional[str] = None, dtype: torch.dtype = torch.float32,
                device="cpu", prediction_type: Optional[str] = None, tokenizer_dir=None,
                resolution: Optional[int] = None) -> DiffusionBundle:
    """A ``DiffusionBundle`` from a diffusers folder or a single ``.safetensors`` checkpoint."""
    _offline()
    path = Path(path)
    if not path.exists():
        raise MissingWeightsError(f"{path}: no such model file or folder")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ArchitectureMismatchError(f"prediction_type must be one of {PREDICTION_TYPES}, not {prediction_type!r}")
    if path.is_dir():
        bundle = _load_diffusers_folder(path, architecture, dtype, prediction_type)
    else:
        bundle = _load_single_file(path, architecture, dtype, prediction_type, tokenizer_dir)
    if resolution is not None:
        bundle.resolution = int(resolution)
    bundle.unet.to(device)
    for encoder in bundle.text_encoders:
        encoder.to(device)
    if bundle.vae is not None:
        bundle.vae.to(device)
    for module in [bundle.unet, *bundle.text_encoders, *([bundle.vae] if bundle.vae is not None else [])]:
        module.eval()
        module.requires_grad_(False)
    return bundle


def _check_architecture(found: str, asked: Optional[str], source: Path) -> str:
    if asked is not None and asked != found:
        raise ArchitectureMismatchError(f"{source}: asked for {asked!r} but the model is {found!r} by its structure")
    return found


# -- diffusers folders ---------------------------------------------------------------------------

def _load_diffusers_folder(path: Path, architecture, dtype, prediction_type) -> DiffusionBundle:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise MissingWeightsError(f"{path}: not a diffusers model folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    if not (path / "unet").is_dir():
        raise ArchitectureMismatchError(
            f"{path}: {index.get('_class_name', 'this pipeline')} has no UNet; supported are SD1.5, SD2.1 and SDXL "
            "(UNet-based) models")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, torch_dtype=dtype)
    sdxl = unet.config.get("addition_embed_type") == "text_time"
    if sdxl:
        text_encoders = [CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, dtype=dtype),
                         CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True,
                                                                     dtype=dtype)]
        tokenizers = [CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
                      CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True)]
        found = "sdxl"
    else:
        if unet.config.get("addition_embed_type") is not None or unet.config.get("class_embed_type") is not None:
            raise ArchitectureMismatchError(
                f"{path}: a UNet with extra conditioning "
                f"({unet.config.get('addition_embed_type') or unet.config.get('class_embed_type')})"
                " is not SD1.5, SD2.1 or SDXL")
        text_encoders = [CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True, dtype=dtype)]
        tokenizers = [CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)]
        found = "sd21" if text_encoders[0].config.hidden_act == "gelu" else "sd15"
    found = _check_architecture(found, architecture, path)
    vae = None
    if (path / "vae").is_dir():
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, torch_dtype=dtype)
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text()) \
        if (path / "scheduler" / "scheduler_config.json").is_file() else dict(SD_SCHEDULER)
    prediction = prediction_type or scheduler_config.get("prediction_type", "epsilon")
    scheduler = DDPMScheduler.from_config({**scheduler_config, "prediction_type": prediction})
    size = int(unet.config.sample_size) * (2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1)
    return DiffusionBundle(unet=unet, text_encoders=text_encoders, tokenizers=tokenizers, noise_scheduler=scheduler,
                           vae=vae, architecture=found, prediction_type=prediction, resolution=size, name=path.name)


# -- single-file checkpoints ---------------------------------------------------------------------

def detect_checkpoint_architecture(keys) -> str:
    """``sd15``, ``sd21`` or ``sdxl`` from the key names of a single-file checkpoint."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET_PREFIX + "input_blocks."):
        hint = ""
        if has("model.diffusion_model.joint_blocks.") or has("model.diffusion_model.double_blocks.") \
                or has("double_blocks."):
            hint = " (it looks like an SD3/Flux transformer model)"
        raise ArchitectureMismatchError(
            f"not an SD1.5/SD2.1/SDXL checkpoint{hint}: no '{UNET_PREFIX}input_blocks' keys. Only UNet-based "
            "SD1.5, SD2.1 and SDXL full checkpoints (UNet + text encoder + VAE) can be trained.")
    if has("conditioner.embedders.1.model.") and has(UNET_PREFIX + "label_emb."):
        if not has("conditioner.embedders.0.transformer."):
            raise ArchitectureMismatchError("an SDXL refiner (OpenCLIP only) is not supported; use an SDXL base model")
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd21"
    if has("cond_stage_model.transformer."):
        return "sd15"
    raise ArchitectureMismatchError("the checkpoint has a UNet but no recognised text encoder "
                                    "(cond_stage_model / conditioner); a UNet-only file cannot be trained by "
                                    "the command line: use a full checkpoint or a diffusers folder")


def _read_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    if path.suffix.lower() in (".ckpt", ".pt", ".pth", ".bin"):
        raise ArchitectureMismatchError(f"{path}: pickle checkpoints are not loaded (unsafe); convert it to "
                                        ".safetensors first")
    from .files import read_safetensors

    return read_safetensors(path, error=ArchitectureMismatchError)


def _load_single_file(path: Path, architecture, dtype, prediction_type, tokenizer_dir) -> DiffusionBundle:
    from diffusers import DDPMScheduler

    state, _ = _read_checkpoint(path)
    found = _check_architecture(detect_checkpoint_architecture(state), architecture, path)
    if prediction_type is None:
        if "v_pred" in state:
            prediction_type = "v_prediction"
        elif found == "sd21":
            prediction_type = "v_prediction"
            log.warning("%s: SD2.x checkpoint without a v_pred key; assuming v-prediction (SD2.1-768). Pass "
                        "prediction_type='epsilon' for a -base (512 px) model.", path.name)
        else:
            prediction_type = "epsilon"
    unet = _unet_from_ldm(state, found, dtype)
    text_encoders, tokenizers = _text_encoders_from_ldm(state, found, dtype, tokenizer_dir, path)
    vae = _vae_from_ldm(state, found, dtype) if any(k.startswith(VAE_PREFIX) for k in state) else None
    if vae is None:
        raise ArchitectureMismatchError(f"{path}: the checkpoint has no VAE ({VAE_PREFIX}…); use a full checkpoint")
    scheduler = DDPMScheduler.from_config({**SD_SCHEDULER, "prediction_type": prediction_type})
    size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return DiffusionBundle(unet=unet, text_encoders=text_encoders, tokenizers=tokenizers, noise_scheduler=scheduler,
                           vae=vae, architecture=found, prediction_type=prediction_type, resolution=size,
                           name=path.stem)


def _strip(state, prefix) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _unet_from_ldm(state, architecture, dtype):
    from diffusers import UNet2DConditionModel

    from .unet_keys import infer_layout_from_ldm_keys, ldm_to_diffusers

    ldm = _strip(state, UNET_PREFIX)
    layout = infer_layout_from_ldm_keys(ldm.keys())
    channels = []
    for level in range(layout.levels):
        first = layout.input_block_start(level)
        channels.append(int(ldm[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
    attention_keys = [k for k in ldm if k.endswith("attn2.to_k.weight")]
    if not attention_keys:
        raise ArchitectureMismatchError("the UNet has no cross-attention layers: not a text-to-image SD model")
    cross = int(ldm[attention_keys[0]].shape[1])
    linear = any(k.endswith("proj_in.weight") and ldm[k].dim() == 2 for k in ldm)
    if architecture == "sd15":
        heads = 8
    else:
        heads = [max(1, c // 64) for c in channels]
    down_types = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in layout.down_depth]
    up_types = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in layout.up_depth]
    config = dict(
        sample_size=RESOLUTION[architecture] // 8, in_channels=int(ldm["input_blocks.0.0.weight"].shape[1]),
        out_channels=int(ldm["out.2.weight"].shape[0]), block_out_channels=tuple(channels),
        layers_per_block=list(layout.res_blocks) if len(set(layout.res_blocks)) > 1 else layout.res_blocks[0],
        down_block_types=tuple(down_types), up_block_types=tuple(up_types), cross_attention_dim=cross,
        attention_head_dim=heads, use_linear_projection=linear,
        transformer_layers_per_block=[max(d, 1) for d in layout.down_depth],
        mid_block_type="UNetMidBlock2DCrossAttn" if layout.mid_attention else None,
        norm_num_groups=_groups(channels),
    )
    if layout.mid_attention:
        # diffusers' mid block depth is the last level's transformer depth
        config["transformer_layers_per_block"][-1] = layout.mid_depth
    if "label_emb.0.0.weight" in ldm:
        adm_in = int(ldm["label_emb.0.0.weight"].shape[1])
        pooled = _sdxl_pooled_width(state)
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(adm_in - pooled) // 6,
                      projection_class_embeddings_input_dim=adm_in)
    unet = UNet2DConditionModel(**config)
    converted = {}
    for key, value in ldm.items():
        converted[ldm_to_diffusers(key, layout)] = value
    _load_exactly(unet, converted, "UNet")
    return unet.to(dtype)


def _groups(channels: List[int]) -> int:
    for groups in (32, 16, 8, 4, 2, 1):
        if all(c % groups == 0 for c in channels):
            return groups
    return 1


def _sdxl_pooled_width(state) -> int:
    projection = state.get("conditioner.embedders.1.model.text_projection")
    if projection is None:
        raise ArchitectureMismatchError("SDXL checkpoint without conditioner.embedders.1.model.text_projection")
    return int(projection.shape[1])


def _load_exactly(module, state, what: str) -> None:
    expected = module.state_dict()
    # transformers 5 CLIPTextModel drops the "text_model." level; checkpoints keep it.
    if not any(k.startswith("text_model.") for k in expected):
        state = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state) - {k for k in expected if k.endswith("position_ids")})
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArchitectureMismatchError(
            f"{what}: the checkpoint does not match the derived model ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:3]}); "
            "the file may be damaged or of an unsupported variant")
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ArchitectureMismatchError(f"{what}: {key} has shape {tuple(value.shape)}, the model expects "
                                            f"{tuple(expected[key].shape)}")
    module.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False)


def _vae_from_ldm(state, architecture, dtype):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = _strip(state, VAE_PREFIX)
    levels = sorted({int(m.group(1)) for k in vae if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    channels = [int(vae[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    per_level = len({m.group(1) for k in vae if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    latent = int(vae["quant_conv.weight"].shape[0]) // 2 if "quant_conv.weight" in vae \
        else int(vae["encoder.conv_out.weight"].shape[0]) // 2
    config = dict(in_channels=int(vae["encoder.conv_in.weight"].shape[1]),
                  out_channels=int(vae["decoder.conv_out.weight"].shape[0]),
                  down_block_types=("DownEncoderBlock2D",) * len(levels),
                  up_block_types=("UpDecoderBlock2D",) * len(levels), block_out_channels=tuple(channels),
                  layers_per_block=per_level, latent_channels=latent, norm_num_groups=_groups(channels),
                  sample_size=RESOLUTION[architecture], scaling_factor=VAE_SCALING[architecture])
    model = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(state, dict(config))
    _load_exactly(model, converted, "VAE")
    return model.to(dtype)


def _text_encoders_from_ldm(state, architecture, dtype, tokenizer_dir, source):
    from transformers import CLIPTextModel

    encoders, tokenizers = [], []
    for index, prefix in enumerate(TEXT_PREFIXES[architecture]):
        if prefix.endswith("transformer."):
            weights = _strip(state, prefix)
            hidden = int(weights["text_model.embeddings.token_embedding.weight"].shape[1])
            layers = len({m.group(1) for k in weights if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
            config = _clip_config(vocab=weights["text_model.embeddings.token_embedding.weight"].shape[0],
                                  positions=weights["text_model.embeddings.position_embedding.weight"].shape[0],
                                  hidden=hidden, layers=layers,
                                  intermediate=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                                  act="quick_gelu")
            model = CLIPTextModel(config)
        else:
            weights, model = _open_clip(state, prefix, drop_last=(architecture == "sd21"),
                                        with_projection=(architecture == "sdxl"))
        _load_exactly(model, weights, f"text encoder {index + 1}")
        encoders.append(model.to(dtype))
        tokenizers.append(_tokenizer(tokenizer_dir, pad="!" if not prefix.endswith("transformer.") else None,
                                     max_length=int(model.config.max_position_embeddings), source=source))
    return encoders, tokenizers


def _clip_config(vocab, positions, hidden, layers, intermediate, act, projection=None):
    from transformers import CLIPTextConfig

    heads = max(1, hidden // 64) if hidden % 64 == 0 else next(h for h in (8, 4, 2, 1) if hidden % h == 0)
    return CLIPTextConfig(vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(intermediate),
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=int(positions),
                          hidden_act=act, projection_dim=int(projection or hidden), bos_token_id=int(vocab) - 2,
                          eos_token_id=int(vocab) - 1, pad_token_id=1)


def _open_clip(state, prefix, drop_last: bool, with_projection: bool):
    """An OpenCLIP text tower (SD2.x / SDXL's second encoder) converted to transformers' CLIP."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    layers = len({m.group(1) for k in state
                  if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))})
    if drop_last:
        # SD2.x conditions on the penultimate layer: diffusers' text encoder simply has one layer less.
        last = f"{prefix}transformer.resblocks.{layers - 1}."
        state = {k: v for k, v in state.items() if not k.startswith(last)}
        layers -= 1
    token = state[prefix + "token_embedding.weight"]
    hidden = int(token.shape[1])
    projection = state.get(prefix + "text_projection")
    config = _clip_config(vocab=token.shape[0], positions=state[prefix + "positional_embedding"].shape[0],
                          hidden=hidden, layers=layers,
                          intermediate=state[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0], act="gelu",
                          projection=projection.shape[1] if projection is not None else None)
    model = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    converted = convert_open_clip_checkpoint(model, {k: v for k, v in state.items() if k.startswith(prefix)}, prefix)
    if not with_projection:
        converted.pop("text_projection.weight", None)
    converted.pop("text_model.embeddings.position_ids", None)
    return converted, model


def find_tokenizer_dir(tokenizer_dir=None) -> Optional[Path]:
    """A local folder with CLIP's ``vocab.json`` + ``merges.txt`` (never downloaded)."""
    candidates = []
    if tokenizer_dir:
        candidates.append(Path(tokenizer_dir))
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]) / "comfy" / "sd1_tokenizer")
    # Installed as ComfyUI/custom_nodes/<pack>: ComfyUI ships the CLIP tokenizer files.
    candidates.append(Path(__file__).resolve().parents[3] / "comfy" / "sd1_tokenizer")
    for candidate in candidates:
        if (candidate / "vocab.json").is_file() and (candidate / "merges.txt").is_file():
            return candidate
        if (candidate / "tokenizer" / "vocab.json").is_file():
            return candidate / "tokenizer"
    return None


def _tokenizer(tokenizer_dir, pad: Optional[str], max_length: int, source: Path):
    from transformers import CLIPTokenizer

    folder = find_tokenizer_dir(tokenizer_dir)
    if folder is None:
        raise MissingWeightsError(
            f"{source}: a single-file checkpoint has no tokenizer; give the folder with CLIP's vocab.json and "
            "merges.txt (--tokenizer-dir; ComfyUI ships them in ComfyUI/comfy/sd1_tokenizer, or set COMFYUI_PATH)")
    kwargs = {"model_max_length": max_length}
    if pad is not None:
        kwargs["pad_token"] = pad
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **kwargs)
