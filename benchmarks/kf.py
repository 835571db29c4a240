"""kronfluence 1.0.1 driven on msif's own tokenization; tests/engine/test_kronfluence_parity.py checks this very code.

Its task returns the summed cross-entropy (−log p) over the tokens msif scores, for both the
training loss and the measurement: gradients flip sign on both sides, so kronfluence's pairwise
scores equal msif's single_stage scores (no sign change).
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class PaddedTexts(Dataset):
    """msif-encoded (token ids, loss mask) pairs, in the given order; ``collate`` right-pads each batch
    to its own longest (as msif's batches are), labels −100 where no loss."""

    def __init__(self, encoded: Sequence[tuple[list[int], list[bool]]], pad_id: int):
        self.examples = [(torch.tensor(ids), torch.tensor(mask)) for ids, mask in encoded]
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.examples[i]

    def collate(self, rows: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (ids, mask) in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.where(mask, ids, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def causal_lm_task(tracked: list[str]):
    """kronfluence's Task for a causal LM: summed cross-entropy (= −log p) over tokens whose label is
    not -100, for the training loss and the measurement; ``tracked``: the module names to track."""
    from kronfluence.task import Task

    class CausalLMTask(Task):
        def _nll(self, batch, model, sample: bool) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
            labels = batch["labels"][:, 1:]
            if sample:  # true Fisher: labels drawn from the model on the loss tokens
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits.detach().float(), -1).flatten(0, 1), 1).view(labels.shape)
                labels = torch.where(labels == -100, labels, drawn)
            return F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="sum")

        def compute_train_loss(self, batch, model, sample=False):
            return self._nll(batch, model, sample)

        def compute_measurement(self, batch, model):
            return self._nll(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    return CausalLMTask()


def kronfluence_single_stage(
    model: torch.nn.Module, layers: list[str], train: PaddedTexts, queries: PaddedTexts, dampings: Sequence[float | None],
    workdir: Path, empirical: bool = False, batch_size: int = 16, dtype: torch.dtype = torch.float32,
) -> tuple[dict[float | None, torch.Tensor], dict[str, float]]:
    """kronfluence EK-FAC pairwise scores [N train, Q] at each damping (None = its heuristic, 0.1 x mean Λ).

    Batches are ``batch_size`` consecutive examples of ``train`` padded to their longest (order
    ``train`` as msif's batches are, longest first, for the same padding); the factors are fitted
    on every example. Returns the scores and the seconds of its stages (factor fit; each scoring call).
    """
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    task = causal_lm_task(layers)
    kf_model = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer("bench", kf_model, task, cpu=True, disable_tqdm=True, log_level=logging.WARNING,
                        output_dir=str(workdir))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical, activation_covariance_dtype=dtype,
                                  gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
    loader = DataLoaderKwargs(num_workers=0, collate_fn=train.collate)  # queries are padded alike (same pad id)
    seconds = {}
    t = time.perf_counter()
    analyzer.fit_all_factors("ekfac", train, per_device_batch_size=batch_size, factor_args=factor_args,
                             dataloader_kwargs=loader, overwrite_output_dir=True)
    seconds["factors"] = time.perf_counter() - t
    out = {}
    for k, damping in enumerate(dampings):
        score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                    score_dtype=dtype)
        t = time.perf_counter()
        analyzer.compute_pairwise_scores(f"scores{k}", "ekfac", queries, train, per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=batch_size, score_args=score_args,
                                         dataloader_kwargs=loader, overwrite_output_dir=True)
        seconds[f"scores{k}"] = time.perf_counter() - t
        out[damping] = analyzer.load_pairwise_scores(f"scores{k}")["all_modules"].t().double()
    return out, seconds
