"""A local stand-in for Alibaba Cloud Model Studio (DashScope), for tests.

:class:`FakeDashScope` is a loopback HTTP server that the real ``dashscope``
and ``openai`` SDKs talk to unchanged: only their base URL changes. It speaks

* DashScope's native API: ``POST /api/v1/services/aigc/text-generation/generation``,
  ``.../aigc/multimodal-generation/generation``,
  ``.../embeddings/text-embedding/text-embedding``,
  ``.../embeddings/multimodal-embedding/multimodal-embedding``,
  ``.../rerank/text-rerank/text-rerank`` and ``/api/v1/apps/<app_id>/completion``,
  plain JSON or server-sent events (when the request carries
  ``X-DashScope-SSE: enable`` or ``Accept: text/event-stream``), with
  ``incremental_output`` deltas or cumulative text, and cumulative usage on every
  chunk;
* the OpenAI-compatible API under ``/compatible-mode/v1``: ``chat/completions`` and
  ``completions`` (JSON or SSE, with the final usage chunk when
  ``stream_options.include_usage`` is true, and ``reasoning_content`` in thinking
  mode), ``responses`` (JSON or SSE events, ``previous_response_id`` too),
  ``embeddings``, ``models``, and enough of ``files`` and ``batches`` for
  ``client.batches.create(...)`` (a batch completes when it is first retrieved);
* the platform's error bodies and status codes, before a response or inside a
  stream that already answered HTTP 200.

Usage figures are real, and billed as the service bills, not as a bound: input
tokens are counted with the Qwen vocabulary (tiktoken over the ``qwen.tiktoken``
file that ships with ``dashscope``) plus the chat template, and output tokens are
the tokens of the text the server produced. A reply is billed in full once it is
generated: a client that gives up waiting, closes a stream early or loses the
connection is billed all the same (a stream that ends in an error frame bills
nothing). :meth:`FakeDashScope.idle` waits until every request is answered.

Example, in a user's own test::

    import dashscope
    import openai
    from quotaguard.testing import FakeDashScope

    def test_my_code_survives_the_free_tier_running_out():
        with FakeDashScope() as server:
            dashscope.base_http_api_url = server.native_base
            rsp = dashscope.Generation.call(model="qwen-plus", prompt="hi", api_key="sk-test")
            assert rsp.status_code == 200
            assert server.usage_log == [("qwen-plus", rsp.usage.input_tokens, 20)]

            server.free_tier_only = True
            with openai.OpenAI(api_key="sk-test", base_url=server.openai_base) as client:
                try:
                    client.chat.completions.create(
                        model="qwen-plus", messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.PermissionDeniedError as e:
                    assert e.code == "AllocationQuota.FreeTierOnly"

Token counting
--------------
Content tokens: tiktoken with the Qwen pattern and vocabulary (the same
encoding as ``dashscope.get_tokenizer("qwen-7b-chat")``: NFC-normalised text,
special tokens allowed). If tiktoken or the vocabulary file is missing, a
``count_tokens(text) -> int`` function of ``quotaguard._core`` is used when it
exists, else the UTF-8 byte length (never fewer than the real count). The one
in use is :attr:`FakeDashScope.token_counter_name`.

Chat input (native ``messages`` or ``prompt``, compatible-mode ``messages``):
``sum(5 + content tokens of each message) + 3``, plus, when no message has the
role ``system``, the default system message the platform adds:
``5 + tokens(server.default_system_prompt)``. The default prompt is
``"You are a helpful assistant."`` (6 tokens), so the default system message
costs 11 tokens, within the 21 that SPEC R8 allows for (Qwen2.5's
``"You are Qwen, created by Alibaba Cloud. You are a helpful assistant."`` is
5 + 16 = 21; set ``default_system_prompt`` to it to bill the bound exactly).
A native ``prompt`` is one user message. On top, as the service bills:

* function tools are rendered with Qwen2.5's chat template into the system turn
  (after its text, or after the default prompt), tool calls into the assistant
  turn, consecutive tool results into one user turn;
* a built-in tool (a ``type`` other than ``"function"``) or a plugin adds
  ``server.builtin_tool_tokens`` (default 1,500), ``enable_search`` adds
  ``server.search_tokens`` (default 2,000);
* a ``fileid://<id>`` in a message adds every token of that uploaded file;
* a Responses API ``previous_response_id`` bills the stored conversation again;
* an image given as a PNG ``data:`` URL costs Qwen-VL's count from its pixels
  (28-pixel patches, 4 to 1,280 of them, 16,384 with
  ``vl_high_resolution_images``, plus 2); any other image, audio or video part
  ``server.image_tokens`` (default 1,280);
* a content part marked ``cache_control: {"type": "ephemeral"}`` creates an
  explicit cache of the prefix up to it, hit by the same prefix within 5 minutes
  (``cache_creation_input_tokens`` / ``cached_tokens``, ``cache_type``).

Embeddings count content tokens only, without framing; multimodal embeddings add
the image tokens; a reranker bills each (query, document) pair plus
``server.rerank_pair_tokens``; an application bills ``server.app_model`` with
``server.app_extra_tokens`` of retrieved input added.

Output: ``min(max_tokens, server.reply_tokens)`` tokens of "Lorem ipsum ..."
(every word is one Qwen token), or ``server.reply_text`` cut at ``max_tokens``.
``finish_reason`` is ``"length"`` when ``max_tokens`` cut the reply. In thinking
mode (``enable_thinking``, else the default of models in ``server.thinking_models``;
natively only with ``result_format="message"``) the reply is preceded by
``server.reasoning_tokens`` (default 40) of reasoning, capped by
``thinking_budget`` and not by ``max_tokens`` (``reasoning_content``, reported as
``reasoning_tokens``).

Errors
------
Error codes and what they answer (the native body is
``{"request_id", "code", "message"}``; the compatible-mode body is
``{"error": {"message", "type", "param": null, "code"}, "request_id"}``, whose
code differs for two of them, as on the platform):

==================================  ======  ==================================
native code                         status  compatible-mode code
==================================  ======  ==================================
``AllocationQuota.FreeTierOnly``    403     ``AllocationQuota.FreeTierOnly``
``Arrearage``                       400     ``Arrearage``
``PrepaidBillOverdue``              400     ``PrepaidBillOverdue``
``PostpaidBillOverdue``             400     ``PostpaidBillOverdue``
``InvalidApiKey``                   401     ``invalid_api_key``
``Throttling.RateQuota``            429     ``limit_requests``
``Throttling.AllocationQuota``      429     ``insufficient_quota``
``InvalidParameter``                400     ``invalid_parameter_error``
``InternalError``                   500     ``internal_error``
==================================  ======  ==================================

Any other code works too when ``fail_next`` is given its ``status``.

A streamed native request refused up front gets the status above with a
``text/event-stream`` body holding one ``event:error`` frame, as the platform
does. An error inside a stream is, natively, an ``event:error`` frame with
``:HTTP_STATUS/<status>`` (the ``dashscope`` SDK then yields a response with
that ``code`` but ``status_code`` 400: it reads the status from ``status:``
lines, which the platform does not send), and in compatible mode a
``data: {"error": {...}}`` frame (``openai`` raises ``APIError`` with
``code`` set and no ``status_code``).

"Model calls" are the generation, multimodal, embedding, rerank, application,
chat-completion, completion, response and batch-creation requests: the switches
(``arrearage``, ``free_tier_only``, ``free_quota``), :meth:`FakeDashScope.fail_next`
and :meth:`FakeDashScope.drop_next` (bill, then reset the connection without an
answer) apply to them only; the API key is checked on every request.
"""

from __future__ import annotations

from .server import FakeDashScope
from .wire import ReceivedRequest

__all__ = ["FakeDashScope", "ReceivedRequest"]
