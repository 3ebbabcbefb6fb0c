"""The slash commands: /imagine, /styles, /stats, /optout, /optin and /admin (with promote and
retire, an admin's override of the A/B gate).

The commands are built inside `register()` because their ranges come from config
(`app_commands.Range[int, 1, max_steps]`), and discord.py reads annotations when a command is
defined. That is also why this module does not use `from __future__ import annotations`.
Discord validates ranges and choices before our code runs; the bot checks the rest.

What Discord shows is what the bot accepts: the prompt's length limit is `[bot] max_prompt_chars`,
every command is offered in DMs only when `[bot] allow_dms` is on, and /admin is shown only to
members who may manage the server (a server's admins can grant it to `admin_role_ids` roles
under Server Settings > Integrations); the bot still checks each of these itself.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands

from bot.imagine import MAX_STYLES, Spec, describe_error
from generation.contract import ADAPTER_NAME_RE, ADAPTER_VERSION_RE, AdapterRef, size_for
from loraloop.profiles import personal_adapter_name, personal_owner

if TYPE_CHECKING:
    from bot.app import LoraloopBot

log = logging.getLogger(__name__)

Aspect = Literal["1:1", "2:3", "3:2", "16:9", "9:16"]
# Discord's own ceiling on a string option's max_length.
DISCORD_MAX_STRING = 6000
STYLE_WEIGHT_RANGE = (0.0, 2.0)


class OptionRefused(app_commands.AppCommandError):
    """An option Discord could not check for us; its message is shown to the person as is."""


def parse_styles(text: str) -> tuple[AdapterRef, ...]:
    """"fox:0.8, ink@2:0.5" as adapters with weights (1 where none is given); ValueError says
    what is wrong in a sentence."""
    styles = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, _, weight_text = entry.partition(":")
        name = name.strip()
        base, _, version = name.partition("@")
        if not ADAPTER_NAME_RE.match(base) or (version and not ADAPTER_VERSION_RE.match(version)):
            raise ValueError(f"{name!r} is not a style name; see /styles (write them like fox:0.8, ink@2:0.5).")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ValueError(f"The weight of {name} is not a number (write fox:0.8).") from None
        low, high = STYLE_WEIGHT_RANGE
        if not low <= weight <= high:
            raise ValueError(f"The weight of {name} must be between {low:g} and {high:g}.")
        styles.append(AdapterRef(name, weight))
    return tuple(styles)


class StylesTransformer(app_commands.Transformer):
    """The `styles` option: parsed here, so the command body gets adapters, and autocompleted
    one entry at a time (the entries before the one being typed are kept as written)."""

    def __init__(self, bot: "LoraloopBot") -> None:
        self.bot = bot

    async def transform(self, interaction: discord.Interaction, value: str) -> tuple[AdapterRef, ...]:
        try:
            styles = parse_styles(value)
        except ValueError as exc:
            raise OptionRefused(str(exc)) from None
        if len(styles) > MAX_STYLES:
            raise OptionRefused(f"At most {MAX_STYLES} styles per image; you named {len(styles)}.")
        return styles

    async def autocomplete(self, interaction: discord.Interaction,  # type: ignore[override]  # a str option
                           value: str) -> list[app_commands.Choice[str]]:
        head, _, typing_now = value.rpartition(",")
        prefix = f"{head}, " if head else ""
        wanted = typing_now.strip().lower()
        taken = {part.split(":")[0].split("@")[0].strip() for part in head.split(",")}
        names = await _style_names(self.bot)
        choices = [prefix + n for n in names if wanted in n.lower() and n not in taken]
        # Discord refuses a choice over 100 characters, and more than 25 of them.
        return [app_commands.Choice(name=c, value=c) for c in choices if len(c) <= 100][:25]


async def _style_names(bot: "LoraloopBot") -> list[str]:
    """The shared styles' names, for autocomplete (personal styles are never offered)."""
    try:
        styles = await bot.styles()
    except Exception as exc:  # noqa: BLE001  autocomplete has no way to show an error; offer nothing
        log.warning("style autocomplete: service unavailable: %s", exc)
        return []
    return sorted({a.name for a in styles})


def register(bot: "LoraloopBot") -> None:
    settings = bot.settings
    tree = bot.tree
    MaxSteps = app_commands.Range[int, 1, settings.max_steps]
    MaxCount = app_commands.Range[int, 1, settings.max_count]
    Prompt = app_commands.Range[str, 1, min(settings.max_prompt_chars, DISCORD_MAX_STRING)]

    @tree.command()
    @app_commands.describe(
        prompt="What to draw",
        negative="What to keep out of the image",
        style="A trained style (see /styles)",
        style_weight="How strongly the style applies (0 to 2; 1 is as trained)",
        styles=f"More styles with weights, like fox:0.8, ink@2:0.5 (at most {MAX_STYLES} in all)",
        aspect="Shape of the image",
        steps="Denoising steps: more is slower and often finer",
        guidance="How literally to follow the prompt (about 7 is usual)",
        seed="Same seed and settings give the same image",
        count="How many images",
        image="A starting image to transform",
        strength="With an image: how far to move away from it (0 to 1)",
        personal="Add your personal style, learned from your own votes (see /profile)",
    )
    async def imagine(
        interaction: discord.Interaction,
        prompt: Prompt,
        negative: str | None = None,
        style: str | None = None,
        style_weight: app_commands.Range[float, 0.0, 2.0] = 1.0,
        styles: app_commands.Transform[tuple[AdapterRef, ...], StylesTransformer(bot)] = (),
        aspect: Aspect = "1:1",
        steps: MaxSteps | None = None,
        guidance: app_commands.Range[float, 0.0, 30.0] | None = None,
        seed: app_commands.Range[int, 0, 2 ** 32 - 1] | None = None,
        count: MaxCount = 1,
        image: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.05, 1.0] = 0.6,
        personal: bool = False,
    ) -> None:
        """Make images from a prompt; rate them with reactions to teach the bot."""
        width, height = size_for(aspect, settings.base_size)
        stacked = ((AdapterRef(style, style_weight),) if style else ()) + tuple(styles)
        if any(personal_owner(s.name) not in (None, interaction.user.id) for s in stacked):
            await interaction.response.send_message("That is someone else's personal style; only they can use it. "
                                                    "/profile tells you about yours.", ephemeral=True)
            return
        if personal:
            profile = await bot.store.profile(interaction.user.id)
            if profile is None or profile.status == "deleted" or profile.version is None:
                await interaction.response.send_message(
                    "You have no personal style yet: /profile says how to get one.", ephemeral=True)
                return
            stacked += (AdapterRef(f"{personal_adapter_name(interaction.user.id)}@{profile.version}"),)
        if len(stacked) > MAX_STYLES:
            await interaction.response.send_message(
                f"At most {MAX_STYLES} styles per image, counting `style` and `personal`; you named {len(stacked)}.",
                ephemeral=True)
            return
        spec = Spec(prompt=prompt, negative=negative or "", styles=stacked,
                    width=width, height=height, steps=steps, guidance=guidance, seed=seed, count=count,
                    strength=strength if image is not None else None)
        await bot.generate.start(interaction, spec, image)

    @imagine.autocomplete("style")
    async def style_autocomplete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        names = await _style_names(bot)
        wanted = current.lower()
        return [app_commands.Choice(name=n, value=n) for n in names if wanted in n.lower()][:25]

    @tree.command()
    @app_commands.describe(image="The picture to describe")
    async def describe(interaction: discord.Interaction, image: discord.Attachment) -> None:
        """Turn an image into a prompt you can /imagine."""
        from bot.views import describe_view

        limits = bot.limits
        place = limits.check_place(interaction.channel_id, interaction.guild_id is None)
        refusal = (place.message if place else None) or (
            "You can't use the image tools on this server; ask a moderator if you think that's wrong."
            if limits.is_banned(interaction.user.id) else bot.generate.attachment_refusal(image))
        if refusal is not None:
            await interaction.response.send_message(refusal, ephemeral=True)
            return
        await interaction.response.defer(thinking=True)
        try:
            data = await image.read()
            description = await bot.service.describe(data)
        except discord.HTTPException as exc:
            log.warning("interaction %s: attachment download failed: %s", interaction.id, exc)
            await interaction.followup.send("I couldn't download that attachment; try uploading it again.")
            return
        except Exception as exc:  # noqa: BLE001  the user gets one sentence; describe_error logs the rest
            await interaction.followup.send(describe_error(exc, str(interaction.id)))
            return
        if not description.caption.strip():
            await interaction.followup.send("I couldn't find words for that image; try another one.")
            return
        # The caption rides in the embed: the button reads it back from there, even after a restart.
        embed = discord.Embed(title="A prompt from your image", description=description.caption[:4000])
        await interaction.followup.send(embed=embed, view=describe_view())

    @tree.command()
    async def styles(interaction: discord.Interaction) -> None:
        """List the styles (trained adapters) /imagine can use."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            adapters = await bot.styles(refresh=True)
        except Exception as exc:  # noqa: BLE001  the user gets one sentence; describe_error logs the rest
            await interaction.followup.send(describe_error(exc, str(interaction.id)), ephemeral=True)
            return
        latest = [a for a in adapters if a.latest]
        if not latest:
            await interaction.followup.send("There are no styles yet: only the base model.", ephemeral=True)
            return
        lines = []
        for a in latest:
            # The version people get (a candidate on trial is newer on disk but not the default).
            version = await bot.store.default_version(a.name) or a.version
            lines.append(f"**{a.name}**" + (f" v{version}" if version is not None else "")
                         + (f": {a.description}" if a.description else ""))
        embed = discord.Embed(title="Styles", description="\n".join(lines)[:4000])
        await interaction.followup.send(embed=embed, ephemeral=True)

    @tree.command()
    async def stats(interaction: discord.Interaction) -> None:
        """Images, votes and like rate per style version, and the week's top images."""
        await interaction.response.defer(thinking=True)
        rows = await bot.store.adapter_stats()
        top = await bot.store.top_images(limit=5, guild_id=interaction.guild_id)
        lines = []
        for row in rows:
            name = "base model" if row.adapter is None else (
                f"{row.adapter} v{row.version}" if row.version is not None else row.adapter)
            rate = "n/a" if row.like_rate is None else f"{row.like_rate:.0%}"
            lines.append(f"**{name}**: {row.images} images, {row.votes} votes, {rate} liked")
        embed = discord.Embed(title="Stats", description="\n".join(lines)[:4000] or "No images yet.")
        if top:
            links = []
            for item in top:
                where = (f"https://discord.com/channels/{item.guild_id or '@me'}/{item.channel_id}/{item.message_id}"
                         if item.message_id and item.channel_id else "")
                label = discord.utils.escape_markdown(item.prompt[:80])
                links.append(f"{item.score:+d} [{label}]({where})" if where else f"{item.score:+d} {label}")
            embed.add_field(name="Top images this week", value="\n".join(links)[:1024], inline=False)
        safety = await bot.store.safety_counts(interaction.guild_id)
        if safety["checked"]:
            embed.add_field(name="Safety check", value=f"{safety['checked']} images checked, {safety['flagged']} "
                            f"flagged, {safety['blocked']} held back from their channel", inline=False)
        running = await bot.gate.lines()
        if running:
            embed.add_field(name="Experiments", value="\n".join(running)[:1024], inline=False)
        await interaction.followup.send(embed=embed)

    @tree.command()
    async def optout(interaction: discord.Interaction) -> None:
        """Keep your prompts, images and votes out of every future training dataset."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        await bot.store.opt_out(interaction.user.id)  # and deletes their personal style
        log.info("user %s opted out of datasets", interaction.user.id)
        await interaction.followup.send("Done: nothing of yours goes into future training datasets, and your "
                                        "personal style (if any) is deleted. /optin undoes the first.",
                                        ephemeral=True)

    @tree.command()
    @app_commands.describe(action="show (the default), train from your votes, or delete your personal style")
    async def profile(interaction: discord.Interaction,
                      action: Literal["show", "train", "delete"] = "show") -> None:
        """Your personal style: learned from your own votes, usable only by you."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        user_id = interaction.user.id
        needed = bot.config.loop.personal_min_votes
        if action == "delete":
            deleted = await bot.store.delete_profile(user_id)
            log.info("user %s deleted their personal style", user_id)
            await interaction.followup.send(
                "Deleted: nobody can use your personal style any more, and its files go at the loop's next pass."
                if deleted else "You have no personal style to delete.", ephemeral=True)
            return
        votes = await bot.store.user_votes(user_id)
        if action == "train":
            if await bot.store.is_opted_out(user_id):
                text = "You opted out of training; /optin first if you want a personal style."
            elif votes < needed:
                text = f"A personal style needs {needed} of your votes; you have {votes}. Rate more images with 👍 👎."
            elif await bot.store.request_profile(user_id):
                log.info("user %s asked for a personal style (%d votes)", user_id, votes)
                text = (f"Queued: your personal style trains from your {votes} votes at the loop's next pass. "
                        "/profile shows when it is ready.")
            else:
                text = "Your personal style is training right now; /profile shows when it is ready."
            await interaction.followup.send(text, ephemeral=True)
            return
        await interaction.followup.send(await profile_text(bot, user_id, votes, needed), ephemeral=True)

    @tree.command()
    async def optin(interaction: discord.Interaction) -> None:
        """Let your prompts, images and votes into future training datasets again."""
        await interaction.response.defer(ephemeral=True, thinking=True)
        await bot.store.opt_in(interaction.user.id)
        log.info("user %s opted in to datasets", interaction.user.id)
        await interaction.followup.send("Done: your images and votes can teach future styles again.",
                                        ephemeral=True)

    tree.add_command(admin_group(bot))
    # Where Discord offers the commands: the server always, DMs and group DMs only with allow_dms.
    for command in tree.get_commands():
        in_dms = settings.allow_dms and command.name != "admin"
        command.guild_only = not in_dms
        command.allowed_contexts = app_commands.AppCommandContext(guild=True, dm_channel=in_dms,
                                                                  private_channel=in_dms)


async def profile_text(bot: "LoraloopBot", user_id: int, votes: int, needed: int) -> str:
    """What /profile shows: the state, the votes behind the style, and how it pleases its owner."""
    profile = await bot.store.profile(user_id)
    if profile is None or profile.status == "deleted":
        if votes < needed:
            return f"No personal style yet: it needs {needed} of your votes and you have {votes}."
        return f"No personal style yet: you have {votes} votes, enough for `/profile action:train`."
    lines = {"requested": "Queued: it trains at the loop's next pass.", "training": "Training now.",
             "failed": f"The last training failed: {profile.error}.", "ready": "Ready."}
    text = [f"**Your personal style**: {lines[profile.status]}"]
    if profile.version is not None:
        name = personal_adapter_name(user_id)
        text.append(f"Version {profile.version}, learned from {profile.votes} of your votes (you have {votes} now). "
                    "Use it with `/imagine personal:true`.")
        with_it, rate_with = await bot.store.own_like_rate(user_id, name)
        without, rate_without = await bot.store.own_like_rate(user_id, None)
        shown = lambda rate: "n/a" if rate is None else f"{rate:.0%}"  # noqa: E731  a format, not logic
        text.append(f"You liked {shown(rate_with)} of {with_it} rated images made with it, "
                    f"{shown(rate_without)} of {without} without a personal style.")
    return "\n".join(text)


def admin_group(bot: "LoraloopBot") -> app_commands.Group:
    def is_admin(interaction: discord.Interaction) -> bool:
        if not bot.is_admin(interaction):
            raise app_commands.CheckFailure("Only the image admins can do that.")
        return True

    admin = app_commands.Group(name="admin", description="Run the image service (admins only)",
                               guild_only=True, default_permissions=discord.Permissions(manage_guild=True))

    async def service_call(interaction: discord.Interaction, action: Callable[[], Awaitable[object]],
                           done: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            await action()
        except Exception as exc:  # noqa: BLE001  the user gets one sentence; describe_error logs the rest
            await interaction.followup.send(describe_error(exc, str(interaction.id)), ephemeral=True)
            return
        log.info("admin %s: %s", interaction.user.id, action.__name__)
        await interaction.followup.send(done, ephemeral=True)

    async def change_ban(interaction: discord.Interaction, user: discord.User, change: Callable[[int], bool],
                         changed: str, unchanged: str) -> None:
        done = await asyncio.to_thread(change, user.id)  # writes the bans file
        await interaction.response.send_message(
            f"{user.mention} {changed if done else unchanged}", ephemeral=True,
            allowed_mentions=discord.AllowedMentions.none())

    @admin.command()
    @app_commands.check(is_admin)
    async def pause(interaction: discord.Interaction) -> None:
        """Stop starting new jobs (running ones finish)."""
        await service_call(interaction, bot.service.pause, "Paused: new jobs are refused until /admin resume.")

    @admin.command()
    @app_commands.check(is_admin)
    async def resume(interaction: discord.Interaction) -> None:
        """Start taking jobs again."""
        await service_call(interaction, bot.service.resume, "Resumed: jobs are running again.")

    @admin.command()
    @app_commands.check(is_admin)
    async def reload(interaction: discord.Interaction) -> None:
        """Re-read the adapters directory (new or updated styles)."""
        await service_call(interaction, bot.service.reload_adapters, "Reloaded the styles.")
        bot.forget_styles()

    async def decide(interaction: discord.Interaction, style: str, decision: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        outcome = await bot.gate.decide(style, decision, interaction.user.id)
        await interaction.followup.send(outcome, ephemeral=True)

    @admin.command()
    @app_commands.check(is_admin)
    @app_commands.describe(style="The style whose candidate version becomes the one /imagine uses")
    async def promote(interaction: discord.Interaction, style: str) -> None:
        """Promote a style's candidate now, whatever the A/B gate says."""
        await decide(interaction, style, "promote")

    @admin.command()
    @app_commands.check(is_admin)
    @app_commands.describe(style="The style whose candidate version is dropped")
    async def retire(interaction: discord.Interaction, style: str) -> None:
        """Retire a style's candidate now, whatever the A/B gate says."""
        await decide(interaction, style, "retire")

    @admin.command()
    @app_commands.check(is_admin)
    @app_commands.describe(user="Who may no longer make images")
    async def ban(interaction: discord.Interaction, user: discord.User) -> None:
        """Stop a user from making images."""
        await change_ban(interaction, user, bot.limits.ban, "can no longer make images.", "was already banned.")

    @admin.command()
    @app_commands.check(is_admin)
    @app_commands.describe(user="Who may make images again")
    async def unban(interaction: discord.Interaction, user: discord.User) -> None:
        """Let a banned user make images again."""
        await change_ban(interaction, user, bot.limits.unban, "can make images again.", "was not banned.")

    return admin
