"""Error types: every failure a user can cause is one of these, with a message that says what to do."""


class SafetyDPOError(Exception):
    """Base class for every error this pack raises on purpose."""


class LoraFormatError(SafetyDPOError):
    """A LoRA file or state dict cannot be read: corrupt, pickle, unknown keys, bad shapes, NaN."""


class ArchitectureMismatchError(SafetyDPOError):
    """An expert, statistics file or checkpoint belongs to another architecture or module set."""


class MergeError(SafetyDPOError):
    """Experts cannot be merged as asked (weights, methods, statistics)."""


class DatasetError(SafetyDPOError):
    """Prompt lists or preference pairs are empty, unpaired, missing images or inconsistent."""


class TrainingError(SafetyDPOError):
    """Training cannot go on: NaN losses, out of memory, unusable configuration."""


class TrainingCancelled(SafetyDPOError):
    """The user cancelled training; the last checkpoint was kept."""


class MissingWeightsError(SafetyDPOError):
    """A feature needs weights the user must supply locally (CLIP, Q16, Inception, checkpoints)."""
