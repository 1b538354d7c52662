"""Finetune datasets: records in, token sequences with a loss mask out.

A LoRA adapter is only useful if it is trained on exactly the token sequences the server later feeds the
model, so every format is tokenized the way inference tokenizes it:

- ``{"prompt": str, "completion": str}``: ``tokenizer(prompt)`` *with* the tokenizer's special tokens (BOS),
  as the server tokenizes a completion request's prompt, then the completion tokenized on its own without
  special tokens, then EOS. Targets: the completion and the EOS. The two parts are tokenized separately on
  purpose: at inference the model continues the prompt's tokens, it never sees the merged tokenization.
- ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``: rendered with the
  tokenizer's chat template (or ``PLAIN_CHAT_TEMPLATE`` when it has none) and tokenized like
  ``tokenizer.apply_chat_template(..., tokenize=True)`` does, i.e. without adding special tokens (templates
  emit BOS themselves). The tokens before each assistant reply equal the tokenized
  ``apply_chat_template(messages[:i], add_generation_prompt=True)``, what a chat request sends; a template
  for which that does not hold is refused. Targets: each assistant reply up to and including the template's
  end-of-turn token (the last special token the turn emits; template whitespace after it is context). If the
  last reply has no such token, EOS is appended as a target so the model learns to stop.
- ``{"text": str}``: ``tokenizer(text)`` plus EOS; every position but the first is a target.

``PLAIN_CHAT_TEMPLATE`` renders BOS (if the tokenizer has one), then each message as
``"{role}: {content}\\n"``; the generation prompt is ``"assistant:"``. The space before a reply belongs to
the reply, so the prompt ends on ``":"`` and tokenizes identically with or without the reply after it (a
trailing space would merge into the reply's first token under byte-level BPE).

Position 0 is never a target: nothing precedes it to predict it from. Nothing here imports SGLang.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import msgspec

from sglang_harli.core.errors import SpecError

PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token is defined and bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)

ROLES = ("system", "user", "assistant")
_FORMATS = (("prompt", "completion"), ("messages",), ("text",))


class DatasetError(SpecError):
    """A dataset the server refuses; ``field`` names where (e.g. "dataset.path", "line 7")."""


class Example(msgspec.Struct, frozen=True, array_like=True):
    input_ids: list[int]
    loss_mask: list[bool]
    """Same length as ``input_ids``; True where that token is a training target (predicted from the ones
    before it)."""


class DatasetSummary(msgspec.Struct):
    records: int
    examples: int
    truncated: int
    """Examples cut to ``max_seq_len`` (and kept)."""
    dropped: int
    """Records whose truncated sequence had no target token left."""
    tokens: int
    target_tokens: int


def resolve_dataset_path(data_dir: str | None, path: str) -> pathlib.Path:
    """The file ``path`` names inside ``data_dir``; API callers may read nothing outside that directory."""
    if data_dir is None:
        raise DatasetError(
            "dataset.path", "reading datasets from files is disabled; start the server with --harli-data-dir"
        )
    if not isinstance(path, str) or not path:
        raise DatasetError("dataset.path", "must be a non-empty string")
    given = pathlib.PurePath(path)
    if given.is_absolute():
        raise DatasetError("dataset.path", f"{path!r} must be relative to --harli-data-dir, not absolute")
    if "\x00" in path:
        raise DatasetError("dataset.path", "must not contain NUL characters")
    try:
        root = pathlib.Path(data_dir).resolve()
        target = (root / given).resolve()
        inside = target.is_relative_to(root)
        is_dir, is_file = inside and target.is_dir(), inside and target.is_file()
    except (OSError, RuntimeError, ValueError):  # the message would show the server's absolute paths
        raise DatasetError("dataset.path", f"cannot resolve {path!r} (too long? a symlink loop?)") from None
    if not inside:
        raise DatasetError("dataset.path", f"{path!r} is outside --harli-data-dir")
    if is_dir:
        raise DatasetError("dataset.path", f"{path!r} is a directory, not a JSONL file")
    if not is_file:
        raise DatasetError("dataset.path", f"{path!r} does not exist under --harli-data-dir")
    return target


def read_jsonl(path: pathlib.Path, *, max_records: int | None = None) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-blank line."""
    return [record for _, record in _read_jsonl_numbered(path, max_records)]


def _read_jsonl_numbered(path: pathlib.Path, max_records: int | None) -> list[tuple[int, dict]]:
    """Like ``read_jsonl`` but with each record's 1-based file line, so errors can point at it."""
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as exc:
        raise DatasetError(
            "dataset.path", f"cannot read {pathlib.Path(path).name!r}: {exc.strerror}"
        ) from None
    records: list[tuple[int, dict]] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte order mark, as some editors write
        if not raw.strip():
            continue
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"line {lineno}", f"not valid UTF-8 (byte {exc.start})") from None
        try:
            record = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise DatasetError(f"line {lineno}", f"invalid JSON: {exc}") from None
        except RecursionError:
            raise DatasetError(f"line {lineno}", "nested too deeply") from None
        if not isinstance(record, dict):
            raise DatasetError(f"line {lineno}", f"expected a JSON object, got {_json_type(record)}")
        if max_records is not None and len(records) >= max_records:
            raise DatasetError("dataset.path", f"the file has more than {max_records} records")
        records.append((lineno, record))
    return records


def record_to_example(record: dict, tokenizer, *, where: str) -> Example:
    """Tokenize one record in whichever of the three formats its keys select (see the module docstring)."""
    if not isinstance(record, dict):
        raise DatasetError(where, f"expected a JSON object, got {_json_type(record)}")
    present = [keys for keys in _FORMATS if any(k in record for k in keys)]
    if not present:
        raise DatasetError(
            where, "has none of the keys 'prompt'+'completion', 'messages' or 'text'; which format is it?"
        )
    if len(present) > 1:
        names = " and ".join("+".join(repr(k) for k in keys) for keys in present)
        raise DatasetError(where, f"has keys of more than one format ({names}); keep one")
    if "messages" in record:
        return _messages_example(record["messages"], tokenizer, where)
    if "text" in record:
        text = _string(record, "text", where)
        if not text:
            raise DatasetError(where, "'text' is empty")
        ids = _ids(tokenizer, text, special=True) + [_eos(tokenizer, where)]
        return _example(ids, [True] * len(ids))
    prompt = _string(record, "prompt", where)
    completion = _string(record, "completion", where)
    if not completion:
        raise DatasetError(where, "'completion' is empty; there would be nothing to learn")
    prompt_ids = _ids(tokenizer, prompt, special=True)
    target_ids = _ids(tokenizer, completion, special=False) + [_eos(tokenizer, where)]
    return _example(prompt_ids + target_ids, [False] * len(prompt_ids) + [True] * len(target_ids))


def build_examples(
    records: list[dict], tokenizer, *, max_seq_len: int, where: Callable[[int], str]
) -> tuple[list[Example], DatasetSummary]:
    """Tokenize every record, cut each to ``max_seq_len`` and drop those left with nothing to learn.

    ``where(i)`` names record ``i`` in errors ("line 7", "dataset.records[3]").
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    examples: list[Example] = []
    truncated = dropped = 0
    for i, record in enumerate(records):
        example = record_to_example(record, tokenizer, where=where(i))
        if len(example.input_ids) > max_seq_len:
            example = Example(example.input_ids[:max_seq_len], example.loss_mask[:max_seq_len])
            if not any(example.loss_mask):
                dropped += 1
                continue
            truncated += 1
        examples.append(example)
    if not examples:
        raise DatasetError(
            "dataset",
            f"no example has a target token within the first {max_seq_len} tokens"
            if records
            else "has no records",
        )
    summary = DatasetSummary(
        records=len(records),
        examples=len(examples),
        truncated=truncated,
        dropped=dropped,
        tokens=sum(len(e.input_ids) for e in examples),
        target_tokens=sum(sum(e.loss_mask) for e in examples),
    )
    return examples, summary


def load_examples(
    dataset_records: list[dict] | None,
    dataset_path: str | None,
    tokenizer,
    *,
    data_dir: str | None,
    max_seq_len: int,
    max_inline_records: int = 10_000,
    max_file_bytes: int | None = None,
) -> tuple[list[Example], DatasetSummary]:
    """The examples of a finetune request's dataset: inline ``records`` or a JSONL ``path`` (exactly one)."""
    if (dataset_records is None) == (dataset_path is None):
        raise DatasetError("dataset", "give exactly one of records or path")
    if dataset_path is not None:
        target = resolve_dataset_path(data_dir, dataset_path)
        size = target.stat().st_size
        if max_file_bytes is not None and size > max_file_bytes:
            raise DatasetError(
                "dataset.path",
                f"{dataset_path!r} is {size / 2**20:.1f} MiB, more than the {max_file_bytes / 2**20:.1f} MiB "
                "the server accepts (--harli-max-dataset-mb)",
            )
        numbered = _read_jsonl_numbered(target, None)
        if not numbered:
            raise DatasetError("dataset.path", f"{dataset_path!r} has no records")
        return build_examples(
            [record for _, record in numbered],
            tokenizer,
            max_seq_len=max_seq_len,
            where=lambda i: f"line {numbered[i][0]}",
        )
    if not isinstance(dataset_records, list):
        raise DatasetError("dataset.records", f"must be a list, got {_json_type(dataset_records)}")
    if not dataset_records:
        raise DatasetError("dataset.records", "is empty")
    if len(dataset_records) > max_inline_records:
        raise DatasetError(
            "dataset.records",
            f"{len(dataset_records)} records is more than {max_inline_records} inline; "
            "put larger datasets in a file under --harli-data-dir",
        )
    return build_examples(
        dataset_records, tokenizer, max_seq_len=max_seq_len, where=lambda i: f"dataset.records[{i}]"
    )


def _messages_example(messages, tokenizer, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(where, "'messages' must be a non-empty list of {role, content} objects")
    clean = []
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetError(where, f"messages[{j}] must be an object, got {_json_type(message)}")
        for key in ("role", "content"):
            if key not in message:
                raise DatasetError(where, f"messages[{j}] has no {key!r}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DatasetError(where, f"messages[{j}].role is {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DatasetError(where, f"messages[{j}].content must be a string, got {_json_type(content)}")
        clean.append({"role": role, "content": content})
    replies = [j for j, m in enumerate(clean) if m["role"] == "assistant"]
    if not replies:
        raise DatasetError(where, "'messages' has no assistant message; there would be nothing to learn")

    template = tokenizer.chat_template or PLAIN_CHAT_TEMPLATE

    def tokens(upto: int, generation_prompt: bool) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(
                clean[:upto], chat_template=template, add_generation_prompt=generation_prompt, tokenize=False
            )
        except Exception as exc:  # jinja errors, raise_exception() in templates that reject an order
            raise DatasetError(where, f"the chat template cannot render 'messages': {exc}") from None
        return _ids(tokenizer, text, special=False)

    ids = tokens(replies[-1] + 1, False)
    mask = [False] * len(ids)
    special = set(tokenizer.all_special_ids)
    ended = False
    for j in replies:
        prompt, turn = tokens(j, True), tokens(j + 1, False)
        start, stop = len(prompt), len(turn)
        if ids[:start] != prompt or ids[:stop] != turn:
            raise DatasetError(
                where,
                f"the chat template is not prefix-stable at messages[{j}]: the conversation before it "
                "tokenizes differently on its own than inside the whole conversation, so training would "
                "not match inference; use prompt/completion records instead",
            )
        closing = [k for k in range(start, stop) if ids[k] in special]
        ended = bool(closing)
        for k in range(start, closing[-1] + 1 if closing else stop):
            mask[k] = True
    if not ended:
        ids.append(_eos(tokenizer, where))
        mask.append(True)
    return _example(ids, mask)


def _example(ids: list[int], mask: list[bool]) -> Example:
    if mask:
        mask[0] = False
    return Example(ids, mask)


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer, where: str) -> int:
    if tokenizer.eos_token_id is None:
        raise DatasetError(where, "the model's tokenizer has no eos_token to end a target with")
    return tokenizer.eos_token_id


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        raise DatasetError(where, f"has no {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DatasetError(where, f"{key!r} must be a string, got {_json_type(value)}")
    return value


def _json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
