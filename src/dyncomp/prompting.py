"""The one prompt format shared by training, teacher-forced scoring and generation."""

from __future__ import annotations

INSTRUCTION = "Solve the following math problem step by step. End with the final answer on its own line as '#### <number>'."


def chat_messages(question: str) -> list[dict]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{question.strip()}"}]


def format_prompt(tokenizer, question: str) -> str:
    """Return the chat-formatted prompt up to the start of the assistant's reply.

    Tokenizers without a chat template (base models) get the plain instruction and
    question followed by 'Answer:'.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat_messages(question), tokenize=False, add_generation_prompt=True)
    return f"{INSTRUCTION}\n\nQuestion: {question.strip()}\nAnswer:"
