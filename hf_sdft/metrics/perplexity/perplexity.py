"""Perplexity of a local (or Hub) causal LM on texts, as an ``evaluate`` metric.

Texts are concatenated (EOS between them) and cut into ``block_size``-token blocks; the
result is exp(mean next-token NLL) over all scored tokens. Quanto folders saved by hf-sdft
are detected and loaded with ``load_quantized``.
"""

import evaluate
from transformers import AutoTokenizer

from hf_sdft.compress.checkpoint import load_model
from hf_sdft.data import as_batches, pack_blocks
from hf_sdft.jobs.evaluation import perplexity
from hf_sdft.metrics import text_metric_info


class Perplexity(evaluate.Metric):
    def _info(self):
        return text_metric_info(__doc__, "", "predictions: list of texts; model_id: folder or Hub id; block_size; batch_size")

    def _compute(self, predictions, model_id, block_size=128, batch_size=16, tokenizer_id=None):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_id or model_id)
        blocks = pack_blocks(tokenizer, list(predictions), block_size)
        return {"perplexity": perplexity(load_model(model_id), as_batches(blocks, batch_size))}
