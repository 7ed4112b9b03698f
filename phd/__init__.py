"""phd: a PHD-style integration test framework for a VMM server and Crucible-style storage.

The public API is what a test author touches; everything else is private to its module.
"""

from phd.core.errors import (
    ArtifactUnavailable,
    HarnessError,
    PhdError,
    ServerError,
    SutError,
    SutTimeout,
    WaitTimeout,
)
from phd.core.wait import wait_until
from phd.storage.crucible import CrucibleDisk
from phd.storage.downstairs import Downstairs
from phd.storage.dsc import DownstairsSet, RegionGeometry
from phd.vm.client import InstanceState
from phd.vm.factory import DiskFactory, VmFactory
from phd.vm.guest import CommandResult, GuestCommandError
from phd.vm.lifecycle import Action, run_lifecycle
from phd.vm.serial import GuestPanic
from phd.vm.ssh import SshCommandError, SshResult, SshSession
from phd.vm.status import StatusCheck, check_err, check_ok, ignore_status
from phd.vm.testvm import FileDisk, MigrationFailures, MigrationState, TestVm, VmConfig
from phd.vm.volume_status import DownstairsStatus, VolumeStatus

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
    "GuestPanic",
    "HarnessError",
    "InstanceState",
    "MigrationFailures",
    "MigrationState",
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
