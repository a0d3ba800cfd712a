"""Guarded SDK clients: :func:`wrap_openai` and :func:`wrap_dashscope`.

Both return proxies: the calls that spend tokens are guarded (reserve, call, settle,
see :mod:`quotaguard.wrap`); every other attribute is the wrapped object's own. The
global ``dashscope`` module is never patched. Neither SDK is imported here, except
``dashscope`` itself when :func:`wrap_dashscope` is called without a module.
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from .wrap import Guard, Reservation, acall_guarded, call_guarded

__all__ = ["GuardedDashScope", "GuardedOpenAI", "wrap_dashscope", "wrap_openai"]


def _run(
    guard: Guard,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    **options: Any,
) -> Any:
    """A guarded call of ``fn``; for a coroutine function, a coroutine to await."""
    if inspect.iscoroutinefunction(fn):
        return acall_guarded(guard, fn, args, kwargs, **options)
    return call_guarded(guard, fn, args, kwargs, **options)


class _Proxy:
    """Delegates every attribute it does not define itself to the wrapped object."""

    def __init__(self, target: Any, guard: Guard, clip: bool) -> None:
        self._target = target
        self._guard = guard
        self._clip = clip

    def __getattr__(self, name: str) -> Any:
        if name in ("_target", "_guard", "_clip"):  # not yet set: avoid recursing
            raise AttributeError(name)
        return getattr(self._target, name)

    def __dir__(self) -> list[str]:
        return sorted(set(dir(self._target)) | set(super().__dir__()))

    def __repr__(self) -> str:
        return f"<guarded {self._target!r}>"


# --------------------------------------------------------------------------------------
# OpenAI (pointed at DashScope's OpenAI-compatible endpoint)


class _ChatCompletions(_Proxy):
    def create(self, *args: Any, **kwargs: Any) -> Any:
        """``chat.completions.create``, guarded; a stream reports its usage at the end."""
        hide = False
        if kwargs.get("stream") is True:
            options = kwargs.get("stream_options")
            options = options if isinstance(options, Mapping) else {}
            if not options.get("include_usage"):
                # Without it the stream never reports usage and settles at the worst case;
                # the extra chunk is hidden from a caller who did not ask for it.
                kwargs["stream_options"] = {**options, "include_usage": True}
                hide = True
        return _run(
            self._guard, self._target.create, args, kwargs, clip=self._clip, hide_usage_chunk=hide
        )

    def parse(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self._guard, self._target.parse, args, kwargs, clip=self._clip)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        # The SDK's helper builds its stream on ``self.create``: hand it this proxy.
        return type(self._target).stream(self, *args, **kwargs)

    @property
    def with_raw_response(self) -> _ChatCompletions:
        # Raw responses carry no parsed usage: they settle at the worst case.
        return _ChatCompletions(self._target.with_raw_response, self._guard, self._clip)

    @property
    def with_streaming_response(self) -> _ChatCompletions:
        return _ChatCompletions(self._target.with_streaming_response, self._guard, self._clip)


class _Chat(_Proxy):
    @property
    def completions(self) -> _ChatCompletions:
        return _ChatCompletions(self._target.completions, self._guard, self._clip)


class _Embeddings(_Proxy):
    def create(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self._guard, self._target.create, args, kwargs, clip=False, max_output=0)

    @property
    def with_raw_response(self) -> _Embeddings:
        return _Embeddings(self._target.with_raw_response, self._guard, self._clip)

    @property
    def with_streaming_response(self) -> _Embeddings:
        return _Embeddings(self._target.with_streaming_response, self._guard, self._clip)


def _stated_models(kwargs: Mapping[str, Any]) -> list[str] | None:
    """The models a batch says it uses: ``metadata={"model": "qwen-plus[,qwen-max]"}``."""
    metadata = kwargs.get("metadata")
    stated = metadata.get("model") if isinstance(metadata, Mapping) else None
    if isinstance(stated, str) and stated.strip():
        return [m.strip() for m in stated.split(",") if m.strip()]
    return None


def _models_in_jsonl(text: str) -> list[str]:
    """The distinct ``body.model`` of the request lines of a batch input file."""
    models: list[str] = []
    for line in text.splitlines():
        if line.strip():
            body = json.loads(line).get("body")
            model = body.get("model") if isinstance(body, Mapping) else None
            if isinstance(model, str) and model not in models:
                models.append(model)
    if not models:
        raise ValueError("the batch input file names no model")
    return models


class _Batches(_Proxy):
    """``batches.create`` counted as ``kind="batch"``.

    A batch is never covered by the free quota (R4), so the guard refuses it under the
    Free Quota Only switch or for an unverified account, and otherwise admits it as
    pay-as-you-go. Its input is not known at submit time (and its reservation does not
    touch the free quota), so each model is reserved with 0 tokens and settled with
    0/0 at submit, under the batch id: the batch's real usage arrives later, with its
    results. The models come from ``metadata={"model": ...}`` if stated, else from
    the input file (one extra download).
    """

    def __init__(self, target: Any, guard: Guard, clip: bool, files: Any) -> None:
        super().__init__(target, guard, clip)
        self._files = files

    def create(self, *args: Any, **kwargs: Any) -> Any:
        models = _stated_models(kwargs)
        if inspect.iscoroutinefunction(self._target.create):
            return self._create_async(models, args, kwargs)
        if models is None:
            models = _models_in_jsonl(self._files.content(kwargs["input_file_id"]).text)
        others = self._reserve_others(models)
        try:
            batch = call_guarded(
                self._guard, self._target.create, args, kwargs, **self._options(models)
            )
        except BaseException:
            self._end_others(others, None)
            raise
        self._end_others(others, batch)
        return batch

    async def _create_async(
        self, models: list[str] | None, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if models is None:
            content = await self._files.content(kwargs["input_file_id"])
            models = _models_in_jsonl(content.text)
        others = self._reserve_others(models)
        try:
            batch = await acall_guarded(
                self._guard, self._target.create, args, kwargs, **self._options(models)
            )
        except BaseException:
            self._end_others(others, None)
            raise
        self._end_others(others, batch)
        return batch

    @staticmethod
    def _options(models: list[str]) -> dict[str, Any]:
        return {"model": models[0], "kind": "batch", "input_tokens": 0, "max_output": 0}

    def _reserve_others(self, models: list[str]) -> list[Reservation]:
        """Reserve every model but the first (``call_guarded`` reserves that one)."""
        reserved: list[Reservation] = []
        try:
            for model in models[1:]:
                reserved.append(self._guard.reserve(model, 0, 0, "batch"))
        except BaseException:
            self._end_others(reserved, None)
            raise
        return reserved

    @staticmethod
    def _end_others(reserved: list[Reservation], batch: Any) -> None:
        for reservation in reserved:
            if batch is None:
                reservation.release(failed=True)
            else:
                reservation.settle(0, 0, getattr(batch, "id", None))


class GuardedOpenAI(_Proxy):
    """An ``openai.OpenAI`` / ``openai.AsyncOpenAI`` whose token-spending calls are guarded.

    Guarded: ``chat.completions.create`` (streaming too), ``.parse`` and ``.stream``,
    ``embeddings.create``, ``batches.create``; also through ``with_raw_response`` and
    ``with_streaming_response`` (raw responses settle at the worst case).
    """

    def __init__(self, guard: Guard, client: Any, *, clip: bool = False) -> None:
        super().__init__(client, guard, clip)

    @property
    def chat(self) -> _Chat:
        return _Chat(self._target.chat, self._guard, self._clip)

    @property
    def embeddings(self) -> _Embeddings:
        return _Embeddings(self._target.embeddings, self._guard, self._clip)

    @property
    def batches(self) -> _Batches:
        return _Batches(self._target.batches, self._guard, self._clip, self._target.files)

    def with_options(self, *args: Any, **kwargs: Any) -> GuardedOpenAI:
        return GuardedOpenAI(
            self._guard, self._target.with_options(*args, **kwargs), clip=self._clip
        )

    def copy(self, *args: Any, **kwargs: Any) -> GuardedOpenAI:
        return GuardedOpenAI(self._guard, self._target.copy(*args, **kwargs), clip=self._clip)

    def __enter__(self) -> GuardedOpenAI:
        self._target.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._target.__exit__(*exc_info)

    async def __aenter__(self) -> GuardedOpenAI:
        await self._target.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self._target.__aexit__(*exc_info)


def wrap_openai(guard: Guard, client: Any, *, clip: bool = False) -> GuardedOpenAI:
    """A proxy of ``client`` (``openai.OpenAI`` or ``AsyncOpenAI``) whose calls are guarded.

    A streamed chat completion gets ``stream_options={"include_usage": True}`` so its
    usage can be settled; the extra usage chunk is hidden unless the caller asked for it.
    With ``clip=True`` a call's max tokens shrink to what the free quota has left.
    """
    return GuardedOpenAI(guard, client, clip=clip)


# --------------------------------------------------------------------------------------
# DashScope's own SDK

# The API classes wrap_dashscope guards, and the output bound each gets (None: read it).
_DASHSCOPE_APIS: dict[str, int | None] = {
    "Generation": None,
    "MultiModalConversation": None,
    "TextEmbedding": 0,
    "AioGeneration": None,
    "AioMultiModalConversation": None,
    "AioTextEmbedding": 0,
}


class _DashScopeApi(_Proxy):
    def __init__(self, target: Any, guard: Guard, clip: bool, max_output: int | None) -> None:
        super().__init__(target, guard, clip)
        self._max_output = max_output

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """The API's ``call``, guarded; errors are still returned, as DashScope does."""
        return _run(
            self._guard,
            self._target.call,
            args,
            kwargs,
            clip=self._clip,
            max_output=self._max_output,
        )


class GuardedDashScope(_Proxy):
    """The ``dashscope`` module with guarded ``Generation``, ``MultiModalConversation``,
    ``TextEmbedding`` and their ``Aio*`` variants (those the installed SDK has)."""

    def __init__(self, guard: Guard, module: ModuleType | Any, *, clip: bool = False) -> None:
        super().__init__(module, guard, clip)
        for name, max_output in _DASHSCOPE_APIS.items():
            api = getattr(module, name, None)
            if api is not None:
                setattr(self, name, _DashScopeApi(api, guard, clip, max_output))


def wrap_dashscope(
    guard: Guard, module: ModuleType | Any | None = None, *, clip: bool = False
) -> GuardedDashScope:
    """A proxy of the ``dashscope`` module (imported if not given) whose calls are guarded."""
    if module is None:
        module = importlib.import_module("dashscope")
    return GuardedDashScope(guard, module, clip=clip)
