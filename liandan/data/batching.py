"""Encoded examples → training batches (random or length-grouped) → padded tensors with little padding."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from liandan.data.formats import DataFile
from liandan.data.render import IGNORE, Encoded, Encoder
from liandan.errors import LiandanError


@dataclass
class EncodedSet:
    name: str
    format: str
    items: list[Encoded]

    def __len__(self) -> int:
        return len(self.items)


def encode_file(data: DataFile, encoder: Encoder, max_seq_length: int, log=print, long_examples: str | None = None) -> EncodedSet:
    """Encode every example of a file; over-long ones are split (text), truncated (chats) or dropped.

    long_examples None picks the default: split documents into windows (nothing is lost), truncate
    conversations (a split chat would train answers without their question).
    """
    policy = long_examples or ("split" if data.format == "text" else "truncate")  # checked in config.py
    if policy == "split" and data.format != "text":
        log(f"Note: {data.path.name}: --long-examples split applies to text; over-long {data.format} examples are truncated.")
        policy = "truncate"
    encoder.hand_typed.counts.clear()
    items, long_count = [], 0
    for example in data.examples:
        enc = _encode(data, encoder, example, max_seq_length)
        pieces = [enc]
        if len(enc.input_ids) > max_seq_length:
            long_count += 1
            if policy == "drop":
                continue
            if policy == "split":
                pieces = [Encoded(enc.input_ids[i : i + max_seq_length], enc.labels[i : i + max_seq_length], enc.line)
                          for i in range(0, len(enc.input_ids), max_seq_length)]
                pieces = [p for p in pieces if len(p.input_ids) > 1]
            else:
                pieces = [Encoded(enc.input_ids[:max_seq_length], enc.labels[:max_seq_length], enc.line)]
        for piece in pieces:
            if piece.n_trained == 0:
                raise LiandanError(
                    f"{data.path}:{example.line}: no tokens left to train on"
                    + (f" after truncation to --max-seq-length {max_seq_length}" if len(enc.input_ids) > max_seq_length else "")
                )
            items.append(piece)
    name = data.path.name
    if encoder.hand_typed.counts:
        typed = ", ".join(f"'{t}' ×{n}" for t, n in encoder.hand_typed.counts.items())
        log(f"Note: {name} has stop tokens typed by hand ({typed}); liandan removed them and ends every "
            f"answer with '{encoder.stop_token(data.format)}' itself.")
    if long_count:
        done = {"truncate": "truncated", "split": "split into pieces", "drop": "dropped"}[policy]
        log(f"Warning: {name}: {long_count} example(s) longer than --max-seq-length {max_seq_length} were {done}.")
    if not items:
        raise LiandanError(f"{data.path}: no examples left after --long-examples drop")
    return EncodedSet(name, data.format, items)


def _encode(data: DataFile, encoder: Encoder, example, max_seq_length: int) -> Encoded:
    """One example encoded (chats past the limit truncated); a rendering error names the example's file and line."""
    try:
        return encoder.encode(example, limit=max_seq_length)
    except LiandanError as exc:
        where = f"{data.path}:{example.line}: "
        raise (exc if str(exc).startswith(where) else LiandanError(where + str(exc))) from None


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random | None) -> list[list[int]]:
    """Indices sorted by length, cut into batches; the batch order is shuffled when rng is given.

    Same idea as mlx_lm: similar lengths share a batch, so padding stays small. Unlike mlx_lm, the
    examples left over after the full batches are not dropped: the order is the same every epoch, so
    the same (longest) ones would never be trained. They fill a last full batch with their nearest
    neighbours in length, trained twice that epoch (a short batch could not split evenly over processes).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if len(order) % batch_size:
        batches.append(order[-batch_size:])  # the whole order when it is shorter than one batch
    if rng is not None:
        rng.shuffle(batches)
    return batches


def random_batches(n: int, batch_size: int, rng: random.Random) -> list[list[int]]:
    """A random permutation cut into batches. The incomplete last one is left out: each epoch permutes anew, so
    the examples left out differ (length grouping, whose order repeats, fills a last batch instead)."""
    order = list(range(n))
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


# What one more forward + backward pass costs, in padded tokens: set by measurement on the 2-core CPU with
# the embedded model (the six jokes + replay at batch 2 ran 36% slower split into one pass per example
# than padded together). Not measured on GPUs, where a pass's fixed cost (kernel launches) is large next to
# a token's: there the batch stays whole and padded, as in HF Trainer.
PASS_COST_TOKENS = {"cpu": 64, "cuda": 10**9, "mps": 10**9}


def pass_cost_tokens(device) -> int:
    return PASS_COST_TOKENS.get(torch.device(device).type, PASS_COST_TOKENS["cpu"])


def padding_free_groups(items: list[Encoded], pass_cost_tokens: int) -> list[list[Encoded]]:
    """Split one batch into sub-batches where padding would cost more than a pass of its own.

    A random batch mixes lengths (say 40 and 560 tokens): padded together, most of the compute would
    go to padding. The training loop runs each sub-batch's forward and backward pass and normalises by
    the trained tokens of the whole step, so the gradient is exactly the padded batch's. Going from the
    longest example down, an example joins the current sub-batch when the padding it needs (the
    sub-batch's width minus its length) costs fewer tokens than a separate pass."""
    groups: list[list[Encoded]] = []
    for item in sorted(items, key=lambda x: -len(x.input_ids)):
        if groups and len(groups[-1][0].input_ids) - len(item.input_ids) <= pass_cost_tokens:
            groups[-1].append(item)  # groups[-1][0] is the longest of its group: the padded width
        else:
            groups.append([item])
    return groups


def collate(items: list[Encoded], pad_id: int, device) -> dict:
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        mask[row, :n] = 1
    batch = {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
    if any(item.soft is not None for item in items):
        # Soft targets (replay with --kl-weight), one row per trained position in supervised_loss's order
        # (row-major over labels[:, 1:]); soft_mask says which trained positions have one.
        soft_ids, soft_logp, soft_mask = [], [], []
        for item in items:
            soft_mask += [item.soft is not None] * item.n_trained
            if item.soft is not None:
                soft_ids += item.soft[0]
                soft_logp += item.soft[1]
        batch.update(soft_ids=torch.tensor(soft_ids, dtype=torch.long, device=device),
                     soft_logp=torch.tensor(soft_logp, dtype=torch.float32, device=device),
                     soft_mask=torch.tensor(soft_mask, dtype=torch.bool, device=device))
    return batch


def iterate_batches(data: EncodedSet, batch_size: int, seed: int, start_epoch: int = 0,
                    replay: list[Encoded] | None = None, pick_replay=None, order: str = "random"):
    """Endless training batches, (epoch, list of indices), reshuffled each epoch. order "random": random draws
    of examples; "length": batches of similar lengths (mlx_lm's), in random order.

    With `replay` (liandan.replay), each epoch also mixes in the items `pick_replay(epoch_rng)` chooses
    (positions in `replay`, e.g. replay.replay_indices); their batch indices continue after the data's
    (len(data) + position in replay)."""
    lengths = [len(x.input_ids) for x in data.items]
    n = len(lengths)
    if n < batch_size:
        raise LiandanError(
            f"{data.name} has {n} example(s), fewer than --batch-size {batch_size}; "
            "lower --batch-size or add examples"
        )
    replay = replay or []
    epoch = start_epoch
    while True:
        rng = random.Random(seed * 1_000_003 + epoch)
        pool = list(range(n)) + [n + j for j in (pick_replay(rng) if replay and pick_replay else [])]
        if order == "random":
            cut = random_batches(len(pool), batch_size, rng)
        else:
            pool_lengths = [lengths[i] if i < n else len(replay[i - n].input_ids) for i in pool]
            cut = length_grouped_batches(pool_lengths, batch_size, rng)
        for batch in cut:
            yield epoch, [pool[k] for k in batch]
        epoch += 1


def eval_batches(data: EncodedSet, batch_size: int, max_batches: int) -> list[list[int]]:
    """Fixed-order batches for validation/test; max_batches -1 means the whole set."""
    lengths = [len(x.input_ids) for x in data.items]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return batches if max_batches < 0 else batches[:max_batches]
