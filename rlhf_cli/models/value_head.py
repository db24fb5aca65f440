"""A scalar value head on the policy's last hidden state, computed in the policy's own forward pass.

`PolicyWithValue` is what `AutoModelForCausalLMWithValueHead` / `AutoModelForSeq2SeqLMWithValueHead`
were in TRL: one module, one forward, (logits, values). The head is saved in its own safetensors
file beside the policy, so the policy folder stays loadable by plain `transformers`.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhf_cli.lm import shared_prompts

VALUE_HEAD_FILE = "value_head.safetensors"


def hidden_size(model) -> int:
    """The width of the hidden state a value head reads: the input width of the model's own head (the
    LM head, or a classifier's `score`), which is not config.hidden_size where the model projects its
    last hidden state first (OPT's word_embed_proj_dim); else the config's hidden size."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = head if head is not None else getattr(model, "score", None)
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        return head.weight.shape[-1]
    config = model.config
    for name in ("hidden_size", "d_model", "n_embd"):
        if getattr(config, name, None):
            return getattr(config, name)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")


class ValueHead(nn.Module):
    """hidden (B, T, H) -> value (B, T). Kept and computed in float32 whatever the policy's dtype,
    under autocast too (a bf16 matmul would round the values that GAE and the value loss use)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.summary = nn.Linear(hidden, 1)
        # small init, as the reward head of Ziegler et al. 2019: values start near zero
        nn.init.normal_(self.summary.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)

    def save(self, folder: str | Path, state: dict | None = None) -> None:
        """`state`: the weights to write instead of the head's own (gathered from FSDP shards)."""
        state = state if state is not None else {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, Path(folder) / VALUE_HEAD_FILE)

    @classmethod
    def load(cls, folder: str | Path) -> "ValueHead | None":
        path = Path(folder) / VALUE_HEAD_FILE
        if not path.exists():
            return None
        state = load_file(path)
        head = cls(state["summary.weight"].shape[1])
        head.load_state_dict(state)
        return head


class PolicyWithValue(nn.Module):
    """A causal or seq2seq LM plus a value head, sharing one forward pass.

    Causal: `forward(input_ids, attention_mask, position_ids)` -> logits (B, L, V), values (B, L)
    Seq2seq: `forward(input_ids, attention_mask, decoder_input_ids=..., decoder_attention_mask=...)`
             -> decoder logits (B, T, V), values (B, T) (one per decoder position).
    """

    def __init__(self, policy, value_head: ValueHead | None = None, critic=None, with_value: bool = True):
        super().__init__()
        self.policy = policy
        # without a value (critic-free algorithms) the forward is the policy's alone and values are None
        self.value_head = (value_head or ValueHead(hidden_size(critic or policy))) if with_value else None
        self.critic = critic  # optional separate backbone (e.g. the reward model's) for the values
        self.is_encoder_decoder = bool(getattr(policy.config, "is_encoder_decoder", False))

    def tie_weights(self) -> None:
        """Tie the policy's (and critic's) shared weights again, as a transformers model's own method does:
        accelerate's FSDP loading calls it on the module it prepares after moving that to the meta device,
        which unties them (an untied LM head would then train apart from the input embeddings)."""
        for model in (self.policy, self.critic):
            if model is not None and hasattr(model, "tie_weights"):
                model.tie_weights()

    def forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.value_head is None:  # (prompts shared between rows where the inputs say so: lm/shared_prompts.py)
            return shared_prompts.logits(self.policy, inputs), None
        if self.critic is not None:
            logits = self.policy(**inputs, use_cache=False).logits
            hidden = self.critic(**inputs).last_hidden_state
            return logits, self.value_head(hidden)
        out = self.policy(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
        hidden = out.decoder_hidden_states[-1] if self.is_encoder_decoder else out.hidden_states[-1]
        return out.logits, self.value_head(hidden)
