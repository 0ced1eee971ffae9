"""Inference-time mitigation of memorization (METHOD.md section 3): Wen et al.'s embedding optimisation, the
baselines of Somepalli et al. 2023, the attention, SAIL and NeMo peer methods, and generation guarded by first-step
detection. `MITIGATIONS` maps `--method` names to the classes (`diffmem.mitigate.base.Mitigation`).

Importing the package imports every module in it, so a mitigation class joins `MITIGATIONS` by being defined in a
new module here: nothing else lists it (docs/extending/mitigation.md). A model's target loss (`target_loss` of
`diffmem.models.defaults.ModelDefaults`) is the embedding method's default.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from diffmem.mitigate.base import MITIGATIONS, GenerationConfig, Mitigation, Outcome

for _module in pkgutil.iter_modules(__path__):
    import_module(f"{__name__}.{_module.name}")

from diffmem.mitigate.attention_rescale import AttentionRescale  # noqa: E402
from diffmem.mitigate.baselines import cwr, gni, rna, rta  # noqa: E402
from diffmem.mitigate.embedding import EmbeddingResult, FirstStep, mitigate_embedding  # noqa: E402
from diffmem.mitigate.guard import Decision, GuardResult, generate, guarded_generate, iter_generate  # noqa: E402
from diffmem.mitigate.nemo import NeuronStatistics, localize  # noqa: E402

ALL_METHODS = tuple(MITIGATIONS)
"""Every method `generate` and `diffmem mitigate --method` accept, in listing order (a view of `MITIGATIONS`)."""
METHODS = tuple(name for name, cls in MITIGATIONS.items() if cls.in_paper_table)
"""The methods of Wen et al.'s mitigation table: the embedding optimisation, the four baselines, plain sampling."""
PEER_METHODS = tuple(name for name in ALL_METHODS if name not in METHODS)
"""The peer mitigations: Ren et al.'s attention re-scaling, SAIL, NeMo."""

__all__ = ["ALL_METHODS", "METHODS", "MITIGATIONS", "PEER_METHODS", "AttentionRescale", "Decision", "EmbeddingResult",
           "FirstStep", "GenerationConfig", "GuardResult", "Mitigation", "NeuronStatistics", "Outcome", "cwr",
           "generate", "gni", "guarded_generate", "iter_generate", "localize", "mitigate_embedding", "rna", "rta"]
