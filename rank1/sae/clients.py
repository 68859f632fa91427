"""Chat clients for auto-interpretation: any OpenAI-compatible endpoint, or a local transformers model.

Both take OpenAI-style messages and return the reply text. The API key is read from an environment
variable at call time and is never stored in outputs.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from rank1.sae.errors import SAEError


class ChatClient(Protocol):
    def complete(self, messages: list[dict], max_tokens: int = 256) -> str: ...

    def describe(self) -> dict: ...


@dataclass
class OpenAIChatClient:
    """POST {base_url}/chat/completions, e.g. base_url='https://api.example.com/v1'."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    temperature: float = 0.0

    def complete(self, messages: list[dict], max_tokens: int = 256) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": self.temperature}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                reply = json.loads(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise SAEError(f"--base-url {self.base_url}: HTTP {e.code} from the chat endpoint ({detail})") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise SAEError(f"--base-url {self.base_url}: cannot reach the chat endpoint ({e})") from None
        except json.JSONDecodeError:
            raise SAEError(f"--base-url {self.base_url}: the reply is not JSON") from None
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise SAEError(f"--base-url {self.base_url}: the reply has no choices[0].message.content") from None

    def describe(self) -> dict:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env}


class TransformersChatClient:
    """A local chat model (greedy decoding) loaded with transformers."""

    def __init__(self, path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()

    def complete(self, messages: list[dict], max_tokens: int = 256) -> str:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = self.model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def describe(self) -> dict:
        return {"kind": "transformers", "model": self.path}
