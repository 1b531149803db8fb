"""A long secret's base64 wrapped onto several lines is masked line by line.

Seen before: `printf %s "$KEY" | base64` with a key past 57 bytes printed 76-character lines,
and each line, a piece of the encoded key, stood in the log as it was (the README said to use
`base64 -w0`). Now each line of base64 wrapped at 76 (`base64`, MIME) or 64 (PEM, `openssl
base64`) characters is a form the masker knows, where the secret starts what was encoded.
"""

from __future__ import annotations

import base64
import textwrap
from pathlib import Path

import pytest

from spoold.core.secrets import MASK, Masker, wrapped_base64
from tests.test_secrets_round30 import Runner

KEY = "-----BEGIN KEY-----\n" + "".join(chr(ord("A") + n % 26) for n in range(150)) + "\n"
SECRETS = {
    "58": "k" * 58,  # the first length base64 wraps at 76
    "key": KEY,
    "non-ascii": "p\u00e4ssw\u00f6rd-\u65e5\u672c-" * 12,
    "long": "x7Q" * 700,
}


def _wrapped(data: bytes, width: int) -> list[str]:
    return textwrap.wrap(base64.b64encode(data).decode(), width)


@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
@pytest.mark.parametrize("width", [76, 64])
@pytest.mark.parametrize("newline", [False, True], ids=["printf", "echo"])
def test_every_line_of_wrapped_base64_is_masked(secret: str, width: int, newline: bool) -> None:
    masker = Masker([secret])
    data = secret.encode() + (b"\n" if newline else b"")
    lines = _wrapped(data, width)
    assert len(lines) > 1
    masked = [masker.mask_text(line) for line in lines]
    # What stands of a line is the one character that also holds what follows, what follows
    # (a newline's), and padding: less than a byte of the secret. A last line of the secret
    # too short to be told from other text stands as it is (5 bytes of it at most).
    own = 8 * len(secret.encode()) // 6  # character i holds bits 6i to 6i+5
    for number, line in enumerate(masked):
        mine = min(own, (number + 1) * width) - number * width  # its characters of the secret
        if mine <= 0:
            continue  # the newline's alone
        if mine < 8:
            assert number == len(masked) - 1 and len(line) <= mine + 4, line
            continue
        assert line.startswith(MASK) and len(line.removeprefix(MASK).rstrip("=")) <= 3, (
            number,
            line,
        )


def test_short_secrets_are_left_to_the_one_line_forms() -> None:
    assert wrapped_base64(b"k" * 48) == [], "48 bytes fit one line of 64 (and of 76)"
    assert [len(line) for line in wrapped_base64(b"k" * 57)] == [64, 12], "one of 76"
    assert all(8 <= len(line) <= 76 for line in wrapped_base64(KEY.encode()))


def test_a_job_printing_a_long_key_in_base64_leaks_no_line_of_it(tmp_path: Path) -> None:
    parts = Runner(tmp_path, secrets={"KEY": KEY.strip()})
    commands = [
        'printf "%s\\n" "${secret:KEY}" | base64',
        'printf "%s\\n" "${secret:KEY}" | base64 -w 64',
    ]
    job, status = parts.run({"job_id": "wrap", "executor": "local",
                             "product": {"commands": commands}})  # fmt: skip
    assert status["state"] == "succeeded", job.log_path.read_text()
    log = job.log_path.read_text()
    printed = [line.split(" INFO ", 1)[1] for line in log.splitlines() if " INFO " in line]
    printed = [line for line in printed if not line.startswith("spoold:")]
    data = KEY.strip().encode() + b"\n"
    assert len(printed) == len(_wrapped(data, 76)) + len(_wrapped(data, 64)), log
    assert all(line.startswith(MASK) for line in printed), log
    for width in (76, 64):
        for line in _wrapped(data, width)[:-1]:
            assert line not in parts.written(), line
