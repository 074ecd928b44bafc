"""Prompt gate: apply each safety expert only to prompts that carry its concept.

Merged experts act on every prompt, so whatever one expert changes reaches the prompts of the others and
the safe ones (measured on the demo world: the merge, not the experts, made the collateral; docs/demo.md).
The gate sets each expert's weight per prompt instead: the expert's weight where the text encoder's states of
the prompt show its concept, 0 where they do not. A safe prompt then meets the base model, and a prompt
with one concept meets that concept's expert alone (SPM and CASG report the same effect of applying adapters
only where their concept is present).

It reads the text encoder, not the words: each expert's reference prompt pairs (an unsafe prompt and its safe
rewrite, stored in the expert's metadata by training) give labelled tokens — the tokens the rewrite changed,
labelled with the expert's concept, and every other token of the pairs and of extra safe prompts, labelled
safe. Each token is described by the encoder's output state (the conditioning the model samples with, which
carries the context) beside the encoder's input embedding of the token (what the encoder learned the token
means, whatever precedes it), and a linear classifier of those features decides per token; the expert is on
when any token is its concept's. Paraphrases and other templates reach the same features only as
far as the encoder maps them there, which is what the demo measures (held-out templates); a synonym the encoder
does not place near its concept word is missed, as by any text-side gate.
"""

from __future__ import annotations

import dataclasses
import json
import random
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import MergeError

GATE_PROMPTS_KEY = "safetydpo_gate_prompts"
"""Expert metadata: JSON list of ``[unsafe prompt, safe rewrite]`` the expert was trained on (a sample)."""
MAX_GATE_PROMPTS = 64

TokenStates = Tuple[torch.Tensor, torch.Tensor]
"""One prompt as the text encoder sees it: features ``[tokens, width]`` and token ids ``[tokens]`` (no padding)."""
PromptEncoder = Callable[[Sequence[str]], List[TokenStates]]


def gate_prompt_sample(pairs, limit: int = MAX_GATE_PROMPTS, seed: int = 0) -> List[List[str]]:
    """Up to ``limit`` distinct ``[prompt, safe_prompt]`` of ``pairs`` (a ``PreferencePairs`` or a list of objects
    with those two fields), a seeded sample when there are more."""
    pairs = getattr(pairs, "pairs", pairs)
    distinct = list(dict.fromkeys((str(p.prompt), str(p.safe_prompt)) for p in pairs if p.prompt != p.safe_prompt))
    if len(distinct) > limit:
        distinct = random.Random(seed).sample(distinct, limit)
    return [list(pair) for pair in distinct]


def gate_metadata(pairs) -> Dict[str, str]:
    """The expert metadata entry that lets a gate find the expert's concept later (empty without pairs)."""
    sample = gate_prompt_sample(pairs)
    return {GATE_PROMPTS_KEY: json.dumps(sample, ensure_ascii=False)} if sample else {}


def _no_references(expert_name: str) -> str:
    return (f"expert {expert_name!r} carries no reference prompts for the prompt gate (experts this pack trains "
            "store them; older ones and LoRAs from other tools do not): give the concept's prompt pairs instead, as "
            "a concept file (CSV/YAML/text: unsafe prompt | safe prompt | category) whose categories match the "
            "expert's")


def gate_prompts_from_metadata(metadata: Mapping[str, str], expert_name: str = "expert") -> List[Tuple[str, str]]:
    """The ``(unsafe, safe)`` reference pairs stored in an expert's metadata, or a MergeError saying what to give."""
    raw = metadata.get(GATE_PROMPTS_KEY)
    if not raw:
        raise MergeError(_no_references(expert_name))
    try:
        pairs = [(str(unsafe), str(safe)) for unsafe, safe in json.loads(raw)]
    except (ValueError, TypeError) as error:
        raise MergeError(f"expert {expert_name!r}: its {GATE_PROMPTS_KEY} metadata is not a list of prompt pairs "
                         f"({error})") from error
    if not pairs:
        raise MergeError(f"expert {expert_name!r}: its {GATE_PROMPTS_KEY} metadata holds no prompt pairs")
    return pairs


def _changed_positions(ids: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Positions of ``ids`` whose token the other prompt does not have as often (a multiset difference)."""
    remaining: Dict[int, int] = {}
    for token in other.tolist():
        remaining[token] = remaining.get(token, 0) + 1
    keep = []
    for token in ids.tolist():
        if remaining.get(token, 0) > 0:
            remaining[token] -= 1
            keep.append(False)
        else:
            keep.append(True)
    return torch.tensor(keep, dtype=torch.bool)


@dataclasses.dataclass
class ConceptGate:
    """A linear classifier of token features: each concept, or "not a concept marker"."""

    concepts: List[str]
    mean: torch.Tensor  # [width]: states are standardised with the references' mean and spread
    scale: torch.Tensor  # [width]
    weight: torch.Tensor  # [concepts + 1, width]; the last row is "no concept"
    bias: torch.Tensor  # [concepts + 1]
    reference_accuracy: Dict[str, float] = dataclasses.field(default_factory=dict)
    threshold: float = 0.5

    def token_probabilities(self, states: torch.Tensor) -> torch.Tensor:
        """``[tokens, concepts]``: how likely each token marks each concept."""
        logits = ((states.float() - self.mean) / self.scale) @ self.weight.T + self.bias
        return torch.softmax(logits, dim=-1)[:, :-1]

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """Per concept, the largest probability over the prompt's tokens (above ``threshold``: present)."""
        if not len(states):
            return torch.zeros(len(self.concepts))
        return self.token_probabilities(states).max(dim=0).values

    def present(self, states: torch.Tensor) -> List[str]:
        """The concepts the prompt carries."""
        return [c for c, score in zip(self.concepts, self.scores(states).tolist()) if score > self.threshold]

    def gated_weights(self, states: torch.Tensor, weights: Mapping[str, float]) -> Dict[str, float]:
        """``weights`` (per concept) where the prompt carries the concept, 0 elsewhere."""
        present = set(self.present(states))
        return {concept: (float(weight) if concept in present else 0.0) for concept, weight in weights.items()}

    def describe(self, states: torch.Tensor) -> str:
        """One line per concept: on/off and its score (for the node's text output and logs)."""
        return "\n".join(f"{'ON ' if score > self.threshold else 'off'}  {concept}  (score {score:.2f})"
                         for concept, score in zip(self.concepts, self.scores(states).tolist()))


def build_concept_gate(encode: PromptEncoder, references: Mapping[str, Sequence[Tuple[str, str]]],
                       safe_prompts: Sequence[str] = (), weight_decay: float = 1e-3, seed: int = 0) -> ConceptGate:
    """A gate for ``references`` (concept → its ``(unsafe, safe rewrite)`` prompt pairs), encoded with ``encode``
    (the text encoder the model is sampled with). ``safe_prompts``: more prompts that must stay off.

    Training data: the tokens each rewrite removed, labelled with their concept; every other token of the
    unsafe prompts, of the rewrites and of ``safe_prompts``, labelled "no concept" (leaving the unsafe prompts'
    other tokens out made several concepts fire at once on the demo world). A class-balanced
    multinomial logistic regression (L-BFGS, deterministic) on standardised states: a linear read-out
    generalised to unseen templates where nearest-prototype rules did not (docs/demo.md)."""
    if not references:
        raise MergeError("the prompt gate needs at least one concept with reference prompt pairs")
    concepts = list(references)
    none = len(concepts)
    states, labels = [], []
    for index, concept in enumerate(concepts):
        pairs = [(u, s) for u, s in references[concept] if u != s]
        if not pairs:
            raise MergeError(f"concept {concept!r} has no reference prompt pair whose safe rewrite differs from the "
                             "unsafe prompt: the gate cannot learn what marks the concept")
        encoded = encode([u for u, _ in pairs] + [s for _, s in pairs])
        marked = 0
        for (unsafe_states, unsafe_ids), (safe_states, safe_ids) in zip(encoded[:len(pairs)], encoded[len(pairs):]):
            changed = _changed_positions(unsafe_ids, safe_ids)
            marked += int(changed.sum())
            states += [unsafe_states.float(), safe_states.float()]
            labels += [torch.where(changed, index, none), torch.full((len(safe_states),), none)]
        if not marked:
            raise MergeError(f"concept {concept!r}: no reference pair changes a token between the unsafe prompt and "
                             "its safe rewrite (the text encoder sees them alike)")
    for extra_states, _ in encode(list(safe_prompts)) if safe_prompts else []:
        states.append(extra_states.float())
        labels.append(torch.full((len(extra_states),), none))
    inputs, targets = torch.cat(states), torch.cat(labels)
    mean, scale = inputs.mean(dim=0), inputs.std(dim=0) + 1e-6
    inputs = (inputs - mean) / scale
    counts = torch.bincount(targets, minlength=none + 1).float().clamp(min=1)
    class_weight = counts.sum() / (counts * (none + 1))
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(none + 1, inputs.shape[1], generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(none + 1, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(inputs @ weight.T + bias, targets, weight=class_weight)
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    gate = ConceptGate(concepts, mean, scale, weight.detach(), bias.detach())
    predicted = (inputs @ gate.weight.T + gate.bias).argmax(dim=1)
    gate.reference_accuracy = {"tokens": float((predicted == targets).float().mean()),
                               "marker_tokens": float((predicted == targets)[targets != none].float().mean())}
    return gate


def token_features(states: torch.Tensor, ids: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
    """``[tokens, width + embedding width]``: each token's output state beside the encoder's input embedding of it.

    The output state alone misread concept words after lead-ins the references never used (the demo world's
    seed 1 read "an image showing a olive …" as brown); with the embedding beside it every held-out template
    was read right on three seeds (docs/demo.md)."""
    rows = token_embedding[ids.to(token_embedding.device)].detach().float().cpu()
    return torch.cat([states.float().cpu(), rows], dim=-1)


def bundle_prompt_encoder(bundle) -> PromptEncoder:
    """A ``PromptEncoder`` over a ``DiffusionBundle``: its cross-attention states beside the first text encoder's
    token embeddings, with the first tokenizer's ids, padding left out."""
    tokenizer = bundle.tokenizers[0]
    embedding = bundle.text_encoders[0].get_input_embeddings().weight

    def encode(prompts: Sequence[str]) -> List[TokenStates]:
        if not prompts:
            return []
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                           truncation=True, return_tensors="pt")
        states = bundle.encode_prompts(list(prompts)).encoder_hidden_states.float().cpu()
        keep = tokens.attention_mask.bool()
        return [(token_features(states[row][keep[row]], tokens.input_ids[row][keep[row]], embedding),
                 tokens.input_ids[row][keep[row]]) for row in range(len(prompts))]

    return encode


def gate_accuracy(gate: ConceptGate, encode: PromptEncoder, prompts: Sequence[str],
                  truth: Sequence[Optional[str]]) -> Dict[str, float]:
    """How often the gate finds the prompt's concept (``truth``: the concept, or None for a safe prompt) and how
    often it turns an expert on for a safe prompt."""
    hits, unsafe, false_on, safe = 0, 0, 0, 0
    for (states, _), concept in zip(encode(list(prompts)), truth):
        present = gate.present(states)
        if concept is None:
            safe += 1
            false_on += bool(present)
        else:
            unsafe += 1
            hits += present == [concept]
    return {"found": hits / unsafe if unsafe else float("nan"), "safe_on": false_on / safe if safe else float("nan"),
            "unsafe_prompts": unsafe, "safe_prompts": safe}


def references_for_experts(experts: Sequence[object], pairs: Sequence[object] = ()) -> Dict[str, List[Tuple[str, str]]]:
    """Each expert's reference prompt pairs (keyed by expert name): those stored in its metadata, else the
    ``pairs`` (prompt pairs with ``categories``) that share one of its categories; a MergeError names an expert
    that has neither."""
    references: Dict[str, List[Tuple[str, str]]] = {}
    for expert in experts:
        if expert.metadata.get(GATE_PROMPTS_KEY):
            references[expert.name] = gate_prompts_from_metadata(expert.metadata, expert.name)
            continue
        wanted = {c.strip().casefold() for c in expert.categories}
        chosen = [(p.prompt, p.safe_prompt) for p in pairs
                  if wanted & {c.strip().casefold() for c in p.categories} and p.prompt != p.safe_prompt]
        if not chosen:
            raise MergeError(_no_references(expert.name))
        references[expert.name] = list(dict.fromkeys(chosen))
    return references
