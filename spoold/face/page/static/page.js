// spoold's page: the live log (Server-Sent Events, resumed where the last event ended), older
// log lines on demand, and a confirmation before a destructive form. No framework: nothing
// to build, nothing from elsewhere; served from the daemon under a CSP without inline script.
"use strict";

function follow(log) {
  const status = document.getElementById("log-status");
  const url = new URL(log.dataset.stream, window.location.href);
  // Start after what the page showed; a reconnect sends Last-Event-ID by itself.
  url.searchParams.set("offset", log.dataset.offset || "0");
  const source = new EventSource(url);
  source.onmessage = (event) => {
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(document.createTextNode(event.data + "\n"));
    if (atEnd) log.scrollTop = log.scrollHeight;
  };
  source.addEventListener("end", (event) => {
    source.close();
    let outcome = {};
    try { outcome = JSON.parse(event.data); } catch (e) { outcome = {}; }
    if (status) status.textContent = "ended: " + (outcome.state || "?");
    const badge = document.getElementById("state");
    if (badge && outcome.state) {
      badge.textContent = outcome.state;
      badge.className = "state " + outcome.state;
    }
  });
  // The API ends the stream when the session ends (logout, a revoked token); the reconnect it
  // then refuses (401, 403) closes the EventSource: no more lines.
  source.onerror = () => {
    if (!status) return;
    status.textContent = source.readyState === EventSource.CLOSED
      ? "stopped (reload the page, or log in again)" : "reconnecting…";
  };
  source.onopen = () => { if (status) status.textContent = "following…"; };
}

// Older lines are fetched this many bytes at a time.
const OLDER_STEP = 65536;
// A line longer than this (no newline in it) is shown in parts, cut between characters.
const OLDER_MOST = 16 * OLDER_STEP;

// The log's text from byte `from` to byte `end`, as the API escapes it (control characters as
// `spoold logs` shows them); null if the log is not what it was.
async function logText(base, from, end) {
  if (from >= end) return "";
  const url = new URL(base, window.location.href);
  url.searchParams.set("offset", String(from));
  url.searchParams.set("limit", String(end - from));
  const answer = await fetch(url, {credentials: "same-origin"});
  if (!answer.ok || answer.headers.get("X-Log-Next-Offset") !== String(end)) return null;
  return answer.text();
}

// Older lines: the bytes before the first one shown, by byte offsets as the API counts them.
// Cut in the bytes as stored (raw=1), at a newline, and only then asked for as text: a chunk
// may start in the middle of a character, and text is not the bytes it came from (an escape
// is longer than its character), which would shift each step and show bytes twice.
async function older(button) {
  if (button.disabled) return;
  button.disabled = true;
  try {
    const log = document.getElementById("log");
    const end = Number(button.dataset.start);
    let start = end;
    let held = new Uint8Array(0);  // bytes before `start` not shown yet: no line start in them
    while (start > 0) {
      const from = Math.max(start - OLDER_STEP, 0);
      const url = new URL(button.dataset.url, window.location.href);
      url.searchParams.set("offset", String(from));
      url.searchParams.set("limit", String(start - from));
      url.searchParams.set("raw", "1");
      const answer = await fetch(url, {credentials: "same-origin"});
      if (!answer.ok) return;
      const got = new Uint8Array(await answer.arrayBuffer());
      if (got.length !== start - from) return;  // the log is not what it was: stop here
      const bytes = new Uint8Array(got.length + held.length);
      bytes.set(got, 0);
      bytes.set(held, got.length);
      let cut = 0;
      if (from > 0) {  // from a line's start: after the first newline in these bytes
        cut = bytes.indexOf(0x0a) + 1;
        if (cut === 0 && bytes.length < OLDER_MOST) {  // no line starts here: fetch more
          held = bytes;
          start = from;
          continue;
        }
        // One line longer than OLDER_MOST: shown from a character's start (never from a
        // UTF-8 continuation byte, 10xxxxxx).
        if (cut === 0) {
          while (cut < bytes.length && (bytes[cut] & 0xc0) === 0x80) cut += 1;
        }
      }
      const text = await logText(button.dataset.url, from + cut, end);
      if (text === null) return;
      log.prepend(document.createTextNode(text));
      button.dataset.start = String(from + cut);
      if (from + cut <= 0) button.remove();
      return;
    }
  } finally {
    button.disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const log = document.getElementById("log");
  if (log && log.dataset.stream) follow(log);
  const button = document.getElementById("log-older");
  if (button) button.addEventListener("click", () => older(button));
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  }
});
