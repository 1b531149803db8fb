"""The HTTP API against a real daemon over loopback: tokens and scopes, submitting (422 with
positions, 409, Idempotency-Key), jobs as `spoold status --json` shows them, logs paged and
followed (SSE resumed with Last-Event-ID, chunked text), artifacts confined, cancel and retry,
limits on bodies and slow clients, TLS, and a restart that loses nothing."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import spoold
from tests.apiclient import Api, certificate, make_token, sse_events, start_api
from tests.harness import DaemonProcess, run_cli, wait_finished, wait_for, write_config


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("api")
    tmp.chmod(0o755)
    started = start_api(tmp, policy={"tokens": {"limited": {"executors": ["local"]}},
                                     "default": {"executors": ["*"], "run_as": ["*"],
                                                 "secrets": ["*"]}})  # fmt: skip
    started.tokens["limited"] = make_token(started.spool, "limited", "submit,read")
    yield started
    started.daemon.kill()


def job(job_id: str, commands: str | list[str], **fields: object) -> str:
    document = {"job_id": job_id, "executor": "local", "product": {"commands": commands}}
    return yaml.safe_dump({**document, **fields})


def wait_state(api: Api, job_id: str, *states: str, bound: float = 60.0) -> dict[str, object]:
    end = time.monotonic() + bound
    while time.monotonic() < end:
        answer = api.call("GET", f"/api/v1/jobs/{job_id}", token="read")
        if answer.status_code == 200 and answer.json()["state"] in states:
            found: dict[str, object] = answer.json()
            return found
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {states}")


# -- who may ---------------------------------------------------------------------------------


def test_healthz_needs_no_token_and_everything_else_does(api: Api) -> None:
    assert api.call("GET", "/healthz", token=None).json() == {"status": "ok"}
    for method, path in [
        ("GET", "/api/v1/jobs"), ("GET", "/api/v1/jobs/x"), ("GET", "/api/v1/jobs/x/log"),
        ("POST", "/api/v1/jobs"), ("POST", "/api/v1/jobs/x/cancel"), ("GET", "/metrics"),
        ("GET", "/openapi.json"), ("GET", "/api/v1/schedules"), ("GET", "/api/v1/hosts"),
        ("GET", "/api/v1/status"),
    ]:  # fmt: skip
        for token in (None, "spoold_000000000000_nope", "nonsense", api.tokens["read"] + "x"):
            answer = api.call(method, path, token=token)
            assert answer.status_code == 401, (method, path, token, answer.text)
            assert answer.json() == {"detail": "unauthorized"}
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "API: refused GET /api/v1/jobs from 127.0.0.1: a token that is not valid" in (
        api.daemon.log()
    )


def test_scopes_decide_what_a_token_may_do(api: Api) -> None:
    refused = api.submit(job("scoped-1", "true"), token="read")
    assert refused.status_code == 403
    assert refused.json()["detail"] == "token read lacks the submit scope (it has read)"
    assert api.submit(job("scoped-1", "true"), token="submit").status_code == 201
    assert api.call("GET", "/api/v1/jobs/scoped-1", token="submit").status_code == 403
    assert api.call("GET", "/api/v1/jobs/scoped-1", token="read").status_code == 200
    assert api.call("POST", "/api/v1/jobs/scoped-1/cancel", token="read").status_code == 403
    assert api.call("POST", "/api/v1/jobs/scoped-1/retry", token="submit").status_code == 403
    wait_state(api, "scoped-1", "succeeded")
    # The job records the token that submitted it, as a submitter.
    status = api.call("GET", "/api/v1/jobs/scoped-1").json()
    assert (status["submitter"], status["submitter_uid"]) == ("token:submit", None)


def test_x_api_key_is_the_same_token(api: Api) -> None:
    answer = api.call(
        "GET", "/api/v1/status", token=None, headers={"X-Api-Key": api.tokens["read"]}
    )
    assert answer.status_code == 200
    assert answer.json()["spool"] == str(api.spool)


def test_a_revoked_token_is_refused_at_once(api: Api) -> None:
    token = make_token(api.spool, "short-lived", "read")
    assert api.call("GET", "/api/v1/status", token=token).status_code == 200
    revoked = run_cli(api.spool, "token", "revoke", "short-lived")
    assert revoked.returncode == 0, revoked.stderr
    assert api.call("GET", "/api/v1/status", token=token).status_code == 401


def test_the_policy_of_a_token_limits_what_it_submits(api: Api) -> None:
    text = "job_id: limited-ssh\nexecutor: ssh\nproduct: {host: 127.0.0.1, user: root, commands: 'true'}\n"
    refused = api.submit(text, token="limited")
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert detail["code"] == "not_allowed"
    assert detail["errors"] == [{
        "message": "submitter token:limited may not submit ssh jobs (the config's policy gives "
                   "token:limited the executors: local)",
        "path": "executor", "line": 2, "column": 11,
    }]  # fmt: skip
    assert api.submit(job("limited-local", "true"), token="limited").status_code == 201
    assert not list((api.spool / "rejected").glob("api-*"))  # answered, not dropped


# -- submitting ------------------------------------------------------------------------------


def test_a_posted_job_runs_and_reads_as_spoold_status_json(api: Api) -> None:
    answer = api.submit(job("posted-1", "echo from the api"))
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"] == f"{api.url}/api/v1/jobs/posted-1"
    assert answer.json()["state"] in ("pending", "running", "succeeded")
    assert answer.json()["submitter"] == "token:admin"
    directory, _ = wait_finished(api.spool, "posted-1")
    assert directory == "done"
    shown = run_cli(api.spool, "status", "posted-1", "--json")
    assert api.call("GET", "/api/v1/jobs/posted-1", token="read").json() == json.loads(shown.stdout)


def test_json_and_yaml_without_a_job_id_are_given_one(api: Api) -> None:
    document = {"executor": "local", "product": {"commands": "true"}}
    answer = api.call("POST", "/api/v1/jobs", json=document)
    assert answer.status_code == 201, answer.text
    job_id = answer.json()["job_id"]
    assert answer.headers["Location"].endswith(f"/api/v1/jobs/{job_id}")
    assert wait_state(api, job_id, "succeeded")["source"] == "api-admin.yaml"


def test_an_invalid_job_file_gets_422_with_line_column_and_path(api: Api) -> None:
    text = "job_id: bad-1\nexecutor: local\nproduct:\n  commands: true\n  shel: bash\n"
    answer = api.submit(text)
    assert answer.status_code == 422
    detail = answer.json()["detail"]
    assert detail["code"] == "invalid"
    assert {"path": "product.commands", "line": 4, "column": 13} | {
        "message": detail["errors"][0]["message"]
    } == detail["errors"][0]
    paths = [(e["path"], e["line"], e["column"]) for e in detail["errors"]]
    assert ("product.shel", 5, 3) in paths
    unparsable = api.submit("job_id: [unclosed\n")
    assert unparsable.status_code == 422
    assert unparsable.json()["detail"]["errors"][0]["line"] is not None
    assert api.call("GET", "/api/v1/jobs/bad-1").status_code == 404


def test_a_taken_job_id_gets_409(api: Api) -> None:
    assert api.submit(job("twice-1", "true")).status_code == 201
    again = api.submit(job("twice-1", "true"))
    assert again.status_code == 409
    assert again.json()["detail"]["code"] == "duplicate"


def test_a_job_id_another_change_is_taking_gets_503_until_that_change_is_decided(
    api: Api,
) -> None:
    """Another host taking a file of that id (its ``accepted`` delivery prepared, not yet
    committed) may yet fail: not a 409 for a job that may never be, but a 503 to try again."""
    hook = {"url": "http://127.0.0.1:9/hook", "secret": "s3cret"}
    under_way = api.daemon.spool / "outbox" / "busy-1~00000001.prepared"
    under_way.write_text(json.dumps({"key": "busy-1", "sequence": 1, "event": "accepted",
                                     "condition": {"job": "busy-1"}, "created": time.time()}))  # fmt: skip
    busy = api.submit(job("busy-1", "true", callback=hook))
    assert busy.status_code == 503, busy.text
    assert busy.headers["Retry-After"] == "1"
    assert "under way" in busy.json()["detail"]
    under_way.unlink()  # that change failed
    assert api.submit(job("busy-1", "true", callback=hook)).status_code == 201


def test_forwarded_headers_from_a_loopback_client_are_not_believed(api: Api) -> None:
    # Without public_url, URLs are the request's own: its scheme is the connection's, not
    # what an X-Forwarded-Proto says (the logged address: tests/test_api_trust.py, whose
    # daemon has refused fewer requests than this module's 20 lines a minute).
    forged = {"X-Forwarded-For": "198.51.100.7", "X-Forwarded-Proto": "https"}
    answer = api.submit(job("forwarded-1", "true"), headers=forged)
    assert answer.status_code == 201, answer.text
    assert answer.headers["Location"] == f"{api.url}/api/v1/jobs/forwarded-1"


def test_an_idempotent_post_answers_the_first_job(api: Api) -> None:
    text = yaml.safe_dump({"executor": "local", "product": {"commands": "true"}})
    key = {"Idempotency-Key": "order-4711"}
    first = api.submit(text, headers=key)
    assert first.status_code == 201
    job_id = first.json()["job_id"]
    for _ in range(3):
        again = api.submit(text, headers=key)
        assert again.status_code == 200, again.text
        assert again.json()["job_id"] == job_id
        assert again.headers["Location"] == first.headers["Location"]
        assert again.headers["Idempotent-Replayed"] == "true"
    other = api.submit(text + "description: other\n", headers=key)
    assert other.status_code == 422
    assert other.json()["detail"]["code"] == "idempotency_key_reused"
    # Keys are the token's own: another token with the same key makes its own job.
    theirs = api.submit(text, headers=key, token="submit")
    assert theirs.status_code == 201 and theirs.json()["job_id"] != job_id
    rows = api.call("GET", "/api/v1/jobs", params={"submitter": "token:admin", "limit": 500})
    assert sum(1 for row in rows.json()["jobs"] if row.get("sha256") == first.json()["sha256"]) == 1


def test_a_body_larger_than_the_file_limit_gets_413(api: Api) -> None:
    answer = api.submit("x" * (1024 * 1024 + 1))
    assert answer.status_code == 413


# -- jobs ------------------------------------------------------------------------------------


def test_an_unknown_job_gets_404(api: Api) -> None:
    answer = api.call("GET", "/api/v1/jobs/no-such-job")
    assert answer.status_code == 404
    assert "no job 'no-such-job'" in answer.json()["detail"]


def test_cancel_a_running_job_and_retry_it(api: Api) -> None:
    assert api.submit(job("cancel-1", "echo started; sleep 60")).status_code == 201
    wait_state(api, "cancel-1", "running")
    asked = api.call("POST", "/api/v1/jobs/cancel-1/cancel", token="control")
    assert asked.status_code == 202, asked.text
    assert asked.json() == {"job_id": "cancel-1", "state": "running", "cancelled": False,
                            "requested": True}  # fmt: skip
    ended = wait_state(api, "cancel-1", "cancelled")
    assert "token control" in str(ended["error"])
    again = api.call("POST", "/api/v1/jobs/cancel-1/cancel", token="control")
    assert again.status_code == 409
    retried = api.call("POST", "/api/v1/jobs/cancel-1/retry", token="control")
    assert retried.status_code == 200, retried.text
    assert retried.json()["state"] == "pending"
    wait_state(api, "cancel-1", "running")
    api.call("POST", "/api/v1/jobs/cancel-1/cancel", token="control")
    wait_state(api, "cancel-1", "cancelled")
    attempts = api.call("GET", "/api/v1/jobs/cancel-1").json()["attempts"]
    assert len(attempts) == 2


def test_a_succeeded_job_cannot_be_retried(api: Api) -> None:
    api.submit(job("done-1", "true"))
    wait_state(api, "done-1", "succeeded")
    answer = api.call("POST", "/api/v1/jobs/done-1/retry", token="control")
    assert answer.status_code == 409
    assert "only a failed or cancelled job runs again" in answer.json()["detail"]


# -- logs ------------------------------------------------------------------------------------


def test_a_log_is_paged_by_byte_offsets(api: Api) -> None:
    api.submit(job("paged-1", "for i in $(seq 1 200); do echo line-$i; done"))
    wait_state(api, "paged-1", "succeeded")
    whole = api.call("GET", "/api/v1/jobs/paged-1/log", token="read")
    assert whole.status_code == 200
    assert whole.headers["content-type"].startswith("text/plain")
    size = int(whole.headers["X-Log-Size"])
    assert size == len(whole.content)
    pages, offset = [], 0
    while offset < size:
        page = api.call("GET", "/api/v1/jobs/paged-1/log", params={"offset": offset, "limit": 1000})
        assert int(page.headers["X-Log-Offset"]) == offset
        pages.append(page.content)
        offset = int(page.headers["X-Log-Next-Offset"])
    assert b"".join(pages) == whole.content
    assert b"line-200" in whole.content


SLOW = "for i in $(seq 1 40); do echo line-$i; sleep 0.05; done; echo last"


def test_follow_as_server_sent_events_resumes_after_a_dropped_connection(api: Api) -> None:
    api.submit(job("sse-1", SLOW))
    wait_state(api, "sse-1", "running", "succeeded")
    headers = {"Accept": "text/event-stream"}
    seen: list[str] = []
    last_id = None
    with api.call("GET", "/api/v1/jobs/sse-1/log", params={"follow": 1}, headers=headers,
                  stream=True) as first:  # fmt: skip
        assert first.headers["content-type"].startswith("text/event-stream")
        for event in sse_events(first):
            seen += event["data"].split("\n")
            last_id = event["id"]
            if any(line.endswith("line-5") for line in seen):
                break  # the connection drops here
    assert last_id is not None
    resumed = {**headers, "Last-Event-ID": last_id}
    ends = []
    with api.call("GET", "/api/v1/jobs/sse-1/log", params={"follow": 1}, headers=resumed,
                  stream=True) as second:  # fmt: skip
        for event in sse_events(second):
            if event.get("event") == "end":
                ends.append(json.loads(event["data"]))
                break
            seen += event["data"].split("\n")
    assert ends and ends[0]["state"] == "succeeded" and ends[0]["exit_code"] == 0
    log = api.call("GET", "/api/v1/jobs/sse-1/log").content.decode()
    assert "\n".join(seen) + "\n" == log  # every line once, in order, none lost
    assert [
        line.rsplit(" ", 1)[-1] for line in seen if "line-" in line or line.endswith("last")
    ] == [*(f"line-{i}" for i in range(1, 41)), "last"]


def test_follow_as_chunked_text_ends_with_the_job(api: Api) -> None:
    api.submit(job("chunked-1", SLOW))
    with api.call("GET", "/api/v1/jobs/chunked-1/log", params={"follow": "true"},
                  stream=True) as answer:  # fmt: skip
        assert answer.headers["content-type"].startswith("text/plain")
        assert answer.headers.get("transfer-encoding") == "chunked"
        body = b"".join(answer.iter_content(None))
    assert body.decode().rstrip().endswith("last") or b"succeeded" in body
    assert api.call("GET", "/api/v1/jobs/chunked-1").json()["state"] == "succeeded"
    assert body == api.call("GET", "/api/v1/jobs/chunked-1/log").content


# -- artifacts -------------------------------------------------------------------------------


def test_artifacts_download_and_nothing_outside_them(api: Api) -> None:
    text = job("art-1", "mkdir -p out/sub && echo hello > out/a.txt && echo deep > out/sub/b.txt",
               artifacts=[{"path": "out/**/*.txt"}, {"path": "out/*.txt"}])  # fmt: skip
    assert api.submit(text).status_code == 201
    wait_state(api, "art-1", "succeeded")
    listed = api.call("GET", "/api/v1/jobs/art-1/artifacts", token="read").json()
    paths = sorted(a["path"] for a in listed)
    assert "out/a.txt" in paths and "out/sub/b.txt" in paths
    got = api.call("GET", "/api/v1/jobs/art-1/artifacts/out/a.txt", token="read")
    assert got.status_code == 200 and got.content == b"hello\n"
    assert got.headers["Content-Disposition"] == 'attachment; filename="a.txt"'
    assert api.call("GET", "/api/v1/jobs/art-1/artifacts/out/sub/b.txt").content == b"deep\n"
    # A link planted beside them, even one the status named, is not followed.
    directory = api.spool / "done" / "art-1"
    os.symlink("/etc/passwd", directory / "artifacts" / "out" / "passwd")
    status = json.loads((directory / "status.json").read_text())
    status["artifacts"].append({"path": "out/passwd", "size": 1, "sha256": "0"})
    (directory / "status.json").write_text(json.dumps(status))
    host, port = api.url.removeprefix("http://").split(":")
    for path in ("out/passwd", "../status.json", "out/../../status.json", "%2e%2e/status.json",
                 "..%2fstatus.json", "/etc/passwd", "out//a.txt", "out/./a.txt", "job.yaml",
                 "out/%2e%2e/%2e%2e/job.yaml", "out/a.txt%00"):  # fmt: skip
        # As sent, not as a client library would tidy the path first.
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", f"/api/v1/jobs/art-1/artifacts/{path}",
                           headers={"Authorization": f"Bearer {api.tokens['read']}"})  # fmt: skip
        answer = connection.getresponse()
        body = answer.read()
        connection.close()
        assert answer.status == 404, (path, answer.status, body[:100])
        assert b"root:" not in body


# -- limits, TLS, restarts -------------------------------------------------------------------


def test_a_client_that_trickles_its_request_is_disconnected(tmp_path: Path) -> None:
    started = start_api(tmp_path, api={"client_timeout": "1s"})
    try:
        host, port = started.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            began = time.monotonic()
            closed = False
            for piece in (b"GET /healthz HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n") * 5:
                try:
                    sock.sendall(piece)
                    time.sleep(0.4)
                    if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                        closed = True
                        break
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
            assert closed, "a trickling client was served for 6 s"
            assert time.monotonic() - began < 4
        with socket.create_connection((host, int(port)), timeout=10) as idle:
            idle.settimeout(5)
            assert idle.recv(1) == b""  # closed after 1 s of nothing
        assert started.call("GET", "/healthz", token=None).status_code == 200
    finally:
        started.daemon.kill()


def test_https_with_the_configured_certificate(tmp_path: Path) -> None:
    cert, key = certificate(tmp_path)
    started = start_api(tmp_path, api={"certfile": str(cert), "keyfile": str(key)})
    started.verify = str(cert)
    try:
        assert started.url.startswith("https://")
        assert started.call("GET", "/api/v1/status", token="read").status_code == 200
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(started.url.replace("https", "http") + "/healthz", timeout=5)
    finally:
        started.daemon.kill()


def test_a_port_in_use_stops_the_daemon_naming_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        spool = tmp_path / "spool"
        config = write_config(tmp_path / "c.yaml", spool, api={"listen": f"127.0.0.1:{port}"})
        run_cli(spool, "init")
        ran = subprocess.run(
            [sys.executable, "-m", "spoold", "run", "--spool", str(spool), "--config", str(config)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert ran.returncode == 2
    assert f"key api.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in (
        ran.stderr
    )


def test_a_restart_loses_nothing(tmp_path: Path) -> None:
    started = start_api(tmp_path)
    text = job("kept-1", "echo kept")
    key = {"Idempotency-Key": "restart-key"}
    try:
        assert started.submit(text, headers=key).status_code == 201
        wait_state(started, "kept-1", "succeeded")
        started.daemon.stop()
        again = DaemonProcess(started.spool, started.daemon.config)
        again.start()
        started.daemon = again
        assert started.call("GET", "/api/v1/jobs/kept-1").json()["state"] == "succeeded"
        replay = started.submit(text, headers=key)
        assert replay.status_code == 200 and replay.json()["job_id"] == "kept-1"
        assert b"kept" in started.call("GET", "/api/v1/jobs/kept-1/log").content
    finally:
        started.daemon.kill()


def test_openapi_describes_every_route(api: Api) -> None:
    described = api.call("GET", "/openapi.json", token="read").json()
    paths = described["paths"]
    for path in (
        "/api/v1/jobs",
        "/api/v1/jobs/{job_id}",
        "/api/v1/jobs/{job_id}/log",
        "/api/v1/jobs/{job_id}/artifacts/{path}",
        "/api/v1/jobs/{job_id}/cancel",
        "/api/v1/jobs/{job_id}/retry",
        "/api/v1/schedules",
        "/api/v1/schedules/{job_id}/run",
        "/api/v1/schedules/{job_id}/pause",
        "/api/v1/schedules/{job_id}/resume",
        "/api/v1/hosts",
        "/healthz",
        "/metrics",
    ):
        assert path in paths, path
    schemes = described["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


# -- schedules -------------------------------------------------------------------------------


def test_schedules_listed_run_now_paused_and_resumed(api: Api) -> None:
    text = yaml.safe_dump({
        "job_id": "hourly-1", "executor": "local", "product": {"commands": "echo tick"},
        "schedule": {"every": "1h", "catch_up": "skip"},
    })  # fmt: skip
    assert api.submit(text).status_code == 201
    rows = api.call("GET", "/api/v1/schedules", token="read").json()
    row = next(r for r in rows if r["job_id"] == "hourly-1")
    assert row["paused"] is False and len(row["next_fire_times"]) >= 3
    assert api.call("POST", "/api/v1/schedules/hourly-1/run", token="read").status_code == 403
    asked = api.call("POST", "/api/v1/schedules/hourly-1/run", token="control")
    assert asked.status_code == 202, asked.text
    run = asked.json()["run_id"]
    assert run.startswith("hourly-1@")
    assert wait_state(api, run, "succeeded")["schedule"] == "hourly-1"
    paused = api.call("POST", "/api/v1/schedules/hourly-1/pause", token="control").json()
    assert paused["paused"] is True and paused["paused_by"].startswith("token control")
    row = next(r for r in api.call("GET", "/api/v1/schedules").json() if r["job_id"] == "hourly-1")
    assert row["paused"] is True and row["next_fire_times"] == []
    resumed = api.call("POST", "/api/v1/schedules/hourly-1/resume", token="control").json()
    assert resumed["paused"] is False and resumed["changed"] is True
    # The CLI does the same through the same functions.
    listed = run_cli(api.spool, "schedule", "list", "--json")
    assert [r["job_id"] for r in json.loads(listed.stdout)] == ["hourly-1"]
    assert run_cli(api.spool, "schedule", "pause", "hourly-1").stdout == "hourly-1: paused\n"
    shown = run_cli(api.spool, "schedule", "list")
    assert "next: paused" in shown.stdout
    # Not a schedule: 404, as for any unknown id.
    assert api.call("POST", "/api/v1/schedules/posted-1/run", token="control").status_code in (404,)


# -- listing and metrics ---------------------------------------------------------------------


def test_jobs_are_listed_newest_first_filtered_and_paged(tmp_path: Path) -> None:
    started = start_api(tmp_path)
    try:
        for n in range(7):
            labels = {"team": "ops" if n % 2 else "web", "urgent": "yes"} if n < 5 else {}
            text = job(f"list-{n}", "true" if n != 3 else "exit 3", labels=labels)
            assert started.submit(text, token="submit").status_code == 201
        for n in range(7):
            wait_state(started, f"list-{n}", "succeeded", "failed")
        everything = started.call("GET", "/api/v1/jobs", token="read").json()
        assert [row["job_id"] for row in everything["jobs"]] == [
            f"list-{n}" for n in reversed(range(7))
        ]
        assert everything["next_cursor"] is None
        assert everything["jobs"][0] == started.call("GET", "/api/v1/jobs/list-6").json() | {
            "labels": {}
        }

        def ids(**params: object) -> list[str]:
            answer = started.call("GET", "/api/v1/jobs", params=params, token="read")
            assert answer.status_code == 200, answer.text
            return [row["job_id"] for row in answer.json()["jobs"]]

        assert ids(state="failed") == ["list-3"]
        assert ids(state="succeeded", label="team=ops") == ["list-1"]
        assert ids(label=["urgent", "team=web"]) == ["list-4", "list-2", "list-0"]
        assert ids(executor="docker") == []
        assert ids(submitter="token:submit", q="list-5") == ["list-5"]
        # Pages of two, through the cursor and the Link header, cover all of them once.
        seen, url = [], f"{started.url}/api/v1/jobs?limit=2"
        while url:
            page = requests.get(url, headers={"Authorization": f"Bearer {started.tokens['read']}"},
                                timeout=30)  # fmt: skip
            seen += [row["job_id"] for row in page.json()["jobs"]]
            link = page.headers.get("Link")
            url = link.split(";")[0].strip("<>") if link else ""
            if len(seen) > 20:
                break
        assert seen == [f"list-{n}" for n in reversed(range(7))]
        bad = started.call("GET", "/api/v1/jobs", params={"cursor": "not-a-cursor"})
        assert bad.status_code == 400
        wrong = started.call("GET", "/api/v1/jobs", params={"state": "sleeping"})
        assert wrong.status_code == 422
    finally:
        started.daemon.kill()


def test_metrics_parse_and_count_what_happened(tmp_path: Path) -> None:
    started = start_api(tmp_path)
    try:
        started.submit(job("m-ok", "true"))
        started.submit(job("m-bad", "exit 4"))
        started.submit(job("m-retried", "exit 1", retries=1, backoff="1s"))
        for name in ("m-ok", "m-bad", "m-retried"):
            wait_state(started, name, "succeeded", "failed")
        (started.spool / "incoming" / ".half-written").write_text("x")  # transient: not counted
        families: dict[str, Metric] = {}

        def value(name: str, **labels: str) -> float:
            samples = (sample for family in families.values() for sample in family.samples)
            for sample in samples:
                if sample.name == name and all(sample.labels.get(k) == v
                                               for k, v in labels.items()):  # fmt: skip
                    return float(sample.value)
            raise AssertionError(f"no sample {name} {labels}")

        def scraped() -> bool:
            answer = started.call("GET", "/metrics", token="read")
            assert answer.status_code == 200
            assert answer.headers["content-type"].startswith("text/plain")
            families.clear()
            families.update({f.name: f for f in text_string_to_metric_families(answer.text)})
            # A worker process tells its changes within 50 ms: the last may be on its way.
            return value("spoold_jobs_finished_total", executor="local", outcome="failed") == 2

        wait_for(scraped, what="the last finished job counted")
        assert value("spoold_jobs", state="succeeded") == 1
        assert value("spoold_jobs", state="failed") == 2
        assert value("spoold_jobs", state="pending") == 0
        finished = families["spoold_jobs_finished"]  # the parser drops _total
        assert finished.type == "counter"
        assert value("spoold_jobs_finished_total", executor="local", outcome="failed") == 2
        assert value("spoold_jobs_finished_total", executor="local", outcome="succeeded") == 1
        assert value("spoold_job_retries_total", executor="local") == 1
        assert value("spoold_job_run_duration_seconds_count", executor="local") == 4
        assert value("spoold_job_queue_wait_seconds_count", executor="local") >= 3
        assert value("spoold_build_info", version=spoold.__version__) == 1
        assert value("spoold_hosts_alive") == 1
        assert value("spoold_leases_stale") == 0
        assert value("spoold_callbacks_given_up") == 0
        assert value("spoold_worker_process_starts_total") >= 1, "the daemon's, at least"
        for family in families.values():
            assert family.name.startswith("spoold_"), family.name
        # Counted from the spool: true after a restart, when the counters begin anew.
        started.daemon.stop()
        again = DaemonProcess(started.spool, started.daemon.config)
        again.start()
        started.daemon = again
        text = started.call("GET", "/metrics", token="read").text
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert value("spoold_jobs", state="failed") == 2
        assert value("spoold_jobs", state="succeeded") == 1
    finally:
        started.daemon.kill()


def test_the_hosts_are_this_daemons_view_of_hosts(api: Api) -> None:
    """/api/v1/hosts is ``spoold hosts --json``: this host alive, with its beat."""
    rows = api.call("GET", "/api/v1/hosts", token=api.tokens["read"]).json()
    mine = [row for row in rows if row["this_host"]]
    assert len(mine) == 1 and mine[0]["state"] == "alive" and mine[0]["beat"] >= 1, rows
    shown = run_cli(api.spool, "hosts", "--json")
    assert shown.returncode == 0, shown.stderr
    assert [row["host"] for row in json.loads(shown.stdout)] == [row["host"] for row in rows]
