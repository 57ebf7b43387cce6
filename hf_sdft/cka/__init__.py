"""Centered Kernel Alignment: the metric (:mod:`.metric`), measuring it per layer on probe batches
(:mod:`.measure`) and the training callback that logs it (:mod:`.callback`)."""

from hf_sdft.cka.callback import CKACallback
from hf_sdft.cka.measure import cka_history, measure_cka
from hf_sdft.cka.metric import MinibatchCKA, linear_cka, rbf_cka

__all__ = ["CKACallback", "MinibatchCKA", "cka_history", "linear_cka", "measure_cka", "rbf_cka"]
