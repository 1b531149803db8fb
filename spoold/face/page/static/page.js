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
  source.onerror = () => {
    if (status && source.readyState !== EventSource.CLOSED) status.textContent = "reconnecting…";
  };
  source.onopen = () => { if (status) status.textContent = "following…"; };
}

async function older(button) {
  const log = document.getElementById("log");
  const start = Number(button.dataset.start);
  const from = Math.max(start - 65536, 0);
  const url = new URL(button.dataset.url, window.location.href);
  url.searchParams.set("offset", String(from));
  url.searchParams.set("limit", String(start - from));
  const answer = await fetch(url, {credentials: "same-origin"});
  if (!answer.ok) return;
  let text = await answer.text();
  let shown = from;
  if (from > 0) {  // from a line's start
    const cut = text.indexOf("\n") + 1;
    shown += new TextEncoder().encode(text.slice(0, cut)).length;
    text = text.slice(cut);
  }
  log.prepend(document.createTextNode(text));
  button.dataset.start = String(shown);
  if (shown <= 0) button.remove();
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
