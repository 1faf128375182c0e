"""The API is the CLI's engine: one greedy request gives the same tokens through `phi3v_ort`, `run`, `chat`,
`batch` and the server."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from phi3v_ort.cli import cli

QUESTION = "Could you please introduce this stock to me?"
FOLLOW_UP = "And the trend?"
N = 12


def test_the_api_run_chat_batch_and_the_server_give_the_same_tokens(model, chart, tiny_dir, served, tmp_path):
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx
    answer = model.ask(QUESTION, images=[chart], max_new_tokens=N)
    assert len(answer.token_ids) == N  # a full budget: no early end token makes the comparison trivial

    run = CliRunner().invoke(cli, ["run", "--model-dir", str(tiny_dir), "-i", str(chart), "--max-new-tokens", str(N),
                                   "--json", QUESTION])
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["token_ids"] == list(answer.token_ids)

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"id": "chart", "images": [str(chart)], "question": QUESTION}) + "\n")
    out = tmp_path / "out.jsonl"
    batch = CliRunner().invoke(cli, ["batch", str(items), "-o", str(out), "--model-dir", str(tiny_dir),
                                     "--max-new-tokens", str(N)])
    assert batch.exit_code == 0, batch.stderr
    line = json.loads(out.read_text().splitlines()[0])
    assert line["token_ids"] == list(answer.token_ids) and line["answer"] == answer.text

    chat = model.chat()
    turns = [chat.ask(QUESTION, images=[chart], max_new_tokens=N), chat.ask(FOLLOW_UP, max_new_tokens=N)]
    assert turns[0].token_ids == answer.token_ids and turns[1].stats.kv_reused
    cli_chat = CliRunner().invoke(cli, ["chat", "--model-dir", str(tiny_dir), "-i", str(chart), "--max-new-tokens",
                                        str(N)], input=f"{QUESTION}\n{FOLLOW_UP}\n")
    assert cli_chat.exit_code == 0, cli_chat.stderr
    assert cli_chat.stdout == "".join(t.text + "\n" for t in turns)  # each turn's answer, as streamed

    import base64

    image = "data:image/png;base64," + base64.b64encode(chart.read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                      {"type": "image_url", "image_url": {"url": image}}]}],
            "max_tokens": N}
    response = httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    served_answer = response.json()
    assert served_answer["choices"][0]["message"]["content"] == answer.text
    assert served_answer["usage"] == {"prompt_tokens": answer.prompt_tokens, "completion_tokens": N,
                                      "total_tokens": answer.prompt_tokens + N}


@pytest.fixture(autouse=True)
def _serve_extra():
    pytest.importorskip("starlette", reason="the server needs the serve extra")
