"""Tests for appliance.config: layering, validation, provenance and rendering."""

import re
import tomllib
from importlib import resources

import pytest

from appliance import config as config_module
from appliance.config import BUILTIN, SCHEMA, gpio_number, load_config, render_config
from appliance.errors import ConfigError


@pytest.fixture
def etc(tmp_path, monkeypatch):
    """A stand-in for /etc/crankllm: the default config path points into it, and it starts empty."""
    folder = tmp_path / "etc" / "crankllm"
    folder.mkdir(parents=True)
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", str(folder / "crankllm.toml"))
    return folder


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def load_text(etc, text):
    """Write ``text`` as the main config file and load it."""
    path = write(etc / "crankllm.toml", text)
    return load_config(path, env={})


def load_error(etc, text) -> str:
    with pytest.raises(ConfigError) as caught:
        load_text(etc, text)
    return str(caught.value)


# --- Layering and provenance -----------------------------------------------------------


def test_missing_default_file_gives_defaults(etc):
    config = load_config(env={})
    assert config.files == []
    assert config.crank.pin_a == "GPIO17"
    assert config.model.n_ctx == 512
    assert config.source_of("crank", "pin_a") == BUILTIN


def test_default_file_is_read(etc):
    main = write(etc / "crankllm.toml", "[model]\nn_ctx = 1024\n")
    config = load_config(env={})
    assert config.model.n_ctx == 1024
    assert config.files == [main]
    assert config.source_of("model", "n_ctx") == main
    assert config.source_of("model", "n_batch") == BUILTIN


def test_dropins_apply_in_lexical_order(etc):
    write(etc / "crankllm.toml", "[crank]\npin_a = 5\n")
    first = write(etc / "conf.d" / "10-pins.toml", "[crank]\npin_a = 6\npin_b = 13\n")
    second = write(etc / "conf.d" / "20-pins.toml", "[crank]\npin_a = 19\n")
    config = load_config(env={})
    assert config.crank.pin_a == 19
    assert config.crank.pin_b == 13
    assert config.source_of("crank", "pin_a") == second
    assert config.source_of("crank", "pin_b") == first


def test_dropins_apply_without_main_file(etc):
    dropin = write(etc / "conf.d" / "10-model.toml", "[model]\ntop_k = 7\n")
    config = load_config(env={})
    assert config.model.top_k == 7
    assert config.files == [dropin]


def test_dropins_skip_other_files(etc):
    write(etc / "conf.d" / "10-a.toml.dpkg-old", "[model]\ntop_k = 1\n")
    write(etc / "conf.d" / ".20-hidden.toml", "[model]\ntop_k = 2\n")
    write(etc / "conf.d" / "README", "not toml at all [\n")
    (etc / "conf.d" / "30-folder.toml").mkdir()
    config = load_config(env={})
    assert config.model.top_k == 40
    assert config.files == []


def test_explicit_path_reads_its_own_dropins(etc, tmp_path):
    main = write(tmp_path / "other" / "my.toml", "[model]\ntop_k = 3\n")
    write(tmp_path / "other" / "conf.d" / "50-x.toml", "[model]\ntop_p = 0.5\n")
    write(etc / "conf.d" / "50-y.toml", "[model]\nmin_p = 0.5\n")
    config = load_config(main, env={})
    assert config.model.top_k == 3
    assert config.model.top_p == 0.5
    assert config.model.min_p == 0.05


def test_env_variable_names_config(etc, tmp_path):
    main = write(tmp_path / "env.toml", "[model]\ntop_k = 9\n")
    config = load_config(env={"CRANKLLM_CONFIG": main})
    assert config.model.top_k == 9
    assert config.files == [main]


def test_path_argument_beats_env_variable(etc, tmp_path):
    from_env = write(tmp_path / "env.toml", "[model]\ntop_k = 9\n")
    from_argument = write(tmp_path / "arg.toml", "[model]\ntop_k = 11\n")
    config = load_config(from_argument, env={"CRANKLLM_CONFIG": from_env})
    assert config.model.top_k == 11


def test_explicit_missing_file_is_error(etc, tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: config file not found")):
        load_config(missing, env={})


def test_env_missing_file_is_error(etc, tmp_path):
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(env={"CRANKLLM_CONFIG": missing})


def test_config_error_exit_code(etc):
    with pytest.raises(ConfigError) as caught:
        load_text(etc, "[model]\nn_ctx = 1\n")
    assert caught.value.exit_code == 78


def test_loading_changes_no_files(etc, tmp_path):
    write(etc / "crankllm.toml", '[prompts]\nfile = "prompts.txt"\n')
    write(etc / "prompts.txt", "One more prompt.\n")
    write(etc / "conf.d" / "10-a.toml", "[model]\ntop_k = 3\n")
    before = sorted((str(path), path.stat().st_mtime_ns) for path in tmp_path.rglob("*"))
    load_config(env={})
    after = sorted((str(path), path.stat().st_mtime_ns) for path in tmp_path.rglob("*"))
    assert after == before


def test_overrides_beat_files(etc):
    write(etc / "crankllm.toml", '[crank]\npin_factory = "lgpio"\n')
    config = load_config(env={}, overrides={"crank": {"pin_factory": "mock"}})
    assert config.crank.pin_factory == "mock"
    assert config.source_of("crank", "pin_factory") == "command-line override"


def test_overrides_are_checked(etc):
    with pytest.raises(ConfigError, match=r"^command-line override: \[model\] seed = -1: out of range"):
        load_config(env={}, overrides={"model": {"seed": -1}})


def test_override_blamed_for_pin_clash(etc):
    write(etc / "crankllm.toml", "[crank]\npin_a = 5\n")
    with pytest.raises(ConfigError, match="^command-line override: \\[crank\\] pin_b = 5"):
        load_config(env={}, overrides={"crank": {"pin_b": 5}})


# --- File and syntax errors -----------------------------------------------------------


def test_toml_syntax_error_names_line_and_column(etc):
    message = load_error(etc, "[model]\nn_ctx = 512\ntop_k 40\n")
    assert message.startswith(str(etc / "crankllm.toml") + ": line 3, column 7: invalid TOML")


def test_invalid_utf8_names_line(etc):
    path = etc / "crankllm.toml"
    path.write_bytes(b"[model]\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: line 2: not valid UTF-8")):
        load_config(str(path), env={})


def test_unknown_key_suggests_nearest(etc):
    message = load_error(etc, "[crank]\npn_a = 5\n")
    assert message == f"{etc / 'crankllm.toml'}: [crank] pn_a: unknown key; did you mean 'pin_a'?"


def test_unknown_section_suggests_nearest(etc):
    message = load_error(etc, "[crnak]\npin_a = 5\n")
    assert message == f"{etc / 'crankllm.toml'}: unknown section [crnak]; did you mean 'crank'?"


def test_key_in_wrong_section_names_section(etc):
    message = load_error(etc, "[model]\nbaudrate = 9600\n")
    assert message.endswith("[model] baudrate: unknown key; did you mean [serial] baudrate?")


def test_top_level_key_names_section(etc):
    message = load_error(etc, "n_ctx = 1024\n")
    assert message.endswith("unknown section [n_ctx]; did you mean [model] n_ctx?")


def test_section_must_be_table(etc):
    message = load_error(etc, "[[crank]]\npin_a = 5\n")
    assert message.endswith("[crank] is an array; expected a table")


# --- Values --------------------------------------------------------------------------


def test_error_names_file_key_and_value(etc):
    dropin = write(etc / "conf.d" / "10-pins.toml", '[crank]\npin_a = "GPIO99"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(env={})
    assert str(caught.value).startswith(f'{dropin}: [crank] pin_a = "GPIO99": not a GPIO pin name; expected ')


def test_wrong_type_names_expected_type(etc):
    message = load_error(etc, '[model]\nn_ctx = "512"\n')
    assert message.endswith('[model] n_ctx = "512": a string is the wrong type; expected an integer from 16 to 131072')


def test_boolean_is_not_integer(etc):
    message = load_error(etc, "[model]\nn_ctx = true\n")
    assert "a boolean is the wrong type" in message


def test_float_is_not_integer(etc):
    message = load_error(etc, "[model]\nn_ctx = 512.0\n")
    assert "a float is the wrong type" in message


def test_integer_is_accepted_as_float(etc):
    config = load_text(etc, "[crank]\nlong_press = 2\n")
    assert config.crank.long_press == 2.0
    assert isinstance(config.crank.long_press, float)


def test_out_of_range_names_range(etc):
    message = load_error(etc, "[model]\ntop_p = 1.5\n")
    assert message.endswith("[model] top_p = 1.5: out of range; expected a number from 0 to 1")


def test_exclusive_lower_bound(etc):
    message = load_error(etc, "[model]\nrepeat_penalty = 0\n")
    assert message.endswith("expected a number greater than 0")


def test_nan_is_rejected(etc):
    message = load_error(etc, "[model]\ntemperature = nan\n")
    assert "not a finite number" in message


def test_choice_lists_options(etc):
    message = load_error(etc, '[model]\ncontext_policy = "wrap"\n')
    assert message.endswith('not a valid choice; expected one of "shift", "restart", "stop"')


def test_choice_of_integers(etc):
    assert load_text(etc, "[crank]\ntransitions_per_detent = 2\n").crank.transitions_per_detent == 2
    message = load_error(etc, "[crank]\ntransitions_per_detent = 3\n")
    assert message.endswith("expected one of 4, 2")


@pytest.mark.parametrize(
    ("text", "expected"),
    [('"0x3D"', 0x3D), ('"0x3c"', 0x3C), ("61", 61), ("0x3C", 0x3C), ('"auto"', "auto")],
)
def test_i2c_address_normalised(etc, text, expected):
    assert load_text(etc, f"[display]\ni2c_address = {text}\n").display.i2c_address == expected


@pytest.mark.parametrize("text", ['"3C"', '"0x80"', "2", '"0x"', "true"])
def test_i2c_address_rejected(etc, text):
    message = load_error(etc, f"[display]\ni2c_address = {text}\n")
    assert "expected an I2C address from 0x03 to 0x77" in message


def test_seed_integer(etc):
    assert load_text(etc, "[model]\nseed = 42\n").model.seed == 42


@pytest.mark.parametrize("text", ['"42"', "-1", "4294967295", "1.0"])
def test_seed_rejected(etc, text):
    message = load_error(etc, f"[model]\nseed = {text}\n")
    assert message.endswith('expected an integer from 0 to 4294967294 or "random"')


@pytest.mark.parametrize(("text", "expected"), [("true", True), ("false", False), ('"auto"', "auto")])
def test_extra_buffer_types(etc, text, expected):
    assert load_text(etc, f"[model]\nextra_buffer_types = {text}\n").model.extra_buffer_types == expected


def test_extra_buffer_types_rejected(etc):
    message = load_error(etc, '[model]\nextra_buffer_types = "yes"\n')
    assert message.endswith('expected "auto", true or false')


def test_spi_speed_must_suit_luma(etc):
    message = load_error(etc, "[display]\nspi_bus_speed_hz = 10000000\n")
    assert "expected one of 500000, 1000000" in message


def test_baudrate_must_be_standard(etc):
    message = load_error(etc, "[serial]\nbaudrate = 115201\n")
    assert "not a valid choice" in message


def test_prompt_list_rejects_empty_item(etc):
    message = load_error(etc, '[prompts]\nlist = ["Hello", "  "]\n')
    assert message.endswith("item 1 is empty; expected an array of non-empty strings")


def test_prompt_list_rejects_non_string(etc):
    message = load_error(etc, '[prompts]\nlist = ["Hello", 3]\n')
    assert "item 1 is an integer" in message


def test_dropin_replaces_whole_list(etc):
    write(etc / "crankllm.toml", '[prompts]\nlist = ["a", "b"]\n')
    write(etc / "conf.d" / "10-p.toml", '[prompts]\nlist = ["c"]\n')
    assert load_config(env={}).prompts.list == ["c"]


def test_invalid_overridden_value_is_still_error(etc):
    write(etc / "crankllm.toml", "[model]\nn_ctx = 8\n")
    write(etc / "conf.d" / "10-fix.toml", "[model]\nn_ctx = 1024\n")
    with pytest.raises(ConfigError, match=r"crankllm.toml: \[model\] n_ctx = 8: out of range"):
        load_config(env={})


# --- Pins ----------------------------------------------------------------------------


def test_pin_names_match_gpiozero():
    pins = pytest.importorskip("gpiozero.pins.pi")
    board = pins.PiBoardInfo.from_revision(0xA03111)  # a Raspberry Pi 4B
    for pin in board.headers["J8"].pins.values():
        if "gpio" not in pin.interfaces:
            continue
        for name in pin.names:
            assert gpio_number(name) == int(pin.name[4:]), name


@pytest.mark.parametrize("name", ["GPIO28", "BCM99", "BOARD1", "J8:6", "WPI17", "GPIO", "gpio17", "28", -1])
def test_pin_name_rejected(name):
    assert gpio_number(name) is None


def test_pin_as_bcm_integer(etc):
    assert load_text(etc, "[crank]\npin_a = 5\n").crank.pin_a == 5


def test_same_pin_twice_is_error(etc):
    message = load_error(etc, '[crank]\npin_a = "GPIO17"\npin_b = "BOARD11"\n')
    assert message.endswith('[crank] pin_b = "BOARD11": GPIO17 is also [crank] pin_a; expected a different pin for each role')


def test_same_pin_blames_later_file(etc):
    write(etc / "crankllm.toml", "[crank]\npin_button = 5\n")
    dropin = write(etc / "conf.d" / "10-pins.toml", "[crank]\npin_a = 5\n")
    with pytest.raises(ConfigError) as caught:
        load_config(env={})
    assert str(caught.value) == (
        f"{dropin}: [crank] pin_a = 5: GPIO5 is also [crank] pin_button; expected a different pin for each role"
    )


def test_crank_pin_on_i2c_bus_is_error(etc):
    message = load_error(etc, '[crank]\npin_a = "GPIO2"\n')
    assert "GPIO2 is also I2C1 SDA for the display" in message


def test_crank_pin_on_spi_bus_is_error(etc):
    message = load_error(etc, '[display]\ninterface = "spi"\nspi_port = 1\n')
    assert "[crank] pin_a = \"GPIO17\": GPIO17 is also SPI1 CE1 for the display" not in message
    assert "[crank] pin_b = \"GPIO18\": GPIO18 is also SPI1 CE0 for the display" in message


def test_crank_pin_on_display_dc_is_error(etc):
    message = load_error(etc, '[display]\ninterface = "spi"\ngpio_dc = 27\n')
    assert "GPIO27 is also [display] gpio_dc" in message


def test_emulated_display_frees_bus_pins(etc):
    config = load_text(etc, '[display]\ndriver = "terminal"\n[crank]\npin_a = "GPIO2"\n')
    assert config.crank.pin_a == "GPIO2"


def test_crank_pin_on_serial_uart_is_error(etc):
    message = load_error(etc, '[serial]\nmode = "console"\n[crank]\npin_button = 15\n')
    assert "GPIO15 is also UART RXD for [serial] port" in message


def test_display_dc_and_reset_must_differ(etc):
    message = load_error(etc, '[display]\ninterface = "spi"\ngpio_dc = 22\ngpio_rst = 22\n')
    assert "gpio_dc and gpio_rst are the same GPIO" in message


# --- Combinations --------------------------------------------------------------------


def test_serial_source_needs_pulses(etc):
    message = load_error(etc, '[crank]\nsource = "serial"\n')
    assert message.endswith('[crank] source = "serial": [serial] mode is "off"; expected source = "gpio", or [serial] mode = "pulses"')


def test_pulses_need_serial_source(etc):
    message = load_error(etc, '[serial]\nmode = "pulses"\n')
    assert '[serial] mode = "pulses": [crank] source is "gpio"' in message


def test_serial_source_with_pulses(etc):
    config = load_text(etc, '[crank]\nsource = "serial"\n[serial]\nmode = "pulses"\nport = "/dev/ttyUSB0"\n')
    assert config.crank.source == "serial"


def test_detents_and_tokens_not_both_above_one(etc):
    message = load_error(etc, "[crank]\ndetents_per_token = 2\ntokens_per_detent = 3\n")
    assert "detents_per_token and tokens_per_detent are both above 1" in message


def test_png_driver_needs_output(etc):
    message = load_error(etc, '[display]\ndriver = "png"\n')
    assert message.endswith('[display] output = "": the png driver writes a file; expected the path of the file to write')


def test_relative_output_is_taken_from_config_folder(etc):
    config = load_text(etc, '[display]\ndriver = "gif"\noutput = "out/demo.gif"\n')
    assert config.display.output == str(etc / "out" / "demo.gif")


# --- Model path and prompts -----------------------------------------------------------


def test_missing_model_path_is_error(etc):
    message = load_error(etc, '[model]\npath = "/nowhere/model.gguf"\n')
    assert message == (
        f'{etc / "crankllm.toml"}: [model] path = "/nowhere/model.gguf": file not found; '
        'expected an existing GGUF file, or "" for the prepared default model'
    )


def test_model_path_relative_to_config(etc):
    (etc / "models").mkdir()
    (etc / "models" / "tiny.gguf").write_bytes(b"GGUF")
    config = load_text(etc, '[model]\npath = "models/tiny.gguf"\n')
    assert config.model.path == str(etc / "models" / "tiny.gguf")


def test_model_path_folder_is_error(etc):
    message = load_error(etc, f'[model]\npath = "{etc}"\n')
    assert "not a regular file" in message


def test_prompt_file_appends_prompts(etc):
    write(etc / "prompts.txt", "\ufeff# my prompts\n\nFirst extra.\n  Second extra.  \n   # indented comment\n")
    config = load_text(etc, '[prompts]\nlist = ["Listed."]\nfile = "prompts.txt"\n')
    assert config.all_prompts == ("Listed.", "First extra.", "Second extra.")
    assert config.prompts.list == ["Listed."]


def test_prompt_file_alone_is_enough(etc):
    write(etc / "prompts.txt", "Only one.\n")
    config = load_text(etc, '[prompts]\nlist = []\nfile = "prompts.txt"\n')
    assert config.all_prompts == ("Only one.",)


def test_missing_prompt_file_is_error(etc):
    message = load_error(etc, '[prompts]\nfile = "none.txt"\n')
    assert message.endswith(f'[prompts] file = "{etc / "none.txt"}": file not found; expected a UTF-8 text file with one prompt per line')


def test_prompt_file_invalid_utf8(etc):
    (etc / "bad.txt").write_bytes(b"ok\n\xff\n")
    message = load_error(etc, '[prompts]\nfile = "bad.txt"\n')
    assert "line 2 is not valid UTF-8" in message


def test_no_prompts_is_error(etc):
    write(etc / "empty.txt", "# nothing here\n\n")
    message = load_error(etc, '[prompts]\nlist = []\nfile = "empty.txt"\n')
    assert "no prompts; expected at least one prompt" in message


# --- Folders and sockets from the environment ----------------------------------------------


def test_transcripts_dir_under_service(etc):
    config = load_config(env={"STATE_DIRECTORY": "/var/lib/crankllm:/var/lib/other"})
    assert config.effective_transcripts_dir == "/var/lib/crankllm/transcripts"


def test_transcripts_dir_from_xdg(etc):
    config = load_config(env={"XDG_DATA_HOME": "/home/u/data", "HOME": "/home/u"})
    assert config.effective_transcripts_dir == "/home/u/data/crankllm/transcripts"


def test_transcripts_dir_from_home(etc):
    config = load_config(env={"HOME": "/home/u"})
    assert config.effective_transcripts_dir == "/home/u/.local/share/crankllm/transcripts"


def test_transcripts_dir_configured(etc):
    config = load_text(etc, '[transcripts]\ndir = "/srv/stories"\n')
    assert config.effective_transcripts_dir == "/srv/stories"


def test_control_socket_under_service(etc):
    config = load_config(env={"RUNTIME_DIRECTORY": "/run/crankllm", "XDG_RUNTIME_DIR": "/run/user/1000"})
    assert config.effective_control_socket == "/run/crankllm/control.sock"


def test_control_socket_from_xdg(etc):
    config = load_config(env={"XDG_RUNTIME_DIR": "/run/user/1000"})
    assert config.effective_control_socket == "/run/user/1000/crankllm/control.sock"


def test_control_socket_fallback(etc):
    assert load_config(env={}).effective_control_socket == "/run/crankllm/control.sock"


def test_control_socket_too_long(etc):
    long_path = "/run/" + "x" * 110 + ".sock"
    message = load_error(etc, f'[service]\ncontrol_socket = "{long_path}"\n')
    assert "longer than 107 bytes" in message


# --- The config object -----------------------------------------------------------------


def test_sections_are_read_only(etc):
    config = load_config(env={})
    with pytest.raises(AttributeError):
        config.crank.pin_a = "GPIO5"


def test_attribute_typo_suggests_key(etc):
    config = load_config(env={})
    with pytest.raises(AttributeError, match="did you mean 'pin_a'"):
        config.crank.pin_aa


def test_source_of_unknown_key(etc):
    with pytest.raises(KeyError):
        load_config(env={}).source_of("crank", "pin_c")


def test_as_dict_is_a_copy(etc):
    config = load_config(env={})
    config.as_dict()["prompts"]["list"].append("changed")
    assert "changed" not in config.prompts.list


# --- Rendering --------------------------------------------------------------------------


def test_render_round_trips(etc):
    write(etc / "crankllm.toml", '[prompts]\nlist = ["Say \\"hi\\"\\n", "tab\\there"]\n[display]\ni2c_address = "0x3D"\n')
    config = load_config(env={})
    assert tomllib.loads(render_config(config)) == config.as_dict()


def test_render_names_sources(etc):
    main = write(etc / "crankllm.toml", "[model]\nn_ctx = 1024\n")
    text = render_config(load_config(env={}))
    assert f"n_ctx = 1024  # {main}\n" in text
    assert "n_batch = 64  # built-in default\n" in text


def test_render_shows_resolved_folders(etc):
    text = render_config(load_config(env={"STATE_DIRECTORY": "/var/lib/crankllm"}))
    assert 'dir = ""  # built-in default; resolves to /var/lib/crankllm/transcripts\n' in text


def test_render_counts_prompt_file(etc):
    write(etc / "prompts.txt", "a\nb\n")
    text = render_config(load_text(etc, '[prompts]\nfile = "prompts.txt"\n'))
    assert "# [prompts] file adds 2 prompts after the list." in text


# --- The shipped example config ------------------------------------------------------------


def shipped_text():
    return resources.files("appliance").joinpath("data/crankllm.toml").read_text(encoding="utf-8")


def test_shipped_config_has_every_key():
    data = tomllib.loads(shipped_text())
    assert set(data) == set(SCHEMA)
    for section, keys in SCHEMA.items():
        assert set(data[section]) == set(keys), section


def test_shipped_config_values_are_defaults():
    data = tomllib.loads(shipped_text())
    for section, keys in SCHEMA.items():
        for key, spec in keys.items():
            assert spec.check(data[section][key], "/") == spec.default, f"[{section}] {key}"


def test_shipped_config_documents_every_key():
    lines = shipped_text().splitlines()
    section = None
    documented = set()
    for index, line in enumerate(lines):
        if line.startswith("["):
            section = line.strip("[]")
        match = re.match(r"(\w+) = ", line)
        if match:
            assert lines[index - 1].startswith("# "), f"[{section}] {match.group(1)} has no comment above it"
            documented.add((section, match.group(1)))
    assert documented == {(section, key) for section, keys in SCHEMA.items() for key in keys}


def test_shipped_config_loads(etc, tmp_path):
    shipped = write(tmp_path / "shipped" / "crankllm.toml", shipped_text())
    assert load_config(shipped, env={}).as_dict() == load_config(env={}).as_dict()
