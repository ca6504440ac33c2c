"""ModelStreamInfer: each request of a stream answered as it completes, a bounded number at a time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from appliance import errors
from appliance.dataplane.plane import Answer
from appliance.server.grpc import messages

log = logging.getLogger(__name__)

# Requests of one stream in the data plane or answered and not yet sent, at once; the stream is read no
# further meanwhile, so HTTP/2 flow control holds the client back (one HTTP/1.1 connection has one
# request at a time). A client that does not read its answers stops being read after this many.
MAX_INFLIGHT_PER_STREAM = 16
# Triton's flag on a stream's responses: true on the last one of a request, which for a model that is
# not decoupled (every model here) is its only one. Clients that multiplex requests on one stream
# (tritonclient's enable_empty_final_response) wait for it.
FINAL_RESPONSE = "triton_final_response"


class RequestFailed(Exception):
    """A stream's request refused or failed after it was parsed: `error`, and what its error response
    names (Triton fills them in, so that a client with several requests on the stream knows which)."""

    def __init__(self, error: errors.ApplianceError, request: Any) -> None:
        super().__init__(str(error))
        self.error = error
        self.request_id: str = request.id
        self.model: str = request.model_name
        self.version: str = request.model_version


async def answer_each(
    requests: AsyncIterator[bytes], infer: Callable[[bytes], Awaitable[Answer]]
) -> AsyncIterator[bytes]:
    """Serialised ModelStreamInferResponse messages, in the order the requests complete: the answer,
    or the request's own error in `error_message` (the stream goes on, as Triton's does), with its id,
    model name and version where `infer` raised RequestFailed; each with triton_final_response true.

    A request's place is given back once its answer is sent (grpc.aio resumes this generator after
    the message is written), not once it is computed: answers a client leaves unread stay bounded."""
    done: asyncio.Queue[bytes | None] = asyncio.Queue()
    slots = asyncio.Semaphore(MAX_INFLIGHT_PER_STREAM)
    tasks: set[asyncio.Task[None]] = set()
    outstanding = 0

    async def answered(data: bytes) -> Any:
        try:
            answer = await infer(data)
            response = messages.ModelStreamInferResponse()
            response.infer_response.MergeFromString(answer.encoded.parts[0])
        except RequestFailed as failed:
            response = messages.ModelStreamInferResponse(error_message=str(failed.error))
            named = response.infer_response
            named.id, named.model_name, named.model_version = failed.request_id, failed.model, failed.version
        except errors.ApplianceError as exc:
            response = messages.ModelStreamInferResponse(error_message=str(exc))
        response.infer_response.parameters[FINAL_RESPONSE].bool_param = True
        return response

    async def one(data: bytes) -> None:
        try:
            response = await answered(data)
        except Exception as exc:  # an answer must come, or the stream would wait for it for ever
            log.exception("ModelStreamInfer: a request's answer failed unexpectedly")
            failure = f"internal error: {type(exc).__name__}: {exc}"
            response = messages.ModelStreamInferResponse(error_message=failure)
            response.infer_response.parameters[FINAL_RESPONSE].bool_param = True
        done.put_nowait(response.SerializeToString())

    async def read() -> None:
        nonlocal outstanding
        try:
            async for data in requests:
                await slots.acquire()
                outstanding += 1
                task = asyncio.create_task(one(data))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            done.put_nowait(None)

    reading = asyncio.create_task(read())
    try:
        is_read = False
        while not (is_read and outstanding == 0):
            item = await done.get()
            if item is None:
                is_read = True
                continue
            outstanding -= 1
            yield item
            slots.release()
        await reading  # its errors (a broken stream) end the RPC
    finally:
        for task in (reading, *tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(reading, *tasks, return_exceptions=True)
