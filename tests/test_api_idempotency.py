"""An Idempotency-Key makes one job, whatever races it: POSTs of one key at once on one host and
on two hosts of one spool, a POST that died between its record and its job, and a replay after
the job was purged. Against real daemons over loopback."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml

from tests.apiclient import Api, free_port, module_api, start_api
from tests.harness import DaemonProcess, run_cli, wait_for, write_config

ROUNDS = 4
AT_ONCE = 8


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    yield from module_api(tmp_path_factory, "idem")


def _body(tag: str) -> str:
    return yaml.safe_dump({"executor": "local", "product": {"commands": "true"},
                           "description": tag})  # fmt: skip


def _race(calls: list[tuple[Api, str]], text: str, key: str) -> list[requests.Response]:
    """Every call's POST of ``text`` with ``key``, let go at once."""
    start = threading.Barrier(len(calls))
    answers: list[requests.Response | None] = [None] * len(calls)

    def post(n: int, api: Api, token: str) -> None:
        start.wait(30)
        answers[n] = api.call("POST", "/api/v1/jobs", token=token, data=text,
                              headers={"Content-Type": "application/yaml",
                                       "Idempotency-Key": key})  # fmt: skip

    threads = [threading.Thread(target=post, args=(n, api, token))
               for n, (api, token) in enumerate(calls)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(answer is not None for answer in answers), "every POST answered"
    return [answer for answer in answers if answer is not None]


def _one_job(answers: list[requests.Response]) -> str:
    codes = Counter(answer.status_code for answer in answers)
    assert codes[201] == 1 and codes[200] == len(answers) - 1, (
        codes,
        [a.text for a in answers if a.status_code not in (200, 201)],
    )
    (job_id,) = {str(answer.json()["job_id"]) for answer in answers}
    return job_id


def _jobs_of(spool: Path, tag: str) -> list[str]:
    """The ids of the jobs described ``tag``, each once: a job that moves on (pending/ to
    running/ to done/) while the states are listed one after another is met in two of them
    (CI saw ``['job-...-2c2b3d59', 'job-...-2c2b3d59']``), and is still one job."""
    found: dict[str, None] = {}
    for state in ("pending", "running", "done", "failed"):
        for job in (spool / state).iterdir():
            try:
                status = json.loads((job / "status.json").read_text())
            except FileNotFoundError:
                continue  # it moved on meanwhile: met in the state it moved to
            if status.get("description") == tag:
                found[job.name] = None
    return list(found)


def test_posts_of_one_key_at_once_make_one_job(api: Api) -> None:
    """Fifteen POSTs of one key at once made two or three jobs, each run; some callers were
    told 409 about their own job. A POST whose placement lost to another's freed the key, and
    the next one made a new job."""
    for n in range(ROUNDS):
        tag = f"at-once-{n}"
        answers = _race([(api, "admin")] * AT_ONCE, _body(tag), f"order-{n}")
        job_id = _one_job(answers)
        assert _jobs_of(api.spool, tag) == [job_id]


def test_posts_of_one_key_on_two_hosts_of_one_spool_make_one_job(tmp_path: Path) -> None:
    """Two daemons serving one spool (hosts a and b): their POSTs of one key race in two
    processes, where no lock of either holds the other; the job's id settles it."""
    first = start_api(tmp_path, host_id="a")
    api = {"listen": f"127.0.0.1:{free_port()}"}
    config = write_config(tmp_path / "b.yaml", first.spool, api=api, host_id="b")
    second = DaemonProcess(first.spool, config, log_path=tmp_path / "b.log")
    second.start()
    other = Api(second, f"http://{api['listen']}", first.tokens)
    try:
        for n in range(ROUNDS):
            tag = f"two-hosts-{n}"
            calls = [(first, "admin"), (other, "admin")] * (AT_ONCE // 2)
            job_id = _one_job(_race(calls, _body(tag), f"deploy-{n}"))
            assert _jobs_of(first.spool, tag) == [job_id]
    finally:
        second.kill()
        first.daemon.kill()


def _record(api: Api, key: str) -> Path:
    """Where the record of ``key``, posted with the admin token, is kept."""
    token_id = next(json.loads(path.read_text())["id"]
                    for path in (api.spool / "tokens").glob("*.json")
                    if json.loads(path.read_text())["name"] == "admin")  # fmt: skip
    digest = hashlib.sha256(f"{token_id}\0{key}".encode()).hexdigest()[:40]
    return api.spool / "idempotency" / f"{digest}.json"


def test_a_record_whose_post_died_is_placed_under_its_id_and_a_purged_job_is_not_again(
    api: Api,
) -> None:
    """A POST that died between its record and its job: the next one places the job under the
    recorded id. Once placed and then purged, the same POST again placed it once more (the
    same job run twice): it is answered 410 now, and nothing runs."""
    text = _body("purged")
    record = _record(api, "invoice-9")
    record.parent.mkdir(exist_ok=True)
    sha = hashlib.sha256(text.encode()).hexdigest()
    record.write_text(json.dumps({"job_id": "died-before-placing", "body_sha256": sha}))
    placed = api.submit(text, headers={"Idempotency-Key": "invoice-9"})
    assert placed.status_code == 201 and placed.json()["job_id"] == "died-before-placing"
    wait_for((api.spool / "done" / "died-before-placing").exists, what="its end")
    purged = run_cli(api.spool, "purge", "--older-than", "0s", "--state", "done")
    assert purged.returncode == 0, purged.stderr
    assert not (api.spool / "done" / "died-before-placing").exists()
    again = api.submit(text, headers={"Idempotency-Key": "invoice-9"})
    assert again.status_code == 410, again.text
    assert again.json()["detail"]["code"] == "idempotent_job_removed"
    assert _jobs_of(api.spool, "purged") == []


def test_an_empty_key_is_refused_not_remembered(api: Api) -> None:
    """``Idempotency-Key:`` with nothing after it was a key like any other, for a day: a
    second POST with another body was told the key was used."""
    answer = api.submit(_body("empty-key"), headers={"Idempotency-Key": ""})
    assert answer.status_code == 422, answer.text
    assert _jobs_of(api.spool, "empty-key") == []
