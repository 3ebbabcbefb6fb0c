"""One generation as a person sees it in Discord: refuse or defer, queue, progress, images, votes.

`Generate.start()` owns the life of a job started from `/imagine`, 🔁 reroll or 🎨 variation:

1. checks (`bot.limits`, the attachment, the style) answered at once with a short ephemeral
   refusal, else the interaction is deferred, well inside Discord's 3-second deadline;
2. the job is submitted and recorded in the store, and the deferred message shows its queue
   position with a ❌ cancel button;
3. the service's events become edits of that message (step/total and a preview), at most one
   every `progress_interval` seconds;
4. each image is posted as its own message (so a reaction rates exactly one image) with a line
   of provenance, the rating reactions and the 🔁 🎨 🗑 buttons, and recorded in the store.

Interaction tokens die after 15 minutes: `InteractionReply` notices (by age, or by Discord
refusing the token) and continues with ordinary channel messages, which is all a `ChannelReply`
(a job resumed after a restart) ever sends. Errors a person can act on become one sentence;
anything else is logged with the job id, and the person sees that id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import discord
from PIL import Image

from generation.contract import AdapterRef, ImageResult, JobRequest, JobState, JobStatus
from loraloop import experiments

if TYPE_CHECKING:
    from bot.app import LoraloopBot
    from loraloop.store import Generation

log = logging.getLogger(__name__)

# Discord lets an interaction token post for 15 minutes; stop trusting it a little before.
TOKEN_LIFETIME_S = 14 * 60
# Discord's smallest upload limit, for messages sent without an interaction to ask.
DEFAULT_FILESIZE_LIMIT = 10 * 1024 * 1024
# JSON error codes Discord answers when an interaction token is no longer usable.
DEAD_TOKEN_CODES = {50027, 10015}
# Styles one /imagine may stack: each more adapter dilutes the others and costs a little time.
MAX_STYLES = 3


@dataclass(frozen=True)
class Spec:
    """What a person asked for, before it becomes a `JobRequest`."""

    prompt: str
    negative: str = ""
    # The adapters to stack, in order; a name may pin a version ("ink@2").
    styles: tuple[AdapterRef, ...] = ()
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    count: int = 1
    init_image: bytes | None = None
    strength: float | None = None
    # Served in an A/B experiment: the image's message must not say which version made it.
    blind: bool = False
    # 🔍 upscale: the stored image this job enlarges, recorded as the generation's parent.
    parent_image_id: int | None = None

    def request(self, requester: int) -> JobRequest:
        return JobRequest(
            prompt=self.prompt,
            negative_prompt=self.negative,
            adapters=self.styles,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            width=self.width,
            height=self.height,
            count=self.count,
            init_image=base64.b64encode(self.init_image).decode() if self.init_image else None,
            strength=self.strength if self.init_image else None,
            requester=f"discord:{requester}",
        )

    @classmethod
    def from_generation(cls, generation: Generation) -> Spec:
        """The settings of a recorded generation (for 🔁 and 🎨), without its seed."""
        params = generation.parameters
        return cls(
            prompt=generation.prompt,
            negative=generation.negative_prompt,
            styles=tuple(AdapterRef(str(a["name"]).partition("@")[0], float(a.get("weight", 1.0)))
                         for a in generation.adapters),
            width=params.get("width"),
            height=params.get("height"),
            steps=params.get("steps"),
            guidance=params.get("guidance"),
            count=int(params.get("count", 1)),
            blind=generation.arm is not None,
        )


def shown(prompt: str, limit: int = 200) -> str:
    """A prompt as it appears in a status line: shortened, Markdown escaped."""
    short = prompt if len(prompt) <= limit else prompt[: limit - 1] + "…"
    return discord.utils.escape_markdown(short)


def provenance(spec_prompt: str, image: ImageResult, status: JobStatus, blind: bool = False) -> str:
    """The line under each image: enough to reproduce it; `blind` (an A/B experiment's image)
    names the style without its version, so raters cannot tell the arms apart."""
    params = status.parameters
    parts = [f"seed {image.seed}", f"{image.width}×{image.height}"]
    if params.get("steps"):
        parts.append(f"{params['steps']} steps")
    if params.get("guidance") is not None:
        parts.append(f"cfg {params['guidance']}")
    if status.adapters:
        parts.append(" + ".join(
            f"{a.name} v{a.version}" if a.version is not None and not blind else a.name for a in status.adapters))
    else:
        parts.append("base model")
    return f"**{shown(spec_prompt, 300)}**\n-# " + " · ".join(parts)


def fit_for_discord(png: bytes, limit: int, name: str, strip_metadata: bool = False) -> list[discord.File]:
    """The image as file(s) under Discord's upload limit: the PNG as is, else re-encoded.

    Re-encoding tries an optimized PNG (keeps the parameters chunk), then JPEG at falling
    quality, then halves the size; the original always stays in the store. `strip_metadata`
    drops the parameters chunk (it names the adapter version: an A/B experiment's image).
    """
    if len(png) <= limit and not strip_metadata:
        return [discord.File(io.BytesIO(png), filename=f"{name}.png")]
    with Image.open(io.BytesIO(png)) as source:
        image = source.convert("RGB")
        info = {} if strip_metadata else source.info
    out = io.BytesIO()
    pnginfo = None
    if "parameters" in info:
        from PIL.PngImagePlugin import PngInfo
        pnginfo = PngInfo()
        pnginfo.add_text("parameters", info["parameters"])
    image.save(out, format="PNG", optimize=True, pnginfo=pnginfo)
    if out.tell() <= limit:
        return [discord.File(io.BytesIO(out.getvalue()), filename=f"{name}.png")]
    while True:
        for quality in (90, 75, 60):
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=quality)
            if out.tell() <= limit:
                return [discord.File(io.BytesIO(out.getvalue()), filename=f"{name}.jpg")]
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)))


def _is_dead_token(exc: discord.HTTPException) -> bool:
    return exc.code in DEAD_TOKEN_CODES or exc.status == 401


class Reply(Protocol):
    """Where a job's messages go, as `Generate` follows it: `InteractionReply` or `ChannelReply`."""

    @property
    def user_id(self) -> int: ...  # who asked

    @property
    def filesize_limit(self) -> int: ...  # the largest upload a message may carry

    @property
    def token_alive(self) -> bool: ...  # False: edits are no longer seen, so outcomes are sent

    @property
    def age_restricted(self) -> bool: ...  # the channel is one Discord marks age-restricted (NSFW)

    async def edit(self, **kwargs: Any) -> None: ...

    async def send(self, **kwargs: Any) -> discord.Message: ...


class ChannelReply:
    """Ordinary channel messages that mention who asked.

    For a job resumed after a restart (this process never saw its interaction), and for an
    interaction's job that outlived its token. There is no message to edit: progress is skipped.
    """

    token_alive = False
    # A job resumed after a restart knows its channel by id only: treated as an ordinary channel.
    age_restricted = False

    def __init__(self, channel: discord.abc.Messageable, user_id: int) -> None:
        self.channel = channel
        self.user_id = user_id
        self.filesize_limit = DEFAULT_FILESIZE_LIMIT

    async def edit(self, **kwargs: Any) -> None:
        """Nothing to edit: the job's outcome arrives as a message of its own."""

    async def send(self, **kwargs: Any) -> discord.Message:
        kwargs.pop("ephemeral", None)
        content = kwargs.pop("content", None) or ""
        return await self.channel.send(content=f"<@{self.user_id}> {content}".strip(),
                                       allowed_mentions=discord.AllowedMentions(users=[discord.Object(self.user_id)]),
                                       **kwargs)


class InteractionReply:
    """The interaction's deferred message and followups while its token lives, then the channel.

    The token dies after 15 minutes: this notices by age, or by Discord refusing the token, and
    from then on sends as a `ChannelReply` does.
    """

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.user_id = interaction.user.id
        self.filesize_limit = interaction.filesize_limit
        self.started = time.monotonic()
        self.token_dead = False

    @property
    def token_alive(self) -> bool:
        return not self.token_dead and time.monotonic() - self.started < TOKEN_LIFETIME_S

    @property
    def age_restricted(self) -> bool:
        # DMs and channels discord.py could not resolve have no is_nsfw(): ordinary channels.
        is_nsfw = getattr(self.interaction.channel, "is_nsfw", None)
        return bool(is_nsfw()) if callable(is_nsfw) else False

    async def edit(self, **kwargs: Any) -> None:
        """Edit the deferred message; skipped once the token is gone (progress is optional)."""
        if not self.token_alive:
            return
        try:
            await self.interaction.edit_original_response(**kwargs)
        except discord.HTTPException as exc:
            if not _is_dead_token(exc):
                raise
            self.token_dead = True
            log.info("interaction %s: token expired; continuing in the channel", self.interaction.id)

    async def refuse(self, text: str) -> None:
        """A refusal known only after deferring (the service said no): swap the public "thinking"
        message for an ephemeral note, so a refusal is seen only by the person who asked."""
        try:
            await self.interaction.delete_original_response()
            await self.interaction.followup.send(text, ephemeral=True)
        except discord.HTTPException as exc:
            if not _is_dead_token(exc):
                raise
            log.info("interaction %s: token expired before the refusal %r", self.interaction.id, text)

    async def send(self, **kwargs: Any) -> discord.Message:
        if self.token_alive:
            try:
                return await self.interaction.followup.send(wait=True, **kwargs)
            except discord.HTTPException as exc:
                if not _is_dead_token(exc):
                    raise
                self.token_dead = True
                log.info("interaction %s: token expired; continuing in the channel", self.interaction.id)
        return await ChannelReply(self._channel(), self.user_id).send(**kwargs)

    def _channel(self) -> discord.abc.Messageable:
        channel = self.interaction.channel
        if isinstance(channel, discord.abc.Messageable):
            return channel
        if self.interaction.channel_id is None:
            raise RuntimeError(f"interaction {self.interaction.id} names no channel to continue in")
        # discord.py leaves `channel` None when it neither has the channel cached nor was sent it;
        # the id is enough to post there.
        return self.interaction.client.get_partial_messageable(self.interaction.channel_id)


def describe_error(exc: Exception, job_ref: str) -> str:
    """One sentence for a person, for whatever went wrong talking to the service."""
    from generation.client import ServiceError

    if isinstance(exc, ServiceError):
        code = getattr(exc, "code", "")
        message = getattr(exc, "message", str(exc))
        friendly = {
            "queue_full": "The queue is full right now; try again in a minute.",
            "requester_limit": "You already have the most jobs the queue takes from one person; "
                               "wait for one to finish.",
            "unavailable": "The image service is not reachable right now; try again in a minute.",
            "captioner_unavailable": "Describing images is not available on this server right now.",
        }
        if code in friendly:
            return friendly[code]
        if code in ("invalid_request", "unknown_adapter", "unknown_scheduler", "invalid_image",
                    "payload_too_large"):
            return message
    log.error("job %s failed: %r", job_ref, exc, exc_info=exc)
    return f"Something went wrong making your image (reference `{job_ref}`); it has been logged."


class Generate:
    """Runs jobs for the bot; one instance per bot."""

    def __init__(self, bot: LoraloopBot) -> None:
        self.bot = bot
        self.settings = bot.settings
        # The tasks following jobs, so a shutting-down bot stops them instead of leaking them.
        self.following: set[asyncio.Task[Any]] = set()
        # Job ids this process is following: a catch-up that runs while a job is in flight (the
        # first READY can come after the first /imagine) must not follow, and post, it twice.
        self.followed_jobs: set[str] = set()

    def refusal_for(self, interaction: discord.Interaction, spec: Spec,
                    attachment: discord.Attachment | None = None) -> str | None:
        """Everything decided without waiting on anything: None means go ahead."""
        limits = self.bot.limits
        in_dm = interaction.guild_id is None
        refusal = limits.check_place(interaction.channel_id, in_dm) or limits.check(
            interaction.user.id, spec.prompt, spec.negative)
        if refusal is not None:
            log.info("refused %s for user %s: %s", interaction.id, interaction.user.id, refusal.reason)
            return refusal.message
        if attachment is not None:
            return self.attachment_refusal(attachment)
        # The style is checked by the service on submit (its answer lists the styles there are):
        # a local cache could be stale right after an adapter is published.
        return None

    def attachment_refusal(self, attachment: discord.Attachment) -> str | None:
        """Why an attached image is not taken (not an image, too large); None: it is."""
        if not (attachment.content_type or "").startswith("image/"):
            return f"{attachment.filename} is not an image; attach a PNG, JPEG or WebP."
        if attachment.size > self.settings.max_attachment_bytes:
            mib = self.settings.max_attachment_bytes / (1024 * 1024)
            return f"{attachment.filename} is too large; attach an image under {mib:.0f} MiB."
        return None

    async def start(self, interaction: discord.Interaction, spec: Spec,
                    attachment: discord.Attachment | None = None) -> None:
        """Refuse, or acknowledge and run the job to the end (called from a command or button)."""
        refusal = self.refusal_for(interaction, spec, attachment)
        if refusal is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        user_id = interaction.user.id
        job_key = f"interaction-{interaction.id}"
        self.bot.limits.started(user_id, job_key)
        try:
            with self._stoppable():
                if attachment is not None:
                    try:
                        spec = replace(spec, init_image=await attachment.read())
                    except discord.HTTPException as exc:
                        log.warning("interaction %s: attachment download failed: %s", interaction.id, exc)
                        await InteractionReply(interaction).refuse(
                            "I couldn't download that attachment; try uploading it again.")
                        return
                await self._run(interaction, spec, job_key)
        finally:
            self.bot.limits.finished(user_id, job_key)

    async def resume_unfinished(self) -> int:
        """Pick up jobs this bot was following when it stopped; their results go to the channel.

        Returns how many are followed again. A job the service no longer knows (it restarted,
        or forgot it) is recorded as failed.
        """
        from generation.client import ServiceError

        resumed = 0
        for generation in await self.bot.store.unfinished_generations():
            if generation.channel_id is None or generation.requester_id is None:
                continue
            if generation.job_id in self.followed_jobs:
                continue
            try:
                await self.bot.service.status(generation.job_id)
            except ServiceError as exc:
                if exc.code == "not_found":
                    await self.bot.store.update_generation(
                        generation.id, status="failed", error="the service no longer knows this job")
                    log.info("job %s: lost while the bot was away", generation.job_id)
                else:
                    log.warning("job %s: cannot resume now: %s", generation.job_id, exc)
                continue
            reply = ChannelReply(self.bot.get_partial_messageable(generation.channel_id), generation.requester_id)
            spec = Spec.from_generation(generation)
            self.bot.spawn(self._resume(reply, generation.id, generation.job_id, spec))
            resumed += 1
        log.info("resumed following %d unfinished job(s)", resumed)
        return resumed

    async def _resume(self, reply: Reply, generation_id: int, job_id: str, spec: Spec) -> None:
        with self._stoppable():
            log.info("job %s: following again after a restart", job_id)
            await self._follow_and_post(reply, generation_id, job_id, f"resumed-{job_id}", spec, None)

    @contextlib.contextmanager
    def _stoppable(self) -> Iterator[None]:
        """While inside, the task running this is one that `stop` cancels."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("jobs are followed from asyncio tasks only")
        self.following.add(task)
        try:
            yield
        finally:
            self.following.discard(task)

    async def stop(self) -> None:
        """Stop following jobs (the service keeps running them); used when the bot shuts down."""
        for task in list(self.following):
            task.cancel()
        await asyncio.gather(*self.following, return_exceptions=True)

    async def _serve(self, spec: Spec) -> tuple[Spec, Spec, int | None, str | None]:
        """(what to request, what to show, experiment id, arm): a style named without a version
        gets its default version pinned, or, while an experiment runs and it is the only style
        asked for, an arm drawn for this request (`loraloop.experiments.choose_arm`).

        Stacked styles always get their default versions: an arm's images must differ from the
        other arm's by the candidate alone, and a generation records one experiment at most."""
        pinned: list[AdapterRef] = []
        experiment_id: int | None = None
        arm: str | None = None
        for style in spec.styles:
            if "@" in style.name:
                pinned.append(style)
                continue
            serving = await self.bot.store.call(experiments.serving, style.name)
            if len(spec.styles) == 1:
                version, arm = experiments.choose_arm(serving, random.random())
                experiment_id = serving.experiment_id if arm is not None else None
            else:
                version = serving.version
            # No recorded version: the service picks its newest file.
            pinned.append(style if version is None else replace(style, name=f"{style.name}@{version}"))
        # An upscale of an experiment's image pins its version and stays as blind as the original.
        shown_spec = replace(spec, blind=spec.blind or arm is not None)
        return replace(shown_spec, styles=tuple(pinned)), shown_spec, experiment_id, arm

    async def _run(self, interaction: discord.Interaction, spec: Spec, job_key: str) -> None:
        reply = InteractionReply(interaction)
        user_id = interaction.user.id
        asked, spec, experiment_id, arm = await self._serve(spec)
        request = asked.request(user_id)
        try:
            accepted = await self.bot.service.submit(request)
        except Exception as exc:  # noqa: BLE001  every failure becomes a sentence; unexpected ones are logged
            await reply.refuse(describe_error(exc, job_key))
            return
        job_id = accepted.id
        log.info("job %s: submitted for user %s from interaction %s", job_id, user_id, interaction.id)
        parameters = {k: v for k, v in request.to_dict().items()
                      if k not in ("prompt", "negative_prompt", "adapters", "init_image", "requester")}
        generation_id = await self.bot.store.record_generation(
            job_id=job_id, prompt=spec.prompt, negative_prompt=spec.negative,
            requester_id=user_id, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
            parameters=parameters, adapters=[a.to_dict() for a in request.adapters],
            experiment_id=experiment_id, arm=arm, parent_image_id=spec.parent_image_id,
        )
        from bot.views import progress_view

        cancel = progress_view(job_id, user_id)
        await reply.edit(content=f"🕒 Queued at position {accepted.position + 1}: **{shown(spec.prompt)}**",
                         view=cancel)
        await self._follow_and_post(reply, generation_id, job_id, job_key, spec, cancel)

    async def _follow_and_post(self, reply: Reply, generation_id: int, job_id: str, job_key: str,
                               spec: Spec, cancel: discord.ui.View | None) -> None:
        if job_id in self.followed_jobs:
            log.info("job %s: already followed by this bot", job_id)
            return
        self.followed_jobs.add(job_id)
        try:
            await self._follow_and_post_once(reply, generation_id, job_id, job_key, spec, cancel)
        finally:
            self.followed_jobs.discard(job_id)

    async def _follow_and_post_once(self, reply: Reply, generation_id: int, job_id: str, job_key: str,
                                    spec: Spec, cancel: discord.ui.View | None) -> None:
        user_id = reply.user_id
        try:
            status = await self._follow(reply, job_id, job_key, user_id, spec, cancel)
        except Exception as exc:  # noqa: BLE001  recorded as failed and told as one sentence
            await self.bot.store.update_generation(generation_id, status="failed", error=repr(exc)[:500])
            await reply.edit(content=f"⚠️ {describe_error(exc, job_id)}", view=None, attachments=[])
            return
        queue_ms = duration_ms = None
        if status.started_at is not None and status.created_at:
            queue_ms = int((status.started_at - status.created_at) * 1000)
        if status.finished_at is not None and status.started_at is not None:
            duration_ms = int((status.finished_at - status.started_at) * 1000)
        if status.state is not JobState.DONE:
            error = status.error.message if status.error else None
            await self.bot.store.update_generation(generation_id, status=status.state.value, error=error,
                                                   queue_ms=queue_ms, duration_ms=duration_ms)
            if status.state is JobState.CANCELLED:
                text = "❌ Cancelled."
            else:
                log.error("job %s failed: %s", job_id, error)
                text = f"⚠️ That didn't work: {error or 'the service failed'} (reference `{job_id}`)."
            if status.state is JobState.FAILED and not reply.token_alive:
                await reply.send(content=text)  # nobody would see an edit
            await reply.edit(content=text, view=None, attachments=[])
            return
        await self.bot.store.update_generation(
            generation_id, adapters=[a.to_dict() for a in status.adapters],
            queue_ms=queue_ms, duration_ms=duration_ms)
        await reply.edit(content=f"🖼️ Posting {len(status.images)} image(s)…", view=None, attachments=[])
        # After a restart mid-posting, the images already shown are not posted twice.
        shown_before = {i.index for i in await self.bot.store.images_for_generation(generation_id)
                        if i.message_id is not None}
        for image in status.images:
            if image.index not in shown_before:
                await self._post_image(reply, generation_id, job_id, user_id, spec, status, image)
        await self.bot.store.update_generation(generation_id, status="done")
        await reply.edit(content=f"✅ Done: {len(status.images)} image(s) for **{shown(spec.prompt)}**")
        log.info("job %s: done, %d image(s) posted", job_id, len(status.images))

    async def _follow(self, reply: Reply, job_id: str, job_key: str, user_id: int, spec: Spec,
                      cancel: discord.ui.View | None) -> JobStatus:
        """Turn the service's events into progress edits, throttled; return the final status."""
        interval = self.settings.progress_interval
        last_edit = time.monotonic()
        last_text = ""
        pending_preview: str | None = None
        async for status in self.bot.service.events(job_id):
            if status.state is JobState.RUNNING:
                self.bot.limits.running(user_id, job_key)
            if status.state.finished:
                return status
            if status.preview:
                pending_preview = status.preview
            if status.state is JobState.QUEUED:
                text = f"🕒 Queued at position {status.position + 1}: **{shown(spec.prompt)}**"
            else:
                text = f"⏳ Step {status.step}/{status.total_steps}: **{shown(spec.prompt)}**"
            now = time.monotonic()
            if text == last_text or now - last_edit < interval:
                continue
            kwargs: dict[str, Any] = {"content": text, "view": cancel}
            if pending_preview:
                kwargs["attachments"] = [discord.File(io.BytesIO(base64.b64decode(pending_preview)),
                                                      filename="preview.png")]
                pending_preview = None
            last_edit, last_text = now, text
            await reply.edit(**kwargs)
        # The client raises when a stream breaks off, so ending without a final state is a bug.
        raise RuntimeError(f"the event stream of job {job_id} ended without a final state")

    def nsfw_policy(self, reply: Reply) -> str:
        """What to do with an image the safety check flagged, where this reply posts: "post",
        "spoiler" or "block" (`[bot] nsfw_channel_policy` in age-restricted channels, else `nsfw_policy`)."""
        return self.settings.nsfw_channel_policy if reply.age_restricted else self.settings.nsfw_policy

    async def _post_image(self, reply: Reply, generation_id: int, job_id: str, user_id: int, spec: Spec,
                          status: JobStatus, image: ImageResult) -> None:
        from bot.views import image_view

        png = await self.bot.service.image(job_id, image.index)
        policy = self.nsfw_policy(reply) if image.nsfw else "post"
        image_id = await self.bot.store.add_image(generation_id, index=image.index, seed=image.seed,
                                                  width=image.width, height=image.height, png=png,
                                                  nsfw=image.nsfw, blocked=policy == "block")
        if policy == "block":
            log.info("job %s: image %d held back by the safety check", job_id, image.index)
            await reply.send(content=f"🚫 Image {image.index + 1} of **{shown(spec.prompt)}** was held back: the "
                                     "safety check flagged it, and this channel does not show such images.",
                             ephemeral=True)
            return
        # Re-encoding an oversized (or experiment's) image is CPU work: keep it off the event loop.
        files = await asyncio.to_thread(fit_for_discord, png, reply.filesize_limit, f"{job_id}-{image.index}",
                                        spec.blind)
        for file in files:
            file.spoiler = policy == "spoiler"
        async with self.bot.votes.posting():
            message = await reply.send(content=provenance(spec.prompt, image, status, spec.blind), files=files,
                                       view=image_view(user_id))
            await self.bot.store.set_image_message(image_id, message.id)
        for emoji in [*self.settings.rating_emojis, self.settings.flag_emoji]:
            await message.add_reaction(emoji)
