"""Per-layer linear CKA between a student's and its teacher's hidden states on texts, as an
``evaluate`` metric (tokens are the rows; each batch is one minibatch of MinibatchCKA)."""

import evaluate
from transformers import AutoTokenizer

from hf_sdft.cka.callback import tokenize_probe
from hf_sdft.cka.measure import measure_cka, per_layer
from hf_sdft.compress.checkpoint import load_model
from hf_sdft.metrics import text_metric_info


class CKA(evaluate.Metric):
    def _info(self):
        return text_metric_info(__doc__, "Kornblith et al. 2019 (CKA); Nguyen et al. 2021 (minibatch CKA)",
                                "predictions: list of texts; student_model_id, teacher_model_id: folders or Hub ids")

    def _compute(self, predictions, student_model_id, teacher_model_id, layers="all", debiased=False,
                 max_tokens=4096, batch_size=8):
        tokenizer = AutoTokenizer.from_pretrained(teacher_model_id)
        batches = tokenize_probe(list(predictions), tokenizer, max_tokens, batch_size)
        layers, values = measure_cka(load_model(student_model_id), load_model(teacher_model_id), batches, layers,
                                     debiased=debiased)
        return {"cka_mean": float(values.mean()), "cka_per_layer": per_layer(layers, values)}
