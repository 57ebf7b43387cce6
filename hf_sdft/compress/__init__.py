"""Degradations behind one small registry: ``quanto`` (quantization-aware training on
optimum-quanto's grid, in :mod:`.quantize` and :mod:`.fake_quant`) and ``prune`` (unstructured /
N:M pruning with kept masks, in :mod:`.prune`)."""

from hf_sdft.compress import fp4_student, prune, quantize  # noqa: F401  (import registers the degradations)
from hf_sdft.compress.base import DEGRADATIONS, Degradation, get_degradation, register_degradation

__all__ = ["DEGRADATIONS", "Degradation", "get_degradation", "register_degradation"]
