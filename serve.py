"""`medmoe serve`: an OpenAI-compatible HTTP API and a browser page for one Med-MoE checkpoint.

    GET  /                     the page (serve.html: pick or drop a scan, ask, watch the answer stream)
    GET  /v1/models            the one model served
    POST /v1/chat/completions  OpenAI's chat format; the scan is an image_url part (a base64 data: URL)
    POST /medmoe/preview       {"url": a scan's data: URL} -> PNG, for the page (browsers show no DICOM)

Answers come from the same Assistant, prompt and decoding as `medmoe ask`, so a greedy answer here
is `ask`'s answer. One worker thread owns the model: requests that arrive while it is busy wait,
and it then takes all that sample alike as one left-padded batch (as `medmoe eval` batches).

Why Starlette + uvicorn: the smallest well-kept ASGI pair with what this needs (routes, streaming
responses for server-sent events, the client's disconnect) and nothing more. FastAPI would add a
pydantic layer whose validation errors are not OpenAI's shape, so we would be undoing it.

Safe by default, because the images are patients': loopback only unless an API key is set; body
size, image pixels and max_tokens capped; images come only as data: URLs and are decoded in
memory, never written to disk; no question, answer or image reaches the log
unless --log-requests. Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}}):
  400  malformed JSON, or a request outside the format: no image, two images, an image that is not
       a base64 data: URL, an empty or too long question, a bad parameter
  401  missing or wrong API key             404  unknown path or model
  413  body or image over its cap          422  an unreadable or unsupported image; max_tokens over the cap
"""

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from medmoe import data, vqa
from medmoe.files import MedMoEError

log = logging.getLogger("medmoe.serve")

MEDIA_TYPES = ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/dicom")
PAGE_HEADERS = {  # the page may load nothing from elsewhere: it works offline and leaks nothing
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


@dataclass
class Limits:
    """What one request may ask of the server."""

    max_body: int = 25 * 2**20  # bytes: a 16 MiB scan as base64, and the conversation
    max_pixels: int = 40_000_000  # a 6000 x 6000 radiograph; read from the header, before decoding
    max_tokens: int = 512  # per answer (a request asks for 256, as `ask`, unless it says otherwise)
    max_batch: int = 8  # requests decoded together


class RequestError(Exception):
    """A request the server will not answer: HTTP status and one line saying why."""

    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status, message, param=None):
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


# ----------------------------------------------------------------------------- reading a request


@dataclass
class Chat:
    """A request as the model will answer it: the conversation [(question, answer), ...,
    (question, None)], the scan (media type, bytes) and the decoding settings."""

    turns: list
    scan: tuple
    max_tokens: int
    temperature: float = 0.0  # greedy, as `ask`, unless asked (OpenAI's default of 1 would make answers vary)
    top_p: float = 1.0
    seed: int | None = None
    stop: list = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_chat(body, limits, model):
    """The JSON body of a chat completion request -> Chat, or a RequestError naming the problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model):
        raise RequestError(404, f"model {body['model']!r} not found: this server serves {model!r}", "model")
    if body.get("n", 1) != 1:
        raise RequestError(400, "n must be 1 (one answer per request)", "n")
    turns, scan = parse_messages(body.get("messages"))
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, "seed must be an integer", "seed")
    options = body.get("stream_options") or {}
    return Chat(turns, scan, max_tokens(body, limits), temperature=number(body, "temperature", 0.0, 0.0, 2.0),
                top_p=number(body, "top_p", 1.0, 1e-6, 1.0), seed=seed, stop=stop, stream=body.get("stream") is True,
                include_usage=isinstance(options, dict) and options.get("include_usage") is True)


def number(body, name, default, lo, hi):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise RequestError(400, f"{name} must be a number from {lo:g} to {hi:g}", name)
    return float(value)


def max_tokens(body, limits):
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = body.get(name)
    if n is None:
        return min(256, limits.max_tokens)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(400, f"{name} must be a positive integer", name)
    if n > limits.max_tokens:
        raise RequestError(422, f"{name} {n} is over this server's cap of {limits.max_tokens} (medmoe serve --max-tokens)", name)
    return n


def parse_messages(messages):
    """OpenAI messages (user, assistant, ..., user) -> (turns, the one scan)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    turns, scans = [], []
    for i, m in enumerate(messages):
        want = "user" if i % 2 == 0 else "assistant"
        if not isinstance(m, dict) or m.get("role") != want:
            raise RequestError(400, f"messages[{i}]: expected a {want} message (a conversation alternates user and assistant "
                                    "messages and ends with the user's; the model's template brings its own system prompt)", "messages")
        text, images = message_parts(m.get("content"), f"messages[{i}]")
        scans += images
        if want == "user":
            turns.append((text, None))
        else:
            turns[-1] = (turns[-1][0], text)
    if turns[-1][1] is not None:
        raise RequestError(400, "the last message must be the user's question", "messages")
    if not scans:
        raise RequestError(400, "no image: send the scan as an image_url part (a base64 data: URL) of a user message", "messages")
    if len(scans) > 1:
        raise RequestError(400, f"{len(scans)} images: the model answers about one image per conversation", "messages")
    return turns, scans[0]


def message_parts(content, where):
    """A message's content (a string, or a list of text and image_url parts) -> (text, [scan])."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(400, f"{where}: content must be a string or a list of parts", "messages")
    texts, scans = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            scans.append(parse_data_url(url.get("url") if isinstance(url, dict) else url, where))
        else:
            raise RequestError(400, f"{where}: a content part must be {{'type': 'text', 'text': ...}} or "
                                    "{'type': 'image_url', 'image_url': {'url': 'data:...'}}", "messages")
    return "\n".join(texts), scans


def parse_data_url(url, where):
    """A base64 data: URL -> (media type, bytes). Nothing else: the server fetches no URL and opens
    no file for a client."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(400, f"{where}: the image must be a base64 data: URL (data:image/png;base64,...); "
                                "this server fetches no URL and reads no file", "messages")
    head, _, payload = url[5:].partition(",")
    media, *params = head.split(";")
    media = media.strip().lower().replace("image/jpg", "image/jpeg")
    if media not in MEDIA_TYPES:
        raise RequestError(422, f"{where}: unsupported image type {media or '(none)'!r} (PNG, JPEG, TIFF, BMP or DICOM: "
                                f"{', '.join(MEDIA_TYPES)})", "messages")
    if "base64" not in params:
        raise RequestError(400, f"{where}: the image data: URL must be base64 (data:{media};base64,...)", "messages")
    try:
        return media, base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise RequestError(400, f"{where}: the image's base64 data is malformed", "messages") from None


def scan_pixels(assistant, scan, max_pixels):
    """The scan as the vision tower's input [1, 3, S, S], prepared as `ask` prepares a file."""
    img = read_scan(scan, max_pixels)
    return data.preprocess(img, assistant.model.cfg.vision, assistant.image_mode)[None].to(assistant.model.llm.embed.weight)


def read_scan(scan, max_pixels):
    """The scan as an RGB image, read from its bytes by data.py's own readers (as `ask` reads a
    file): a patient's image is never written to disk."""
    media, blob = scan
    dicom = media == "application/dicom" or data.is_dicom(blob)  # DICOM's magic, whatever the label
    n = pixel_count(blob, dicom)
    if n > max_pixels:
        raise RequestError(413, f"image of {n:,} pixels is over this server's cap of {max_pixels:,} (medmoe serve --max-image-pixels)")
    try:
        return data.load_dicom(blob) if dicom else data.load_image(blob)
    except MedMoEError as e:
        raise RequestError(422, str(e), "messages") from None


def preview_png(scan, max_pixels, side=512):
    """The scan as PNG bytes, at most `side` pixels across: how the page shows DICOM and TIFF."""
    img = read_scan(scan, max_pixels)
    img.thumbnail((side, side))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def pixel_count(blob, dicom):
    """Width x height (x frames) from the file's header, before anything is decoded; 0 when the
    header is unreadable (the reader then says why)."""
    try:
        if dicom:
            import pydicom

            ds = pydicom.dcmread(io.BytesIO(blob), stop_before_pixels=True)
            return int(ds.Rows) * int(ds.Columns) * int(ds.get("NumberOfFrames", 1) or 1)
        with Image.open(io.BytesIO(blob)) as img:
            return img.width * img.height
    except Image.DecompressionBombError:
        return 2 * Image.MAX_IMAGE_PIXELS + 1  # Pillow refuses to even open it: over any cap we allow
    except Exception:  # noqa: BLE001 -- unreadable headers take many forms; data.py's reader names the problem next
        return 0


# ----------------------------------------------------------------------------- the worker


@dataclass(eq=False)
class Slot:
    """One request's place in a batch. The worker thread feeds it tokens; its text, then its end,
    go to the request's asyncio queue (handed over to the event loop thread-safely)."""

    chat: Chat
    prompt: list
    pixels: torch.Tensor
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    detok: vqa.Detokenizer  # its tokens -> its text, as `ask` turns them
    cancelled: bool = False  # the client hung up: no more work for it
    answer: str = ""  # all the text so far
    content: str = ""  # what the client has been sent (stop strings and trailing spaces held back)
    finish: str | None = None

    def emit(self, kind, value):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def step(self, t):
        """The batch's next token for this request."""
        if self.finish or self.cancelled:
            return
        piece = self.detok.push(t)
        if self.detok.done:
            self.add(piece, "stop")
        elif len(self.detok.ids) >= self.chat.max_tokens:
            self.add(piece + self.detok.rest(), "length")
        else:
            self.add(piece)

    def add(self, piece, finish=None):
        self.answer += piece
        shown, hit = cut_at_stop(self.answer, self.chat.stop)
        shown = shown.rstrip()  # the answer is stripped, as `ask`'s is: trailing spaces wait for more text
        if len(shown) > len(self.content):
            self.emit("text", shown[len(self.content):])
            self.content = shown
        self.finish = "stop" if hit else finish


def cut_at_stop(text, stops):
    """(text before the first stop string, True) once one occurs; else (the text without any end
    that could still become a stop string, False)."""
    hits = [text.find(s) for s in stops if s in text]
    if hits:
        return text[: min(hits)], True
    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - held], False


def batch_key(chat):
    """Requests decode together when they sample alike: every greedy one, or those with the same
    temperature and top_p; a seeded sampled request decodes alone, so that its seed decides it."""
    if chat.temperature <= 0:
        return "greedy"
    return id(chat) if chat.seed is not None else (chat.temperature, chat.top_p)


class Worker:
    """The one thread that runs the model, a batch at a time."""

    def __init__(self, assistant, max_batch):
        self.assistant, self.max_batch = assistant, max_batch
        self.waiting, self.wake, self.stopped = [], threading.Condition(), False
        self.busy = threading.Lock()  # held while a batch runs (tests hold it to make requests queue up)
        self.dropped = 0  # requests whose client left before their answer ended
        self.routing = bool(assistant.model.cfg.moe and assistant.model.llm.moe_layers())
        self.thread = threading.Thread(target=self.run, name="medmoe-worker", daemon=True)

    def submit(self, slot):
        with self.wake:
            self.waiting.append(slot)
            self.wake.notify()

    def stop(self):
        with self.wake:
            self.stopped = True
            self.wake.notify()

    def run(self):
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.waiting or self.stopped)
                if self.stopped:
                    return
            with self.busy:
                batch = self.take_batch()
                try:
                    self.answer(batch)
                except Exception as e:  # a failed batch answers its requests with an error; the server goes on
                    log.exception("batch failed")
                    for s in batch:
                        s.emit("error", RequestError(500, f"the model failed on this request ({type(e).__name__})"))

    def take_batch(self):
        """The oldest waiting request and every other that samples as it does, up to max_batch."""
        with self.wake:
            key = batch_key(self.waiting[0].chat)
            batch = [s for s in self.waiting if batch_key(s.chat) == key][: self.max_batch]
            self.waiting = [s for s in self.waiting if s not in batch]
        self.dropped += sum(s.cancelled for s in batch)
        return [s for s in batch if not s.cancelled]

    def answer(self, batch):
        """Decode a batch: each request gets its text as it comes, then its end (finish reason,
        usage, routing). Decoding stops once every request has ended or its client has left."""
        if not batch:
            return
        started, chat = time.perf_counter(), batch[0].chat
        pixels = torch.cat([s.pixels for s in batch])
        generator = torch.Generator(pixels.device).manual_seed(chat.seed) if chat.seed is not None else None
        steps = self.assistant.token_steps(pixels, [s.prompt for s in batch], max(s.chat.max_tokens for s in batch),
                                           temperature=chat.temperature, top_p=chat.top_p, generator=generator)
        with contextlib.closing(steps):  # closing frees the KV cache at once when we stop early
            for tok in steps:
                for s, t in zip(batch, tok.tolist()):
                    s.step(t)
                if all(s.finish or s.cancelled for s in batch):
                    break
        self.dropped += sum(s.cancelled and not s.finish for s in batch)
        done = [s for s in batch if not s.cancelled]
        for s in done:
            if not s.finish:  # the context ran out before its stop token or max_tokens
                s.add(s.detok.rest(), "length")
        for s, routing in zip(done, self.route(done)):
            n = len(s.detok.ids)
            usage = {"prompt_tokens": len(s.prompt), "completion_tokens": n, "total_tokens": len(s.prompt) + n}
            s.emit("end", {"content": s.content, "finish_reason": s.finish, "usage": usage,
                           "medmoe": {"routing": routing, "batch_size": len(batch)}})
        tokens = sum(len(s.detok.ids) for s in batch)
        log.info("answered a batch of %d in %.2f s (%d tokens)", len(batch), time.perf_counter() - started, tokens)

    def route(self, batch):
        """What `ask --show-routing` shows, for each request's conversation and answer, plus the
        expert the router sees most (None for a dense model, or an answer that filled the context)."""
        a, fits, out = self.assistant, {}, [None] * len(batch)
        for i, s in enumerate(batch):
            with contextlib.suppress(MedMoEError):
                fits[i] = a.prompt(s.chat.turns[:-1] + [(s.chat.turns[-1][0], s.content)])
        if not self.routing or not fits:
            return out
        pixels = torch.cat([batch[i].pixels for i in fits])
        for i, r in zip(fits, vqa.route(a, pixels, list(fits.values()))):
            d = vqa.routing_dict(a, r)
            out[i] = {"expert": max(d["router_sees"], key=d["router_sees"].get), **d}
        return out


# ----------------------------------------------------------------------------- HTTP


class Server:
    """The endpoints; they share one worker, and so one model."""

    def __init__(self, assistant, limits=None, api_key=None, log_requests=False):
        self.assistant, self.limits, self.api_key, self.log_requests = assistant, limits or Limits(), api_key, log_requests
        self.worker = Worker(assistant, self.limits.max_batch)
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.html"), encoding="utf-8") as f:
            self.html = f.read()

    def app(self):
        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.worker.thread.start()
            yield
            self.worker.stop()

        routes = [Route("/", self.page), Route("/v1/models", self.models), Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/medmoe/preview", self.preview, methods=["POST"])]
        handlers = {RequestError: lambda request, e: error_response(e), HTTPException: self.http_error}
        return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)

    async def http_error(self, request, e):
        message = {404: f"no such path: {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(RequestError(e.status_code, message.get(e.status_code, e.detail)))

    async def page(self, request):
        return HTMLResponse(self.html, headers=PAGE_HEADERS)

    async def models(self, request):
        self.check_key(request)
        model = {"id": self.assistant.name, "object": "model", "created": 0, "owned_by": "medmoe"}
        return JSONResponse({"object": "list", "data": [model]})

    async def preview(self, request):
        """{"url": a scan's data: URL} -> the scan as a PNG (browsers show neither DICOM nor TIFF)."""
        self.check_key(request)
        body = await read_json(request, self.limits.max_body)
        scan = parse_data_url(body.get("url") if isinstance(body, dict) else None, "url")
        return Response(await run_in_threadpool(preview_png, scan, self.limits.max_pixels), media_type="image/png")

    def check_key(self, request):
        given = request.headers.get("authorization", "").encode()
        if self.api_key and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise RequestError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)")

    async def chat(self, request):
        self.check_key(request)
        chat = parse_chat(await read_json(request, self.limits.max_body), self.limits, self.assistant.name)
        try:
            prompt = self.assistant.prompt(chat.turns)
        except MedMoEError as e:
            raise RequestError(400, str(e), "messages") from None
        pixels = await run_in_threadpool(scan_pixels, self.assistant, chat.scan, self.limits.max_pixels)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": self.assistant.name}
        if self.log_requests:
            log.info("%s: questions %r; image %s, %d bytes, sha256 %s", head["id"], [q for q, _ in chat.turns], chat.scan[0],
                     len(chat.scan[1]), hashlib.sha256(chat.scan[1]).hexdigest())
        detok = vqa.Detokenizer(self.assistant.tok, self.assistant.stop)
        slot = Slot(chat, prompt, pixels, asyncio.get_running_loop(), asyncio.Queue(), detok)
        self.worker.submit(slot)
        if chat.stream:
            return StreamingResponse(self.sse(slot, head), media_type="text/event-stream", headers={"Cache-Control": "no-store"})
        return await self.complete(request, slot, head)

    async def complete(self, request, slot, head):
        """The whole answer as one JSON object; a client that hangs up first frees its slot."""
        answer, gone = asyncio.ensure_future(last_event(slot)), asyncio.ensure_future(disconnect(request))
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not answer.done():
            answer.cancel()
            slot.cancelled = True
            return Response(status_code=499)  # nginx's "client closed request": nobody is there to read it
        end = answer.result()
        self.log_answer(head, end)
        return JSONResponse({**head, "object": "chat.completion", "usage": end["usage"], "medmoe": end["medmoe"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": end["content"]},
                                          "finish_reason": end["finish_reason"], "logprobs": None}]})

    async def sse(self, slot, head):
        """Server-sent events in OpenAI's chunk shape, ending with [DONE]. Starlette cancels this
        generator when the client hangs up; the finally then frees its slot."""
        try:
            yield chunk(head, {"role": "assistant", "content": ""})
            while (item := await slot.events.get())[0] == "text":
                yield chunk(head, {"content": item[1]})
            if item[0] == "error":
                yield event(error_body(item[1].status, item[1].message))
            else:
                end = item[1]
                self.log_answer(head, end)
                yield chunk(head, {}, end["finish_reason"], medmoe=end["medmoe"])
                if slot.chat.include_usage:
                    yield event({**head, "object": "chat.completion.chunk", "choices": [], "usage": end["usage"]})
            yield "data: [DONE]\n\n"
        finally:
            slot.cancelled = True  # a no-op once the answer has ended

    def log_answer(self, head, end):
        if self.log_requests:
            log.info("%s: answer %r (%s)", head["id"], end["content"], end["finish_reason"])


def event(obj):
    return f"data: {json.dumps(obj)}\n\n"


def chunk(head, delta, finish=None, **extra):
    return event({**head, "object": "chat.completion.chunk", **extra,
                  "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})


def error_response(e):
    return JSONResponse(error_body(e.status, e.message, e.param), e.status)


async def read_json(request, cap):
    """The body as JSON, read no further than the cap."""
    too_big = RequestError(413, f"request body over this server's cap of {cap:,} bytes (medmoe serve --max-body-mb)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > cap:
            raise too_big
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"malformed JSON in the request body ({e})") from None


async def last_event(slot):
    """The end of a request's answer (its text pieces are skipped: the end carries all of it)."""
    while (item := await slot.events.get())[0] == "text":
        pass
    if item[0] == "error":
        raise item[1]
    return item[1]


async def disconnect(request):
    """Returns once the client has hung up (the body is read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ----------------------------------------------------------------------------- running


def check_host(host, api_key):
    """Only this machine may use a server without a key: a hospital network is no place for an open one."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise MedMoEError(f"--host {host} opens the server beyond this machine: set an API key (--api-key or MEDMOE_API_KEY)")


def run(assistant, host="127.0.0.1", port=8000, api_key=None, limits=None, log_requests=False, echo=print):
    """Serve until Ctrl-C. Port 0 takes any free port; the line printed names the one bound."""
    check_host(host, api_key)
    sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{sock.getsockname()[1]}"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    echo(f"medmoe serve: {assistant.name} at {url}/ (the page) and {url}/v1 (the API){'; API key required' if api_key else ''}")
    app = Server(assistant, limits, api_key, log_requests).app()
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down cleanly, then raises Ctrl-C again: it is how one stops it
        uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])
