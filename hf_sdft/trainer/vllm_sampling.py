"""On-policy samples drawn by vLLM (``use_vllm``: a CUDA machine and ``pip install "trl[vllm]"``),
through TRL's :class:`~trl.generation.vllm_generation.VLLMGeneration` in its colocate or server mode.

TRL would hand vLLM the student's parameters as they are: for a quanto student those are the float
shadow weights, so vLLM would sample from the *undegraded* model. What this module adds is the
weights the student computes with (:func:`computed_weights`: quantized layers' grid values, LoRA deltas
added, pruned zeros as they stand), synced before the first sample of every optimizer step, and a
plain checkpoint for colocated vLLM to start from when the student's own is a quanto one.

vLLM may run a float32 checkpoint in bfloat16 (TRL passes it no dtype), so its samples may come
from the student's weights rounded to bfloat16. Tested here without vLLM (no GPU): the weights sent, loaded
into a plain model, reproduce the student's logits; the run through vLLM itself is
tests/trainer/test_vllm.py's GPU test. On 2026-12-03 no vLLM release installs beside transformers 5.23
(``trl[vllm]`` takes vLLM ≤ 0.31.0, which needs transformers < 5.18).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from hf_sdft.compress.quantize import QMAP_FILE, computed_weight
from hf_sdft.modeling import is_peft, unwrap
from hf_sdft.trainer.on_policy import stop_ids

ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "original_module"}
BOOT_FOLDER = "vllm_boot"


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / PEFT wrappers (PEFT's layers still inside)."""
    model = unwrap(model)
    return model.get_base_model() if is_peft(model) else model


@torch.no_grad()
def computed_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter of the plain transformers model that computes what
    ``model`` computes now, under the plain model's names (tied parameters once): quanto weights
    dequantized, active LoRA deltas added, the active ``modules_to_save`` copies in place of the
    originals. Raises for what no plain model reproduces (see :func:`check_plain`)."""
    base = plain_model(model)
    check_plain(base)
    modules = dict(base.named_modules())
    for name, param in base.named_parameters():
        owner, _, leaf = name.rpartition(".")
        parts = name.split(".")
        if ADAPTER_PARTS & set(parts):
            continue
        if "modules_to_save" in parts:  # PEFT's trained copy of a whole module: keep the active adapter's
            at = parts.index("modules_to_save")
            if parts[at + 1] not in modules[".".join(parts[:at])].active_adapters:
                continue
        module = modules[owner]
        value = computed_weight(module) if leaf == "weight" else None
        value = param if value is None else value
        if owner.endswith(".base_layer") and leaf == "weight":
            value = value + _lora_delta(modules[owner.removesuffix(".base_layer")])
        yield re.sub(r"\.modules_to_save\.[^.]+", "", name.replace(".base_layer", "")), value.detach()


def check_plain(base: nn.Module) -> None:
    """Refuse the PEFT set-ups that a plain model cannot compute: DoRA, LoRA biases, trainable
    token deltas, and an adapted embedding or head where the two are tied (vLLM reads the head
    from the embedding; the student does not)."""
    fix = "train plain LoRA adapters, or sample with model.generate (use_vllm false)"
    for name, module in base.named_modules():
        if name.endswith("token_adapter") or "trainable_tokens_delta" in dict(module.named_parameters(recurse=False)):
            raise ValueError(f"use_vllm: {name} holds trainable token deltas, which vLLM cannot load: {fix}")
        for adapter in lora_adapters(module):
            if getattr(module, "use_dora", {}).get(adapter) or getattr(module, "lora_bias", {}).get(adapter):
                raise ValueError(f"use_vllm: {name} has a DoRA or lora_bias adapter, which has no additive weight "
                                 f"to send to vLLM: {fix}")
    if getattr(base.config.get_text_config(), "tie_word_embeddings", False):
        ends = [base.get_input_embeddings(), base.get_output_embeddings()]
        if any(hasattr(m, "base_layer") or hasattr(m, "modules_to_save") for m in ends):
            raise ValueError("use_vllm: the embedding or the head carries adapters while the two are tied: the "
                             "student's head stays the base embedding, vLLM's would not. Leave embed_tokens and "
                             "lm_head out of target_modules / modules_to_save, or set use_vllm false")


def lora_adapters(module: nn.Module) -> dict:
    """A LoRA layer's adapters (its ``scaling`` per adapter name); ``{}`` for other modules (an
    attention module's ``scaling`` is a float)."""
    scaling = getattr(module, "scaling", None)
    return scaling if isinstance(scaling, dict) else {}


def _lora_delta(layer: nn.Module) -> torch.Tensor | float:
    """The summed weight deltas of ``layer``'s active LoRA adapters (linear or embedding)."""
    if getattr(layer, "merged", False):
        return 0.0
    delta = 0.0
    for adapter in getattr(layer, "active_adapters", ()):
        if adapter in lora_adapters(layer):
            delta = delta + layer.get_delta_weight(adapter)
    return delta


def own_checkpoint(model: nn.Module) -> str | None:
    """The student's own checkpoint (folder or Hub id) when vLLM can load it: a plain one, not quanto's."""
    path = plain_model(model).name_or_path
    if not path or (Path(path).is_dir() and (not (Path(path) / "config.json").exists()
                                             or (Path(path) / QMAP_FILE).exists())):
        return None
    return path


def write_plain_checkpoint(model: nn.Module, tokenizer, folder: str | Path) -> None:
    """Save :func:`computed_weights` as a plain transformers checkpoint (with the tokenizer) in ``folder``."""
    from transformers import AutoModelForCausalLM

    base = plain_model(model)
    plain = AutoModelForCausalLM.from_config(base.config)
    result = plain.load_state_dict({name: t.cpu() for name, t in computed_weights(model)}, strict=False)
    not_parameters = set(plain.state_dict()) - {name for name, _ in plain.named_parameters()}  # tied, buffers
    if result.unexpected_keys or set(result.missing_keys) - not_parameters:
        raise ValueError(f"the student's weights do not fit {type(plain).__name__} built from its config: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    if getattr(base, "generation_config", None) is not None:  # the same stop tokens as the student's
        plain.generation_config = base.generation_config
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_vllm_available() -> None:
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ImportError('use_vllm needs vLLM (pip install "trl[vllm]" on a CUDA machine, with a vLLM release that '
                          "accepts this transformers version): install it, or set use_vllm false to sample with "
                          "model.generate")
    if not torch.cuda.is_available():
        raise RuntimeError("use_vllm samples on CUDA GPUs and none is visible here: set use_vllm false")


def vllm_generation(model: nn.Module, accelerator, tokenizer, args):
    """TRL's ``VLLMGeneration`` for the student, set up from ``args`` (the ``vllm_*`` fields), that
    sends vLLM :func:`computed_weights`. Colocated vLLM starts from the student's own checkpoint, or
    where that is a quanto one from a plain copy written to ``output_dir/vllm_boot``; its weights are
    replaced before the first sample either way."""
    from trl.generation.vllm_generation import VLLMGeneration

    class StudentVLLM(VLLMGeneration):
        def _init_vllm(self):  # TRL starts colocated vLLM from model.name_or_path
            if boot is None:
                return super()._init_vllm()
            base = plain_model(self.model)
            saved, base.name_or_path = base.name_or_path, boot
            try:
                super()._init_vllm()
            finally:
                base.name_or_path = saved

        def _iter_named_params(self):  # what sync_weights sends
            yield from computed_weights(self.model)

    boot = None  # server mode: the server loaded its own checkpoint
    if args.vllm_mode == "colocate":
        boot = own_checkpoint(model)
        if boot is None:
            boot = str(Path(args.output_dir) / BOOT_FOLDER)
            if accelerator.is_local_main_process:
                write_plain_checkpoint(model, tokenizer, boot)
            accelerator.wait_for_everyone()
    return StudentVLLM(
        model, accelerator, tokenizer, mode=args.vllm_mode, server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host, server_port=args.vllm_server_port, server_timeout=args.vllm_server_timeout,
        group_port=args.vllm_group_port, tensor_parallel_size=args.vllm_tensor_parallel_size,
        max_model_length=args.vllm_max_model_length,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_num_seqs=args.per_device_train_batch_size * args.vllm_tensor_parallel_size,
        temperature=args.generation_temperature, top_p=args.generation_top_p, top_k=args.generation_top_k,
        max_completion_length=args.max_new_tokens, logprobs=None,
        generation_kwargs={"stop_token_ids": stop_ids(tokenizer.eos_token_id)},
    )

