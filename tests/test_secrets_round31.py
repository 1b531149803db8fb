"""Secrets, round 31: a secret's base64 (at any offset in larger base64, either alphabet, with or
without padding) and its hex are masked as the secret is: in the job's log, status.json, the
callbacks and spoold's own log, whatever the number of secrets, across reads and at the cut of
a long line."""

from __future__ import annotations

import base64
import io
import logging
import random
import string
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spoold.core.joblog import HELD_BYTES, LINE_BOUND, JobLog, OutputStream
from spoold.core.secrets import (
    MASK,
    MAX_FORM_SIZE,
    MAX_SECRET_SIZE,
    Masker,
    base64_forms,
    encoded_forms,
)
from tests.test_secrets_round30 import LOGGER, Runner

TOKEN = "ghp_Xq7+Lm/2Zt9Kd0wPa4Rv8sYb1Nc6Jh3Ue5Tf"
SECRETS = [TOKEN, "p\u00e4ssw\u00f6rd-\u65e5\u672c", "abcd", "s3cr3t-TOKEN", "x" * 57]


def _b64(data: bytes, *, url: bool, padded: bool) -> str:
    text = (base64.urlsafe_b64encode if url else base64.b64encode)(data).decode()
    return text if padded else text.rstrip("=")


def _leaked_bits(masked: str, before: int, secret: bytes, whole: str) -> tuple[int, int]:
    """How many bits of the secret's first and last byte the characters left standing around
    the one ``***`` in ``masked`` hold; ``whole`` is the encoding before masking."""
    head, mask, tail = masked.partition(MASK)
    assert mask and MASK not in tail, masked
    tail = tail.rstrip("=")
    start, end = 8 * before, 8 * (before + len(secret))  # the secret's bits
    first_tail_bit = 6 * (len(whole.rstrip("=")) - len(tail))
    return max(0, 6 * len(head) - start), max(0, end - first_tail_bit)


# --- base64 and hex ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", SECRETS, ids=["token", "non-ascii", "four", "plain", "57x"])
@pytest.mark.parametrize("url", [False, True], ids=["standard", "url-safe"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
def test_base64_of_a_secret_anywhere_in_larger_base64_shows_less_than_a_byte_of_it(
    secret: str, url: bool, padded: bool
) -> None:
    masker = Masker([secret])
    data = secret.encode()
    for before in range(6):
        for after in range(5):
            whole = _b64(b"<" * before + data + b">" * after, url=url, padded=padded)
            masked = masker.mask_text(f"blob {whole} end")
            assert masked.startswith("blob ") and masked.endswith(" end"), masked
            head_bits, tail_bits = _leaked_bits(masked[5:-4], before, data, whole)
            # What stands at each end holds part of one byte of the secret at most.
            assert head_bits < 8 and tail_bits < 8, (before, after, whole, masked)


def test_what_jobs_print_of_a_token_in_base64_or_hex_is_masked() -> None:
    masker = Masker([TOKEN])
    data = TOKEN.encode()
    basic = base64.b64encode(b"user:" + data).decode()  # an HTTP client's debug output
    masked = masker.mask_text(f"Authorization: Basic {basic}")
    assert masked.startswith("Authorization: Basic dXNlcjp"), masked
    assert max(_leaked_bits(masked.removeprefix("Authorization: Basic "), 5, data, basic)) < 8
    echoed = base64.b64encode(data).decode()  # echo -n "$TOKEN" | base64
    assert max(_leaked_bits(masker.mask_text(echoed), 0, data, echoed)) < 8
    assert masker.mask_text(data.hex()) == masker.mask_text(data.hex().upper()) == MASK
    assert masker.mask_text(f"key=0x{data.hex()},") == "key=0x***,"


def test_a_short_secret_has_no_encodings_and_four_characters_have_them() -> None:
    short = Masker(["abc"])
    assert short.mask_text("YWJj 616263 table") == "YWJj 616263 table"
    four = Masker(["abcd"])
    for before in range(3):
        encoded = base64.b64encode(b"." * before + b"abcd").decode()
        assert MASK in four.mask_text(encoded), encoded
    assert four.mask_text("61626364 61626364".upper()) == "*** ***"


def test_encodings_are_derived_again_by_a_masker_given_the_values_not_sent() -> None:
    first = Masker([TOKEN, "s3cr3t-TOKEN"])
    assert TOKEN.encode().hex() not in first.values(), "derived again, not sent"
    second = Masker(first.values())
    assert second.values() == first.values()
    for shown in (base64.b64encode(b"u:" + TOKEN.encode()).decode(), TOKEN.encode().hex()):
        assert second.mask_text(shown) == first.mask_text(shown) != shown


def test_no_form_is_longer_than_max_form_size() -> None:
    """What cuts a long line looks MAX_FORM_SIZE past the cut: every form must fit."""
    for worst in ("\x01" * MAX_SECRET_SIZE, "\u00e4" * (MAX_SECRET_SIZE // 2), "\\" * 4096):
        data = worst.encode()
        forms = [worst, *encoded_forms(worst), *base64_forms(data), data.hex()]
        assert max(len(form.encode()) for form in forms) <= MAX_FORM_SIZE


def test_many_forms_are_found_as_a_search_for_each_finds_them() -> None:
    """Past a few forms the masker looks up words, not each form: it must find all a search
    finds, at any offset, in data of any length, with forms of every length."""
    rng = random.Random(31)
    alphabet = (string.ascii_letters + string.digits + "+/=-_").encode()
    for _ in range(60):
        values = ["".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(4, 30)))
                  for _ in range(rng.randint(3, 12))]  # fmt: skip
        masker = Masker(values)
        forms = [*masker.values(), *(f for v in values for f in base64_forms(v.encode()))]
        data = bytearray(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        if rng.random() < 0.7:
            form = rng.choice(forms).encode()
            at = rng.randint(0, len(data))
            data[at:at] = form
        found = masker.in_output(bytes(data))
        assert found == any(form.encode() in data for form in forms), (values, bytes(data))
        text = data.decode()
        assert (masker.mask_text(text) != text) == found


# --- in the job's log ------------------------------------------------------------------------------


class _Clock:
    def now(self) -> datetime:
        return datetime(2026, 12, 2, 10, 0, tzinfo=UTC)

    def monotonic(self) -> float:
        return 0.0


def _logged(masker: Masker, chunks: list[bytes]) -> str:
    out = io.BytesIO()
    log = JobLog(out, _Clock(), mask=masker.mask_text)
    stream = OutputStream(log, stderr=False)
    for chunk in chunks:
        stream.feed(chunk)
    stream.close()
    return out.getvalue().decode()


@pytest.mark.parametrize("count", [1, 20], ids=["one-secret", "twenty-secrets"])
def test_base64_and_hex_split_across_reads_never_reach_the_log(count: int) -> None:
    others = [f"other-secret-{n:02}-{'q' * n}" for n in range(count - 1)]
    masker = Masker([*others, TOKEN])
    data = TOKEN.encode()
    for shown in (base64.b64encode(b"user:" + data), data.hex().upper().encode()):
        output = b"one\nsays " + shown + b" here\nthree\n"
        for cut in range(9, 9 + len(shown), 7):
            lines = [
                line.split(" ", 1)[1]
                for line in _logged(masker, [output[:cut], output[cut:]]).splitlines()
            ]
            assert lines[0] == "INFO one" and lines[2] == "INFO three", lines
            assert lines[1].startswith("INFO says ") and MASK in lines[1], lines
            assert shown.decode()[8:-8] not in lines[1], (cut, lines)


def test_a_line_cut_at_the_bound_leaves_no_part_of_a_long_secrets_hex_or_base64() -> None:
    rng = random.Random(5)
    secret = "".join(rng.choice(string.ascii_letters) for _ in range(52_000))
    masker = Masker([secret])
    data = secret.encode()
    for shown in (data.hex().encode(), base64.b64encode(b"u:" + data)):
        # Longer than the secret itself: the old hold (a secret's size past the bound) fell
        # short of its end, so neither side of the cut saw it whole.
        assert len(shown) > MAX_SECRET_SIZE
        offset = LINE_BOUND - 1000
        line = b"a" * offset + shown + b"z" * HELD_BYTES  # cut as it comes
        chunks = [line[i : i + 65536] for i in range(0, len(line), 65536)] + [b"\nafter\n"]
        text = _logged(masker, chunks)
        first = text.splitlines()[0].split(" INFO ", 1)[1]
        # What the cut keeps: the a's, then the characters that also hold "u:" ("dTp" of the
        # base64), then the mask or as much of it as fits before the bound.
        kept = first[offset:]
        assert first.startswith("a" * offset) and kept.strip("*") in ("", "dTp"), kept[:40]
        assert shown.decode()[8:40] not in text
        assert "INFO after" in text


# --- a job, end to end -------------------------------------------------------------------------------


def test_a_job_printing_its_token_in_base64_and_hex_leaks_it_nowhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    parts = Runner(tmp_path, secrets={"TOK": TOKEN})
    commands = [
        'printf %s "${secret:TOK}" | base64',
        "printf 'user:%s' \"${secret:TOK}\" | base64 -w0; echo",
        "printf %s \"${secret:TOK}\" | od -An -tx1 -v | tr -d ' \\n'; echo",
        'printf %s "${secret:TOK}" | basenc --base64url -w0; echo',
        "exit 3",
    ]
    document = {"job_id": "enc", "executor": "local", "product": {"commands": commands},
                "callback": {"url": "http://127.0.0.1:9/hook", "secret": "cb-secret-4711"}}  # fmt: skip
    with caplog.at_level(logging.INFO, logger=LOGGER.name):
        job, status = parts.run(document)
    assert status["exit_code"] == 3, job.log_path.read_text()
    log = job.log_path.read_text()
    printed = [line.split(" INFO ", 1)[1] for line in log.splitlines() if " INFO " in line]
    printed = [line for line in printed if not line.startswith("spoold:")]
    assert len(printed) == 4 and all(MASK in line for line in printed), log
    assert printed[1].startswith("dXNlcjp"), "what holds only 'user:' stays"
    written = parts.written() + "\n".join(r.getMessage() for r in caplog.records)
    assert "dXNlcjp" in written, "the log, status.json's tail and the callback hold it"
    data = TOKEN.encode()
    forms = [*base64_forms(data), data.hex(), base64.b64encode(data).decode()]
    for form in forms:
        assert form not in written, form
    for line in log.splitlines():
        for run in line.split():
            for start in range(4):  # whatever base64 stands in the log decodes to no token
                piece = run[start:].rstrip("=*")
                piece = piece[: len(piece) // 4 * 4]
                try:
                    decoded = base64.b64decode(piece.replace("-", "+").replace("_", "/"))
                except ValueError:
                    continue
                assert data[2:8] not in decoded, line
