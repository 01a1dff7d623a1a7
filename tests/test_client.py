"""The add-in's HTTP client against a small OpenAI-shaped server (conftest's FakeEmbeddingServer):
formulas in threads do not wait for each other, a text in flight is sent once, the cache follows
the served model, a cache smaller than one call still answers, the API key stays out of reprs,
a busy server is asked again, an answer not the service's is a sentence; where the settings come
from; which prompt fields a formula's requests carry, and what a formula sends for a whole column."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import FakeClock, serve_in_background

from excel_addin import udfs
from excel_addin.client import EmbedClient
from excel_addin.settings import ServiceError, Settings, load_settings

DEADLINE_S = 10.0  # for what should take milliseconds; a failing test waits this long, once


@pytest.fixture()
def make_client(fake_server):
    """EmbedClients pointed at the fake server, closed after the test."""
    made = []

    def make(clock=None, sleep=None, **settings) -> EmbedClient:
        extra = {k: v for k, v in (("clock", clock), ("sleep", sleep)) if v}
        client = EmbedClient(Settings(server_url=fake_server.url, **settings), **extra)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def test_a_one_text_call_completes_while_a_large_call_is_blocked_in_the_server(fake_server, make_client):
    client = make_client()
    column = [f"row {i}" for i in range(2000)]
    fake_server.hold = {"row 0"}
    with ThreadPoolExecutor(2) as pool:
        large = pool.submit(client.vectors, column)
        fake_server.wait_for_request("row 0")
        small = pool.submit(client.vectors, ["one cell"])
        try:
            vector = small.result(timeout=DEADLINE_S)["one cell"]
            assert not large.done()  # the column is still held in the server
        finally:
            fake_server.release.set()
        assert set(large.result(timeout=DEADLINE_S)) == set(column)
    np.testing.assert_array_equal(vector, fake_server.vector("one cell"))


def test_a_named_prompt_is_sent_as_one_cached_apart_and_an_instruction_takes_its_place(
        fake_server, make_client):
    client = make_client()
    client.vectors(["q"])
    client.vectors(["q"], prompt_name="query")
    client.vectors(["q"], "Find the clause", prompt_name="query")  # the server takes one, not both
    client.vectors(["q"], prompt_name="query")  # cached
    posts = [r for r in fake_server.seen if r["path"] == "/v1/embeddings"]
    assert [(r["instruction"], r["prompt_name"]) for r in posts] == [
        (None, None), (None, "query"), ("Find the clause", None)]


@pytest.fixture()
def formulas(monkeypatch, fake_server):
    """The xlwings formulas pointed at the fake server, as EMBED_SERVER_URL would in Excel."""
    for name in ("EMBED_API_KEY", "EMBED_INSTRUCTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EMBED_SERVER_URL", fake_server.url)
    monkeypatch.setattr("excel_addin.settings._xlwings_user_config", lambda: {})
    return udfs


def test_semantic_search_sends_its_query_with_the_models_query_prompt(formulas, fake_server):
    # As the batch job's search does: Qwen3's query instruction, none for models without a
    # query prompt (the server decides); a formula's instruction takes its place.
    udfs.semantic_search("reset my password", [["Steps to reset"], ["Refunds"]], 1)
    udfs.semantic_search("reset my password", [["Steps to reset"], ["Refunds"]], 1, "Find the article")
    posts = [(r["input"], r["instruction"], r["prompt_name"])
             for r in fake_server.seen if r["path"] == "/v1/embeddings"]
    assert sorted(posts, key=str) == sorted([
        (["reset my password"], None, "query"),
        (["Steps to reset", "Refunds"], None, None),
        (["reset my password"], "Find the article", None)], key=str)


def test_a_text_in_flight_in_another_thread_is_sent_once(fake_server, make_client):
    client = make_client()
    fake_server.hold = {"shared"}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.vectors, ["shared", "first only"])
        fake_server.wait_for_request("shared")
        second = pool.submit(client.vectors, ["shared", "second only"])
        try:
            fake_server.wait_for_request("second only")  # the texts nobody fetches it sends itself
        finally:
            fake_server.release.set()
        a, b = first.result(timeout=DEADLINE_S), second.result(timeout=DEADLINE_S)
    assert fake_server.carrying("shared") == 1
    np.testing.assert_array_equal(a["shared"], fake_server.vector("shared"))
    np.testing.assert_array_equal(b["shared"], fake_server.vector("shared"))
    np.testing.assert_array_equal(b["second only"], fake_server.vector("second only"))


def test_a_failed_fetch_gives_the_threads_waiting_for_it_the_same_sentence(fake_server, make_client):
    client = make_client(max_retries=0)
    fake_server.hold = fake_server.fail = {"shared"}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.vectors, ["shared", "first only"])
        fake_server.wait_for_request("shared")
        second = pool.submit(client.vectors, ["shared", "second only"])
        try:
            fake_server.wait_for_request("second only")
        finally:
            fake_server.release.set()
        with pytest.raises(ServiceError) as failed_first:
            first.result(timeout=DEADLINE_S)
        with pytest.raises(ServiceError) as failed_second:
            second.result(timeout=DEADLINE_S)  # raises in time: the waiter does not hang
    assert str(failed_second.value) == str(failed_first.value)
    assert "busy or unavailable: The model is restarting. Recalculate to retry." in str(failed_second.value)
    assert fake_server.carrying("shared") == 1


def test_a_cached_sheet_is_fetched_again_only_when_the_server_changes_model(fake_server, make_client):
    clock = FakeClock()
    client = make_client(clock=clock, model_ttl_s=30.0)
    sheet = ["termination", "notice period", "renewal"]
    first = client.vectors(sheet)
    assert client.requests == 1

    clock.now += 31  # past the time-to-live, same model: the cache answers, no embedding request
    unchanged = client.vectors(sheet)
    assert client.requests == 1
    for text in sheet:
        np.testing.assert_array_equal(unchanged[text], first[text])

    fake_server.model = "fake-model-b"
    clock.now += 31  # the next check finds the new model: the sheet gets its vectors
    fresh = client.vectors(sheet)
    for text in sheet:
        np.testing.assert_array_equal(fresh[text], fake_server.vector(text, model="fake-model-b"))
    assert client.requests == 2

    client.vectors(sheet)  # within the time-to-live: cached, nothing sent
    assert client.requests == 2
    assert client.model_checks == 3  # GET /v1/models: the first call, then once per 31 s step


def test_a_cell_just_typed_after_the_time_to_live_is_sent_without_asking_for_the_model(
        fake_server, make_client):
    """None of its texts cached: the answer names the model, so GET /v1/models would only
    add a round trip; a model changed meanwhile is still caught from that answer."""
    clock = FakeClock()
    client = make_client(clock=clock, model_ttl_s=30.0)
    client.vectors(["termination"])
    assert (client.model_checks, client.requests) == (1, 1)

    clock.now += 31
    typed = client.vectors(["notice period"])
    assert (client.model_checks, client.requests) == (1, 2)
    np.testing.assert_array_equal(typed["notice period"], fake_server.vector("notice period"))

    fake_server.model = "fake-model-b"
    clock.now += 31
    typed = client.vectors(["renewal"])
    assert (client.model_checks, client.requests) == (1, 3)
    np.testing.assert_array_equal(typed["renewal"], fake_server.vector("renewal", model="fake-model-b"))
    # The answer named the new model: what was cached under the old one is not used.
    again = client.vectors(["termination"])
    assert client.requests == 4
    np.testing.assert_array_equal(again["termination"], fake_server.vector("termination", model="fake-model-b"))

    clock.now += 31  # cached texts after the time-to-live: the model is asked first
    client.vectors(["termination", "a new cell"])
    assert client.model_checks == 2


def test_a_cached_sheet_is_fetched_again_when_the_same_model_name_serves_another_version(
        fake_server, make_client):
    """A new model_revision (or token limit, or precision) under the same served name gives
    other vectors: the server's system_fingerprint says so, and old ones must not be mixed in."""
    clock = FakeClock()
    fake_server.fingerprint = "fp_0123456789"
    client = make_client(clock=clock, model_ttl_s=30.0)
    sheet = ["termination", "notice period"]
    first = client.vectors(sheet)
    assert client.requests == 1
    np.testing.assert_array_equal(first["termination"], fake_server.vector("termination"))

    fake_server.fingerprint = "fp_9876543210"  # the operator deployed another revision
    clock.now += 31
    fresh = client.vectors(sheet)
    assert client.requests == 2
    for text in sheet:
        np.testing.assert_array_equal(fresh[text], fake_server.vector(text))
        assert not np.array_equal(fresh[text], first[text])


def test_an_answer_of_two_versions_is_asked_again_and_never_cached(fake_server, make_client):
    """fp_mixed: during a rolling update one request was answered by replicas of two
    versions; those vectors must not enter a sheet or the cache."""
    fake_server.fingerprint = "fp_0123456789"
    client = make_client()
    fake_server.answer_fingerprints = ["fp_mixed"]
    got = client.vectors(["termination", "notice period"])
    assert client.requests == 2  # the mixed answer, then the calculation asked again
    for text in got:
        np.testing.assert_array_equal(got[text], fake_server.vector(text))
    client.vectors(["termination", "notice period"])
    assert client.requests == 2  # what is cached is the second answer's

    fake_server.answer_fingerprints = ["fp_mixed"] * 3  # an update that does not settle
    with pytest.raises(ServiceError, match="versions of fake-model-a during one calculation"):
        client.vectors(["renewal"])
    assert client.requests == 5
    client.vectors(["renewal"])
    assert client.requests == 6  # nothing of the mixed answers was kept


def test_a_cache_smaller_than_one_call_evicts_without_error(fake_server, make_client):
    fake_server.dimensions = 1024  # 4 KiB a vector: 1 MB holds 256 of the 600
    client = make_client(cache_mb=1, chunk_size=100)
    texts = [f"clause {i}" for i in range(600)]
    vectors = client.vectors(texts)
    assert client.requests == 6  # each text sent once
    for text in texts:
        np.testing.assert_array_equal(vectors[text], fake_server.vector(text))


def test_the_api_key_is_in_no_repr_and_is_sent_as_a_bearer_token(fake_server, make_client):
    key = "sk-test-7f3a9c"
    client = make_client(api_key=key)
    settings = client.settings
    for shown in (repr(settings), str(settings), repr(client), repr(client._http.headers)):
        assert key not in shown
    assert "api_key='***'" in repr(settings)
    assert {settings: "usable as a dict key"}[Settings(server_url=fake_server.url, api_key=key)]
    client.vectors(["x"])
    assert {r["authorization"] for r in fake_server.seen} == {f"Bearer {key}"}


def test_settings_come_from_env_and_xlwings_config_wins():
    settings = load_settings(
        {"EMBED_SERVER_URL": "http://env:8000/", "EMBED_TIMEOUT_S": "60", "EMBED_API_KEY": "k"},
        {"embed_server_url": "http://conf:9000", "embed_instruction": "Find the clause"},
    )
    assert settings.server_url == "http://conf:9000"
    assert settings.timeout_s == 60.0 and settings.api_key == "k"
    assert settings.instruction == "Find the clause"
    assert load_settings({}, {}).timeout_s >= 60  # longer than any cold start


def test_ray_serves_plain_404_while_starting_is_a_sentence_about_starting():
    import httpx

    def starting(request: httpx.Request) -> httpx.Response:  # Ray Serve's front before the app is up
        return httpx.Response(404, text=f"Path '{request.url.path}' not found. Ping http://.../-/routes "
                                        "for available routes.")

    client = EmbedClient(Settings(server_url="http://127.0.0.1:9"), transport=httpx.MockTransport(starting))
    with pytest.raises(ServiceError, match="may still be starting"):
        client.vectors(["a clause"])


@pytest.fixture()
def https_server(tmp_path):
    """The fake server over HTTPS, with a certificate from a CA of the test's own (as an
    office's CA is): (server, the CA's file)."""
    from conftest import FakeEmbeddingServer

    from bench.certificates import make_certificate

    ca, cert, key, _ = make_certificate(tmp_path)
    server = FakeEmbeddingServer(tls=(cert, key))
    yield server, ca
    server.close()


def test_https_is_checked_against_the_computers_trust_store_or_a_ca_file(https_server, monkeypatch):
    server, ca = https_server
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    # A certificate nobody here trusts is said as such, not as a server that is down.
    client = EmbedClient(Settings(server_url=server.url))
    with pytest.raises(ServiceError, match="has a certificate this computer does not trust") as refused:
        client.info()
    assert "EMBED_CA_FILE" in str(refused.value) and "Is it running" not in str(refused.value)
    client.close()

    # EMBED_CA_FILE names the office's CA.
    client = EmbedClient(load_settings({"EMBED_SERVER_URL": server.url, "EMBED_CA_FILE": str(ca)}, {}))
    assert client.info()["model"] == server.model
    client.close()

    # The computer's own store, where an office installs its CA (Windows' certificate
    # store; on Linux OpenSSL's, which SSL_CERT_FILE names), not Python's bundled one.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    client = EmbedClient(Settings(server_url=server.url))
    assert client.info()["model"] == server.model
    client.close()

    with pytest.raises(ServiceError, match="EMBED_CA_FILE .* is not a readable CA certificate"):
        EmbedClient(Settings(server_url=server.url, ca_file=str(ca.parent / "missing.pem")))


def test_a_web_page_where_the_service_should_be_is_said_as_such():
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Intranet(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b"<html><body>Welcome to the intranet</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Intranet)
    serve_in_background(server)
    client = EmbedClient(Settings(server_url=f"http://127.0.0.1:{server.server_address[1]}"))
    try:
        with pytest.raises(ServiceError, match=r"answered, but not as the embedding service does "
                                               r"\(it sent text/html, not JSON\)\. Check that EMBED_SERVER_URL"):
            client.info()
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def test_plain_http_needs_no_truststore_and_https_without_it_is_a_sentence(monkeypatch):
    # A desk updated with `pip install --no-deps` from before truststore was needed.
    import sys

    monkeypatch.setitem(sys.modules, "truststore", None)  # import truststore -> ImportError
    EmbedClient(Settings(server_url="http://127.0.0.1:8000")).close()
    with pytest.raises(ServiceError, match="HTTPS needs the truststore package"):
        EmbedClient(Settings(server_url="https://embeddings.office.lan:8443"))


def test_a_long_columns_second_chunk_is_sent_while_the_first_is_in_the_server(fake_server, make_client):
    # Two requests in flight keep both of the model's workers busy between chunks; a third
    # waits for the first answer.
    client = make_client(chunk_size=100)
    column = [f"row {i}" for i in range(500)]
    fake_server.hold = {"row 0", "row 100"}
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.vectors, column)
        try:
            fake_server.wait_for_request("row 0")
            fake_server.wait_for_request("row 100")
            assert fake_server.carrying("row 200") == 0
        finally:
            fake_server.release.set()
        vectors = call.result(timeout=DEADLINE_S)
    assert client.requests == 5
    for text in column:
        np.testing.assert_array_equal(vectors[text], fake_server.vector(text))


def test_a_failed_chunk_fails_the_call_and_stops_the_chunks_after_it(fake_server, make_client):
    client = make_client(chunk_size=100, max_retries=0)
    column = [f"row {i}" for i in range(500)]
    fake_server.hold, fake_server.fail = {"row 0"}, {"row 100"}
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.vectors, column)
        try:
            fake_server.wait_for_request("row 100")  # answered 503 while the first is held
        finally:
            fake_server.release.set()
        with pytest.raises(ServiceError, match="busy or unavailable"):
            call.result(timeout=DEADLINE_S)
    # The third chunk may have gone out once the first was answered; none after it did.
    assert [fake_server.carrying(f"row {i}") for i in (0, 100, 300, 400)] == [1, 1, 0, 0]
    before = client.requests
    again = client.vectors(["row 0", "row 300"])  # the first chunk's answer was kept
    assert client.requests == before + 1
    np.testing.assert_array_equal(again["row 300"], fake_server.vector("row 300"))


# --- a busy server, and answers that are not the service's -----------------------------------


class BusyOnce(set):
    """FakeEmbeddingServer.fail for a server that recovers: a request carrying one of these
    texts is answered 503, and the texts it carried are then embedded."""

    def intersection(self, texts):
        busy = super().intersection(texts)
        self.difference_update(busy)
        return busy


def test_a_busy_server_is_asked_again_after_retry_after_as_the_office_addin_does(fake_server, make_client):
    waits = []  # the client's sleeps, recorded instead of slept
    client = make_client(sleep=waits.append)
    fake_server.fail = BusyOnce({"termination"})
    got = client.vectors(["termination"])
    np.testing.assert_array_equal(got["termination"], fake_server.vector("termination"))
    assert fake_server.carrying("termination") == 2
    assert waits == [1.0]  # no Retry-After: 1 s, as client.js waits

    fake_server.fail = {"renewal"}  # busy for good: asked 1 + max_retries (4) times, then the sentence
    waits.clear()
    with pytest.raises(ServiceError, match=r"busy or unavailable: The model is restarting\. Recalculate to retry\."):
        client.vectors(["renewal"])
    assert fake_server.carrying("renewal") == 5 and waits == [1.0] * 4


def test_a_503_saying_the_request_ran_the_replica_out_of_memory_is_not_sent_again():
    # Sent again, the same chunk could bring the next replica down too (STYLE: never retry
    # work that may be what killed the worker).
    sent = []

    def out_of_memory(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json=MODELS)
        sent.append(request)
        return httpx.Response(503, headers={"Retry-After": "1"}, json={"error": {
            "message": "The model's replica ran out of memory on this request; send fewer or shorter texts.",
            "type": "service_unavailable_error", "param": None, "code": "replica_out_of_memory"}})

    waits = []
    client = EmbedClient(Settings(server_url="http://127.0.0.1:9"), transport=httpx.MockTransport(out_of_memory),
                         sleep=waits.append)
    with pytest.raises(ServiceError, match="ran out of memory on this request"):
        client.vectors(["a long clause"])
    assert (len(sent), waits) == (1, [])


def test_the_wait_before_asking_again_is_client_js_rule():
    from excel_addin.client import _retry_wait_s

    def wait(retry_after=None, cap_s=30.0):
        headers = {} if retry_after is None else {"Retry-After": retry_after}
        return _retry_wait_s(httpx.Response(503, headers=headers), cap_s)

    assert wait("2") == 2.0 and wait("0.25") == 0.25
    assert wait() == wait("0") == wait("Wed, 21 Oct 2026 07:28:00 GMT") == wait("inf") == 1.0
    assert wait("120") == 30.0 and wait("2", cap_s=0.5) == 0.5  # each wait capped: 2 min at most in all


def mock_client(handler, **settings) -> EmbedClient:
    """A client whose requests `handler` answers (httpx.Request -> httpx.Response)."""
    return EmbedClient(Settings(server_url="http://127.0.0.1:9", **settings), transport=httpx.MockTransport(handler))


MODELS = {"object": "list", "data": [{"id": "fake-model", "object": "model", "dimensions": 4}]}
NOT_THE_SERVICE = (r"^The server at http://127\.0\.0\.1:9 answered, but not as the embedding service does "
                   r"\(.+\)\. Check that EMBED_SERVER_URL is the embedding service's address\.$")


@pytest.mark.parametrize("models, embeddings", [
    ({"status": "ok"}, None),  # a health check's answer where /v1/models should be
    ({"object": "list", "data": []}, None),
    (["fake-model"], None),
    (MODELS, {"status": "ok"}),
    (MODELS, {"object": "list", "model": "fake-model"}),  # no "data"
    (MODELS, {"object": "list", "model": "fake-model", "data": [{"embedding": [0.1, 0.2, 0.3, 0.4]}]}),  # floats
    (MODELS, {"object": "list", "model": "fake-model", "data": [{"embedding": "not base64!"}]}),
    (MODELS, {"object": "list", "model": "fake-model", "data": [{"vector": "AAAAAA=="}]}),
    (MODELS, "ok"),
])
def test_a_200_answer_not_the_services_is_a_sentence(models, embeddings):
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=models if request.method == "GET" else embeddings)

    client = mock_client(answer)
    with pytest.raises(ServiceError, match=NOT_THE_SERVICE):
        client.vectors(["a clause"])


def test_a_connect_timeout_is_a_server_that_cannot_be_reached_not_a_slow_one():
    def unreachable(request: httpx.Request) -> httpx.Response:  # no answer to the connection within 10 s
        raise httpx.ConnectTimeout("timed out", request=request)

    with pytest.raises(ServiceError) as failed:
        mock_client(unreachable).info()
    assert str(failed.value) == ("Cannot reach the embedding server at http://127.0.0.1:9. Is it running? "
                                 "If it runs elsewhere, set EMBED_SERVER_URL.")


def test_a_401_says_a_key_is_needed_when_none_is_set_and_refused_when_one_was_sent():
    def keyed(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "Invalid API key.", "type": "invalid_request_error",
                                                   "param": None, "code": "invalid_api_key"}})

    with pytest.raises(ServiceError) as without_key:
        mock_client(keyed).info()
    assert str(without_key.value) == (
        "The embedding server at http://127.0.0.1:9 needs an API key. Set EMBED_API_KEY to the key your "
        "admin gave you (in the xlwings config or the environment).")
    with pytest.raises(ServiceError) as wrong_key:
        mock_client(keyed, api_key="not-the-key").info()
    assert str(wrong_key.value) == "The embedding server at http://127.0.0.1:9 refused the API key. Check EMBED_API_KEY."


# --- what the formulas send for their arguments ------------------------------------------------

WHOLE_COLUMN = 1_048_576  # rows of a whole-column reference (B:B), as xlwings hands it over


def test_a_whole_column_costs_its_used_rows_only_and_blanks_inside_keep_their_place(formulas, fake_server):
    used = [["refund"], [None], ["reset my password"], ["   "]]  # whitespace only is blank
    column = used + [[None]] * (WHOLE_COLUMN - len(used))
    matrix = udfs.sim_matrix([["a"], ["b"]], column)
    assert [len(row) for row in matrix] == [3, 3] and matrix[0][1] is None
    sent = [text for request in fake_server.seen for text in request["input"]]
    assert sorted(sent) == ["a", "b", "refund", "reset my password"]  # the used rows' texts, each once
    vectors = udfs.embed(column)
    assert len(vectors) == 3 and vectors[1] == [None] * fake_server.dimensions
    # Two such columns are cut at the last row either uses: their rows stay paired.
    scores = udfs.embed_sim([["refund"]] + [[None]] * 999, used + [[None]] * 996)
    assert len(scores) == 3 and scores[0][0] == pytest.approx(1.0) and scores[2] == [None]
    # Ranges of two shapes are refused as before, even when one is blank below its first row.
    assert udfs.embed_sim([["refund"]] + [[None]] * 8, [["a"]] * 19).startswith("EMBED_SIM: ")
    # A block's trailing blank columns go too.
    block = [["a", "b", None], [None, None, None]]
    assert np.array(udfs.embed_sim(block, block)).shape == (1, 2)


def test_a_range_given_to_a_one_cell_argument_is_a_sentence_naming_it(formulas, fake_server):
    # xlwings hands a range given to an argument declared without ndim as a list.
    assert udfs.semantic_search(["reset", "refund"], [["Refunds"]]) == (
        "SEMANTIC_SEARCH: query must be one cell, not a range.")
    assert udfs.embed_sim("a", "b", [["Find", "the clause"]]) == "EMBED_SIM: instruction must be one cell, not a range."
    assert udfs.embed([["a"]], [32.0, 64.0]) == "EMBED: dimensions must be one cell, not a range."
    assert fake_server.seen == []  # nothing was sent, neither the range's text
    # A range of one cell is that cell.
    assert udfs.semantic_search(["Refunds"], [["Refunds"], ["Rent"]], [[1.0]])[0][0] == "Refunds"


def test_a_blank_k_or_dimensions_cell_takes_the_default(formulas, fake_server):
    candidates = [[f"clause {i}"] for i in range(7)]
    assert len(udfs.semantic_search("q", candidates, "   ")) == len(udfs.semantic_search("q", candidates, None)) == 5
    assert len(udfs.embed([["a"]], " ")) == fake_server.dimensions
