"""Turn examples into token ids and loss labels: chat template, stop token, prompt masking.

The prompt format is decided here once, kept in a `Rendering`, saved with the adapters and
reused by generate/chat/serve/fuse/export. Two rules prevent the "never stops" trap:

* every trained answer ends with the token that ends a turn in this template (`<|im_end|>` for
  ChatML, `<|eot_id|>` for Llama 3, ...), appended when the rendering lacks it;
* a stop token typed into the data by hand (`<|endoftext|>` as in many blog posts) is
  recognised and removed before that, so it is never doubled or trained as plain text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from liandan.errors import LiandanError

IGNORE = -100  # label value excluded from the loss (PyTorch's cross_entropy default)

# Used when a model has no chat template (most base models). Documented in the README.
PLAIN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '### Assistant:\\n' }}{%- endif -%}"
)

_PROBE = "LIANDAN_PROBE_ANSWER"


@dataclass
class Rendering:
    """How prompts and answers become text. Saved as part of the adapter record."""

    chat_template: str
    stop_tokens: list[str]
    system_prompt: str | None = None
    template_source: str = "model"  # "model" or "plain"
    prompt_style: str = "chat"  # "chat" (template) or "raw" (the model trained on plain text)
    eos_token: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Rendering":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def make_rendering(tokenizer, system_prompt: str | None = None) -> Rendering:
    """Choose the template and find which token ends an assistant turn in it."""
    template = tokenizer.chat_template
    source = "model"
    if not template or not isinstance(template, str):
        if tokenizer.eos_token is None:
            raise LiandanError("the tokenizer has neither a chat template nor an end-of-sequence token")
        template, source = PLAIN_CHAT_TEMPLATE, "plain"
    stop = _turn_end_token(tokenizer, template)
    return Rendering(template, [stop], system_prompt, source, "chat", tokenizer.eos_token)


def rendering_of(record: dict, tokenizer, system_prompt: str | None = None) -> Rendering:
    """The rendering saved in an adapter or fused model's record, else the tokenizer's own template.
    A system_prompt given here overrides the recorded one."""
    if not record.get("rendering"):
        return make_rendering(tokenizer, system_prompt)
    rendering = Rendering.from_dict(record["rendering"])
    if system_prompt is not None:
        rendering.system_prompt = system_prompt
    return rendering


def special_tokens(tokenizer) -> list[str]:
    """Strings of all special tokens (control tokens) of a tokenizer, longest first."""
    found = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            found.add(str(token))
    return sorted((t for t in found if t), key=len, reverse=True)


def _turn_end_token(tokenizer, template: str) -> str:
    """The first special token the template writes after an assistant answer."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    text = render_text(tokenizer, template, conversation, add_generation_prompt=False)
    after = text[text.rfind(_PROBE) + len(_PROBE):]
    specials = special_tokens(tokenizer)
    best = None
    for token in specials:
        pos = after.find(token)
        if pos >= 0 and (best is None or pos < best[0]):
            best = (pos, token)
    if best is not None:
        return best[1]
    if tokenizer.eos_token is None:
        raise LiandanError("cannot tell which token ends an answer: the chat template writes none and there is no EOS token")
    return tokenizer.eos_token


def render_text(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool, tools=None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:
        raise LiandanError(f"the chat template failed to render: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    line: int = 0
    # Replay examples only: the base model's top-k (token ids, log-probs) at each trained position, for --kl-weight.
    soft: tuple[list[list[int]], list[list[float]]] | None = None

    @property
    def n_trained(self) -> int:
        """Positions that count in the loss: a label predicts the next token, so the first one never does."""
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class HandTypedStops:
    """Counts stop tokens that users typed into their data, to report them once per file."""

    counts: Counter = field(default_factory=Counter)

    def strip(self, text: str, specials: list[str]) -> str:
        """Remove special tokens typed at the end of a field (and the whitespace around them)."""
        changed = True
        while changed:
            changed = False
            stripped = text.rstrip()
            for token in specials:
                if stripped.endswith(token):
                    self.counts[token] += 1
                    text, changed = stripped[: -len(token)], True
                    break
        return text


class Encoder:
    """Encodes examples of any format into (input_ids, labels) with one fixed Rendering."""

    def __init__(self, tokenizer, rendering: Rendering, mask_prompt: bool = True):
        self.tokenizer = tokenizer
        self.rendering = rendering
        self.mask_prompt = mask_prompt
        self.specials = special_tokens(tokenizer)
        self.hand_typed = HandTypedStops()

    # -- prompts (shared with generation, so inference sees exactly the training prefix) --
    def prompt_messages(self, messages: list[dict]) -> list[dict]:
        if self.rendering.system_prompt and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.rendering.system_prompt}] + list(messages)
        return list(messages)

    def prompt_ids(self, messages: list[dict], tools=None) -> list[int]:
        text = render_text(self.tokenizer, self.rendering.chat_template, self.prompt_messages(messages), True, tools)
        return self._tokenize(text)

    def _tokenize(self, text: str) -> list[int]:
        # The template already contains BOS and friends where the model wants them.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- training examples --
    def encode_text(self, text: str, line: int = 0) -> Encoded:
        text = self.hand_typed.strip(text, self.specials)
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids = ids + [eos]
        return Encoded(ids, list(ids), line)

    def encode_chat(self, messages: list[dict], tools=None, line: int = 0) -> Encoded:
        messages = self.prompt_messages([self.clean_message(m) for m in messages])
        template = self.rendering.chat_template
        stop = self.rendering.stop_tokens[0]
        ids: list[int] = []
        labels: list[int] = []
        done = ""  # rendered text already turned into tokens
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not self._prefix_stable(messages, turns, tools):
            turns = turns[-1:]  # templates that rewrite history (e.g. drop old reasoning): train the last turn only
        for i in turns:
            prompt = render_text(self.tokenizer, template, messages[:i], True, tools)
            full = render_text(self.tokenizer, template, messages[: i + 1], False, tools)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise LiandanError("the chat template renders a conversation differently from its beginning; cannot mask prompts")
            answer = full[len(prompt):]
            end = answer.find(stop)
            answer = answer[: end + len(stop)] if end >= 0 else answer.rstrip() + stop
            prompt_ids = self._tokenize(prompt[len(done):])
            answer_ids = self._tokenize(answer)
            ids += prompt_ids + answer_ids
            labels += ([IGNORE] * len(prompt_ids) if self.mask_prompt else prompt_ids) + answer_ids
            done = prompt + answer
        return Encoded(ids, labels, line)

    def _prefix_stable(self, messages, turns, tools) -> bool:
        if len(turns) < 2:
            return True
        first = render_text(self.tokenizer, self.rendering.chat_template, messages[: turns[0] + 1], False, tools)
        whole = render_text(self.tokenizer, self.rendering.chat_template, messages, False, tools)
        return whole.startswith(first.rstrip())

    def clean_message(self, message: dict) -> dict:
        """The message with stop tokens typed at the end of its content removed (counted in hand_typed)."""
        content = message.get("content")
        if isinstance(content, str):
            message = dict(message, content=self.hand_typed.strip(content, self.specials))
        return message

    def stop_token(self, fmt: str) -> str:
        """The token that ends a trained example of this format: the turn end for chats, EOS for text."""
        return self.tokenizer.eos_token if fmt == "text" else self.rendering.stop_tokens[0]

    def encode(self, example) -> Encoded:
        if example.text is not None:
            return self.encode_text(example.text, example.line)
        return self.encode_chat(example.messages, example.tools, example.line)


def stop_token_ids(tokenizer, model, rendering, extra_eos: list[str] | None = None) -> list[int]:
    """The trained stop token(s), the model's own EOS ids, and any --extra-eos-token."""
    ids = set()
    for token in list(rendering.stop_tokens) + list(extra_eos or []):
        encoded = tokenizer.convert_tokens_to_ids(token)
        if isinstance(encoded, int) and encoded != tokenizer.unk_token_id:
            ids.add(encoded)
        else:
            pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise LiandanError(f"--extra-eos-token {token!r} is not a single token of this tokenizer")
            ids.add(pieces[0])
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in eos if isinstance(eos, list) else [eos]:
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
