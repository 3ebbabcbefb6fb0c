// The console's only script: live progress over EventSource, rating without a page load, and the
// rate-a-batch keys. Every form works without it.
"use strict";

const csrf = () => document.getElementById("main").dataset.csrf;

function follow(section, onEvent) {
  const source = new EventSource(section.dataset.events);
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    onEvent(event);
    if (event.final) {
      source.close();
      // The finished page is rendered by the server from the store: images, votes, buttons.
      window.location.reload();
    }
  };
}

function followJob(section) {
  const status = document.getElementById("job-status");
  const progress = document.getElementById("job-progress");
  const preview = document.getElementById("job-preview");
  follow(section, (event) => {
    if (event.error) {
      status.textContent = event.error;
    } else if (event.state === "queued") {
      status.textContent = `Queued at position ${event.position + 1}`;
    } else if (event.state === "running") {
      status.textContent = event.total_steps ? `Step ${event.step} of ${event.total_steps}` : "Starting…";
      if (event.total_steps) {
        progress.max = event.total_steps;
        progress.value = event.step;
      }
    } else {
      status.textContent = event.state === "done" ? "Done: storing the images…" : event.state;
    }
    if (event.preview) {
      preview.src = `data:image/png;base64,${event.preview}`;
      preview.hidden = false;
    }
  });
}

function followAdminJob(section) {
  const state = document.getElementById("admin-job-state");
  const progress = document.getElementById("admin-job-progress");
  const message = document.getElementById("admin-job-message");
  follow(section, (event) => {
    state.textContent = event.state;
    message.textContent = event.message;
    if (event.total) {
      progress.max = event.total;
      progress.value = event.step;
    }
  });
}

async function rate(form, submitter) {
  const response = await fetch(form.action, {
    method: "POST",
    headers: { "X-CSRF-Token": csrf(), Accept: "application/json" },
    body: new FormData(form),
  });
  if (!response.ok) {
    alert(await response.text());
    return;
  }
  const tally = await response.json();
  const box = form.closest(".rate");
  box.querySelector("[data-likes]").textContent = tally.likes;
  box.querySelector("[data-dislikes]").textContent = tally.dislikes;
  for (const button of box.querySelectorAll("button[data-choice]")) {
    if (button.dataset.choice !== "flag") {
      button.setAttribute("aria-pressed", String(button.dataset.choice === tally.choice));
    } else if (tally.choice === "flag") {
      button.setAttribute("aria-pressed", "true");
    }
  }
  submitter.focus();
}

document.addEventListener("DOMContentLoaded", () => {
  const job = document.querySelector("#job[data-events]");
  if (job) followJob(job);
  const adminJob = document.querySelector("#admin-job[data-events]");
  if (adminJob) followAdminJob(adminJob);
  for (const form of document.querySelectorAll("form[data-rate]")) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      rate(form, event.submitter || form.querySelector("button"));
    });
  }
  if (document.querySelector("[data-rate-batch]")) {
    const keys = { ArrowRight: "l", ArrowLeft: "d", l: "l", d: "d", f: "f", s: "s" };
    document.addEventListener("keydown", (event) => {
      if (event.ctrlKey || event.metaKey || event.altKey || event.target.closest("input, textarea, select")) return;
      const key = keys[event.key] || keys[event.key.toLowerCase()];
      const button = key && document.querySelector(`button[data-key="${key}"]`);
      if (button) {
        event.preventDefault();
        button.click();
      }
    });
  }
});
