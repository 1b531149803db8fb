"""Secrets: every refusal of SecretStore with its message, and what Masker masks."""

from __future__ import annotations

import os
import socket
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import pytest

from spoold.core import secrets as secrets_module
from spoold.core.errors import SecretError, SpooldError
from spoold.core.secrets import MAX_SECRET_SIZE, Masker, SecretStore, is_secret_field
from spoold.core.states import JobState


def _secret(directory: Path, name: str, data: bytes, mode: int = 0o600) -> Path:
    path = directory / name
    path.write_bytes(data)
    # chmod after writing: the umask decides the mode write_bytes creates.
    path.chmod(mode)
    return path


def _refusal(store: SecretStore, name: str) -> str:
    with pytest.raises(SecretError) as caught:
        store.read(name)
    return str(caught.value)


# --- SecretStore ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"hunter2\n", "hunter2"),
        (b"hunter2\r\n", "hunter2"),
        (b"hunter2", "hunter2"),
        (b"hunter2\n\n", "hunter2\n"),
        (b" spaced \n", " spaced "),
        ("pässwörd\n".encode(), "pässwörd"),
    ],
    ids=["lf", "crlf", "no-newline", "only-one-newline", "spaces-kept", "utf8"],
)
def test_read_returns_the_value_with_exactly_one_trailing_newline_stripped(
    tmp_path: Path, data: bytes, value: str
) -> None:
    _secret(tmp_path, "db_password", data)
    assert SecretStore(tmp_path).read("db_password") == value


def test_read_accepts_stricter_modes_and_the_size_limit_itself(tmp_path: Path) -> None:
    _secret(tmp_path, "ro", b"x\n", mode=0o400)
    _secret(tmp_path, "big.pem", b"a" * MAX_SECRET_SIZE)
    store = SecretStore(tmp_path)
    assert store.read("ro") == "x"
    assert store.read("big.pem") == "a" * MAX_SECRET_SIZE


def test_read_sees_a_rotated_secret_without_caching(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    _secret(tmp_path, "token", b"old\n")
    assert store.read("token") == "old"
    _secret(tmp_path, "token", b"new\n")
    assert store.read("token") == "new"


def test_no_secrets_dir_is_refused_with_the_fix(tmp_path: Path) -> None:
    message = _refusal(SecretStore(None), "token")
    assert "'token'" in message
    assert "no secrets_dir is configured" in message


@pytest.mark.parametrize(
    "name",
    ["", ".hidden", "..", ".", "a/b", "../etc/passwd", "/etc/passwd", "a b", "tok\n", "é", "a" * 129],
    ids=["empty", "dotfile", "dotdot", "dot", "slash", "traversal", "absolute", "space",
         "newline", "non-ascii", "too-long"],
)  # fmt: skip
def test_a_name_that_is_not_a_plain_file_name_is_refused(tmp_path: Path, name: str) -> None:
    # A file the name could reach must not matter: the name is refused before any open.
    (tmp_path / "b").mkdir()
    _secret(tmp_path / "b", "x", b"x")
    message = _refusal(SecretStore(tmp_path), name)
    assert "is not a plain file name" in message
    assert repr(name) in message


def test_the_longest_and_oddest_allowed_names_are_read(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    for name in ("a" * 128, "_x.y-z", "0", "a..b"):
        _secret(tmp_path, name, b"v\n")
        assert store.read(name) == "v"


def test_a_missing_file_is_refused_naming_the_path_and_the_fix(tmp_path: Path) -> None:
    message = _refusal(SecretStore(tmp_path), "token")
    assert f"{tmp_path / 'token'} does not exist" in message
    assert "chmod 600" in message


def test_a_missing_secrets_dir_is_refused_naming_it(tmp_path: Path) -> None:
    directory = tmp_path / "nowhere"
    message = _refusal(SecretStore(directory), "token")
    assert f"secrets_dir {directory} does not exist" in message


@pytest.mark.parametrize("dangling", [False, True], ids=["to-a-good-file", "dangling"])
def test_a_symlink_is_never_followed(tmp_path: Path, dangling: bool) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if not dangling:
        _secret(elsewhere, "real", b"value\n")
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "token").symlink_to(elsewhere / "real")
    message = _refusal(SecretStore(secrets_dir), "token")
    assert f"{secrets_dir / 'token'} is a symbolic link" in message
    assert "value" not in message


def test_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "token").mkdir(mode=0o700)
    message = _refusal(SecretStore(tmp_path), "token")
    assert f"{tmp_path / 'token'} is a directory, not a regular file" in message


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    # Without O_NONBLOCK the open would wait for a writer that never comes.
    os.mkfifo(tmp_path / "token", 0o600)
    message = _refusal(SecretStore(tmp_path), "token")
    assert f"{tmp_path / 'token'} is a FIFO, not a regular file" in message


def test_a_socket_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # open() itself fails on a socket (ENXIO); the message still says what is there.
    # AF_UNIX paths are limited to ~108 bytes: bind relative to tmp_path.
    monkeypatch.chdir(tmp_path)
    with socket.socket(socket.AF_UNIX) as server:
        server.bind("token")
        message = _refusal(SecretStore(tmp_path), "token")
    assert f"{tmp_path / 'token'} is a socket, not a regular file" in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o644, 0o666, 0o610, 0o601])
def test_a_mode_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = _secret(tmp_path, "token", b"value\n", mode=mode)
    message = _refusal(SecretStore(tmp_path), "token")
    assert f"{path} has mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message


def test_mode_0700_is_accepted(tmp_path: Path) -> None:
    # Owner-only, even if executable: nothing for group or others.
    _secret(tmp_path, "token", b"value\n", mode=0o700)
    assert SecretStore(tmp_path).read("token") == "value"


def test_a_file_larger_than_64_kib_is_refused(tmp_path: Path) -> None:
    path = _secret(tmp_path, "token", b"a" * (MAX_SECRET_SIZE + 1))
    message = _refusal(SecretStore(tmp_path), "token")
    assert f"{path} is {MAX_SECRET_SIZE + 1} bytes, larger than 64 KiB" in message


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = _secret(tmp_path, "token", b"ab\xff\xfe\n")
    message = _refusal(SecretStore(tmp_path), "token")
    assert f"{path} is not valid UTF-8 (bad byte at offset 2)" in message


def test_secret_error_is_a_spoold_error() -> None:
    assert issubclass(SecretError, SpooldError)


# --- secret field names ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["secret", "token_secret", "callback.secret", "DB_PASSWORD", "password", "api_key",
     "stripe_API_KEY", "api_token", "github_api_token", "ClientSecret"],
)  # fmt: skip
def test_secret_field_names(name: str) -> None:
    assert is_secret_field(name)


@pytest.mark.parametrize(
    "name",
    ["secrets", "secret_name", "password_file", "api_keys", "token", "key", "user", "passwd", ""],
)
def test_other_field_names(name: str) -> None:
    assert not is_secret_field(name)


# --- Masker ----------------------------------------------------------------------------------


def test_nothing_to_mask_returns_the_text_itself() -> None:
    text = "a line of output"
    assert Masker().mask_text(text) is text
    assert Masker(["", "  ", "\n\t"]).mask_text(text) is text
    assert Masker(["zzz"]).mask_text(text) is text


def test_every_occurrence_of_every_value_is_masked() -> None:
    masker = Masker(["hunter2", "s3cr3t"])
    assert masker.mask_text("a hunter2 b s3cr3t c hunter2") == "a *** b *** c ***"


def test_values_are_literals_not_patterns() -> None:
    masker = Masker(["a.c", "x+"])
    assert masker.mask_text("abc a.c xx x+") == "abc *** xx ***"


def test_overlapping_values_mask_the_longest_first() -> None:
    masker = Masker(["abc", "abcdef", "def"])
    # "abcdef" as one mask, not "abc" then "def".
    assert masker.mask_text("[abcdef] [abc] [def]") == "[***] [***] [***]"
    assert masker.mask_text("abcdefg") == "***g"


def test_values_overlapping_in_the_text_leave_no_fragment() -> None:
    # "abc" starts first; masking it alone would leave "de", part of "cde".
    masker = Masker(["abc", "cde"])
    assert masker.mask_text("xabcdey") == "x***y"
    assert masker.mask_text("abc cde") == "*** ***"


def test_a_multiline_value_is_masked_whole_and_line_by_line() -> None:
    pem = (
        "-----BEGIN KEY-----\n"
        "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\n"
        "KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ\n"
        "ab\n"
        "-----END KEY-----\n"
    )
    masker = Masker()
    masker.add(pem)
    assert masker.mask_text(f"key: {pem}!") == "key: ***!"
    # The job log arrives one line at a time, each stripped of its newline.
    lines = [masker.mask_text(line) for line in pem.splitlines()]
    assert lines == ["***", "***", "***", "ab", "***"]
    assert masker.mask_text("  KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ  ") == "  ***  "


def test_add_is_idempotent_and_ignores_blank_values() -> None:
    masker = Masker(["token"])
    masker.add("token")
    masker.add("")
    masker.add("   ")
    assert masker.mask_text("a token b") == "a *** b"
    assert masker.mask_text("   ") == "   "


def test_a_masker_made_of_many_values_is_the_one_they_make_added_one_by_one() -> None:
    """Made whole (a supervisor's, from its job's ``values()``), it derives the same forms in
    the same order, masks the same, and is built once: 100 secrets took 254 ms, built anew
    for each value, where once is some 10 ms. Counted, not timed."""
    values = [f"s3cr3t-{n}-value" for n in range(100)] + ["two\nlines", "a b", "s3cr3t-1-value"]
    one_by_one = Masker()
    for value in values:
        one_by_one.add(value)
    with mock.patch("spoold.core.secrets._Finder", wraps=secrets_module._Finder) as built:
        whole = Masker(values)
    assert built.call_count == 1
    assert whole.values() == one_by_one.values()
    again = Masker(whole.values())  # as a supervisor makes it
    assert again.values() == whole.values()
    text = " | ".join(values) + " s3cr3t-1-value%0A lines"
    assert whole.mask_text(text) == one_by_one.mask_text(text) == again.mask_text(text)
    assert "s3cr3t" not in whole.mask_text(text)


def test_mask_data_masks_strings_and_secret_fields_at_any_depth() -> None:
    masker = Masker(["hunter2"])
    data = {
        "job_id": "j1",
        "message": "login with hunter2 failed",
        "product": {
            "env": {"DB_PASSWORD": "other", "USER": "app", "NOTE": None},
            "steps": [{"api_key": 123}, {"cmd": "echo hunter2"}, ["hunter2", 7, True]],
        },
        "callback": {"url": "https://example.com", "secret": "cb-secret", "token_secret": None},
        "hunter2": "as a key",
        "pair": ("hunter2", 1),
    }
    masked = masker.mask_data(data)
    assert masked == {
        "job_id": "j1",
        "message": "login with *** failed",
        "product": {
            "env": {"DB_PASSWORD": "***", "USER": "app", "NOTE": None},
            "steps": [{"api_key": "***"}, {"cmd": "echo ***"}, ["***", 7, True]],
        },
        "callback": {"url": "https://example.com", "secret": "***", "token_secret": None},
        "***": "as a key",
        "pair": ("***", 1),
    }
    # A copy: the original is untouched.
    assert data["product"]["env"]["DB_PASSWORD"] == "other"  # type: ignore[index]
    assert data["message"] == "login with hunter2 failed"


def test_a_secret_field_whose_value_is_a_structure_is_masked_whole() -> None:
    assert Masker().mask_data({"secret": {"a": 1}, "x": [{"password": ["p"]}]}) == {
        "secret": "***",
        "x": [{"password": "***"}],
    }


def test_collect_adds_secret_field_values_at_any_depth() -> None:
    document = {
        "job_id": "j1",
        "callback": {"url": "https://example.com", "secret": "cb-signing-key"},
        "product": {
            "env": {"DB_PASSWORD": "pg-pass-1", "USER": "app"},
            "steps": [{"api_token": "tok-abc"}, {"api_key": 42}, {"password": None}],
            "Vault_Secret": ["list-one", {"nested": "list-two"}],
        },
    }
    masker = Masker()
    masker.collect(document)
    text = "cb-signing-key pg-pass-1 tok-abc list-one list-two app j1 42 https://example.com"
    assert masker.mask_text(text) == "*** *** *** *** *** app j1 42 https://example.com"


def test_concurrent_adds_and_masks_lose_no_value() -> None:
    threads_count, per_thread = 6, 20
    masker = Masker()
    barrier = threading.Barrier(threads_count)
    failures: list[str] = []

    def work(index: int) -> None:
        barrier.wait(timeout=30)
        for n in range(per_thread):
            value = f"secret-{index}-{n}-value"
            masker.add(value)
            # Once add() returned, this thread's value must be masked, whatever others do.
            if masker.mask_text(f"<{value}>") != "<***>":
                failures.append(value)

    old_interval = sys.getswitchinterval()
    # Switch threads as often as possible, so that a lost update in add() would show.
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(old_interval)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
    every = " ".join(
        f"secret-{i}-{n}-value" for i in range(threads_count) for n in range(per_thread)
    )
    assert masker.mask_text(every) == " ".join(["***"] * threads_count * per_thread)


def test_a_short_secret_masks_what_was_said_not_spoolds_own_names_and_values() -> None:
    """A secret ``a`` (a careless submitter's) made status.json's "state": "failed"
    "st***te": "f***iled"; spoold could not read the job back. What a job, its executor or
    its submitter said is masked, keys and all where they are data (``result``,
    ``labels``); spoold's own fields, the attempts' and steps' records but their errors,
    and the step ids (read back on a retry) are written as they are."""
    from spoold.core.job import JobStatus  # noqa: PLC0415 - this test alone needs the job model
    from spoold.run.worker import _masked  # noqa: PLC0415

    status = JobStatus(job_id="a-job", state=JobState.FAILED, executor="local", type="backup",
                       submitted_at="2026-12-06T12:00:00Z", source="a.yaml")  # fmt: skip
    status.begin_attempt(datetime(2026, 12, 6, 12, 0, 1, tzinfo=UTC), "vm-42")
    status.end_attempt(datetime(2026, 12, 6, 12, 0, 2, tzinfo=UTC), JobState.FAILED, 3,
                       "exit code 3 (bad password a)")  # fmt: skip
    status.steps = {"fetch-data": {"state": "failed", "error": "a failure", "exit_code": 3}}
    status.result = {"vmid": 4711, "name": "data-1", "api_token": "tok"}
    status.labels = {"team": "data"}
    document = status.to_dict()
    masked = _masked(Masker(["a"]), document)
    again = JobStatus.from_dict(masked)
    assert (again.job_id, again.state, again.executor, again.type) == (
        "a-job", JobState.FAILED, "local", "backup",
    )  # fmt: skip
    assert masked["submitted_at"] == document["submitted_at"] and masked["worker"] == "vm-42"
    assert masked["error"] == "exit code 3 (b***d p***ssword ***)"
    assert masked["attempts"][0]["error"] == masked["error"]
    assert masked["attempts"][0]["started_at"] == document["attempts"][0]["started_at"]
    assert masked["steps"] == {"fetch-data": {"state": "failed", "error": "*** f***ilure",
                                              "exit_code": 3}}  # fmt: skip
    assert masked["result"] == {"vmid": 4711, "n***me": "d***t***-1", "***pi_token": "***"}
    assert masked["labels"] == {"te***m": "d***t***"} and masked["source"] == "***.y***ml"
    assert _masked(Masker(["a"]), {"log": "a tail"}) == {"log": "*** t***il"}, "a notice's tail"
