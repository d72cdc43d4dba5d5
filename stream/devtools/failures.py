"""What the simulator answers for an injected fault (`stream.devtools.faults` names the
kinds): OpenAI-style error bodies with the headers real APIs send, hangs, and connections
reset before or in the middle of an answer."""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid

from aiohttp import web

__all__ = ["error_response", "fault_response"]


def error_response(status: int, code: str, message: str, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": code, "code": code}}
    # Real APIs give failures an id too: it is what their support asks for.
    request_id = f"req_{uuid.uuid4().hex[:20]}"
    return web.json_response(body, status=status, headers={"x-request-id": request_id, **headers})


async def fault_response(request: web.Request, kind: str) -> web.StreamResponse:
    name, _, arg = kind.partition("/")
    if name == "429":
        wait = float(arg) if arg else 1.0
        return error_response(
            429,
            "rate_limit_exceeded",
            "rate limited by the simulator",
            **{"retry-after": f"{wait:g}", "retry-after-ms": f"{wait * 1000:.0f}"},
        )
    if name == "quota":
        return error_response(429, "insufficient_quota", "you exceeded your current quota")
    if name == "context_length":
        return error_response(
            403,
            "invalid_request_error",
            "Input validation error: input token count + max_tokens must be less than the "
            "context length of the model",
        )
    if name == "hang":
        await asyncio.sleep(float(arg) if arg else 600.0)
        return error_response(504, "timeout", "the simulator hung and then gave up")
    if name == "reset":
        return _reset(request)
    if name == "resetbody":
        return await _reset_mid_body(request)
    status = int(name)
    message = _ERROR_MESSAGES.get(status, f"simulated HTTP {status}")
    return error_response(status, _ERROR_CODES.get(status, "server_error"), message)


_ERROR_CODES = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    402: "payment_required",
    404: "model_not_found",
}
_ERROR_MESSAGES = {
    402: "the account has reached its maximum allowed monthly spending limit",
}


def _reset(request: web.Request) -> web.StreamResponse:
    """Close the connection with an RST (SO_LINGER 0), as a crashed upstream would."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    raise asyncio.CancelledError


async def _reset_mid_body(request: web.Request) -> web.StreamResponse:
    """A 200 whose body stops halfway, then an RST: the client has begun reading."""
    body = b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "half an answer, then'
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "application/json", "Content-Length": "4096"}
    )
    await response.prepare(request)
    await response.write(body)
    await asyncio.sleep(0.01)  # let the headers and the first bytes reach the client
    return _reset(request)
