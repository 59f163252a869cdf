"""AWS console links of amibake's resources, shown as operator extra links in the UI."""

from __future__ import annotations

from airflow.providers.amazon.aws.links.base_aws import BASE_AWS_CONSOLE_LINK, BaseAwsLink
from airflow.providers.amazon.aws.links.ec2 import EC2InstanceLink

EC2_CONSOLE = BASE_AWS_CONSOLE_LINK + "/ec2/home?region={region_name}"

__all__ = ["EC2InstanceLink", "SecurityGroupLink", "VolumeLink", "SnapshotLink", "AmiLink"]


class SecurityGroupLink(BaseAwsLink):
    """The build box's temporary security group."""

    name = "Security group"
    key = "_amibake_security_group"
    format_str = EC2_CONSOLE + "#SecurityGroup:groupId={security_group_id}"


class VolumeLink(BaseAwsLink):
    """The canvas volume."""

    name = "Canvas volume"
    key = "_amibake_volume"
    format_str = EC2_CONSOLE + "#VolumeDetails:volumeId={volume_id}"


class SnapshotLink(BaseAwsLink):
    """The snapshot of the canvas."""

    name = "Snapshot"
    key = "_amibake_snapshot"
    format_str = EC2_CONSOLE + "#SnapshotDetails:snapshotId={snapshot_id}"


class AmiLink(BaseAwsLink):
    """The registered AMI."""

    name = "AMI"
    key = "_amibake_ami"
    format_str = EC2_CONSOLE + "#ImageDetails:imageId={image_id}"
