"""SDFT trainers: a frozen teacher's next-token distribution (and optionally its hidden-layer
geometry) is distilled into the student.

``SDFTTrainer`` extends ``transformers.Trainer``; ``SDFTSFTTrainer`` extends ``trl.SFTTrainer``
(chat templates, packing, completion-only loss). Both share :class:`SDFTMixin`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
from collections import defaultdict
from dataclasses import dataclass

import datasets
import torch
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import logging
from trl import SFTTrainer

from hf_sdft.cka.callback import CKACallback
from hf_sdft.cka.metric import masked_linear_cka, sample_rows
from hf_sdft.compress.fake_quant import (
    FakeQuantLinear,
    compiled_fake_quant_available,
    forget_grids,
    scale_group,
    split_scale_parameters,
)
from hf_sdft.data import pad
from hf_sdft.distributed import check_fsdp_launch
from hf_sdft.modeling import (
    capture_layers,
    from_pretrained,
    head_input,
    is_peft,
    plain_head,
    resolve_layers,
    teacher_context,
    unwrap,
)
from hf_sdft.trainer.fused import HostRowIndex, fused_linear_kd_ce_loss
from hf_sdft.trainer.losses import (
    cached_label_logprobs,
    distillation_loss,
    label_logprobs,
    mean_label_probability,
    token_cross_entropy,
    topk_distillation_loss,
)
from hf_sdft.trainer.on_policy import TEACHER_PROMPT, OnPolicySampler
from hf_sdft.trainer.teacher import check_teacher, freeze_teacher, shard_teacher_fsdp2
from hf_sdft.trainer.teacher_cache import CACHE_COLUMNS, cache_metadata, check_cache

logger = logging.get_logger(__name__)
TEACHER_INPUTS = {"teacher_input_ids": "input_ids", "teacher_attention_mask": "attention_mask",
                  "teacher_position_ids": "position_ids"}  # on-policy batches: the teacher's own sequence
NOT_MODEL_INPUTS = ("labels", "shift_labels", TEACHER_PROMPT, *CACHE_COLUMNS, *TEACHER_INPUTS)


EMPTY_BATCHES = "empty_batches"  # the fraction of micro-batches with no supervised token, checked at each log
NO_SUPERVISED_TOKEN = ("a batch has no supervised token (every label is -100): check max_length/truncation, "
                       "completion_only_loss or how labels are built")


@dataclass
class _Batch:
    """One batch as :meth:`SDFTMixin.compute_loss` reads it: what the student and the teacher get,
    the shifted labels and their mask, and how much of the output loss is KD."""

    inputs: dict
    model_inputs: dict
    teacher_inputs: dict
    labels: torch.Tensor
    shift_labels: torch.Tensor
    mask: torch.Tensor
    n_local: torch.Tensor
    on_policy: bool
    kd_ratio: float

    @classmethod
    def of(cls, inputs: dict, kd_ratio: float) -> _Batch:
        model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS} | {"use_cache": False}
        on_policy = "teacher_input_ids" in inputs  # KD only, on the sampled tokens (the teacher's own sequence)
        teacher_inputs = ({name: inputs[key] for key, name in TEACHER_INPUTS.items()} | {"use_cache": False}
                          if on_policy else model_inputs)
        labels = inputs["labels"]
        shift_labels = labels[..., 1:]
        mask = shift_labels != -100
        # a batch with no supervised token is not checked here (a host sync every step): it adds
        # nothing to the loss, and the next log raises (NO_SUPERVISED_TOKEN)
        n_local = mask.sum().clamp(min=1)
        return cls(inputs, model_inputs, teacher_inputs, labels, shift_labels, mask, n_local, on_policy,
                   1.0 if on_policy else kd_ratio)


def _with_kernel_default(model, args):
    """``args`` for the parent Trainer: TRL's SFTTrainer loads a model given by name itself, with
    Hub kernels only as ``use_kernels`` says (offline-safe by default)."""
    if isinstance(model, str) and hasattr(args, "model_init_kwargs"):
        args = copy.copy(args)
        args.model_init_kwargs = {"use_kernels": getattr(args, "use_kernels", False), **(args.model_init_kwargs or {})}
    return args


class SDFTMixin:
    """Adds the teacher, the KD/CKA losses and per-part logging to a Trainer subclass.

    The teacher, resolved once (:meth:`_resolve_teacher`), is one of these kinds:

    ======================  ==============================================  ==========================================
    kind                    given as                                        what gives the targets
    ======================  ==============================================  ==========================================
    a model                 ``teacher_model=model``                         its frozen forward, in ``teacher_dtype`` on
                                                                            ``teacher_device`` (sharded under FSDP /
                                                                            DeepSpeed ZeRO-3 like the student)
    a path or Hub id        ``teacher_model="id"`` or                       loaded (Hub kernels only with
                            ``args.teacher_model_name_or_path``             ``use_kernels``), then as a model
    the PEFT base           neither, and a PEFT student                     the student with its adapters disabled
    an EMA of the student   ``teacher_model_kind="ema"``                    a copy of the student, moved toward it
                                                                            after every optimizer step
    a teacher cache         neither, and ``train_dataset`` written by       no teacher forward: the batch's cached
                            ``hf-sdft cache-teacher``                       top-k log-probabilities
    ======================  ==============================================  ==========================================

    The output loss is chosen once too (``output_loss``): ``fused`` (the heads applied inside the
    loss, chunk by chunk, never building the logits), ``cache`` (top-k targets from the cache) or
    ``logits`` (the models' own logits, where a head is not a plain linear layer or ``kd_fused`` is off).
    """

    _tag_names = ["hf-sdft", "sdft"]
    model_card_writer = None  # set by a job with its own card (see create_model_card)

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with learned quantization scales and shifts
        (:meth:`~hf_sdft.compress.fake_quant.FakeQuantLinear.hold_scales`) in a group of their own:
        learning rate × ``quant_scales_lr_ratio``, no weight decay (the scheduler scales it alike).
        An optimizer passed to the Trainer is left as it is."""
        given = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        modules = unwrap(model or self.model)
        reusing = any(getattr(m, "reuse_grid", False) for m in modules.modules())
        if reusing and not getattr(optimizer, "_forgets_grids", False):  # reused fake-quant grids: stale after
            # a step (optimizers update in place without always bumping a tensor's version counter)
            optimizer.register_step_post_hook(lambda *_: forget_grids(modules))
            optimizer._forgets_grids = True
        _, scales = split_scale_parameters((model or self.model).named_parameters())
        scales = {id(p) for p in scales}
        if given or not scales or not hasattr(optimizer, "param_groups"):
            return optimizer
        moved = []
        for group in optimizer.param_groups:
            moved += [p for p in group["params"] if id(p) in scales]
            group["params"] = [p for p in group["params"] if id(p) not in scales]
        optimizer.add_param_group(scale_group(moved, self.args.learning_rate, self.args.quant_scales_lr_ratio))
        return optimizer

    def __init__(self, model=None, args=None, *pos, teacher_model: nn.Module | str | None = None, **kwargs):
        if teacher_model is None:
            teacher_model = getattr(args, "teacher_model_name_or_path", None)
        if isinstance(teacher_model, nn.Module) and isinstance(model, nn.Module):
            check_teacher(model, teacher_model)  # fail before any dataset preparation
        self.teacher_cache = cache_metadata(kwargs.get("train_dataset")) if teacher_model is None else None
        if self.teacher_cache is not None:
            kwargs = self._cache_inputs(kwargs, args, model)
        super().__init__(model, _with_kernel_default(model, args), *pos, **kwargs)
        teacher_model = self._resolve_teacher(teacher_model)
        self._validate()
        self.on_policy = (OnPolicySampler(self.args, self.processing_class, self._vllm())
                          if self.args.on_policy_ratio > 0 else None)
        reference = teacher_model if teacher_model is not None else self.model
        self.cka_loss_layers = (
            resolve_layers(self.args.cka_layers, self.model, reference) if self.args.cka_weight > 0 else []
        )
        check_fsdp_launch(self.accelerator)
        self.teacher_model = self._prepare_teacher(teacher_model) if teacher_model is not None else None
        self.fused_heads = self._fused_heads() if self.args.kd_fused and self.teacher_cache is None else None
        # one process, no wrapper hooking gradient accumulation: the fused loss's backward may add
        # the head's gradient into its .grad itself (no copy of it in a half-precision head's dtype)
        self.head_grad_in_place = self.accelerator.distributed_type == DistributedType.NO
        self.output_loss = "cache" if self.teacher_cache is not None else "fused" if self.fused_heads else "logits"
        self.cakld_gamma = self.args.cakld_gamma  # kd_loss cakld: estimated at the first loss when unset
        # compute_loss normalises CE and KD by the token count of the whole accumulated batch,
        # counted over labels[..., 1:] (the causal shift compute_loss applies)
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._loss_shifts_labels = True
        self._sdft_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        for cb in self.callback_handler.callbacks:
            if isinstance(cb, CKACallback):  # it measures against this trainer's teacher
                cb.bind(self)
        self._configure_fake_quant()
        self._resumed_from = None
        if self.on_policy is not None or self.args.teacher_model_kind == "ema":
            self.add_callback(ResumeStateCallback(self))  # what a checkpoint must carry besides the Trainer's own

    def _configure_fake_quant(self) -> None:
        """How fake-quantized layers compute, never what. ``quant_reuse_grid``: their grid once per
        optimizer step (:attr:`~hf_sdft.compress.fake_quant.FakeQuantLinear.reuse_grid`) where a step
        runs several forwards of the same weights (auto: gradient accumulation or checkpointing).
        ``quant_compile``: the min/max grid as one fused kernel (``compile_grid``) on the layers
        whose device runs it (auto; not under ``torch_compile``, whose graph fuses it already), on
        all of them (true: an error for a layer elsewhere) or none."""
        choice = str(self.args.quant_reuse_grid).lower()
        several = self.args.gradient_accumulation_steps > 1 or bool(self.args.gradient_checkpointing)
        reuse = choice == "true" or (choice == "auto" and several)
        compile_choice = str(self.args.quant_compile).lower()
        if compile_choice == "auto" and self.args.torch_compile:
            compile_choice = "false"
        for name, module in unwrap(self.model).named_modules():
            if isinstance(module, FakeQuantLinear):
                module.reuse_grid = reuse
                module.compile_grid = compile_choice != "false" and self._compiles_grid(name, module, compile_choice)

    def _compiles_grid(self, name: str, layer: FakeQuantLinear, choice: str) -> bool:
        """Whether ``layer``'s device runs the compiled grid; ``quant_compile=true`` where it does not: an error."""
        device = layer.weight.device
        if device.type != "cuda":  # not placed yet (FSDP, DeepSpeed) or offloaded: the training device
            device = self.args.device
        if compiled_fake_quant_available(device):
            return True
        if choice == "true":
            raise ValueError(f"quant_compile=true: {name} computes on {device}, where the fused fake quantization "
                             "does not run (a CUDA GPU with Triton only); set quant_compile auto or false")
        return False

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """The Trainer's ``train``, remembering the checkpoint it resumes from (for
        :class:`ResumeStateCallback`: the EMA teacher and the on-policy sampler's random state)."""
        resume = resume_from_checkpoint
        if resume is True or (isinstance(resume, str) and resume == "True"):
            resume = get_last_checkpoint(self.args.output_dir)
        self._resumed_from = resume or None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_resume_state(self, folder: str) -> None:
        """Write into checkpoint ``folder`` what the Trainer does not save: the EMA teacher's weights
        (``ema_teacher.safetensors``) and the on-policy sampler's random state (``on_policy_sampler.json``)."""
        if not self.args.should_save or not os.path.isdir(folder):
            return
        if self.args.teacher_model_kind == "ema" and self.teacher_model is not None:
            from safetensors.torch import save_model

            save_model(unwrap(self.teacher_model), os.path.join(folder, EMA_TEACHER_FILE))
        if self.on_policy is not None:
            version, internal, gauss = self.on_policy.rng.getstate()
            with open(os.path.join(folder, SAMPLER_STATE_FILE), "w") as f:
                json.dump({"version": version, "state": list(internal), "gauss_next": gauss}, f)

    def load_resume_state(self, folder: str) -> None:
        """Restore what :meth:`save_resume_state` wrote into ``folder``; a checkpoint written without it
        (an older hf-sdft) is resumed with a warning: the EMA teacher restarts from the student and
        the sampler from the seed."""
        if self.args.teacher_model_kind == "ema" and self.teacher_model is not None:
            path = os.path.join(folder, EMA_TEACHER_FILE)
            if os.path.isfile(path):
                from safetensors.torch import load_model

                load_model(unwrap(self.teacher_model), path)
            else:
                logger.warning(f"{folder} holds no {EMA_TEACHER_FILE}: the EMA teacher restarts from the resumed "
                               "student, so the run differs from an uninterrupted one")
        if self.on_policy is not None:
            path = os.path.join(folder, SAMPLER_STATE_FILE)
            if os.path.isfile(path):
                with open(path) as f:
                    saved = json.load(f)
                self.on_policy.rng.setstate((saved["version"], tuple(saved["state"]), saved["gauss_next"]))
            else:
                logger.warning(f"{folder} holds no {SAMPLER_STATE_FILE}: the on-policy draws restart from the seed, "
                               "so the run differs from an uninterrupted one")

    @staticmethod
    def _cache_inputs(kwargs: dict, args, model) -> dict:
        """Training on a teacher cache: checked against the student, rows as numpy arrays ((T, k)
        blocks collate without walking nested Python lists), padded by :func:`~hf_sdft.data.pad`."""
        check_cache(cache_metadata(kwargs["train_dataset"]), args, model)
        kwargs = {**kwargs, "train_dataset": kwargs["train_dataset"].with_format("numpy")}
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = pad
        return kwargs

    def _resolve_teacher(self, teacher: nn.Module | str | None) -> nn.Module | None:
        """The teacher as one of the kinds of the class docstring's table, checked against the
        student; None for the PEFT base and the teacher cache (no teacher model is held)."""
        if self.args.teacher_model_kind == "ema":  # starts as the student, then follows it (TRL SDFT's ema teacher)
            teacher = copy.deepcopy(unwrap(self.model))
            self.add_callback(EMATeacherCallback(self))
        elif isinstance(teacher, str):
            teacher = from_pretrained(teacher, dtype="auto", use_kernels=self.args.use_kernels)
        if teacher is None and self.teacher_cache is None and not is_peft(self.model):
            raise ValueError(
                "no teacher: pass teacher_model= (the original model or its path), set "
                "teacher_model_name_or_path, train on a teacher cache (hf-sdft cache-teacher), "
                "or train a PEFT student whose base model is the teacher"
            )
        if teacher is not None:
            check_teacher(self.model, teacher)
        return teacher

    def _validate(self) -> None:
        """The checks that need the model, the data or the launch (the config checks its own fields)."""
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError(
                "the student has no trainable parameter (was it copied from a frozen teacher?): "
                "call student.requires_grad_(True), or give it PEFT adapters"
            )
        if self.args.on_policy_ratio > 0 and self.teacher_cache is not None:
            raise ValueError("on_policy_ratio > 0 needs a teacher to grade the student's samples, which a teacher "
                             "cache cannot do: train with the online teacher")
        columns = getattr(self.train_dataset, "column_names", None)
        if self.args.teacher_context == "demonstration" and columns is not None and TEACHER_PROMPT not in columns:
            raise ValueError(
                f"teacher_context='demonstration' needs the teacher's prompt of each example (a '{TEACHER_PROMPT}' "
                "column): give chat or prompt/completion data tokenized by hf_sdft.data.tokenize_examples(..., "
                "teacher_template=args.teacher_prompt_template), as the recovery job does"
            )
        if self.args.cka_weight > 0 and self.args.n_gpu > 1:
            raise ValueError(
                "cka_weight > 0 under torch.nn.DataParallel (one process, several GPUs) is not supported: "
                "launch one process per GPU with accelerate launch / torchrun"
            )

    def _vllm(self):
        """TRL's vLLM generation for the student (``use_vllm``), or ``None`` (``model.generate``)."""
        if not self.args.use_vllm:
            return None
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        # lazy: vllm_sampling imports optimum-quanto (hf_sdft.compress.quantize), needed only with use_vllm
        from hf_sdft.trainer.vllm_sampling import check_vllm_available, vllm_generation

        if self.is_fsdp_enabled or is_deepspeed_zero3_enabled():
            raise ValueError("use_vllm sends vLLM the student's whole weights, which FSDP and DeepSpeed ZeRO-3 "
                             "shard: train with DDP (or ZeRO-1/2), or set use_vllm false")
        check_vllm_available()
        return vllm_generation(self.model, self.accelerator, self.processing_class, self.args)

    def _prepare_teacher(self, teacher: nn.Module) -> nn.Module:
        """The frozen teacher in ``teacher_dtype`` on ``teacher_device`` (sharded like the student
        under DeepSpeed ZeRO-3 or FSDP)."""
        student_dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        dtype = self.args.resolve_teacher_dtype(student_dtype)
        if any(p.is_floating_point() and p.dtype != dtype for p in teacher.parameters()):
            teacher = teacher.to(dtype)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return freeze_teacher(prepare_deepspeed(teacher, self.accelerator))
        if self.is_fsdp_enabled and self.accelerator.state.fsdp_plugin.fsdp_version == 2:
            return freeze_teacher(shard_teacher_fsdp2(freeze_teacher(teacher), self.accelerator))
        if self.is_fsdp_enabled:  # FSDP1
            from trl.models.utils import prepare_fsdp

            return freeze_teacher(prepare_fsdp(teacher, self.accelerator))
        return freeze_teacher(teacher.to(self.args.teacher_device or self.accelerator.device))

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.teacher_cache is not None and self._signature_columns is not None:
            self._signature_columns = [*self._signature_columns, *CACHE_COLUMNS]
        if self.args.teacher_context == "demonstration" and self._signature_columns is not None:
            self._signature_columns = [*self._signature_columns, TEACHER_PROMPT]

    def _fused_heads(self) -> tuple[nn.Linear, nn.Linear] | None:
        """(student head, teacher head) for the fused loss, or None (with the reason logged) when a
        model's logits are not a plain linear head of its last hidden state."""
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            logger.warning("kd_fused: using the model's own logits under FSDP / DeepSpeed (sharded head weights)")
            return None
        student, why = plain_head(self.model)
        teacher, why_t = plain_head(self.teacher_model) if self.teacher_model is not None else (student, why)
        if student is None or teacher is None:
            logger.warning(f"kd_fused: using the model's own logits, since the {'student' if student is None else 'teacher'}"
                           f"'s {why or why_t}")
            return None
        return student, teacher

    def _teacher_forward(self, model_inputs: dict, layers, head: nn.Module | None):
        """The teacher's logits ``(B, T, V)`` (``head`` None) or the input of its ``head``
        ``(B, T, H)``, and the hidden states of ``layers``; no grad, on the student's device."""
        with teacher_context(self.model, self.teacher_model) as teacher, capture_layers(teacher, layers) as hidden, \
                (head_input(head) if head is not None else contextlib.nullcontext()) as head_in:
            device = next(teacher.parameters()).device
            with self.accelerator.autocast():  # the student's precision (accelerate autocasts only its forward)
                outputs = teacher(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in model_inputs.items()})
        student_device = model_inputs["input_ids"].device
        hidden = {i: h.to(student_device) for i, h in hidden.items()}
        return (outputs.logits.to(student_device) if head is None else head_in["hidden"]), hidden

    def divergence_beta(self) -> float:
        """The ``beta`` of the KD loss: ``kd_beta`` (JSD), or CAKLD's γ (``cakld_gamma``, else
        estimated by :meth:`estimate_cakld_gamma` the first time it is needed)."""
        if self.args.kd_loss != "cakld":
            return self.args.kd_beta
        if self.cakld_gamma is None:
            self.cakld_gamma = self.estimate_cakld_gamma()
            logger.info(f"kd_loss cakld: γ = {self.cakld_gamma:.4f}, the teacher's mean label-token probability over "
                        f"{self.args.cakld_calibration_batches} training batches")
        return self.cakld_gamma

    def estimate_cakld_gamma(self) -> float:
        """BitDistiller's γ (Du et al. 2024, arXiv 2402.10631, §3.2): the teacher's probability of
        the label tokens, averaged over each sequence and then over the sequences of
        ``cakld_calibration_batches`` training batches (at ``kd_temperature``, the temperature the
        loss distils at; the paper's is 1).

        The batches are a random sample of the training set drawn with a generator seeded by
        ``seed`` (an iterable dataset: its first batches), so the global random state is untouched
        and a resumed run gets the same γ. Every process reads the same sample and the estimates
        are averaged, so all hold the same γ. From a teacher cache, a label outside the cached top-k
        counts as probability 0 (a lower bound, exact when k = V).
        """
        args, description = self.args, "CAKLD calibration"
        if self.train_dataset is None:
            raise ValueError("kd_loss cakld estimates γ from the training data but this trainer has no train_dataset: "
                             "pass one, or set cakld_gamma")
        dataset, collator = self.train_dataset, self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)
        batch_size = args.per_device_train_batch_size
        if not isinstance(dataset, IterableDataset):
            order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(args.seed))
            order = order[:batch_size * args.cakld_calibration_batches].tolist()
            dataset = dataset.select(order) if isinstance(dataset, datasets.Dataset) else Subset(dataset, order)
        # its own generator: a DataLoader draws its workers' base seed from the global one otherwise
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collator, generator=torch.Generator())
        head = self.fused_heads[1] if self.fused_heads is not None else None
        sums = torch.zeros(2, dtype=torch.float32, device=args.device)
        for batch in itertools.islice(loader, args.cakld_calibration_batches):
            batch = self._prepare_inputs(batch)
            labels = batch["labels"][..., 1:]
            if self.teacher_cache is not None:
                ids, logprobs = (batch[k][:, :-1] for k in CACHE_COLUMNS[:2])
                label_lp = cached_label_logprobs(ids, logprobs, labels)
            else:
                model_inputs = {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS} | {"use_cache": False}
                teacher_out, _ = self._teacher_forward(model_inputs, [], head)
                with torch.no_grad():
                    label_lp = label_logprobs(teacher_out[..., :-1, :], labels, temperature=args.kd_temperature,
                                              head_weight=None if head is None else head.weight,
                                              head_bias=None if head is None else head.bias)
            sums += torch.stack(mean_label_probability(label_lp, labels.to(label_lp.device))).to(sums.device)
        sums = self.accelerator.reduce(sums, reduction="mean")
        if not sums[1] > 0:
            raise ValueError(f"kd_loss cakld: the {args.cakld_calibration_batches} calibration batches hold no label "
                             "token to estimate γ from: check the training data's labels, or set cakld_gamma")
        return float(sums[0] / sums[1])

    def training_step(self, model, inputs, num_items_in_batch=None):
        """A fraction ``on_policy_ratio`` of micro-batches is replaced by the student's own samples
        (:mod:`hf_sdft.trainer.on_policy`); those are normalised by their own token count."""
        if self.on_policy is not None:
            on = self.on_policy.draw()
            window, device = self._sdft_metrics["train"], self.accelerator.device  # reduced with the loss parts
            window["on_policy/fraction"].append(torch.tensor(float(on), device=device))
            if on:
                inputs, figures = self.on_policy.batch(model, inputs, self.state.global_step)
                for key, value in figures.items():
                    window[f"on_policy/{key}"].append(torch.tensor(value, device=device))
                num_items_in_batch = None
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Student forward, the teacher's targets, the output loss chosen at init (callers asking
        for outputs get logits), the CKA loss when on, and the parts kept for logging."""
        batch = _Batch.of(inputs, self.args.kd_ratio)
        kind = "logits" if return_outputs and self.output_loss == "fused" else self.output_loss
        s_head, t_head = self.fused_heads if kind == "fused" else (None, None)
        # the fused loss's supervised rows, found while the forwards run (no host sync after them)
        rows = HostRowIndex(batch.mask.flatten()) if kind == "fused" else None
        with capture_layers(model, self.cka_loss_layers) as student_hidden, \
                (head_input(s_head) if s_head is not None else contextlib.nullcontext()) as s_in:
            outputs = model(**batch.model_inputs)
        teacher_out, teacher_hidden = (None, {}) if kind == "cache" else \
            self._teacher_forward(batch.teacher_inputs, self.cka_loss_layers, t_head)
        student_out = s_in["hidden"] if kind == "fused" else outputs.logits
        output_grad = torch.is_grad_enabled() and self.args.output_loss_weight > 0  # else CE and KD are logged only
        # accelerate autocasts the model's forward only: without this the fused heads would multiply
        # float32 master weights in float32 (on a GPU, several times slower than bf16 tensor cores)
        with torch.set_grad_enabled(output_grad), self.accelerator.autocast():
            output_loss = {"fused": self._fused_output_loss, "logits": self._logits_output_loss,
                           "cache": self._cache_output_loss}[kind]
            mixed, kd_sum, ce_sum = output_loss(student_out, teacher_out, batch, output_grad, rows)
        loss = self._token_loss(mixed, batch, num_items_in_batch, model.training)
        metrics = {"ce_loss": ce_sum.detach() / batch.n_local, "kd_loss": kd_sum.detach() / batch.n_local,
                   EMPTY_BATCHES: (~batch.mask).all().float()}
        if self.cka_loss_layers:
            cka_loss = self._cka_loss(student_hidden, teacher_hidden, batch, self.cka_loss_layers)
            weighted = self.args.cka_weight * cka_loss
            loss = loss + (weighted / self.current_gradient_accumulation_steps if model.training else weighted)
            metrics["cka_loss"] = cka_loss.detach()
        for key, value in metrics.items():  # kept on the device: reduced (one sync) when logged
            self._sdft_metrics["train" if model.training else "eval"][key].append(value.float().reshape(()))
        return (loss, outputs) if return_outputs else loss

    def _kd_kwargs(self) -> dict:
        args = self.args
        return dict(loss_type=args.kd_loss, beta=self.divergence_beta(), temperature=args.kd_temperature,
                    num_items_in_batch=1, chunk_size=args.kd_chunk_size)

    def _fused_output_loss(self, student_hidden, teacher_hidden, batch: _Batch, output_grad: bool, rows):
        """Heads applied inside the loss, chunk by chunk: one gradient buffer for the weighted sum
        (kd_ratio 1 builds no CE gradient), on the supervised ``rows`` found during the forwards."""
        s_head, t_head = self.fused_heads
        memory = self.args.kd_chunk_memory_mb
        return fused_linear_kd_ce_loss(
            student_hidden[..., :-1, :], s_head.weight, teacher_hidden[..., :-1, :], t_head.weight, batch.mask,
            batch.shift_labels, kd_ratio=batch.kd_ratio, student_head_bias=s_head.bias, teacher_head_bias=t_head.bias,
            kernel=self.args.kd_kernel, kept_rows=rows.rows(), head_grad_in_place=self.head_grad_in_place,
            chunk_memory=None if memory is None else int(memory * 2**20), **self._kd_kwargs(),
        )

    def _logits_output_loss(self, student_logits, teacher_logits, batch: _Batch, output_grad: bool, _rows):
        """KD on the models' own logits (a head that is not a plain linear layer, or ``kd_fused`` off)."""
        student_logits = student_logits[..., :-1, :]
        kd_sum = distillation_loss(student_logits, teacher_logits[..., :-1, :], batch.mask, **self._kd_kwargs())
        return self._mix(student_logits, kd_sum, batch, output_grad)

    def _cache_output_loss(self, student_logits, _teacher, batch: _Batch, output_grad: bool, _rows):
        """KD on a teacher cache's top-k log-probabilities (and the tail's mass)."""
        student_logits = student_logits[..., :-1, :]
        cached = [batch.inputs[k][:, :-1] for k in CACHE_COLUMNS]
        kd_sum = topk_distillation_loss(student_logits, *cached, batch.mask, **self._kd_kwargs())
        return self._mix(student_logits, kd_sum, batch, output_grad)

    @staticmethod
    def _mix(student_logits, kd_sum, batch: _Batch, output_grad: bool):
        """(1 − kd_ratio)·CE + kd_ratio·KD, CE's graph built only when it is weighted."""
        with torch.set_grad_enabled(output_grad and batch.kd_ratio < 1.0):
            ce_sum = token_cross_entropy(student_logits, batch.shift_labels, num_items_in_batch=1)
        return (1.0 - batch.kd_ratio) * ce_sum + batch.kd_ratio * kd_sum, kd_sum, ce_sum

    def _token_loss(self, mixed, batch: _Batch, num_items_in_batch, training: bool):
        """The output loss per supervised token of the whole accumulated batch, scaled as the
        Trainer's backward expects."""
        denom = num_items_in_batch if num_items_in_batch is not None else batch.n_local
        loss = self.args.output_loss_weight * mixed / denom
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            return loss * self.accelerator.num_processes  # DDP averages the per-rank gradients
        if num_items_in_batch is None and training:
            return loss / self.current_gradient_accumulation_steps
        return loss

    def _cka_loss(self, student_hidden: dict, teacher_hidden: dict, batch: _Batch, layers) -> torch.Tensor:
        """1 − mean linear CKA over the CKA layers, on the real (attended) positions; on-policy
        batches compare the sampled positions only (the prompts differ under a demonstration).
        Positions are kept by weight, never by boolean indexing (no host sync); with ``cka_tokens``
        a random sample of them, drawn once per step for every layer; the feature products run in
        bfloat16 when training does (:func:`~hf_sdft.cka.metric.masked_linear_cka`)."""
        labels = batch.labels
        keep = batch.inputs.get("attention_mask")
        keep = keep.bool() if keep is not None else torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
        if batch.on_policy:
            keep = labels != -100
        keep = keep.flatten()
        if self.args.cka_tokens is not None and self.args.cka_tokens < keep.shape[0]:
            index, weight = sample_rows(keep, self.args.cka_tokens)
        else:
            index, weight = None, keep.to(torch.float32)
        dtype = torch.bfloat16 if self.args.bf16 else torch.float32  # float16 overflows on these products

        def rows(hidden):
            flat = hidden.flatten(0, -2)
            return flat if index is None else flat.index_select(0, index)

        ckas = [masked_linear_cka(rows(student_hidden[i]), rows(teacher_hidden[i]).detach(), weight, dtype=dtype)
                for i in layers]
        return (1.0 - torch.stack(ckas).mean()).float()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        if mode == "eval" or "loss" in logs:  # only the Trainer's own logging events, not a callback's
            window = self._sdft_metrics[mode]
            prefix = "eval_" if mode == "eval" else ""
            names = [k for k, v in window.items() if v]
            if names:  # one gather for every part: the window mean on each rank, averaged over ranks
                means = torch.stack([torch.stack(window[k]).mean() for k in names])
                values = dict(zip(names, self.accelerator.gather(means[None]).mean(0).tolist()))
                if values.pop(EMPTY_BATCHES, 0.0) > 0:
                    raise ValueError(NO_SUPERVISED_TOKEN)
                logs.update({f"{prefix}{k}": v for k, v in values.items()})
            window.clear()
            if self.cakld_gamma is not None and mode == "train":
                logs["cakld_gamma"] = self.cakld_gamma
        super().log(logs, start_time)

    def create_model_card(self, *args, **kwargs):
        """The card of the job that trains with this trainer when it writes one (``model_card_writer``:
        ``(output_dir, hub_model_id) → bool``, e.g. the recovery job's card of its stats); otherwise
        the parent's card with the ``hf-sdft`` tags added (TRL trainers add ``_tag_names`` themselves)."""
        if self.model_card_writer is not None and self.model_card_writer(self.args.output_dir, self.args.hub_model_id):
            return
        if not isinstance(self, SFTTrainer):
            tags = kwargs.get("tags") or []
            kwargs["tags"] = sorted({*([tags] if isinstance(tags, str) else tags), *self._tag_names})
        super().create_model_card(*args, **kwargs)


EMA_TEACHER_FILE = "ema_teacher.safetensors"
SAMPLER_STATE_FILE = "on_policy_sampler.json"


class ResumeStateCallback(TrainerCallback):
    """Saves the trainer's EMA teacher and on-policy sampler state into every checkpoint (``on_save``)
    and restores them when training resumes from one (``on_train_begin``, after the Trainer loaded
    the student's weights, optimizer and RNG states)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        self.trainer.save_resume_state(os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer._resumed_from:
            self.trainer.load_resume_state(str(self.trainer._resumed_from))


class EMATeacherCallback(TrainerCallback):
    """After every optimizer step, moves the trainer's (EMA) teacher toward the student:
    t ← (1 − r)·t + r·s with r = ``teacher_update_rate``."""

    def __init__(self, trainer):
        self.trainer = trainer

    @torch.no_grad()
    def on_step_end(self, args, state, control, model=None, **kwargs):
        teacher = unwrap(self.trainer.teacher_model)
        pairs = zip(teacher.parameters(), unwrap(self.trainer.model).parameters(), strict=True)
        for t, s in pairs:
            if t.is_floating_point():
                t.lerp_(s.detach().to(t.device, t.dtype), args.teacher_update_rate)


class SDFTTrainer(SDFTMixin, Trainer):
    """``transformers.Trainer`` with self-distillation from a frozen teacher.

    Use with :class:`~hf_sdft.SDFTConfig`. Batches need ``labels`` (−100 = not supervised),
    e.g. from ``DataCollatorForLanguageModeling(tokenizer, mlm=False)``.
    """


class SDFTSFTTrainer(SDFTMixin, SFTTrainer):
    """``trl.SFTTrainer`` with self-distillation from a frozen teacher; use with
    :class:`~hf_sdft.SDFTSFTConfig`."""

    _tag_names = ["trl", "sft", "hf-sdft", "sdft"]
