"""`VLLMSampler`: rollouts sampled by a vLLM engine that sits beside training on each GPU (`generation.backend:
vllm`), with the policy's current weights pushed into it before each rollout.

- One engine per training process, on that process's GPU (vLLM's `external_launcher`: it joins the process
  group the launcher made; tensor parallel size 1), holding `generation.vllm_gpu_memory_utilization` of it.
- Weights: the engine starts from a folder written from the policy as it is at start-up (so `builtin:` models,
  hub names and LoRA adapters all work), and after any optimizer step the next `sample` pushes every weight
  again under its Hugging Face checkpoint name, a LoRA adapter folded in out of place (W + scale B A: the
  training weights are never merged and unmerged).
- Sampling settings: temperature, top-k, top-p, response_length, min_response_length and the stop token as
  the HF backend uses them. The engine's log-probs are not used: `sample` returns none, so the trainer takes
  the rollout's old log-probs (and values) from one forward of the policy, in its own precision -- the
  log-probs the update's ratio needs, with no importance correction between two engines' numerics.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Iterator

import torch
from safetensors.torch import save_file

from rlhf_cli.errors import UserError
from rlhf_cli.lm.sampler import Sampler
from rlhf_cli.training.sharding import params_partitioned

log = logging.getLogger(__name__)

INSTALL = "pip install 'rlhf-cli[vllm]'"


def import_vllm():
    try:
        import vllm
    except ImportError as error:
        raise UserError(f"generation.backend: vllm needs the vllm package, which is not installed here ({error}); "
                        f"{INSTALL}, or use backend hf.") from error
    return vllm


def on_gpu(accelerator) -> bool:
    return accelerator.device.type == "cuda"


def check_vllm_backend(accelerator, model) -> None:
    """Exit 2 for what the vLLM backend cannot do, before any engine is built."""
    if not on_gpu(accelerator):
        raise UserError(f"generation.backend: vllm needs a CUDA GPU, and this process runs on {accelerator.device.type}; "
                        "use backend hf.")
    if model.is_encoder_decoder:
        raise UserError("generation.backend: vllm samples causal LMs only; this policy is an encoder-decoder model "
                        f"({model.policy.config.model_type}); use backend hf.")
    if params_partitioned(accelerator):
        raise UserError(f"generation.backend: vllm runs beside training whose processes hold whole weights (one "
                        f"process, data parallel, ZeRO-2); under {accelerator.distributed_type.value} with sharded "
                        "parameters they would have to be gathered for every push, which is not built yet; use "
                        "backend hf, or launch with data parallel.")


def checkpoint_weights(policy) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight of `policy` under its Hugging Face checkpoint name, tied weights once.

    A PEFT model yields its base model's weights with the active LoRA adapters added (W + delta, computed
    apart from W), and a `modules_to_save` module's trained copy under the original name.
    """
    if not hasattr(policy, "get_base_model"):
        for name, param in policy.named_parameters():
            yield name, param.detach()
        return
    base = policy.get_base_model()
    for name, param in base.named_parameters():
        if ".lora_" in name or ".original_module." in name:
            continue  # adapter factors (folded in below) and the frozen copy a trained modules_to_save replaces
        if ".base_layer." in name:
            owner_name, leaf = name.split(".base_layer.")
            owner = base.get_submodule(owner_name)
            if leaf == "weight":
                delta = sum(owner.get_delta_weight(a) for a in owner.active_adapters if a in owner.scaling)
                yield f"{owner_name}.weight", (param + delta).detach()
            else:
                yield f"{owner_name}.{leaf}", param.detach()
            continue
        yield name.replace(".modules_to_save.default.", "."), param.detach()


def engine_dtype(accelerator, policy) -> str:
    """The engine samples in the precision the update computes in: bf16/fp16 under mixed precision."""
    precision = {"bf16": "bfloat16", "fp16": "float16"}.get(str(accelerator.mixed_precision))
    return precision or str(next(policy.parameters()).dtype).removeprefix("torch.")


def sampling_params(vllm, gen, stop_id: int | None):
    """vLLM's SamplingParams for `generation` (GenerationConfig). The stop token is given by id (the engine
    has no tokenizer), and only that token stops a response, as in the HF backend."""
    return vllm.SamplingParams(
        n=1, temperature=gen.temperature, top_k=gen.top_k or -1, top_p=gen.top_p,
        max_tokens=gen.response_length, min_tokens=gen.min_response_length,
        stop_token_ids=[stop_id] if stop_id is not None else None, ignore_eos=True,
        detokenize=False,
    )


def launcher_environment(accelerator) -> None:
    """vLLM's external launcher joins the process group from the torch.distributed variables; a run without
    a launcher (one process) has none, so they are filled in for a group of one."""
    os.environ.setdefault("RANK", str(accelerator.process_index))
    os.environ.setdefault("LOCAL_RANK", str(accelerator.local_process_index))
    os.environ.setdefault("WORLD_SIZE", str(accelerator.num_processes))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


class VLLMSampler(Sampler):
    def __init__(self, model, gen, stop_id: int | None, max_prompt_length: int, accelerator, seed: int):
        """`model`: the PolicyWithValue being trained (unwrapped); `gen`: the OnlineGenerationConfig."""
        vllm = import_vllm()
        check_vllm_backend(accelerator, model)
        self.policy, self.stop_id, self.device = model.policy, stop_id, accelerator.device
        self.params = sampling_params(vllm, gen, stop_id)
        launcher_environment(accelerator)
        # the engine starts from a folder of the policy as it is now (any source, a LoRA adapter folded in)
        with tempfile.TemporaryDirectory(prefix="rlhf-vllm-") as folder:
            self.policy.config.save_pretrained(folder)
            save_file({name: t.contiguous() for name, t in checkpoint_weights(self.policy)},
                      os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
            self.llm = vllm.LLM(
                model=folder, skip_tokenizer_init=True, dtype=engine_dtype(accelerator, self.policy),
                gpu_memory_utilization=gen.vllm_gpu_memory_utilization,
                max_model_len=max_prompt_length + gen.response_length,
                tensor_parallel_size=1, distributed_executor_backend="external_launcher",
                seed=seed + accelerator.process_index,  # each process samples its own rows
            )
        self.stale = False  # the engine holds the weights it was built from
        self.pushes = 0
        log.info("generation backend: vLLM %s on %s, %.0f%% of its memory", vllm.__version__, accelerator.device,
                 100 * gen.vllm_gpu_memory_utilization)

    def weights_updated(self) -> None:
        self.stale = True  # pushed lazily, once, before the next rollout

    def push_weights(self) -> None:
        engine_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        with torch.no_grad():
            engine_model.load_weights(checkpoint_weights(self.policy))
        self.llm.reset_prefix_cache()  # cached prompt states were computed with the old weights
        self.stale, self.pushes = False, self.pushes + 1

    @torch.no_grad()
    def sample(self, query_ids, query_mask, chunk: int, pad_id: int):
        if self.stale:
            self.push_weights()
        prompts = [{"prompt_token_ids": ids[mask.bool()].tolist()} for ids, mask in zip(query_ids, query_mask, strict=True)]
        outputs = self.llm.generate(prompts, sampling_params=self.params, use_tqdm=False)  # the engine batches itself
        rows = [list(out.outputs[0].token_ids) for out in outputs]
        for row, out in zip(rows, outputs, strict=True):
            if out.outputs[0].finish_reason == "stop" and self.stop_id is not None and row[-1:] != [self.stop_id]:
                row.append(self.stop_id)  # a stop the engine left out of the tokens: the response did end there
        width = max(1, max(len(r) for r in rows))
        responses = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            responses[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return responses.to(self.device), None, None
