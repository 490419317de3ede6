"""medmoe serve against the official openai client, on a live server on 127.0.0.1 with a tiny model:
plain and streamed answers equal `medmoe ask`'s for the same image and question (and its routing),
multi-turn equals a cache-free greedy oracle, concurrent requests are batched and still answered as
alone, a client that leaves frees its slot, the API key is enforced, and every bad request gets its
status and an OpenAI-shaped error while the server goes on answering."""

import base64
import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from PIL import Image
from test_vqa import QUESTION, dataset, model_dir, oracle, run  # noqa: F401 -- the tiny MoE model and images of the ask tests

from medmoe import data, serve, vqa

ROOT = os.path.join(os.path.dirname(__file__), "..")
LIMITS = serve.Limits(max_body=300_000, max_pixels=250_000, max_tokens=64, max_batch=8)


@contextlib.contextmanager
def running(server):
    """The server's app under uvicorn in a thread, on a free port of 127.0.0.1; its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(server.app(), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not uv.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def live(model_dir):  # noqa: F811
    server = serve.Server(vqa.Assistant(model_dir), LIMITS)
    with running(server) as url:
        yield server, url


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[1] + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def images(dataset):  # noqa: F811
    return sorted({ex.image for ex in data.load_examples(dataset)})[::3]  # one of each modality


def data_url(path, media="image/png"):
    with open(path, "rb") as f:
        return f"data:{media};base64,{base64.b64encode(f.read()).decode()}"


def user(question, image=None):
    content = [{"type": "text", "text": question}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": data_url(image) if os.path.isfile(image) else image}})
    return {"role": "user", "content": content}


def ask_cli(model_dir, image, question, n=8):  # noqa: F811
    """What `medmoe ask` prints: the oracle every answer here is held to."""
    result = run("ask", image, question, "--model", model_dir, "--max-new-tokens", n)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def create(client, image, question=QUESTION, **kw):
    return client.chat.completions.create(model="moe", messages=[user(question, image)], **{"max_tokens": 8, "temperature": 0, **kw})


def streamed(client, image, question=QUESTION, **kw):
    """(the text of the deltas, the chunk with the finish reason, the usage chunk)."""
    chunks = list(create(client, image, question, stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, next(c for c in chunks if c.choices and c.choices[0].finish_reason), chunks[-1]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["moe"]


def test_plain_and_streamed_answers_equal_ask(client, model_dir, images):  # noqa: F811
    a = vqa.Assistant(model_dir)
    for image in images:
        expected = ask_cli(model_dir, image, QUESTION)
        assert expected  # the random model says something within 8 tokens: the comparison means something
        plain = create(client, image)
        assert plain.choices[0].message.content == expected
        text, end, usage_chunk = streamed(client, image)
        assert text == expected and end.choices[0].finish_reason == plain.choices[0].finish_reason
        prompt = a.prompt([(QUESTION, None)])
        tokens = a.model.generate([prompt], a.pixels(image), max_new_tokens=8, stop_ids=a.stop)[0]
        for usage in (plain.usage, usage_chunk.usage):
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(tokens))
        assert plain.choices[0].finish_reason == ("length" if len(tokens) == 8 else "stop")


def test_routing_extension_is_what_ask_shows(client, model_dir, images):  # noqa: F811
    image = images[0]
    shown = json.loads(run("ask", image, QUESTION, "--model", model_dir, "--max-new-tokens", 8, "--json", "--show-routing").stdout)
    for routing in (create(client, image).medmoe["routing"], streamed(client, image)[1].medmoe["routing"]):
        assert routing["expert"] == max(shown["routing"]["router_sees"], key=shown["routing"]["router_sees"].get)
        assert routing["router_sees"] == pytest.approx(shown["routing"]["router_sees"], abs=1e-5)
        assert [layer["layer"] for layer in routing["layers"]] == [layer["layer"] for layer in shown["routing"]["layers"]]
        for got, want in zip(routing["layers"], shown["routing"]["layers"]):
            assert got["image"] == pytest.approx(want["image"], abs=1e-5) and got["text"] == pytest.approx(want["text"], abs=1e-5)


def test_multi_turn_answers_the_whole_conversation(client, model_dir, images):  # noqa: F811
    a, image = vqa.Assistant(model_dir), images[1]
    first = create(client, image).choices[0].message.content
    follow_up = "Is this a ct image?"
    messages = [user(QUESTION, image), {"role": "assistant", "content": first}, user(follow_up)]
    answer = client.chat.completions.create(model="moe", messages=messages, max_tokens=8, temperature=0).choices[0].message.content
    assert answer == oracle(a, image, [(QUESTION, first), (follow_up, None)])
    assert answer != oracle(a, image, [(follow_up, None)])  # the first turn is in the prompt: it changes the answer


def test_max_tokens_stop_and_seed(client, model_dir, images):  # noqa: F811
    image = images[2]
    short = create(client, image, max_tokens=2)
    assert short.choices[0].message.content == ask_cli(model_dir, image, QUESTION, 2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    full = ask_cli(model_dir, image, QUESTION)
    space = full.index(" ")
    stop = full[space + 1 : space + 4]  # a stop string inside the answer, after a space: the answer ends before both
    assert len(stop) == 3 and stop.strip()
    expected = full[: full.index(stop)].rstrip()
    assert full[: full.index(stop)] != expected  # what comes before it ends in spaces, which the answer drops as `ask`'s does
    cut = create(client, image, stop=[stop, "never said"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert streamed(client, image, stop=stop)[0] == expected  # held back while it might still be the stop string
    sampled = [create(client, image, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_concurrent_requests_are_batched_and_answered_as_alone(live, client, model_dir, images):  # noqa: F811
    server, _ = live
    questions = [QUESTION, "Is this a mri image?", QUESTION, "Is this a xray image?"]
    expected = [ask_cli(model_dir, image, q) for image, q in zip(images, questions)]

    def answer(i):  # streamed and plain requests alike
        if i % 2:
            r = create(client, images[i], questions[i])
            return r.choices[0].message.content, r.medmoe
        text, end, _ = streamed(client, images[i], questions[i])
        return text, end.medmoe

    with ThreadPoolExecutor(4) as pool:
        with server.worker.busy:  # the model is busy: the four requests queue up
            futures = [pool.submit(answer, i) for i in range(4)]
            wait_for(lambda: len(server.worker.waiting) == 4)
        results = [f.result() for f in futures]
    assert [text for text, _ in results] == expected
    assert [ext["batch_size"] for _, ext in results] == [4] * 4  # decoded together, as one left-padded batch


def test_clients_that_leave_free_their_slots(live, client, model_dir, images):  # noqa: F811
    server, url = live
    dropped = server.worker.dropped
    with ThreadPoolExecutor(1) as pool:
        with server.worker.busy:
            stream = create(client, images[0], stream=True, max_tokens=64)
            next(iter(stream))  # the first chunk has arrived: the request is queued
            stream.close()  # and its client hangs up
            body = json.dumps(request(user(QUESTION, images[2]))).encode()
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as plain:  # a plain request's client too
                plain.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                wait_for(lambda: len(server.worker.waiting) == 2)
            wait_for(lambda: all(s.cancelled for s in server.worker.waiting))
            other = pool.submit(create, client, images[1])
            wait_for(lambda: len(server.worker.waiting) == 3)
        r = other.result()
    assert r.medmoe["batch_size"] == 1 and server.worker.dropped == dropped + 2  # decoded alone: the two left
    assert r.choices[0].message.content == ask_cli(model_dir, images[1], QUESTION)


def wait_for(condition, seconds=10):
    end = time.time() + seconds
    while not condition():
        assert time.time() < end, "timed out"
        time.sleep(0.01)


# ----------------------------------------------------------------------------- bad requests


def post(url, body, key=None, path="/v1/chat/completions"):
    """(status, JSON body) of a raw POST, whatever the status."""
    body = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, body, headers), timeout=30) as r:
            return r.status, (json.loads(r.read()) if r.headers.get_content_type() == "application/json" else None)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png_url(size):
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request(*messages, **kw):
    return {"model": "moe", "messages": list(messages), **kw}


def bad_requests(image):
    good = user(QUESTION, image)
    return {
        "malformed JSON": (b'{"messages": [', 400, "malformed JSON"),
        "not an object": ([1, 2], 400, "JSON object"),
        "no image": (request(user(QUESTION)), 400, "no image"),
        "two images": (request(user(QUESTION, image), {"role": "assistant", "content": "ct"}, user(QUESTION, image)), 400, "2 images"),
        "a URL, not data:": (request(user(QUESTION, "https://example.org/scan.png")), 400, "data: URL"),
        "a server file": (request(user(QUESTION, "file:///etc/passwd")), 400, "reads no file"),
        "corrupt image": (request(user(QUESTION, "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 200).decode())),
                          422, "image"),
        "unsupported image type": (request(user(QUESTION, "data:image/gif;base64,R0lGODlhAQABAAAAACw=")), 422, "unsupported image type"),
        "huge image": (request(user(QUESTION, png_url((600, 600)))), 413, "360,000 pixels"),
        "huge body": (request(user("x" * 400_000, image)), 413, "request body"),
        "too many tokens": (request(good, max_tokens=10_000), 422, "max_tokens 10000"),
        "empty question": (request(user(" ", image)), 400, "empty question"),
        "system prompt": (request({"role": "system", "content": "be brief"}, good), 400, "system prompt"),
        "ends with the assistant": (request(good, {"role": "assistant", "content": "ct"}), 400, "last message"),
        "unknown model": (request(good, model="gpt-4"), 404, "gpt-4"),
        "bad temperature": (request(good, temperature=-1), 400, "temperature"),
    }


def test_every_bad_request_gets_its_status_and_the_server_goes_on(live, client, model_dir, images):  # noqa: F811
    _, url = live
    for name, (body, status, says) in bad_requests(data_url(images[0])).items():
        got, error = post(url, body)
        assert got == status, name
        assert error["error"]["code"] == status and says in error["error"]["message"], (name, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}
    got, error = post(url, {}, path="/v1/nowhere")
    assert got == 404 and error["error"]["message"] == "no such path: /v1/nowhere"
    with pytest.raises(openai.BadRequestError, match="no image"):  # the client sees the message too
        client.chat.completions.create(model="moe", messages=[user(QUESTION)])
    assert create(client, images[0]).choices[0].message.content == ask_cli(model_dir, images[0], QUESTION)  # still serving


def test_api_key_is_enforced(model_dir, images):  # noqa: F811
    server = serve.Server(vqa.Assistant(model_dir), LIMITS, api_key="s3cret")
    with running(server) as url:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            create(openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0), images[0])
        for key in (None, "wrong"):  # no key at all: the openai client will not even send that
            assert post(url, request(user(QUESTION, images[0])), key=key)[0] == 401
            assert post(url, {}, key=key, path="/medmoe/preview")[0] == 401
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list()] == ["moe"]
        assert create(keyed, images[0]).choices[0].message.content == ask_cli(model_dir, images[0], QUESTION)


def test_questions_reach_the_log_only_when_asked(model_dir, images, caplog):  # noqa: F811
    secret = "Is this patient 4711's ct image?"
    for log_requests in (False, True):
        caplog.clear()
        with caplog.at_level("DEBUG"), running(serve.Server(vqa.Assistant(model_dir), LIMITS, log_requests=log_requests)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            answer = create(client, images[0], secret).choices[0].message.content
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert "answered a batch of 1" in logged  # the log is there, and was captured
        assert (secret in logged and repr(answer) in logged) == log_requests
        assert data_url(images[0])[22:80] not in logged  # the image never (only its digest)


def test_dicom_scans_answer_as_the_file_does(client, live, model_dir):  # noqa: F811
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("CT_small.dcm")
    scan = data_url(path, "application/dicom")
    assert create(client, scan).choices[0].message.content == ask_cli(model_dir, path, QUESTION)
    with urllib.request.urlopen(urllib.request.Request(live[1] + "/medmoe/preview", json.dumps({"url": scan}).encode())) as r:
        png = Image.open(io.BytesIO(r.read()))
    assert png.format == "PNG" and png.size == data.load_image(path).size  # 128 x 128: under the 512 px preview side, as read


# ----------------------------------------------------------------------------- the command


def test_serve_refuses_an_open_address_without_a_key(model_dir):  # noqa: F811
    result = run("serve", "--model", model_dir, "--host", "0.0.0.0")
    assert result.exit_code == 1 and "API key" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_serve_command_serves_with_the_key_from_the_environment(model_dir):  # noqa: F811
    env = {**os.environ, "MEDMOE_API_KEY": "from-env", "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "medmoe.cli", "serve", "--model", str(model_dir), "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "API key required" in line, line
        url = line.split(" at ")[1].split("/ ")[0]
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url + "/v1/models", timeout=30)
        assert e.value.code == 401
        req = urllib.request.Request(url + "/v1/models", headers={"Authorization": "Bearer from-env"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == os.path.basename(str(model_dir))
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
