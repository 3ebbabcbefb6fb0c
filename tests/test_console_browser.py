"""The whole loop in a real browser: Debian's Chromium, driven by Playwright, against the real service on the
tiny model, the real console and a real SQLite store.

Alice generates and watches her job wait in the queue and finish; Bob rates a batch with the
keyboard and flags one image; the admin logs in with the printed link, finds the flag in the
moderation queue, curates, trains a tiny adapter at the model's native size, publishes it and
compares it with the base model; Alice generates with it, and Bob's vote on that image shows in
the adapter's like rate beside the base model's (Bob's two likes and Alice's own dislike:
self-votes count in the like rate, as in `/stats`, but never in curation).

The screenshots it takes are the README's. Regenerate them with:

    LORALOOP_SCREENSHOTS=docs/console .venv/bin/python -m pytest tests/test_console_browser.py
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from console.app import start_console
from generation.client import ServiceClient
from loraloop.config import Config, Secrets
from loraloop.store import Store

playwright_api = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PROMPT = "a red fox in the snow"
STYLED = "a fox in its own style"
SLOW = 180_000  # ms: a curate, train or publish job on a shared 2-core box

pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM), reason="needs Debian's chromium (.ci/run installs it)")


def settings(tiny_model_dir: Path) -> Config:
    return (Config()
            .replace("service", model=str(tiny_model_dir), default_steps=4, batch_wait_ms=20)
            .replace("training", rank=4, learning_rate=0.05, max_steps=2, batch_size=1, validation_split=0.0,
                     log_with="none", validation_prompts=[PROMPT], sample_every=2, sample_steps=2)
            .replace("curation", min_raters=1))


def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LORALOOP_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.timeout(600)
async def test_generate_rate_moderate_curate_train_publish_and_see_the_like_rate(
        make_service, tiny_model_dir, data_dir, tmp_path):
    expect = playwright_api.expect
    config = settings(tiny_model_dir)
    service = await make_service(preview_every=1)  # a preview at every step, for the page to show
    console = await start_console(config, Secrets(None, None), service.url, port=0)
    url, folder = console.url, shots(tmp_path)
    try:
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            people = {}
            for name in ("alice", "bob", "admin"):
                context = await browser.new_context(viewport={"width": 1200, "height": 900})
                context.set_default_timeout(60_000)
                people[name] = await context.new_page()
            alice, bob, admin = people["alice"], people["bob"], people["admin"]

            # Alice logs in with a name and asks for three foxes while the queue is held.
            for page, name in ((alice, "alice"), (bob, "bob")):
                await page.goto(f"{url}/login")
                await page.get_by_label("Name").fill(name)
                await page.get_by_role("button", name="Log in", exact=True).click()
                await page.wait_for_url(f"{url}/")
            async with ServiceClient(service.url) as client:
                await client.pause()
                await alice.get_by_label("Prompt", exact=True).fill(PROMPT)
                await alice.get_by_label("Count").fill("3")
                await alice.get_by_label("Seed").fill("7")
                await alice.get_by_role("button", name="Generate").click()
                await expect(alice.locator("#job-status")).to_contain_text("Queued at position 1")
                # What the page shows while the job runs goes by in a second: record it as it changes.
                shown: list[str] = []
                await alice.expose_function("recordShown", lambda text: shown.append(text))
                await alice.evaluate("""() => {
                    const status = document.getElementById("job-status");
                    const preview = document.getElementById("job-preview");
                    new MutationObserver(() => window.recordShown(status.textContent))
                        .observe(status, {childList: true, characterData: true, subtree: true});
                    new MutationObserver(() => preview.src.startsWith("data:") && window.recordShown("preview"))
                        .observe(preview, {attributes: true, attributeFilter: ["src"]});
                }""")
                await client.resume()
            foxes = alice.get_by_role("img", name=PROMPT, exact=True)
            await expect(foxes).to_have_count(3)
            assert "Step 4 of 4" in shown and "preview" in shown, shown
            # Rating on the page itself (fetch with the CSRF header, no reload): Alice dislikes one of hers.
            dislike = alice.get_by_role("button", name=f"Dislike: {PROMPT}").first
            await dislike.click()
            await expect(dislike).to_have_attribute("aria-pressed", "true")
            await expect(alice.locator(".rate [data-dislikes]").first).to_have_text("1")

            # Bob rates a batch with the keyboard: two likes, then a flag.
            await bob.goto(f"{url}/rate")
            for key in ("l", "ArrowRight"):
                await expect(bob.get_by_role("img", name=PROMPT, exact=True)).to_be_visible()
                async with bob.expect_navigation():
                    await bob.keyboard.press(key)
            async with bob.expect_navigation():
                await bob.get_by_role("button", name="Flag as bad or unsafe").click()
            await expect(bob.get_by_text("Nothing left to rate")).to_be_visible()
            with sqlite3.connect(config.database_path) as db:
                bob_id = db.execute("SELECT user_id FROM users WHERE name = 'web:bob'").fetchone()[0]
                votes = db.execute("SELECT value, emoji FROM ratings WHERE user_id = ?", (bob_id,)).fetchall()
                flags = db.execute("SELECT kind FROM flags WHERE user_id = ?", (bob_id,)).fetchall()
            assert votes == [(1, "👍"), (1, "👍")]
            assert flags == [("nsfw",)]

            # The admin's link logs in; the flagged fox waits in the moderation queue.
            await admin.goto(console.login_url)
            await admin.wait_for_url(f"{url}/admin")
            await admin.goto(f"{url}/admin/moderation")
            await expect(admin.get_by_role("img", name=PROMPT, exact=True)).to_have_count(1)
            await admin.screenshot(path=folder / "moderation.png", full_page=True)

            # Curate, train and publish from the loop page, each a background job with progress.
            await admin.goto(f"{url}/admin")
            await admin.get_by_role("button", name="Curate").click()
            await expect(admin.locator("#admin-job-state")).to_have_text("done", timeout=SLOW)
            await expect(admin.locator("#admin-job-message")).to_contain_text("kept 2")
            await admin.goto(f"{url}/admin")
            await admin.get_by_label("Adapter name").fill("fox")
            await admin.get_by_role("button", name="Train").click()
            await expect(admin.locator("#admin-job-state")).to_have_text("done", timeout=SLOW)
            await admin.goto(f"{url}/admin/runs")
            await expect(admin.get_by_role("img", name="Loss curve of fox-")).to_be_visible()
            await expect(admin.get_by_role("img", name="Sample grid of fox-")).to_have_count(1)
            await admin.goto(f"{url}/admin")
            await admin.get_by_label("As adapter").fill("fox")
            await admin.get_by_role("button", name="Publish").click()
            await expect(admin.locator("#admin-job-state")).to_have_text("done", timeout=SLOW)
            await expect(admin.locator("#admin-job-message")).to_contain_text("published fox@1")
            await admin.goto(f"{url}/admin")
            await expect(admin.get_by_label("Columns")).to_have_value("base,fox")
            await admin.get_by_label("Steps", exact=True).fill("2")
            await admin.get_by_role("button", name="Compare").click()
            await expect(admin.locator("#admin-job-state")).to_have_text("done", timeout=SLOW)
            await expect(admin.get_by_role("img", name="Comparison grid: compare base,fox")).to_be_visible()

            # Alice draws with the new style (autocompleted from the service's list); Bob likes it.
            await alice.goto(f"{url}/")
            await expect(alice.locator("#styles option[value='fox']")).to_have_count(1)
            await alice.get_by_label("Prompt", exact=True).fill(STYLED)
            await alice.get_by_label("Style", exact=True).fill("fox")
            await alice.get_by_role("button", name="Generate").click()
            await expect(alice.get_by_role("img", name=STYLED, exact=True)).to_have_count(1)
            await expect(alice.locator("dl.params")).to_contain_text("fox v1")
            await bob.goto(f"{url}/rate")
            await expect(bob.get_by_role("img", name=STYLED, exact=True)).to_be_visible()
            async with bob.expect_navigation():
                await bob.keyboard.press("l")

            # The admin sees fox v1's like rate, and the vote behind it.
            await admin.goto(f"{url}/admin/adapters")
            row = admin.get_by_role("row").filter(has_text="fox v1")
            await expect(row).to_contain_text("100%")
            await expect(admin.get_by_role("row").filter(has_text="base model")).to_contain_text("67%")
            await expect(admin.get_by_role("img", name="Bar chart: like rate per adapter version")).to_be_visible()
            await admin.screenshot(path=folder / "adapters.png", full_page=True)
            await row.get_by_role("link").click()
            await expect(admin.get_by_role("row").filter(has_text="web:bob")).to_have_count(1)

            await alice.goto(f"{url}/")
            await alice.get_by_label("Prompt", exact=True).fill(PROMPT)
            await alice.get_by_label("Style", exact=True).fill("fox")
            await alice.screenshot(path=folder / "playground.png", full_page=True)
            await browser.close()
        with Store.from_config(config) as store:
            styled = [g for g in (store.generation(i) for i in range(1, 3)) if g.prompt == STYLED]
        assert styled and [(a["name"], a["version"]) for a in styled[0].adapters] == [("fox", 1)]
    finally:
        await console.stop()
