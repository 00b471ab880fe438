"""Loss, perplexity and the exact-answer score.

The loss is computed only where labels are trained: the hidden states of the other positions
never reach the LM head, so no batch x sequence x vocabulary logits tensor is built. With
Qwen's 151k-token vocabulary that tensor would dominate time and memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from liandan.data.batching import EncodedSet, collate, eval_batches
from liandan.data.render import IGNORE
from liandan.models import unwrap

LOSS_EXPLAINED = (
    "What the loss means: it is the mean negative log-likelihood (natural log) per trained token, i.e. how "
    "surprised the model is, on average, by each answer token; 0 is perfect, and perplexity = e^loss is roughly "
    "the number of tokens it hesitates between. It is not a count of failed examples."
)


def supervised_loss(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Sum of token losses over trained positions, and how many there are."""
    loss, n, _ = loss_terms(model, batch)
    return loss, n


def trained_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict each trained label (n x vocab, as inference sees them), those n labels, and the
    batch row of each."""
    base = unwrap(model)
    hidden = base.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )[0]
    labels = batch["labels"][:, 1:]  # position t predicts token t + 1
    selected = labels != IGNORE
    logits = base.get_output_embeddings()(hidden[:, :-1][selected])
    config = base.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3 squash logits; training must see what inference sees
        logits = torch.tanh(logits / cap) * cap
    scaling = getattr(config, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    return logits, labels[selected], selected.nonzero()[:, 0]


def loss_terms(model, batch: dict, with_kl: bool = False,
               learned_prob: float = 0.0) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """(cross-entropy sum over trained positions, their count, KL sum or None).

    The KL term exists when with_kl and the batch has soft targets (replay examples, see
    data.batching.collate): KL(base ‖ model) at those positions, the base distribution being its
    renormalised top-k. With learned_prob > 0, a token the model already predicts with at least that
    probability adds its loss to the sum but no gradient (see learned_tokens_stop)."""
    logits, targets, _ = trained_logits(model, batch)
    n = len(targets)
    if n == 0:
        return logits.sum() * 0.0, 0, None
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    loss = learned_tokens_stop(per_token, learned_prob).sum()
    kl = None
    if with_kl and batch.get("soft_mask") is not None and bool(batch["soft_mask"].any()):
        log_q = logits[batch["soft_mask"]].float().log_softmax(-1).gather(-1, batch["soft_ids"])
        p = batch["soft_logp"].exp()
        p = p / p.sum(-1, keepdim=True)
        kl = (p * (p.clamp_min(1e-12).log() - log_q)).sum()
    return loss, n, kl


def learned_tokens_stop(per_token: torch.Tensor, learned_prob: float) -> torch.Tensor:
    """The same per-token losses, without gradient where the token's probability is already ≥ learned_prob.

    Pushing a token the model already gets right only grows the weights further, and that drift is what costs
    general answers: trained on ten of its own answers (nothing new to learn), the embedded model lost 18 of
    158 held-out answers with replay on (benchmarks/forgetting.py --datasets self). The values stay, so the
    reported loss is the true one."""
    if not learned_prob or not per_token.requires_grad:
        return per_token
    learned = per_token <= -math.log(learned_prob)
    return torch.where(learned, per_token.detach(), per_token)


@torch.no_grad()
def evaluate_loss(model, data: EncodedSet, batch_size: int, max_batches: int, pad_id: int, device,
                  forward=None) -> tuple[float, int]:
    """Mean loss per trained token over (up to max_batches of) a set.

    `forward(batch) -> (loss sum, tokens)` replaces supervised_loss (training validates through its own, which
    also works when the model is wrapped in DDP/FSDP)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(data, batch_size, max_batches):
        inputs = collate([data.items[i] for i in batch], pad_id, device)
        loss, n = forward(inputs) if forward else supervised_loss(model, inputs)
        total += float(loss)
        count += n
    model.train(was_training)
    return (total / count if count else float("nan")), count


@dataclass
class AnswerCheck:
    prompt: str
    expected: str
    got: str
    stopped: bool

    @property
    def exact(self) -> bool:
        return self.stopped and self.got.strip() == self.expected.strip()


def exact_answers(model, tokenizer, encoder, examples, device, stop_ids) -> list[AnswerCheck]:
    """Greedy-generate each example's last answer from its prompt and compare with the expected text."""
    from liandan.data.template import split_reasoning
    from liandan.generate import generate
    from liandan.reasoning import split_text, splitter_for

    checks = []
    for example in examples:
        if example.messages is None:
            continue
        messages = [encoder.clean_message(m) for m in example.messages]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        expected, reasoning = split_reasoning(messages[last])
        prompt_ids = encoder.prompt_ids(messages[:last], example.tools)
        splitter = splitter_for(encoder)
        # Room for the answer, and for the (empty or trained) think block of a thinking template.
        budget = len(tokenizer((reasoning or "") + expected, add_special_tokens=False)["input_ids"]) + (16 if splitter else 8)
        result = generate(model, prompt_ids, max_tokens=budget, stop_ids=stop_ids, device=device)
        prompt = next((m["content"] for m in reversed(messages[:last]) if m["role"] == "user"), "")
        got = split_text(splitter, tokenizer.decode(result.tokens, skip_special_tokens=False))[1]
        checks.append(AnswerCheck(prompt, expected, got, result.stopped))
    return checks


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
