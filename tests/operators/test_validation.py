"""Unit tests of operators.validation: every bad value is refused with the field's name."""

from __future__ import annotations

import pytest

from operators import defaults
from operators.rules.validation import ParamError, validate_build, validate_cidr, validate_mirror_url

SETTINGS = {"ssh_address": "public_ip", "ssh_cidr": "203.0.113.0/24", "subnet_id": "subnet-0123456789abcdef0"}


def test_defaults_fill_in() -> None:
    params = validate_build({}, SETTINGS)
    assert params.recipe == defaults.DEFAULT_RECIPE
    assert params.subnet_id == SETTINGS["subnet_id"]
    assert params.canvas_size_gib == defaults.DEFAULT_CANVAS_SIZE_GIB
    assert params.ami_name_prefix == f"amibake-{defaults.DEFAULT_RECIPE}"
    assert params.encrypted is True
    assert params.as_dict()["ssh_cidr"] == "203.0.113.0/24"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recipe", "ubuntu"),
        ("base_ami", "ami-XYZ"),
        ("instance_type", "t3 medium"),
        ("subnet_id", "subnet-; rm -rf /"),
        ("canvas_size_gib", 0),
        ("canvas_size_gib", 16385),
        ("canvas_size_gib", "eight"),
        ("canvas_size_gib", " 8"),
        ("canvas_size_gib", 8.5),
        ("canvas_size_gib", True),
        ("ami_name_prefix", "bad*name"),
        ("ami_name_prefix", "x" * 97),
        ("mirror_url", "ftp://mirror.example/"),
        ("mirror_url", "http://mirror.example/$(reboot)"),
        ("mirror_url", "http://mirror.example/ x"),
        ("mirror_url", "https://user:pass@mirror.example/centos"),
        ("mirror_url", "https://mirror.example/centos?token=abc"),
        ("mirror_url", "https://mirror.example/centos#top"),
        ("mirror_url", "file:///srv/mirror"),
        ("device_name", "/dev/sda"),
        ("device_name", "/dev/sdq"),
        ("kms_key_id", "not a key"),
        ("boot_check", "maybe"),
        ("instance_profile", "bad profile"),
        ("base_ami_owner", "someone"),
        ("recipe", 7),
    ],
)
def test_bad_value_names_its_field(field: str, value: object) -> None:
    with pytest.raises(ParamError) as err:
        validate_build({field: value}, SETTINGS)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_base_ami_filter_checked_only_without_an_id() -> None:
    assert validate_build({"base_ami": "ami-0123456789abcdef0", "base_ami_owner": "?"}, SETTINGS).base_ami
    with pytest.raises(ParamError, match="^base_ami_name: "):
        validate_build({"base_ami_name": "name;reboot"}, SETTINGS)


def test_subnet_is_required() -> None:
    with pytest.raises(ParamError, match="^subnet_id: is required"):
        validate_build({}, {**SETTINGS, "subnet_id": ""})


def test_ssh_cidr_has_no_default_but_connection_mode_needs_none() -> None:
    with pytest.raises(ParamError, match="^ssh_cidr: .*never 0.0.0.0/0"):
        validate_build({}, {**SETTINGS, "ssh_cidr": ""})
    assert validate_build({}, {**SETTINGS, "ssh_cidr": "", "ssh_address": "connection"}).ssh_cidr == ""


def test_ssh_address_must_be_known() -> None:
    with pytest.raises(ParamError, match="^ssh_address: "):
        validate_build({}, {**SETTINGS, "ssh_address": "dns"})


def test_kms_key_needs_encryption() -> None:
    ok = validate_build({"kms_key_id": "alias/amibake"}, SETTINGS)
    assert ok.kms_key_id == "alias/amibake"
    with pytest.raises(ParamError, match="^kms_key_id: given but encrypted is false"):
        validate_build({"kms_key_id": "alias/amibake", "encrypted": False}, SETTINGS)


def test_cidr_and_mirror_rules() -> None:
    assert validate_cidr("10.0.0.0/8") == "10.0.0.0/8"
    with pytest.raises(ParamError, match="^ssh_cidr: "):
        validate_cidr("10.0.0.1/8")  # host bits set: probably a typo
    assert validate_mirror_url("https://vault.centos.org/7.9.2009") == "https://vault.centos.org/7.9.2009"
    assert validate_mirror_url("") == ""


def test_mirror_errors_name_the_reason_without_credentials() -> None:
    """One rule with the box (contract.env); the message says why and never repeats a password."""
    with pytest.raises(ParamError, match=r"^mirror_url: must not hold credentials") as err:
        validate_mirror_url("https://user:s3cret@mirror.example/centos")
    assert "s3cret" not in str(err.value) and "https://***@mirror.example/centos" in str(err.value)
    with pytest.raises(ParamError, match=r"^mirror_url: must not have a query or fragment"):
        validate_mirror_url("https://mirror.example/centos?a=b")
    with pytest.raises(ParamError, match=r"^mirror_url: must start with http:// or https://"):
        validate_mirror_url("file:///srv/mirror")
    assert validate_mirror_url("http://127.0.0.1:8080/debian/") == "http://127.0.0.1:8080/debian/"


def test_canvas_size_is_gp3_range() -> None:
    """1..16384 GiB: what CreateVolume takes for gp3 (contract.env), on both sides."""
    assert validate_build({"canvas_size_gib": 1}, SETTINGS).canvas_size_gib == 1
    assert validate_build({"canvas_size_gib": 16384}, SETTINGS).canvas_size_gib == 16384


def test_form_strings_are_accepted() -> None:
    params = validate_build({"canvas_size_gib": "12", "boot_check": "true", "encrypted": "false"}, SETTINGS)
    assert (params.canvas_size_gib, params.boot_check, params.encrypted) == (12, True, False)


def test_a_run_of_an_image_definition_takes_its_values_and_checks_overrides_as_the_file(tmp_path) -> None:
    """validate_image_build: the definition's recipe, size, mirror and retention; the form's overrides
    checked the same way as the file, a refusal naming the form's field; empty fields keep the file's."""
    from operators.rules import definition
    from operators.rules.validation import validate_image_build

    images = tmp_path / "images"
    images.mkdir()
    (images / "web.yaml").write_text(
        "name: web\nrecipe: debian12\nsize_gib: 5\nmirror: http://mirror.example/debian\n"
        "retention: {keep: 4, deprecate: 1}\n"
    )
    image = definition.load(images / "web.yaml")
    params = validate_image_build(image, {"mirror_url": "", "canvas_size_gib": None}, SETTINGS)
    assert (params.recipe, params.image, params.canvas_size_gib) == ("debian12", "web", 5)
    assert (params.mirror_url, params.keep_amis, params.deprecate_grace) == (
        "http://mirror.example/debian",
        4,
        1,
    )
    assert params.ami_name_prefix == "amibake-web"
    changed = validate_image_build(image, {"canvas_size_gib": 7, "keep_amis": 2}, SETTINGS)
    assert (changed.canvas_size_gib, changed.keep_amis) == (7, 2)
    with pytest.raises(
        ParamError, match=r"^mirror_url: .*credentials never go in a URL.*the definition's mirror"
    ):
        validate_image_build(image, {"mirror_url": "http://u:p@m.example/debian"}, SETTINGS)
    with pytest.raises(ParamError, match=r"^canvas_size_gib: "):
        validate_image_build(image, {"canvas_size_gib": 10**6}, SETTINGS)
