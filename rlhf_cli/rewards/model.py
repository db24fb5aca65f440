"""Reward models and classifiers: text in, one scalar per text out.

A reward model from `rlhf reward` (a sequence-classification model with one output) or any
classifier through one label's logit or probability (the classic GPT-2/IMDB example rewards the
POSITIVE logit of a sentiment classifier). The reward model has its own tokenizer: texts are
decoded from the policy and encoded again, so the two need not share a vocabulary.
"""

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf_cli.config.sections import RewardSourceConfig
from rlhf_cli.errors import UserError
from rlhf_cli.models.dropout import disable_dropout
from rlhf_cli.models.loading import load_model, load_tokenizer

log = logging.getLogger(__name__)
STATS_FILE = "reward_stats.json"


def label_index(model, label: str | None, key: str) -> int:
    """The output column used as the reward: the only one, or the named/numbered label."""
    num = model.config.num_labels
    if label is None:
        if num != 1:
            names = ", ".join(str(v) for v in model.config.id2label.values())
            raise UserError(f"{key}.label: the classifier has {num} labels ({names}); name the one to reward.")
        return 0
    if label.isdigit() and int(label) < num:
        return int(label)
    by_name = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}
    if label.lower() not in by_name:
        raise UserError(f"{key}.label: {label!r} is not a label of the classifier; it has: {', '.join(map(str, model.config.id2label.values()))}.")
    return by_name[label.lower()]


class ModelReward:
    """Scores texts with a sequence-classification model in batches of `batch_size`."""

    def __init__(self, source: RewardSourceConfig, device: torch.device, key: str = "reward", max_length: int = 512):
        self.key, self.device, self.batch_size = key, device, source.batch_size
        self.tokenizer = load_tokenizer(source.tokenizer_name_or_path or source.model, padding_side="right",
                                        config_key=f"{key}.model")
        self.model = load_model(source.model, task="sequence-classification", num_labels=None, config_key=f"{key}.model")
        self.model.to(device).eval().requires_grad_(False)
        disable_dropout(self.model)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.index = label_index(self.model, source.label, key)
        self.probability = source.output == "probability"
        self.max_length = min(max_length, self.tokenizer.model_max_length or max_length)
        self.stats = read_stats(source.model, key) if source.normalize else None

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], responses: Sequence[str], columns: dict | None = None) -> torch.Tensor:
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            ).to(self.device)
            logits = self.model(**enc).logits.float()  # (b, num_labels)
            out = logits.softmax(-1) if self.probability else logits
            scores.append(out[:, self.index])
        score = torch.cat(scores).cpu()
        if self.stats is not None:
            score = (score - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return score


def read_stats(folder: str, key: str) -> dict:
    path = Path(folder) / STATS_FILE
    if not path.is_file():
        raise UserError(
            f"{key}.normalize: {path} not found; it is written by `rlhf reward`. Set {key}.normalize: false "
            "for other models."
        )
    return json.loads(path.read_text())
