"""The in-process engine: transformers + PEFT in this Python process (no server to start)."""

from __future__ import annotations

import threading

from agent.protocol import Completion
from serving.engines import Capabilities, EngineError
from trainer.base_model import building, load_causal_lm


class TransformersEngine:
    name = "transformers"
    capabilities = Capabilities()

    def __init__(self, model_path: str):
        self.model_path = model_path
        self._lock = threading.Lock()  # one generation at a time; adapters switch between them
        self._model = None
        self._tokenizer = None
        self._adapters: dict[str, str] = {}

    def start(self) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._model = load_causal_lm(self.model_path).eval()

    def stop(self) -> None:
        self._model = None

    def alive(self) -> bool:
        return self._model is not None

    def follow(self, adapter: str | None, path: str | None) -> None:
        pass  # every adapter is served as loaded

    def prepare(self, adapter: str | None, path: str | None) -> None:
        pass

    def status(self) -> dict:
        return {}

    def restart(self) -> None:
        adapters = dict(self._adapters)
        self._adapters.clear()
        self.start()
        for name, path in adapters.items():
            self.load_adapter(name, path)

    def adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock, building():
            if name in self._adapters:
                return
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(path, adapter_name=name)
            else:
                self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name)
            self._model.eval()
            self._adapters[name] = path

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name not in self._adapters:
                return
            del self._adapters[name]
            if self._adapters:
                if self._model.active_adapter == name:
                    self._model.set_adapter(next(iter(self._adapters)))
                self._model.delete_adapter(name)
            else:  # the last one: back to the plain model
                self._model = self._model.unload()

    def _using(self, adapter: str | None):
        """A context in which the model is the base (None) or has `adapter` active; hold the lock."""
        import contextlib

        from peft import PeftModel

        if self._model is None:
            raise EngineError("the transformers engine is not started")
        if adapter is not None and adapter not in self._adapters:
            raise EngineError(f"adapter {adapter!r} is not loaded")
        if not isinstance(self._model, PeftModel):
            return contextlib.nullcontext()
        if adapter is None:
            return self._model.disable_adapter()
        self._model.set_adapter(adapter)
        return contextlib.nullcontext()

    def agreement(self, prompt_ids: list[int], answer_ids: list[int], adapter: str | None = None) -> int:
        """How many of `answer_ids` the model predicts as its top token, teacher-forced after `prompt_ids`."""
        import torch

        ids = torch.tensor([prompt_ids + answer_ids])
        with self._lock, torch.inference_mode(), self._using(adapter):
            predicted = self._model(input_ids=ids).logits[0].argmax(-1)
        guess = predicted[len(prompt_ids) - 1 : len(prompt_ids) + len(answer_ids) - 1]
        return int((guess == torch.tensor(answer_ids)).sum())

    def stream(self, messages, *, adapter=None, max_tokens=256, temperature=0.0):
        """Text pieces as `generate` produces them (TextIteratorStreamer, generation in a thread)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict = {}

        def generate():
            try:
                result["completion"] = self.complete(messages, adapter=adapter, max_tokens=max_tokens,
                                                     temperature=temperature, streamer=streamer)
            except BaseException as e:  # handed to the caller below
                result["error"] = e
                streamer.end()

        worker = threading.Thread(target=generate, name="ratchet-generate", daemon=True)
        worker.start()
        started = False
        for text in streamer:
            if not started:
                text = text.lstrip()
                started = bool(text)
            if text:
                yield text
        worker.join()
        if "error" in result:
            raise result["error"]
        yield result["completion"]

    def complete(self, messages, *, adapter=None, max_tokens=256, temperature=0.0, streamer=None) -> Completion:
        import torch

        tok = self._tokenizer
        inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with self._lock, torch.inference_mode():
            with self._using(adapter):
                out = self._model.generate(
                    **inputs, max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                    streamer=streamer, **sampling,
                )
        new = out[0, inputs["input_ids"].shape[1] :]
        finished = len(new) and int(new[-1]) in _eos_ids(self._model, tok)
        return Completion(
            text=tok.decode(new, skip_special_tokens=True).strip(),
            prompt_tokens=int(inputs["input_ids"].shape[1]),
            completion_tokens=int(len(new)),
            finish_reason="stop" if finished or len(new) < max_tokens else "length",
        )


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
