import os
import subprocess
import sys

import pytest

from provisioning.core.replay_id import EARLIEST, LATEST, ReplayId
from provisioning.core.settings import (
    ConfigError,
    Settings,
    load_settings,
    load_settings_leniently,
    redact_url,
)


def _load(monkeypatch, tmp_path, **env):
    monkeypatch.chdir(tmp_path)  # no stray .env
    for key in list(os.environ):
        if key.startswith(("SF_", "WHMCS_", "SMDP_", "SMTP_", "CELERY_", "REDIS_", "LOG_")):
            monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_settings()


def test_defaults_are_valid_without_any_environment(monkeypatch, tmp_path):
    settings = _load(monkeypatch, tmp_path)
    assert settings.sf_provision_event_channel == "/event/OrderProvisionRequested__e"
    assert settings.replay_start() is LATEST
    assert settings.replay_fallback() is EARLIEST


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("SF_EVENTS_REPLAY", "sometimes", "a Pub/Sub replay id is the hex of its bytes"),
        ("SF_EVENTS_REPLAY_FALLBACK", "42", "LATEST or EARLIEST"),
        ("REDIS_URL", "http://localhost", "redis://"),
        ("CELERY_BROKER_URL", "kafka://x", "redis://, sentinel://, amqp://"),
        ("SF_LOGIN_URL", "login.salesforce.com", "URL"),
        ("SF_PRIVATE_KEY_FILE", "/nonexistent/key.pem", "file not found"),
        ("SMTP_PORT", "70000", "65535"),
        ("LOG_FORMAT", "xml", "text"),
        ("SF_PROVISION_EVENT_CHANNEL", "/topic/Orders", "/event/"),
        ("REDIS_SENTINELS", "sentinel-a", "host:port,host:port"),
        ("REDIS_SENTINELS", "sentinel-a:26379,sentinel-b:port", "'sentinel-b:port' is not host:port"),
        ("REDIS_WAIT_TIMEOUT_MS", "0", "greater than or equal to 1"),
        ("WORKER_CPUS", "first", "'first' is not a CPU number or a range of them"),
        ("WORKER_CPUS", "3-1", "ends before it starts"),
    ],
)
def test_each_bad_value_is_named_with_what_is_expected(monkeypatch, tmp_path, variable, value, expected):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, **{variable: value})
    text = info.value.render()
    assert variable in text
    assert expected in text


@pytest.mark.parametrize(("value", "kept"), [("1", "1"), ("0,1,2", "0-2"), ("3, 1", "1,3"), ("", None)])
def test_worker_cpus_are_kept_as_the_kernel_writes_them_and_empty_is_unpinned(
    monkeypatch, tmp_path, value, kept
):
    assert _load(monkeypatch, tmp_path, WORKER_CPUS=value).worker_cpus == kept


@pytest.mark.parametrize("variable", ["SF_PRIVATE_KEY_FILE", "TLS_CA_BUNDLE"])
def test_a_directory_given_as_a_file_is_named_a_directory_not_a_file(monkeypatch, tmp_path, variable):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, **{variable: str(tmp_path)})
    assert info.value.problems == [(variable, f"is a directory, not a file: {tmp_path}")]


def test_a_key_file_this_user_cannot_read_is_named_permission_denied(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o000)
    code = (
        "import sys; from pathlib import Path; from provisioning.core.settings import unreadable_file; "
        "print(unreadable_file(Path(sys.argv[1])))"
    )
    argv = [sys.executable, "-c", code, str(key)]
    if os.geteuid() == 0:
        # root reads any file: without the capabilities that let it, it is refused like anyone.
        argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert (
        out.stdout.strip()
        == f"permission denied: {key} cannot be read by this user (check its owner and mode)"
    )


def test_a_missing_file_is_named_not_found_and_a_readable_one_passes(tmp_path):
    from provisioning.core.settings import unreadable_file

    assert unreadable_file(tmp_path / "nope.pem") == f"file not found: {tmp_path / 'nope.pem'}"
    (tmp_path / "key.pem").write_text("key")
    assert unreadable_file(tmp_path / "key.pem") is None


def test_leniently_every_invalid_setting_is_listed_and_the_valid_ones_are_kept(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("SF_", "WHMCS_", "SMDP_", "SMTP_", "CELERY_", "REDIS_", "LOG_", "TLS_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    env = {
        "SF_PRIVATE_KEY_FILE": str(tmp_path / "missing.pem"),
        "SMTP_PORT": "70000",
        "SMTP_HOST": "mail.example.test",
        "REDIS_SENTINELS": "10.0.0.5:26379",  # no REDIS_SENTINEL_MASTER
        "WHMCS_URL": "https://billing.example.test",
        "LOG_LEVEL": "LOUD",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings, error = load_settings_leniently()
    assert error is not None
    assert sorted(var for var, _ in error.problems) == [
        "LOG_LEVEL",
        "REDIS_SENTINEL_MASTER",
        "SF_PRIVATE_KEY_FILE",
        "SMTP_PORT",
    ]
    # Not used: the invalid ones, and the sentinels, which mean nothing without their master's name.
    assert error.fields == {
        "log_level",
        "redis_sentinel_master",
        "redis_sentinels",
        "sf_private_key_file",
        "smtp_port",
    }
    assert settings.sentinel_addresses == []
    assert settings.sf_private_key_file is None
    # What is valid is kept, for the probes that use only that.
    assert str(settings.whmcs_url) == "https://billing.example.test/"
    assert settings.smtp_host == "mail.example.test"
    # The strict load (every other command) refuses the same environment, listing the same problems.
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert sorted(info.value.problems) == sorted(error.problems)


def test_leniently_valid_settings_give_no_error(monkeypatch, tmp_path):
    _load(monkeypatch, tmp_path)
    settings, error = load_settings_leniently()
    assert error is None
    assert settings.celery_queue == "provisioning"


def test_every_bad_variable_is_listed_in_one_message(monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, SF_EVENTS_REPLAY="x", SMTP_PORT="0", LOG_LEVEL="LOUD")
    variables = [var for var, _ in info.value.problems]
    assert sorted(variables) == ["LOG_LEVEL", "SF_EVENTS_REPLAY", "SMTP_PORT"]


def test_a_secret_value_is_never_echoed_in_the_error(monkeypatch, tmp_path):
    # A secret with an invalid type cannot happen for SecretStr, so check the repr of a valid one instead.
    settings = _load(monkeypatch, tmp_path, WHMCS_SECRET="s3cr3t-value", SMTP_PASSWORD="pw-value")
    assert "s3cr3t-value" not in repr(settings)
    assert "pw-value" not in str(settings)
    assert settings.to_env()["WHMCS_SECRET"] == "s3cr3t-value"


def test_the_env_file_named_by_provisioning_env_file_is_read(monkeypatch, tmp_path):
    env_file = tmp_path / "custom.env"
    env_file.write_text("CELERY_QUEUE=from-file\n")
    settings = _load(monkeypatch, tmp_path, PROVISIONING_ENV_FILE=str(env_file))
    assert settings.celery_queue == "from-file"


def test_the_environment_wins_over_the_env_file(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("CELERY_QUEUE=from-file\n")
    settings = _load(monkeypatch, tmp_path, CELERY_QUEUE="from-env")
    assert settings.celery_queue == "from-env"


def test_redact_url_hides_the_password_only():
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    # kombu's failover lists (sentinel://...;sentinel://...): every URL's password.
    assert redact_url("sentinel://:pw@a:26379/1;sentinel://:pw@b:26379/1") == (
        "sentinel://:***@a:26379/1;sentinel://:***@b:26379/1"
    )
    assert redact_url("amqp://guest:guest@127.0.0.1:5672//") == "amqp://guest:***@127.0.0.1:5672//"
    assert redact_url("redis://host:6379/0") == "redis://host:6379/0"


def test_settings_are_not_read_when_the_package_is_imported(tmp_path):
    # A broken environment must not break an import (only the process entry point reads it).
    env = {**os.environ, "SF_EVENTS_REPLAY": "sometimes"}
    code = "import provisioning.core.settings, provisioning.cli, tasks, celeryconfig; print('imported')"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "imported" in out.stdout


def test_require_names_every_missing_variable():
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    with pytest.raises(ConfigError) as info:
        settings.require("whmcs_url", "smtp_host")
    assert [v for v, _ in info.value.problems] == ["WHMCS_URL", "SMTP_HOST"]


def test_the_pubsub_transport_is_the_default_with_salesforces_endpoint(monkeypatch, tmp_path):
    settings = _load(monkeypatch, tmp_path)
    assert settings.sf_events_transport == "pubsub"
    assert settings.sf_pubsub_endpoint == "api.pubsub.salesforce.com:7443"
    assert settings.sf_pubsub_batch_size == 100
    assert settings.sf_pubsub_keepalive_timeout_s > 270


@pytest.mark.parametrize(
    ("transport", "value", "expected"),
    [
        ("pubsub", "LATEST", "LATEST"),
        ("pubsub", "earliest", "EARLIEST"),
        ("pubsub", "-2", "EARLIEST"),
        ("pubsub", "00000000000018AF", bytes.fromhex("00000000000018af")),
        ("pubsub", "0x00ff", b"\x00\xff"),
        ("pubsub", "1234", b"\x12\x34"),
        ("cometd", "1234", b"1234"),
        ("cometd", "-1", "LATEST"),
    ],
)
def test_an_explicit_replay_id_is_read_as_the_transport_spells_it(
    monkeypatch, tmp_path, transport, value, expected
):
    settings = _load(monkeypatch, tmp_path, SF_EVENTS_TRANSPORT=transport, SF_EVENTS_REPLAY=value)
    start = settings.replay_start()
    if isinstance(start, ReplayId):
        assert start.transport == transport
    assert start.value == expected


@pytest.mark.parametrize(
    ("transport", "value", "kept"),
    [
        ("pubsub", "0x00FF", "00ff"),
        ("pubsub", "-2", "EARLIEST"),
        ("cometd", "0042", "42"),
        ("cometd", "latest", "LATEST"),
    ],
)
def test_the_replay_setting_is_kept_in_the_form_the_logs_print(monkeypatch, tmp_path, transport, value, kept):
    settings = _load(monkeypatch, tmp_path, SF_EVENTS_TRANSPORT=transport, SF_EVENTS_REPLAY=value)
    assert settings.sf_events_replay == kept


@pytest.mark.parametrize(
    ("transport", "value", "expected"),
    [
        ("cometd", "00ff", "a CometD replay id is an integer"),
        ("pubsub", "123", "a Pub/Sub replay id is the hex of its bytes"),
        ("pubsub", "-7", "a Pub/Sub replay id is the hex of its bytes"),
    ],
)
def test_a_replay_id_the_transport_cannot_use_is_refused_naming_the_variable(
    monkeypatch, tmp_path, transport, value, expected
):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, SF_EVENTS_TRANSPORT=transport, SF_EVENTS_REPLAY=value)
    assert [var for var, _ in info.value.problems] == ["SF_EVENTS_REPLAY"]
    assert expected in info.value.render()


@pytest.mark.parametrize("value", ["0", "101", "x"])
def test_a_pubsub_batch_size_outside_1_to_100_is_refused(monkeypatch, tmp_path, value):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, SF_PUBSUB_BATCH_SIZE=value)
    assert "SF_PUBSUB_BATCH_SIZE" in info.value.render()


def test_a_transport_other_than_pubsub_or_cometd_is_refused(monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, SF_EVENTS_TRANSPORT="websocket")
    assert "'pubsub' or 'cometd'" in info.value.render()


def test_sentinels_without_the_master_name_are_refused_naming_what_to_set(monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, REDIS_SENTINELS="10.0.0.5:26379,10.0.0.6:26379")
    assert [v for v, _ in info.value.problems] == ["REDIS_SENTINEL_MASTER"]
    assert "sentinel monitor <name>" in info.value.render()
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, CELERY_BROKER_URL="sentinel://10.0.0.5:26379;sentinel://10.0.0.6:26379")
    assert [v for v, _ in info.value.problems] == ["CELERY_BROKER_SENTINEL_MASTER"]
    assert "REDIS_SENTINEL_MASTER" in info.value.render()


def test_sentinel_settings_give_the_addresses_and_the_broker_its_master_name_and_sentinel_password(
    monkeypatch, tmp_path
):
    import celeryconfig

    settings = _load(
        monkeypatch,
        tmp_path,
        REDIS_SENTINELS=" 10.0.0.5:26379, [fd00::7]:26380 ",
        REDIS_SENTINEL_MASTER="ledger",
        REDIS_SENTINEL_PASSWORD="sentinel-pw-value",
        CELERY_BROKER_URL="sentinel://10.0.0.5:26379/1;sentinel://10.0.0.6:26379/1",
    )
    assert settings.sentinel_addresses == [("10.0.0.5", 26379), ("fd00::7", 26380)]
    assert settings.redis_sentinels == "10.0.0.5:26379,[fd00::7]:26380"
    assert "sentinel-pw-value" not in repr(settings)
    config = celeryconfig.build(settings)
    options = config["broker_transport_options"]
    assert options["master_name"] == "ledger"  # the ledger's, unless CELERY_BROKER_SENTINEL_MASTER
    assert options["sentinel_kwargs"]["password"] == "sentinel-pw-value"
    # kombu's Sentinel transport, closing a lost connection without stopping the worker.
    assert config["broker_transport"] == "provisioning.core.broker:SentinelTransport"
    assert options["visibility_timeout"] == settings.celery_visibility_timeout_s


def test_a_rabbitmq_cluster_is_given_as_every_nodes_url_and_gets_the_confirming_transport(
    monkeypatch, tmp_path
):
    import celeryconfig

    url = "amqp://u:pw@10.0.0.10:5672//;amqp://u:pw@10.0.0.11:5672//;amqp://u:pw@10.0.0.12:5672//"
    settings = _load(monkeypatch, tmp_path, CELERY_BROKER_URL=url, CELERY_QUEUE_TYPE="quorum")
    assert settings.broker_is_rabbitmq
    config = celeryconfig.build(settings)
    assert config["broker_url"] == url  # kombu fails over along the list
    assert config["broker_transport"] == "provisioning.core.broker:AmqpTransport"
    assert config["broker_transport_options"]["confirm_publish"] is True
    # The delayed delivery (countdown retries) set up on one node of the cluster, not on each.
    assert config["worker_consumer"] == "provisioning.core.worker_consumer:Consumer"
    assert redact_url(url).count("u:***@") == 3


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://10.0.0.10//;redis://10.0.0.11:6379/1", "are of different brokers (amqp, redis)"),
        ("amqp://10.0.0.10//;10.0.0.11:5672", "the nodes of one broker separated by ';'"),
    ],
)
def test_a_broker_list_mixing_brokers_or_without_schemes_is_refused(monkeypatch, tmp_path, url, expected):
    with pytest.raises(ConfigError) as info:
        _load(monkeypatch, tmp_path, CELERY_BROKER_URL=url)
    assert [var for var, _ in info.value.problems] == ["CELERY_BROKER_URL"]
    assert expected in info.value.render()


@pytest.mark.parametrize(
    ("url", "transport"),
    [
        ("redis://127.0.0.1:6379/1", "provisioning.core.broker:Transport"),
        ("amqp://guest:guest@127.0.0.1:5672//", "provisioning.core.broker:AmqpTransport"),
        ("amqps://guest:guest@rabbit.example:5671//", "provisioning.core.broker:AmqpSSLTransport"),
    ],
)
def test_each_broker_url_gets_the_transport_that_batches_its_publishes(monkeypatch, tmp_path, url, transport):
    import celeryconfig

    config = celeryconfig.build(_load(monkeypatch, tmp_path, CELERY_BROKER_URL=url))
    assert config["broker_transport"] == transport
