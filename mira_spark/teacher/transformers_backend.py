"""The `transformers` backend: a local Hugging Face causal LM (teacher.model is a path or a hub id), prompted
through its own chat template, greedy unless teacher.temperature > 0.

The model loads once per Python process (the driver, or each Spark worker: on a GPU cluster each worker's
GPU holds one copy). It has no constrained decoding: replies go through the same validation and repair
requests as any other backend. Token counts are exact (the model's own tokenizer); cost uses the configured
prices, which are usually zero for a local model.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from mira_spark.teacher.base import CallFailed, Completion, PreparedCall, TeacherSettings
from mira_spark.teacher.secrets import TeacherConfigError

log = logging.getLogger(__name__)

_MODELS: dict[tuple[str, str], tuple[Any, Any]] = {}
_LOAD_LOCK = threading.Lock()


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str, device: str) -> tuple[Any, Any]:
    """(tokenizer, model) for a path or hub id, loaded once per process and device."""
    key = (model, device)
    with _LOAD_LOCK:
        if key not in _MODELS:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(model)
                lm = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
            except OSError as exc:
                raise TeacherConfigError(f"teacher.model {model!r}: cannot load a causal LM and tokenizer "
                                         f"({type(exc).__name__}: {str(exc)[:300]})") from None
            if not getattr(tokenizer, "chat_template", None):
                raise TeacherConfigError(f"teacher.model {model!r}: its tokenizer has no chat template; use an "
                                         "instruction-tuned model (or add a chat_template to tokenizer_config.json)")
            lm.to(device).eval()
            _MODELS[key] = (tokenizer, lm)
            log.info("teacher model %s loaded on %s", model, device)
    return _MODELS[key]


class TransformersBackend:
    name = "transformers"
    concurrency = 1  # one generate() at a time per process; parallelism comes from Spark partitions

    def __init__(self, settings: TeacherSettings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.tokenizer, self.model = load_model(settings.model, self.device)

    def complete(self, call: PreparedCall, messages: list[dict[str, str]]) -> Completion:
        import torch

        try:
            inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                        return_dict=True)
            # Only what a causal LM takes (BERT-style tokenizers add token_type_ids, which generate() rejects).
            inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
            n_in = int(inputs["input_ids"].shape[-1])
            sample = self.settings.temperature > 0
            kwargs: dict[str, Any] = {"max_new_tokens": self.settings.max_output_tokens, "do_sample": sample}
            if sample:
                kwargs["temperature"] = self.settings.temperature
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
                else self.tokenizer.eos_token_id
            with torch.no_grad():
                output = self.model.generate(**inputs, pad_token_id=pad, **kwargs)
            new_tokens = output[0, n_in:]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
        except Exception as exc:  # generation errors (out of memory, a template error) fail this call only
            raise CallFailed(f"generation failed: {type(exc).__name__}: {str(exc)[:300]}", attempts=1) from None
        return Completion(text=text, tokens_in=n_in, tokens_out=int(new_tokens.shape[-1]))

    def close(self) -> None:
        pass  # the model stays loaded for the next task in this worker
