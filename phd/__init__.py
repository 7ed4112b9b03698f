"""phd: a PHD-style integration test framework for a VMM server and Crucible-style storage.

The public API is what a test author touches; everything else is private to its module.
"""

from phd.client import InstanceState
from phd.crucible import CrucibleDisk
from phd.downstairs import Downstairs
from phd.dsc import DownstairsSet, RegionGeometry
from phd.errors import (
    ArtifactUnavailable,
    HarnessError,
    PhdError,
    ServerError,
    SutError,
    SutTimeout,
    WaitTimeout,
)
from phd.factory import DiskFactory, VmFactory
from phd.guest import CommandResult, GuestCommandError
from phd.lifecycle import Action, run_lifecycle
from phd.ssh import SshCommandError, SshResult, SshSession
from phd.status import StatusCheck, check_err, check_ok, ignore_status
from phd.vm import FileDisk, TestVm, VmConfig
from phd.volume_status import DownstairsStatus, VolumeStatus
from phd.wait import wait_until

__all__ = [
    "Action",
    "ArtifactUnavailable",
    "CommandResult",
    "CrucibleDisk",
    "DiskFactory",
    "Downstairs",
    "DownstairsSet",
    "DownstairsStatus",
    "FileDisk",
    "GuestCommandError",
    "HarnessError",
    "InstanceState",
    "PhdError",
    "RegionGeometry",
    "ServerError",
    "SshCommandError",
    "SshResult",
    "SshSession",
    "StatusCheck",
    "SutError",
    "SutTimeout",
    "TestVm",
    "VmConfig",
    "VmFactory",
    "VolumeStatus",
    "WaitTimeout",
    "check_err",
    "check_ok",
    "ignore_status",
    "run_lifecycle",
    "wait_until",
]
