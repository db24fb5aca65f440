"""A stand-in for vLLM's offline API (`LLM`, `SamplingParams`) built on transformers, so that `VLLMSampler` runs
on a CPU in tests: the engine is a Hugging Face model loaded from the folder it is given; its `load_weights`
copies tensors by checkpoint name and refuses a name the model lacks (as vLLM's loaders do); `generate`
samples each prompt with HF `generate` under the SamplingParams, and returns the tokens with the stop token
included, as vLLM does (`LLM.drop_stop_token = True` leaves it out, to test the sampler's repair).
"""

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

__version__ = "0.0+fake"


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.__dict__.update(kwargs)


class EngineModel:
    def __init__(self, hf):
        self.hf, self.loads = hf, []

    def load_weights(self, weights):
        params, names = dict(self.hf.named_parameters()), []
        for name, tensor in weights:
            if name not in params:
                raise KeyError(f"the engine's model has no weight {name!r}")
            params[name].data.copy_(tensor)
            names.append(name)
        self.loads.append(names)


class LLM:
    instances: list = []
    drop_stop_token = False

    def __init__(self, model: str, **kwargs):
        self.kwargs = kwargs
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, kwargs["dtype"])).eval()
        self.engine_model = EngineModel(hf)
        runner = SimpleNamespace(model=self.engine_model)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(model_runner=runner)))
        self.prefix_cache_resets = 0
        LLM.instances.append(self)

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        p, outputs = sampling_params, []
        stop = p.stop_token_ids[0] if p.stop_token_ids else None
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            out = self.engine_model.hf.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=p.temperature,
                top_k=max(p.top_k, 0), top_p=p.top_p, max_new_tokens=p.max_tokens, min_new_tokens=p.min_tokens or None,
                eos_token_id=stop, pad_token_id=stop if stop is not None else 0,
            )[0, ids.shape[1]:].tolist()
            stopped = stop is not None and stop in out
            if stopped:
                out = out[: out.index(stop) + (0 if LLM.drop_stop_token else 1)]
            finish = SimpleNamespace(token_ids=out, finish_reason="stop" if stopped else "length")
            outputs.append(SimpleNamespace(prompt_token_ids=prompt["prompt_token_ids"], outputs=[finish]))
        return outputs
