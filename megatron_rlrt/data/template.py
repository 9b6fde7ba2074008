"""Prompt rendering: the tokenizer's own chat template (Qwen3: ``enable_thinking``), an optional
system prompt and an instruction suffix, to text and token ids.

The token ids are the tokenization of the rendered text with ``add_special_tokens=False``,
which is what ``tokenizer.apply_chat_template(..., tokenize=True)`` returns (tested). The
trainer renders teacher prompts through the same :meth:`PromptRenderer.render_messages`, so
student and teacher views differ only in their content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

Messages = list[dict[str, str]]

ROLES = ("system", "user", "assistant")


@dataclass
class TemplateConfig:
    apply_chat_template: bool = True
    """False: plain text (messages' contents joined by blank lines) for models without a template."""
    enable_thinking: bool | None = None
    """Qwen3: True lets the model think, False makes the template close an empty think block;
    None leaves the template's default."""
    system_prompt: str | None = None
    """Added as the first message when the prompt has no system message of its own."""
    instruction: str | None = None
    """Appended to the last user message, e.g.
    "Please reason step by step, and put your final answer within \\boxed{}."."""
    instruction_separator: str = "\n\n"


def to_messages(prompt: str | Sequence[dict[str, Any]]) -> Messages:
    """A string becomes one user message; a message list is copied (role/content only)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


class PromptRenderer:
    def __init__(self, tokenizer: Any, config: TemplateConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or TemplateConfig()
        if self.config.apply_chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; set TemplateConfig(apply_chat_template=False) "
                "to feed plain text prompts"
            )

    def build_messages(self, prompt: str | Sequence[dict[str, Any]]) -> Messages:
        """The messages that will be rendered: system prompt and instruction applied."""
        cfg = self.config
        messages = to_messages(prompt)
        if cfg.instruction:
            for m in reversed(messages):
                if m["role"] == "user":
                    m["content"] = m["content"].rstrip() + cfg.instruction_separator + cfg.instruction
                    break
        if cfg.system_prompt and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": cfg.system_prompt})
        return messages

    def render_messages(self, messages: Messages) -> str:
        """Text of ``messages`` with the generation prompt (assistant turn opened)."""
        cfg = self.config
        if not cfg.apply_chat_template:
            return "\n\n".join(m["content"] for m in messages) + "\n\n"
        kwargs: dict[str, Any] = {}
        if cfg.enable_thinking is not None:
            kwargs["enable_thinking"] = cfg.enable_thinking
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs
        )

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of already-rendered texts (batched: the fast tokenizer runs in Rust)."""
        if not texts:
            return []
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def render(self, prompt: str | Sequence[dict[str, Any]]) -> tuple[Messages, str, list[int]]:
        """(messages, text, token ids) of one prompt."""
        messages = self.build_messages(prompt)
        text = self.render_messages(messages)
        return messages, text, self.encode([text])[0]
