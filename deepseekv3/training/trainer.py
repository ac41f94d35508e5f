"""The package's `Trainer`: the precision policy, and each loss term the model's forward returns logged by name.

The model returns `loss` (the sum) and each term by name (`lm_loss`, `contrastive_loss`, `distillation_loss`);
`DeepseekV3Trainer` averages every term over the logging interval and logs it with `loss`, so the terms appear in
`trainer.state.log_history`, the progress bar, and every reporting integration (TensorBoard, W&B, ...). The
precision policy (`PrecisionTrainerMixin`: weight-decay groups, adaptive fp16 loss scaling, the optional log-space
loss) reads its options from `PrecisionTrainingArguments`, with its defaults under plain `TrainingArguments`.
"""

import os
from collections import defaultdict

import torch
from transformers import PreTrainedModel, Trainer
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .precision import PrecisionTrainerMixin

__all__ = ["LOSS_TERMS", "DeepseekV3Trainer"]

LOSS_TERMS = ("lm_loss", "contrastive_loss", "distillation_loss", "gate_sparsity_loss")


class DeepseekV3Trainer(PrecisionTrainerMixin, Trainer):
    """[`~transformers.Trainer`] with the precision policy, logging the model's loss terms (training steps only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_term_sums: dict[str, float] = defaultdict(float)
        self._loss_term_counts: dict[str, int] = defaultdict(int)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in LOSS_TERMS:
                term = outputs.get(name) if isinstance(outputs, dict) else None
                if isinstance(term, torch.Tensor):
                    self._loss_term_sums[name] += term.detach().float().item()
                    self._loss_term_counts[name] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log: add the interval's mean of each term, then start a new interval
            for name, total in self._loss_term_sums.items():
                logs[name] = round(total / self._loss_term_counts[name], 6)
            self._loss_term_sums.clear()
            self._loss_term_counts.clear()
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        # transformers 5.24's Trainer reads a full-model checkpoint with a raw `load_state_dict`, which skips the
        # checkpoint conversion `from_pretrained` applies: the experts, saved one per expert as upstream does, would
        # not load into the fused expert tensors. Loading through `from_pretrained` applies it.
        model = self.model if model is None else model
        files = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        is_full_checkpoint = any(os.path.isfile(os.path.join(resume_from_checkpoint, name)) for name in files)
        if not (isinstance(model, PreTrainedModel) and is_full_checkpoint and not self.is_fsdp_enabled):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())
