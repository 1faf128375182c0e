"""The names a server answers to (issue 23 items 6 and 7): /v1/models lists the model's id and aliases (a local
package's name for a local package), and a request naming another model is OpenAI's 404 `model_not_found`."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra")
openai = pytest.importorskip("openai", reason="the server tests use the official openai client")
try:
    import httpx2 as httpx  # the maintained successor the openai client itself uses (as tests/server/test_server.py)
except ImportError:
    httpx = pytest.importorskip("httpx", reason="the server tests use httpx")

from starlette.testclient import TestClient  # noqa: E402

from phi3v_ort.server.app import create_app  # noqa: E402
from phi3v_ort.server.openai_request import ApiError  # noqa: E402
from phi3v_ort.server.served_models import check_model, served_names  # noqa: E402
from phi3v_ort.workers.pool import WorkerSpec  # noqa: E402
from tests.conftest import Served  # noqa: E402

HELLO = [{"role": "user", "content": "Hello"}]


def test_the_id_comes_first_and_each_name_once():
    assert served_names("phi-3-vision", ["phi-3-vision", "phi-3-vision:cpu-int4"]) == \
        ("phi-3-vision", "phi-3-vision:cpu-int4")
    assert served_names("mine", ["phi-3-vision"]) == ("mine", "phi-3-vision")


@pytest.mark.parametrize("model", ["gpt-4o", "", "PHI-3-VISION", "phi-3-vision:cuda-fp16", "x" * 5000])
def test_a_model_it_does_not_serve_is_model_not_found(model):
    with pytest.raises(ApiError) as refused:
        check_model(model, ("phi-3-vision", "phi-3-vision:cpu-int4"))
    body = refused.value.body()["error"]
    assert refused.value.status == 404 and (body["code"], body["param"]) == ("model_not_found", "model")
    assert body["type"] == "invalid_request_error" and "`phi-3-vision`" in body["message"]
    assert len(body["message"]) < 300  # a long name is cut


@pytest.mark.parametrize("model", [None, "phi-3-vision", "phi-3-vision:cpu-int4"])
def test_its_names_and_no_name_are_served(model):
    check_model(model, ("phi-3-vision", "phi-3-vision:cpu-int4"))


def test_a_served_server_answers_only_its_own_names(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny-int4-cpu"]  # --model-dir: the folder's name
    answer = client.chat.completions.create(model="tiny-int4-cpu", messages=HELLO, max_tokens=2)
    assert answer.model == "tiny-int4-cpu" and answer.choices[0].message.content
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2, stream=stream)
        assert refused.value.code == "model_not_found" and "gpt-4o" in refused.value.message
    r = httpx.post(served.url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == "tiny-int4-cpu"  # no `model`: the served one


def test_aliases_are_listed_and_accepted(tiny_dir):
    app = create_app(WorkerSpec(str(tiny_dir)), "phi-3-vision", aliases=("phi-3-vision", "phi-3-vision:cpu-int4"))
    try:
        c = TestClient(app, base_url="http://localhost")
        listed = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["phi-3-vision", "phi-3-vision:cpu-int4"]
        assert {m["root"] for m in listed} == {"phi-3-vision"}
        for name in ("phi-3-vision", "phi-3-vision:cpu-int4"):
            r = c.post("/v1/chat/completions", json={"model": name, "messages": HELLO, "max_tokens": 1})
            assert r.status_code == 200 and r.json()["model"] == "phi-3-vision"
        r = c.post("/v1/chat/completions", json={"model": "tiny-int4-cpu", "messages": HELLO, "max_tokens": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        app.state.pool.close()


def test_a_local_package_is_served_under_its_name(tiny_dir, tmp_path, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(tiny_dir, models / "my-tiny")
    monkeypatch.setenv("PHI3V_ORT_MODELS", str(models))
    from phi3v_ort.package.fetch import model_names

    assert model_names(str(models / "my-tiny"), None, "cpu") == ("my-tiny",)  # -m PATH: the name, not the path
    assert model_names("my-tiny", None, "cpu") == ("my-tiny",)
    server = Served(models / "my-tiny", tmp_path)  # --model-dir of a folder in the models folder
    try:
        listed = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in listed] == ["my-tiny"]
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                       json={"model": "my-tiny", "messages": HELLO, "max_tokens": 1})
        assert r.status_code == 200 and r.json()["model"] == "my-tiny"
    finally:
        server.stop()
