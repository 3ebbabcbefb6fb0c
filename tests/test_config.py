"""config.toml: typed sections, defaults for everything, and clear errors at start."""

from pathlib import Path

import pytest

from loraloop.config import Config, ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_the_shipped_config_loads_and_matches_the_defaults():
    config = load_config(REPO_ROOT / "config.toml")
    defaults = Config()
    for section in ("paths", "service", "store", "bot", "training", "dataset", "curation"):
        assert getattr(config, section) == getattr(defaults, section), section


def test_a_missing_default_file_means_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORALOOP_CONFIG", raising=False)
    assert load_config().service.port == Config().service.port


def test_an_explicit_file_that_does_not_exist_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_an_unknown_key_names_the_file_the_section_and_the_key(tmp_path):
    path = write(tmp_path, "[service]\nprot = 80\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert str(path) in message and "[service]" in message and "'prot'" in message


def test_an_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section \[servce\]"):
        load_config(write(tmp_path, "[servce]\nport = 80\n"))


def test_a_value_of_the_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"\[service\]\.port: expected int, got 'eighty'"):
        load_config(write(tmp_path, '[service]\nport = "eighty"\n'))


def test_a_value_out_of_range_says_why(tmp_path):
    with pytest.raises(ConfigError, match=r"\[service\]\.port: must be between 1 and 65535"):
        load_config(write(tmp_path, "[service]\nport = 0\n"))


def test_broken_toml_is_an_error_that_names_the_file(tmp_path):
    path = write(tmp_path, "[service\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_relative_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("LORALOOP_DATA_DIR", raising=False)
    path = write(tmp_path, '[paths]\ndata_dir = "stuff"\n')
    config = load_config(path)
    assert config.data_dir == (tmp_path / "stuff").resolve()
    assert config.database_path == (tmp_path / "stuff" / "loraloop.db").resolve()


def test_the_data_dir_environment_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("LORALOOP_DATA_DIR", str(tmp_path / "elsewhere"))
    config = load_config(write(tmp_path, '[paths]\ndata_dir = "stuff"\n'))
    assert config.data_dir == (tmp_path / "elsewhere").resolve()


def test_secrets_are_not_accepted_in_the_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'token'"):
        load_config(write(tmp_path, '[bot]\ntoken = "abc"\n'))


@pytest.mark.parametrize(("keys", "message"), [
    ('dtype = "half"', r"\[service\]\.dtype: must be one of auto, fp16, bf16, fp32"),
    ('compile_mode = "fast"', r"compile_mode: must be one of default, reduce-overhead"),
    ("compile = true", r"\[service\]\.compile: needs lora_hotswap = true"),
    ("lora_hotswap_rank = 0", r"lora_hotswap_rank: must be at least 1"),
    ("lora_hotswap_targets = []", r"lora_hotswap_targets: must name some UNet modules"),
    ("warmup_sizes = [[500, 512]]", r"warmup_sizes: \[500, 512\] must be \[width, height\], each a positive multiple"),
    ("warmup_sizes = [[512]]", r"warmup_sizes: \[512\] must be \[width, height\]"),
    ("warmup_sizes = [[2048, 2048]]", r"warmup_sizes: \[2048, 2048\] is over max_pixels"),
    ("warmup_sizes = [512, 512]", r"\[service\]\.warmup_sizes: expected list, got \[512, 512\]"),
    ("max_batch = 4\nwarmup_batch_sizes = [1, 8]", r"warmup_batch_sizes: must each be between 1 and max_batch"),
])
def test_the_gpu_fast_path_keys_are_checked_at_start(tmp_path, keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, f"[service]\n{keys}\n"))


def test_a_full_fast_path_configuration_loads(tmp_path):
    service = load_config(write(tmp_path, "[service]\n" + "\n".join([
        'dtype = "bf16"', "channels_last = true", "vae_tiling = true", "compile = true",
        'compile_mode = "max-autotune-no-cudagraphs"', "lora_hotswap = true", "lora_hotswap_rank = 128",
        'lora_hotswap_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"]',
        "max_batch = 8", "warmup_sizes = [[512, 512], [768, 512]]", "warmup_batch_sizes = [1, 8]",
    ]) + "\n")).service
    assert service.compile and service.lora_hotswap and service.warmup_sizes == [[512, 512], [768, 512]]


def test_from_another_folder_the_config_is_found_in_the_documented_order(tmp_path, monkeypatch):
    import loraloop.config

    monkeypatch.delenv("LORALOOP_CONFIG", raising=False)
    elsewhere, checkout, user = tmp_path / "elsewhere", tmp_path / "checkout", tmp_path / "xdg" / "loraloop"
    for folder in (elsewhere, checkout, user):
        folder.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(loraloop.config, "CHECKOUT_CONFIG", checkout / "config.toml")
    assert load_config().source is None  # nothing anywhere: the defaults, data in ./data

    write(checkout, "[service]\nport = 1001\n")
    assert load_config().service.port == 1001 and load_config().data_dir == checkout / "data"
    write(user, "[service]\nport = 1002\n")
    assert load_config().service.port == 1002
    write(elsewhere, "[service]\nport = 1003\n")
    assert load_config().service.port == 1003
    monkeypatch.setenv("LORALOOP_CONFIG", str(checkout / "config.toml"))
    assert load_config().service.port == 1001


def numeric_keys() -> list[tuple[str, str, type]]:
    import dataclasses
    import typing

    found = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        cls = typing.get_type_hints(Config)[section.name]
        for key, hint in typing.get_type_hints(cls).items():
            if hint in (int, float):
                found.append((section.name, key, hint))
    return found


@pytest.mark.parametrize(("section", "key", "kind"), numeric_keys(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_number_must_be_finite_and_bounded_whichever_way_it_is_set(tmp_path, section, key, kind):
    too_big = "18446744073709551615" if kind is int else "1e300"
    values = [too_big, f"-{too_big}"] + (["inf", "-inf", "nan"] if kind is float else [])
    for value in values:
        with pytest.raises(ConfigError, match=rf"\[{section}\]\.{key}: must be (a finite number|at most)"):
            load_config(write(tmp_path, f"[{section}]\n{key} = {value}\n"))
    with pytest.raises(ConfigError, match=rf"{key}: must be (a finite number|at most)"):
        Config().replace(section, **{key: kind(too_big) if kind is int else float("inf")})


def test_an_infinite_busy_timeout_is_refused_at_start_not_at_the_first_write(tmp_path):
    with pytest.raises(ConfigError, match=r"\[store\]\.busy_timeout_s: must be a finite number, not inf"):
        load_config(write(tmp_path, "[store]\nbusy_timeout_s = inf\n"))
    with pytest.raises(ConfigError, match=r"busy_timeout_s: must be at most 3600"):
        load_config(write(tmp_path, "[store]\nbusy_timeout_s = 1e9\n"))


def test_private_hosts_to_allow_must_be_addresses_or_networks(tmp_path):
    config = load_config(write(tmp_path, '[dataset]\nallow_private_hosts = ["192.168.1.0/24", "::1"]\n'))
    assert config.dataset.allow_private_hosts == ["192.168.1.0/24", "::1"]
    with pytest.raises(ConfigError, match=r"'nas\.local' is not an address or network"):
        load_config(write(tmp_path, '[dataset]\nallow_private_hosts = ["nas.local"]\n'))
