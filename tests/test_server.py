"""``esm-index serve`` as a real process on a free loopback port, the HTTP ``Client`` and the
CLI's ``--server`` path: same rankings as local mode, concurrent requests, one-line 4xx
errors for every kind of bad request, the token, disconnecting clients, SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, SAMPLES, random_esms, read_sample
from esm_index.cli import main
from esm_index.client import Client, ServiceError
from esm_index.errors import IndexStoreError, InvalidArgumentError, InvalidTargetError
from esm_index.index import SourceIndex
from esm_index.server import check_bind, is_loopback

TOKEN = "test-token-1234"
TARGET = str(SAMPLES / "sms_spam.csv")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pool(tmp_path_factory, tiny_model):
    """40 sources for the tiny model: more than the default shortlist, so the prefilter runs."""
    folder = tmp_path_factory.mktemp("served") / "idx"
    with SourceIndex.create(folder, tiny_model) as index:
        esms = random_esms(np.random.default_rng(7), 40, 32, scale=1.0)
        for i, e in enumerate(esms):
            e.meta.update({"task_id": f"s{i}", "language": "en" if i % 2 else "de", "num_examples": 50 * i})
        index.add_esms((f"s{i}", e) for i, e in enumerate(esms))
        index.rebuild()
    return folder


@pytest.fixture(scope="module")
def server(pool, tmp_path_factory):
    """A real server process (token required, small limits so the limit checks are cheap)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("log") / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ESM_INDEX_TOKEN": TOKEN,
           "ESM_INDEX_CACHE": str(tmp_path_factory.mktemp("server-cache"))}
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "esm_index.cli", "serve", "--index", f"tiny={pool}",
                                 "--port", str(port), "--max-body-mb", "1", "--max-rows", "600",
                                 "--max-targets", "20"], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # a bound, not an expectation: ~5 s on a quiet 2-core machine, minutes when starved
    while True:
        try:
            Client(url).health()
            break
        except ServiceError:
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.2)
    yield {"url": url, "port": port, "proc": proc, "log": log, "pool": pool}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(300)


@pytest.fixture
def client(server):
    return Client(server["url"], token=TOKEN)


def _post(server, path: str, body: bytes, token: str | None = TOKEN, headers: dict | None = None):
    """A raw request: (status, parsed JSON) of the answer, which must be one line of JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=600)
    head = {"Content-Type": "application/json", **(headers or {})}
    if token:
        head["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=body, headers=head)
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    assert "\n" not in raw.strip() and "Traceback" not in raw, raw
    return response.status, json.loads(raw)


def _local(pool) -> SourceIndex:
    return SourceIndex(pool, readonly=True)


def _embedded_target(pool, n=120, offset=0):
    texts, names = read_sample("sms_spam", n + offset)
    with _local(pool) as index:
        x = index.embed(texts[offset:])
    return x, np.asarray([s == "spam" for s in names[offset:]], int)


def _same(remote, local) -> None:
    assert [r.source for r in remote.results] == [r.source for r in local.results]
    assert np.allclose([r.score for r in remote.results], [r.score for r in local.results], rtol=1e-9)
    assert remote.pool_size == local.pool_size and remote.target == local.target


def test_rankings_equal_local_mode(server, client):
    texts, names = read_sample("sms_spam", 150)
    labels = np.asarray([s == "spam" for s in names], int)
    with _local(server["pool"]) as index:
        local = index.rank(texts, labels, "classification", top=8)
        local_exact = index.rank(texts, labels, "classification", top=40, exact=True)
        x = index.embed(texts)
    remote = client.rank(texts, labels, "classification", top=8)
    _same(remote, local)
    assert type(remote) is type(local) and {"queue", "embed", "exact"} <= set(remote.timings)
    _same(client.rank(texts, labels, top=40, exact=True), local_exact)
    _same(client.rank_embeddings(x, labels, top=8), local)
    many = client.rank_many([{"embeddings": x, "labels": labels}, {"texts": texts, "labels": names}], top=8)
    _same(many[0], local)
    _same(many[1], local)  # "ham"/"spam" numbered in sorted order, as in a file
    assert [i["name"] for i in client.indexes()] == ["tiny"] and len(client.sources()) == 40


def _approx_equal(a, b) -> bool:
    """Equal JSON, floats to 1e-9: the server's query threads run the kernels with one thread,
    which sums in another order than local mode's two (differences ~1e-12)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_approx_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_approx_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-12)
    return a == b


def test_cli_output_is_identical_to_local_mode(server, runner, monkeypatch):
    monkeypatch.setenv("ESM_INDEX_TOKEN", TOKEN)
    base = ["rank", TARGET, "--index", str(server["pool"]), "--text-col", "text", "--label-col", "label", "--top", "5"]
    outputs = {}
    for mode, extra in (("local", []), ("remote", ["--server", server["url"]])):
        for fmt in ("table", "--json", "--csv"):
            result = runner.invoke(main, base + extra + ([] if fmt == "table" else [fmt]))
            assert result.exit_code == 0, result.output
            outputs[mode, fmt] = result.stdout
    assert outputs["local", "--csv"] == outputs["remote", "--csv"]
    assert outputs["local", "table"].splitlines()[1:] == outputs["remote", "table"].splitlines()[1:]
    local, remote = json.loads(outputs["local", "--json"]), json.loads(outputs["remote", "--json"])
    assert {"startup", "other", "total"} <= set(remote["timings"]) and {"startup", "other", "total"} <= set(local["timings"])
    assert local["timings"]["total"] >= sum(v for k, v in local["timings"].items() if k != "total") - 1e-3
    local.pop("timings"), remote.pop("timings")
    assert _approx_equal(local, remote)
    monkeypatch.setenv("ESM_INDEX_SERVER", server["url"])  # the environment names the server too
    assert runner.invoke(main, base + ["--csv"]).stdout == outputs["local", "--csv"]


def test_the_cli_client_path_imports_neither_numpy_nor_torch(server):
    code = ("import sys\nfrom esm_index.cli import main\n"
            f"main(['rank', {TARGET!r}, '--text-col', 'text', '--label-col', 'label', '--server', "
            f"{server['url']!r}, '--csv'], standalone_mode=False)\n"
            "print(sorted(m for m in ('numpy', 'torch', 'faiss', 'fastapi', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "ESM_INDEX_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]" and result.stdout.startswith("rank,source,score")


def test_concurrent_requests(server, client):
    targets = [_embedded_target(server["pool"], 60, offset=20 * i) for i in range(4)]
    with _local(server["pool"]) as index:
        expected = [index.rank_embeddings(x, y, top=5) for x, y in targets]
    results, failures = {}, []

    def worker(k: int) -> None:
        try:
            for j in range(3):
                i = (k + j) % len(targets)
                results[k, j] = (i, client.rank_embeddings(*targets[i], top=5))
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures and len(results) == 24
    for i, ranking in results.values():
        _same(ranking, expected[i])
    assert client.health()["status"] == "ok"
    assert "OpenBLAS Warning" not in server["log"].read_text()  # see server._warm


def test_bad_requests_get_one_line_4xx(server):
    x, y = _embedded_target(server["pool"], 40)
    good = {"index": "tiny", "targets": [{"embeddings": x.tolist(), "labels": y.tolist()}]}

    def rank(**change) -> tuple[int, dict]:
        target = {**good["targets"][0], **change.pop("target", {})}
        return _post(server, "/rank", json.dumps({**good, "targets": [target], **change}).encode())

    assert rank()[0] == 200
    assert _post(server, "/rank", b'{"targets": [{"labels": [1, 2')[0] == 400  # malformed JSON
    assert _post(server, "/rank", b"not json at all")[0] == 400
    status, answer = rank(target={"embeddings": [row[:31] for row in x.tolist()]})  # wrong dimension
    assert status == 400 and "32" in answer["error"]
    assert rank(target={"embeddings": [], "labels": []})[0] == 400  # empty target
    status, answer = rank(target={"labels": [1] * len(y)})  # a single class
    assert status == 400 and answer["type"] == "InvalidTargetError"
    bad = json.dumps(good).replace(str(x.tolist()[3][5]), "NaN", 1).encode()  # NaN is not JSON, but Python writes it
    assert _post(server, "/rank", bad)[0] == 422
    assert rank(target={"labels": [float("inf")] * len(y), "task": "regression"})[0] == 422
    status, answer = rank(index="no-such-index")
    assert status == 404 and "no-such-index" in answer["error"]
    assert rank(target={"texts": ["a"] * len(y)})[0] == 400  # texts and embeddings at once
    assert rank(top=0)[0] == 400
    assert rank(target={"labels": y.tolist()[:-1]})[0] == 400  # one label short
    big = json.dumps({"targets": [{"texts": ["x" * 1000] * 1100, "labels": [0, 1] * 550}]}).encode()
    assert _post(server, "/rank", big)[0] == 413  # over --max-body-mb 1
    assert rank(target={"texts": ["short text"] * 700, "labels": [0, 1] * 350, "embeddings": None})[0] == 400  # rows
    assert rank(targets=good["targets"] * 21)[0] == 400  # over --max-targets 20
    assert _post(server, "/no-such-path", b"{}")[0] == 404
    status, answer = _post(server, "/rank", json.dumps(good).encode(), token=None)
    assert status == 401 and "token" in answer["error"]
    assert _post(server, "/rank", json.dumps(good).encode(), token="wrong")[0] == 401
    assert "Traceback" not in server["log"].read_text()


def test_client_and_cli_raise_the_typed_errors(server, client, runner, tmp_path, monkeypatch):
    texts, _ = read_sample("sms_spam", 40)
    with pytest.raises(InvalidTargetError):
        client.rank(texts, [0] * 40)
    with pytest.raises(IndexStoreError):
        Client(server["url"], index="nope", token=TOKEN).rank(texts, [0, 1] * 20)
    with pytest.raises(ServiceError):
        Client(f"http://127.0.0.1:{_free_port()}").health()
    with pytest.raises(InvalidArgumentError):
        Client("ftp://example.org")
    monkeypatch.setenv("ESM_INDEX_TOKEN", TOKEN)
    (tmp_path / "one.csv").write_text("text,label\n" + "".join(f"t{i},a\n" for i in range(30)))
    result = runner.invoke(main, ["rank", str(tmp_path / "one.csv"), "--text-col", "text", "--label-col", "label",
                                  "--server", server["url"]])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1
    local_only = runner.invoke(main, ["rank", TARGET, "--text-col", "text", "--label-col", "label", "--device", "cpu",
                                      "--server", server["url"]])
    assert local_only.exit_code == 2 and "--device" in local_only.output and len(local_only.output.splitlines()) == 1


def test_a_disconnecting_client_leaves_the_server_healthy(server, client):
    body = json.dumps({"targets": [{"texts": read_sample("sms_spam", 200)[0], "labels": [0, 1] * 100}]}).encode()
    head = (f"POST /rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for cut in (len(body) // 2, len(body)):  # gone mid-upload, and gone while the query runs
        with socket.create_connection(("127.0.0.1", server["port"])) as s:
            s.sendall(head + body[:cut])
        time.sleep(0.2)
    texts, names = read_sample("sms_spam", 100)
    assert client.rank(texts, names, None, top=3).pool_size == 40
    assert client.health()["status"] == "ok" and server["proc"].poll() is None


def test_the_token_is_required_beyond_loopback(runner, pool):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "a-token")
    with pytest.raises(InvalidArgumentError, match="token"):
        check_bind("0.0.0.0", None)
    result = runner.invoke(main, ["serve", "--index", str(pool), "--host", "0.0.0.0"], env={"ESM_INDEX_TOKEN": ""})
    assert result.exit_code == 2 and "token" in result.output and len(result.output.splitlines()) == 1


def test_a_writer_beside_the_server(server, client):
    """Another process adds sources while the server runs: the next query ranks the new pool
    (the server notices the new LMDB generation and reloads the prefilter)."""
    x, y = _embedded_target(server["pool"], 120)
    assert client.rank_embeddings(x, y, top=3).pool_size == 40
    with SourceIndex(server["pool"]) as writer:
        extra = random_esms(np.random.default_rng(11), 5, 32, scale=1.0)
        writer.add_esms((f"new{i}", e) for i, e in enumerate(extra))
        writer.rebuild()
    remote = client.rank_embeddings(x, y, top=45, exact=True)
    with _local(server["pool"]) as index:
        _same(remote, index.rank_embeddings(x, y, top=45, exact=True))
    assert remote.pool_size == 45 and any(r.source.startswith("new") for r in remote.results)
    with pytest.raises(InvalidTargetError, match="NaN"):
        client.rank_embeddings(np.full((30, 32), np.nan), [0, 1] * 15)


def test_sigterm_finishes_the_request_in_flight_then_exits(server, client):
    """Last in this file: it stops the module's server."""
    x, y = _embedded_target(server["pool"], 120)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(
        client.rank_many([{"embeddings": x, "labels": y}] * 8, top=40, exact=True)))
    slow.start()
    time.sleep(0.3)
    server["proc"].send_signal(signal.SIGTERM)
    slow.join(600)
    assert len(answers) == 1 and len(answers[0]) == 8
    # uvicorn re-raises the signal once it has drained and the lifespan has closed the indexes
    assert server["proc"].wait(300) in (0, -signal.SIGTERM)
    assert "indexes closed" in server["log"].read_text()
    with pytest.raises(ServiceError):
        client.health()
