"""LoRA key formats, one small reader each, behind two dispatchers (as ComfyUI's ``comfy/lora.py`` asks each
weight adapter in turn whether a key is its own).

A key such as ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight`` has two
parts, read separately:
- its role (``KEY_READERS``): which tensor of which module it holds — LoRA ``down``/``up`` matrix, ``alpha`` or
  full ``diff`` — in the spelling of one format: kohya/ComfyUI (``.lora_down.weight``), PEFT (``.lora_A.weight``,
  ``.lora_A.<adapter>.weight``), diffusers attention processors (``.processor.to_q_lora.down.weight``), old
  diffusers (``.lora.down.weight``), ``.diff``; DoRA/LoCon/LoHa/LoKr keys are refused;
- its module name (``ModuleNamer``): from the prefix style — kohya ``lora_unet_``/``lora_te*_``, ComfyUI native
  ``diffusion_model.``, PEFT/diffusers prefixes (``unet.``, ``base_model.model.``, ``text_encoder.`` …), LDM
  paths or diffusers UNet paths — to the canonical ``unet.<diffusers path>`` / ``text_encoder*.<path>``.

``lora_files.expert_from_state_dict`` puts the pieces together (pairs, alphas, checks).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Tuple

from . import unet_keys
from .errors import LoraFormatError

# -- roles: which tensor a key holds -------------------------------------------------------------

DOWN, UP, ALPHA, DIFF = "down", "up", "alpha", "diff"


@dataclasses.dataclass(frozen=True)
class KeyRole:
    """What one file key holds: ``role`` of module ``module`` (the module as spelled in the file)."""

    module: str
    role: str
    peft: bool = False  # alpha comes from the PEFT config (adapter_config.json / diffusers metadata)
    adapter: Optional[str] = None  # PEFT adapter name (``lora_A.<adapter>.weight``)


def _suffix_reader(suffix: str, role: str) -> Callable[[str], Optional[KeyRole]]:
    def read(key: str) -> Optional[KeyRole]:
        return KeyRole(key[: -len(suffix)], role) if key.endswith(suffix) else None

    read.__name__ = f"read_{role}_{suffix.strip('.').replace('.', '_')}"
    return read


read_kohya_down = _suffix_reader(".lora_down.weight", DOWN)
read_kohya_up = _suffix_reader(".lora_up.weight", UP)
read_alpha = _suffix_reader(".alpha", ALPHA)
read_diff = _suffix_reader(".diff", DIFF)

_PROCESSOR_SUFFIX = re.compile(
    r"^(?P<module>.+?)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<which>up|down)\.weight$"
)
_PEFT_SUFFIX = re.compile(r"^(?P<module>.+?)\.lora_(?P<which>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_OLD_DIFFUSERS_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?:lora|lora_linear_layer)\.(?P<which>up|down)\.weight$")
_UNSUPPORTED_SUFFIXES = (".dora_scale", ".diff_b", ".lora_mid.weight", ".hada_w1_a", ".lokr_w1")


def read_attention_processor(key: str) -> Optional[KeyRole]:
    """Old diffusers attention processors: ``<block>.processor.to_q_lora.down.weight``."""
    match = _PROCESSOR_SUFFIX.match(key)
    if not match:
        return None
    proj = "to_out.0" if match.group("proj") == "to_out" else match.group("proj")
    return KeyRole(f"{match.group('module')}.{proj}", DOWN if match.group("which") == "down" else UP, peft=True)


def read_peft(key: str) -> Optional[KeyRole]:
    """PEFT: ``<module>.lora_A.weight`` / ``.lora_B.weight`` (or ``.lora_A.<adapter>.weight``)."""
    match = _PEFT_SUFFIX.match(key)
    if not match:
        return None
    return KeyRole(match.group("module"), DOWN if match.group("which") == "A" else UP, peft=True,
                   adapter=match.group("adapter") or None)


def read_old_diffusers(key: str) -> Optional[KeyRole]:
    """Old diffusers LoRA layers: ``<module>.lora.down.weight`` / ``.lora_linear_layer.up.weight``."""
    match = _OLD_DIFFUSERS_SUFFIX.match(key)
    if not match:
        return None
    return KeyRole(match.group("module"), DOWN if match.group("which") == "down" else UP, peft=True)


def refuse_unsupported(key: str) -> Optional[KeyRole]:
    """DoRA, LoCon, LoHa, LoKr and bias patches: refused with a message (safety experts are plain LoRAs)."""
    if key.endswith(_UNSUPPORTED_SUFFIXES):
        raise LoraFormatError(
            f"{key!r} is a DoRA/LoCon/LoHa/LoKr/bias variant, which safety experts do not support")
    return None


# Asked in order; the first that recognises a key decides (kohya before PEFT: ``.lora_down`` is not ``lora_A``).
KEY_READERS: Tuple[Callable[[str], Optional[KeyRole]], ...] = (
    read_kohya_down, read_kohya_up, read_alpha, read_diff,
    read_attention_processor, read_peft, read_old_diffusers, refuse_unsupported,
)


def key_role(key: str) -> Optional[KeyRole]:
    """The role of ``key`` by the first reader in ``KEY_READERS`` that knows it; None for an unknown key."""
    for reader in KEY_READERS:
        role = reader(key)
        if role is not None:
            return role
    return None


# -- module names: from a file's spelling to the canonical name -----------------------------------

_PEFT_PREFIXES = ("base_model.model.unet.", "base_model.model.", "unet.base_model.model.", "unet.unet.", "unet.",
                  "model.")
_DIFFUSERS_UNET_HEAD = re.compile(r"(down_blocks|up_blocks|mid_block|conv_in|conv_out|conv_norm_out|time_embedding|"
                                  r"add_embedding|class_embedding)(\.|$)")


class ModuleNamer:
    """Canonical module names for one file: ``unet.<diffusers path>`` or ``text_encoder[_2].<path>``.

    ``layout`` (the UNet's block layout) is needed only for LDM-named UNet modules (ComfyUI native keys,
    kohya keys of LDM paths, bare LDM paths); ``architecture`` and ``source`` go into the error messages.
    """

    def __init__(self, layout: Optional[unet_keys.UNetLayout], architecture: str, source: str):
        self.layout, self.architecture, self.source = layout, architecture, source

    def __call__(self, module_key: str) -> str:
        if module_key.startswith("lora_"):
            return self.kohya(module_key)
        if module_key.startswith("diffusion_model."):
            return self.native(module_key)
        return self.diffusers(module_key)

    def needs_layout(self, kind: str) -> LoraFormatError:
        return LoraFormatError(
            f"{self.source}: {kind} keys need the UNet layout, and the architecture is {self.architecture!r}; "
            "pass architecture='sd15'/'sd21'/'sdxl' or layout= (unet_keys.infer_layout_from_ldm_keys)")

    def kohya(self, module_key: str) -> str:
        """kohya: ``lora_unet_<path with _>``, ``lora_te_`` / ``lora_te1_`` / ``lora_te2_``."""
        if module_key.startswith("lora_unet_") and self.layout is None and unet_keys.is_ldm_path(
                unet_keys.dotted_from_flat(module_key[len("lora_unet_"):])):
            raise self.needs_layout("kohya LDM-style")
        return unet_keys.kohya_to_canonical(module_key, self.layout)

    def native(self, module_key: str) -> str:
        """ComfyUI native: ``diffusion_model.<LDM path>``."""
        if self.layout is None:
            raise self.needs_layout("ComfyUI native (diffusion_model.)")
        return unet_keys.native_to_canonical(module_key, self.layout)

    def diffusers(self, module_key: str) -> str:
        """PEFT / diffusers paths with their prefixes; text-encoder paths; LDM or diffusers UNet paths."""
        for prefix in _PEFT_PREFIXES:
            if module_key.startswith(prefix):
                module_key = module_key[len(prefix):]
                break
        for part in ("text_encoder_2.", "text_encoder."):
            if module_key.startswith(part):
                rest = module_key[len(part):]
                rest = rest[len("base_model.model."):] if rest.startswith("base_model.model.") else rest
                return part + unet_keys.normalize_text_encoder_path(rest)
        if module_key.split(".", 1)[0] in ("text_model",) + unet_keys._TEXT_MODEL_HEADS:
            return "text_encoder." + unet_keys.normalize_text_encoder_path(module_key)
        if unet_keys.is_ldm_path(module_key):
            if self.layout is None:
                raise self.needs_layout("LDM-named")
            return "unet." + unet_keys.ldm_to_diffusers(module_key, self.layout)
        if not _DIFFUSERS_UNET_HEAD.match(module_key):
            raise LoraFormatError(f"{self.source}: {module_key!r} is not a UNet or text-encoder module")
        return "unet." + module_key
