// trackrelay dashboard: local times, small form helpers, live notifications.
// Plain JavaScript, no build step. Every page works without it.
"use strict";

(function () {
  const sameYear = (d) => d.getFullYear() === new Date().getFullYear();

  // Times are rendered in UTC on the server; show them in the reader's zone.
  function localizeTimes(root) {
    root.querySelectorAll("time[datetime]").forEach((el) => {
      const d = new Date(el.getAttribute("datetime"));
      if (isNaN(d)) return;
      const short = el.dataset.style === "short";
      const opts = { day: "numeric", month: "short", hour: "2-digit", minute: "2-digit" };
      if (!short || !sameYear(d)) opts.year = "numeric";
      el.title = d.toString();
      el.textContent = d.toLocaleString(undefined, opts);
    });
  }

  // Bar segments carry their share as data (the CSP allows no inline style).
  function sizeBars(root) {
    root.querySelectorAll(".bar-seg[data-share]").forEach((el) => {
      el.style.width = `${Number(el.dataset.share)}%`;
    });
  }

  // Copy a value shown once; the clipboard API needs a secure context, so
  // fall back to selecting the text and the old copy command.
  function copy(button) {
    const target = document.querySelector(button.dataset.copy);
    if (!target) return;
    const value = target.textContent.trim();
    const done = () => {
      button.textContent = button.dataset.copied || "Copied";
      button.classList.add("is-copied");
    };
    const fallback = () => {
      const range = document.createRange();
      range.selectNodeContents(target);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      if (document.execCommand && document.execCommand("copy")) done();
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(value).then(done, fallback);
    } else {
      fallback();
    }
  }

  function formHelpers() {
    document.querySelectorAll("select[data-autosubmit]").forEach((el) => {
      el.addEventListener("change", () => el.form.submit());
    });
    document.querySelectorAll("button[data-copy]").forEach((button) => {
      button.addEventListener("click", () => copy(button));
    });
    document.querySelectorAll("form[data-confirm]").forEach((form) => {
      form.addEventListener("submit", (event) => {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  }

  const ICONS = {
    open: '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="3" y="5.5" width="18" height="13" rx="2.2"/><path d="m3.8 7 8.2 6 8.2-6"/></svg>',
    click: '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M10 13.5a4.5 4.5 0 0 0 6.4.4l3-3a4.5 4.5 0 0 0-6.4-6.4l-1.7 1.7"/><path d="M14 10.5a4.5 4.5 0 0 0-6.4-.4l-3 3a4.5 4.5 0 0 0 6.4 6.4l1.7-1.7"/></svg>',
  };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text) node.textContent = text; // never innerHTML for data from mail
    return node;
  }

  function toast(note) {
    const box = document.querySelector(".toasts");
    if (!box) return;
    const base = document.body.dataset.base || "";
    const item = el("div", "toast");
    item.setAttribute("role", "status");
    const icon = el("span", "toast-icon");
    icon.innerHTML = ICONS[note.kind] || ICONS.open; // our constant markup
    const text = el("div", "toast-text");
    const titles = { click: "Link clicked", reply: "Replied", bounce: "Bounced" };
    const title = el("a", "toast-title", titles[note.kind] || "Opened");
    title.href = base + "/messages/" + note.message_id;
    if (note.recipient) title.textContent += (note.kind === "bounce" ? ": " : " by ") + note.recipient;
    text.append(title, el("div", "toast-sub", note.subject || "(no subject)"));
    if (note.url) text.append(el("div", "toast-sub", note.url));
    const close = el("button", "toast-close", "×");
    close.type = "button";
    close.setAttribute("aria-label", "Dismiss");
    close.addEventListener("click", () => item.remove());
    item.append(icon, text, close);
    box.prepend(item);
    while (box.children.length > 4) box.lastChild.remove();
    setTimeout(() => item.remove(), 10000);
  }

  // Darken the matching icon on this page, as a reload would.
  function markHit(note) {
    const selector = '.hit[data-kind="' + note.kind + '"][data-message="' + note.message_id + '"]';
    document.querySelectorAll(selector).forEach((icon) => {
      icon.classList.remove("is-none");
      icon.classList.add("is-hit");
      let count = icon.querySelector(".hit-count");
      if (!count) {
        count = el("span", "hit-count", "0");
        icon.querySelector("svg").after(count);
      }
      count.textContent = String(Number(count.textContent) + 1);
      const noun = note.kind === "click" ? "Clicked" : "Opened";
      const tip = icon.querySelector(".tip strong");
      if (tip) tip.textContent = noun + " just now";
      icon.setAttribute("aria-label", noun + " just now");
      const row = icon.closest("tr");
      if (row) row.classList.add("flash-hit");
    });
  }

  function live() {
    const url = document.body.dataset.live;
    if (!url || !window.EventSource) return;
    const source = new EventSource(url);
    source.addEventListener("hit", (event) => {
      let note;
      try {
        note = JSON.parse(event.data);
      } catch (e) {
        return;
      }
      markHit(note);
      toast(note);
    });
    document.body.dataset.liveState = "connecting";
    source.addEventListener("open", () => (document.body.dataset.liveState = "open"));
  }

  document.addEventListener("DOMContentLoaded", () => {
    localizeTimes(document);
    sizeBars(document);
    formHelpers();
    // On a narrow screen the chart scrolls: start at the latest period.
    document.querySelectorAll(".chart-scroll").forEach((el) => (el.scrollLeft = el.scrollWidth));
    live();
  });
})();
